"""On-disk layout of a hidden-state cache, shared by its writer and its reader.

    CACHE/
      manifest.json            format version, target identity, captured layers, dtype, codec; at the end of a
                               run: parts, counts, rejects (the reader opens a cache from this file alone)
      target_head.safetensors  embed_tokens, norm, lm_head: all stage two needs of the target
      dump.lock                locked by the dump writing the cache; names it (pid, host, start time)
      parts/<part-name>/       one Zarr v3 group per input shard, written by exactly one rank
        commit.json            what is committed: sample keys, token and audio offsets, rejects, position in
                               the shard; replaced atomically, so a reader never sees a half-written sample
        input_ids  loss_mask  final_hidden  hidden_<i> ...   [tokens, ...]  ragged samples packed by offsets
                                                              (states: [tokens, H], or [tokens, H + 1] uint8 when
                                                              stored as fp8: ``encoding.py``)
        audio_embeds                                          [audio tokens, H]  merged input embeddings at
                                                              audio positions (text positions = embed_tokens)

Hidden-state arrays are chunked along tokens (``chunk_tokens`` rows, one chunk ~ one compressed file), so a
sequential pass streams whole chunks and a random read of one sample touches one or two chunks per array.
Zarr has no bfloat16: bf16 is stored bit-exact as uint16 and viewed back.

Integrity (format version 2): every chunk file ends with a CRC32C of its bytes (zarr's ``crc32c`` codec after
blosc), and every chunk that holds a committed row exists (arrays are written with ``write_empty_chunks``, so an
all-zero chunk is stored too). A reader therefore refuses a corrupted chunk (checksum) and a missing one (a
committed row with no file), instead of reading zeros.

Format version 3 adds ``codec.states``, how the aux and final states are stored: ``exact`` (as in version 2) or
``fp8`` (per-row e4m3 with a power-of-two scale, ``encoding.py``) or ``fp8-audio`` (the audio embeddings too),
and records ``codec.block_kib`` (blosc's block
size). Version 2 caches are read as ``exact`` with blosc's own block size, and a dump resumes them (their manifest
is rewritten as version 3: nothing else differs); a reader refuses a state encoding it does not know. Ids, masks
and the head weights are always stored exactly.

The manifest's ``target`` is the target adapter's ``identity()``: opaque here (the cache knows no model family),
except ``name_or_path`` and ``model_type``, which ``HiddenStateCache.info`` shows. What the cache itself needs
of the target is promoted to typed fields of ``Manifest``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.cache.encoding import StateEncoding, check_readable
from pipeline.errors import CacheError
from pipeline.settings import setting

FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)  # 2: before state encodings (all exact); read as 3 with codec.states "exact"
MANIFEST = "manifest.json"
HEAD_WEIGHTS = "target_head.safetensors"
PARTS = "parts"
COMMIT = "commit.json"
LOCK = "dump.lock"  # held by the one dump writing the cache (``writer.CacheLock``)

# torch dtype name -> (numpy dtype it is stored as, torch dtype to view it back as)
STORED_DTYPES = {
    "bfloat16": (np.uint16, torch.bfloat16),
    "float16": (np.float16, torch.float16),
    "float32": (np.float32, torch.float32),
}


@dataclass(frozen=True)
class CodecConfig:
    """How the arrays are stored: the aux and final states exactly or as fp8 (``states``), then blosc (lossless;
    bitshuffle suits floats and fp8 codes best)."""

    states: StateEncoding = setting(
        "exact",
        "how the aux and final states are stored: exact (lossless, the cache's dtype), fp8 (e4m3 with one "
        "power-of-two scale per token and state: ~half the bytes, relative error <= 2^-4; audio embeddings stay "
        "exact) or fp8-audio (the audio embeddings too); BENCHMARKS.md has their measured cost in acceptance length",
        flag="state-encoding",
    )

    # Defaults chosen on real-size (H=4096) states, BENCHMARKS.md "State encodings and codecs": byte shuffle and
    # 1 MiB blocks let zstd's entropy coder see long sign-and-exponent byte streams: ~20% smaller than bitshuffle
    # in blosc's own blocks (256 KiB: 2% less gain for exact states, 9% for fp8), at level 1 as fast to encode as
    # level 3 was with bitshuffle. The price: a read of a few rows decodes up to 1 MiB per array.
    cname: Literal["zstd", "lz4", "lz4hc", "zlib", "blosclz"] = setting("zstd", "blosc compressor", flag="codec")
    clevel: int = setting(1, "compression level 0-9 (zstd 9 gains little and writes >10x slower)", flag="level")
    shuffle: Literal["bitshuffle", "shuffle", "noshuffle"] = setting(
        "shuffle", "filter before compression (byte shuffle of 1-byte fp8 codes is none)"
    )
    block_kib: int = setting(
        1024, "blosc block size in KiB: the unit a partial read decodes; larger compresses better (0: blosc's)"
    )
    chunk_tokens: int = setting(256, "rows per stored chunk (one compressed file per array)")

    def compressors(self, itemsize: int) -> list:
        """The bytes-to-bytes codecs of every array: blosc, then the chunk's checksum."""
        blosc = BloscCodec(
            cname=self.cname,
            clevel=self.clevel,
            shuffle=self.shuffle,
            typesize=itemsize,
            blocksize=self.block_kib * 1024,
        )
        return [blosc, Crc32cCodec()]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SampleStates:
    """What the writer stores of one sample's forward (CPU tensors); target adapters return this."""

    hidden_states: dict[int, torch.Tensor]  # HF hidden_states index -> [T, H]
    final_hidden: torch.Tensor  # [T, H], post final norm (the lm_head input)
    audio_embeds: torch.Tensor  # [A, H], merged input embeddings at the audio positions, in order


# ------------------------------------------------------------------------------------------- the JSON records


@dataclass
class PartCommit:
    """A part's ``commit.json``: the samples of its shard whose rows are all on disk, and how far the shard went.

    Sample i's rows are ``token_offsets[i]:token_offsets[i + 1]`` of the token arrays and
    ``audio_offsets[i]:audio_offsets[i + 1]`` of ``audio_embeds``."""

    shard: str
    keys: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # index of each sample in its shard, rejects included
    token_offsets: list[int] = field(default_factory=lambda: [0])
    audio_offsets: list[int] = field(default_factory=lambda: [0])
    rejects: list[dict] = field(default_factory=list)  # {"key", "position", "reason"}
    position: int = 0  # samples of the shard dealt with (cached or rejected) and committed
    raw_bytes: int = 0  # uncompressed bytes handed to the writer
    complete: bool = False  # the shard was read to its end
    error: str | None = None  # the shard could not be read to its end: the next run retries it
    writers: list[dict] = field(default_factory=list)  # which rank of which run wrote it, one entry per run

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    @property
    def tokens(self) -> int:
        return self.token_offsets[-1]

    @property
    def audio_tokens(self) -> int:
        return self.audio_offsets[-1]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict, where: Path) -> PartCommit:
        commit = _build(cls, doc, where, "commit record")
        lists = (commit.keys, commit.positions, commit.token_offsets, commit.audio_offsets, commit.rejects)
        if not all(isinstance(x, list) for x in lists):
            raise CacheError(f"{where}: malformed commit record (keys, positions, offsets and rejects are lists)")
        n = len(commit.keys)
        if len(commit.token_offsets) != n + 1 or len(commit.audio_offsets) != n + 1 or len(commit.positions) != n:
            raise CacheError(f"{where}: malformed commit record ({n} keys but offsets or positions of other lengths)")
        return commit

    @classmethod
    def read(cls, path: Path) -> PartCommit:
        return cls.from_dict(_read_record(path, "commit record"), path)

    def write(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict())


@dataclass
class PartSummary:
    """One part as the finished manifest lists it (enough to open the cache without reading any commit)."""

    name: str  # directory under parts/
    shard: str
    samples: int
    tokens: int
    audio_tokens: int
    raw_bytes: int
    complete: bool


@dataclass
class Manifest:
    """``manifest.json``: what the cache holds and how it was made."""

    target: dict  # the target adapter's identity(): opaque to the cache
    audio_token_id: int  # the placeholder id whose rows are the cached merged audio embeddings
    hidden_size: int
    num_layers: int
    vocab_size: int
    captured_layers: list[int]  # HF hidden_states indices stored as hidden_<i>
    dtype: str  # a key of STORED_DTYPES
    codec: CodecConfig
    settings: dict = field(default_factory=dict)  # how the dump ran (max length, audio policy): compared on resume
    shards: list[str] = field(default_factory=list)  # the input shards, one part each
    parts: list[PartSummary] = field(default_factory=list)  # filled in when the dump finishes
    counts: dict = field(default_factory=dict)
    rejects: list[dict] = field(default_factory=list)
    shard_errors: list[dict] = field(default_factory=list)
    complete: bool = False
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict, where: Path) -> Manifest:
        version = doc.get("format_version")
        if version not in READABLE_VERSIONS:
            raise CacheError(
                f"{where.parent} is a cache of format version {version}, but this code reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))} only: dump it again with this version (`just dump-hidden "
                "SHARDS OUT` into a new or emptied directory)"
            )
        if isinstance(doc.get("codec"), dict):  # what earlier writers used without recording it
            doc = {**doc, "codec": {"states": "exact", "block_kib": 0, **doc["codec"]}}
        doc = {**doc, "format_version": FORMAT_VERSION}  # a version 2 cache is a version 3 one with exact states
        manifest = _build(cls, doc, where, "manifest")
        if isinstance(manifest.codec, dict):
            check_readable(manifest.codec.get("states", "exact"), str(where))
        try:
            manifest.codec = CodecConfig(**manifest.codec)
            manifest.parts = [PartSummary(**p) for p in manifest.parts]
        except TypeError as err:
            raise CacheError(f"{where}: malformed manifest ({err}); the cache is damaged") from None
        if not isinstance(manifest.target, dict) or manifest.dtype not in STORED_DTYPES:
            raise CacheError(f"{where}: malformed manifest (target or dtype); the cache is damaged")
        return manifest

    @classmethod
    def read(cls, root: Path) -> Manifest:
        path = root / MANIFEST
        if not path.exists():
            raise CacheError(f"{root} is not a hidden-state cache (no {MANIFEST}); run `just dump-hidden` first")
        return cls.from_dict(_read_record(path, "manifest"), path)

    def write(self, root: Path) -> None:
        write_json_atomic(root / MANIFEST, self.to_dict())


def _read_record(path: Path, what: str) -> dict:
    """A JSON object from ``path``; a missing or unparsable file is a CacheError naming it."""
    try:
        doc = read_json(path)
    except FileNotFoundError:
        raise CacheError(f"{path}: {what} missing; the cache is damaged (re-run the dump to redo it)") from None
    except (OSError, ValueError) as err:  # ValueError: JSON and UTF-8 decoding errors
        raise CacheError(f"{path}: unreadable {what} ({err}); the cache is damaged") from None
    if not isinstance(doc, dict):
        raise CacheError(f"{path}: malformed {what} (not a JSON object); the cache is damaged")
    return doc


def _build(cls, doc: dict, where: Path, what: str):
    """``cls(**doc)`` with a CacheError naming the file for missing or unknown fields."""
    try:
        return cls(**doc)
    except TypeError as err:
        raise CacheError(f"{where}: malformed {what} ({err}); the cache is damaged") from None


# ---------------------------------------------------------------------------------------------------- helpers


def hidden_name(layer: int) -> str:
    return f"hidden_{layer}"


def part_name(shard_url: str) -> str:
    """A stable directory name for an input shard: readable stem plus a hash of the full URL."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(shard_url.split("?")[0]).name)
    stem = re.sub(r"\.(tar|tgz|tar\.gz)$", "", stem)[:80]
    return f"{stem}-{hashlib.sha1(shard_url.encode()).hexdigest()[:8]}"


def to_storable(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as the numpy array it is stored as (bf16 as its uint16 bits)."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.uint16)
    return t.contiguous().numpy()


def from_stored(a: np.ndarray, dtype_name: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).view(STORED_DTYPES[dtype_name][1])


def as_stored(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor in its stored form (bf16 as uint16), sharing its memory: row gathers and
    scatters through numpy ran ~10x faster than torch's index_select / index_put on CPU (4096-wide bf16 rows)."""
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def write_json_atomic(path: Path, doc: dict) -> None:
    """Write-then-rename: readers and killed processes see the old file or the new one, never half of one.

    No fsync: like the chunk files (which zarr also writes then renames), commits rely on the OS page cache,
    which survives a killed process; an fsync per commit would put a disk flush on the writer's path."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)
