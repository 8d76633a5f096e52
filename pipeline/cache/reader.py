"""Reading a hidden-state cache: ``open_cache(path)`` -> a sequence of samples as torch tensors.

    c = open_cache("caches/sample")
    len(c), c.info["captured_layers"], c.target   # c.manifest: the typed Manifest
    s = c[0]   # input_ids [T], loss_mask [T], hidden_states {layer: [T, H]}, final_hidden [T, H],
               # inputs_embeds [T, H] (audio positions filled with the merged audio embeddings), key, shard

Opening reads the manifest only (one entry per part, none per sample); a part's commit file and arrays are
opened on first use, so a cache of ten million samples opens as fast as one of ten. Rows are read through
``RowReader`` (``rows.py``), which refuses damaged chunks with a ``CacheError`` naming the part.
"""

from __future__ import annotations

import bisect
import json
import warnings
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from pipeline.cache.format import (
    COMMIT,
    HEAD_WEIGHTS,
    PARTS,
    STORED_DTYPES,
    Manifest,
    PartCommit,
    PartSummary,
    as_stored,
    from_stored,
    hidden_name,
)
from pipeline.cache.rows import RowReader


class CachePart:
    """The committed samples of one input shard."""

    def __init__(self, path: Path, num_samples: int, shard: str):
        self.path = path
        self.num_samples = num_samples
        self.shard = shard

    @property
    def name(self) -> str:
        return self.path.name

    @cached_property
    def commit(self) -> PartCommit:
        return self.read_commit()

    def read_commit(self) -> PartCommit:
        """``commit.json`` read afresh and not kept: a loader walking a huge cache holds only the parts in use."""
        return PartCommit.read(self.path / COMMIT)

    def release(self) -> None:
        """Forget the commit (a loader walking many parts keeps only the recent ones)."""
        self.__dict__.pop("commit", None)


class HiddenStateCache:
    def __init__(self, root: Path, manifest: Manifest):
        self.root = root
        self.manifest = manifest
        self.layers: list[int] = manifest.captured_layers
        self.dtype: str = manifest.dtype
        self.audio_token_id: int = manifest.audio_token_id
        parts = manifest.parts if manifest.complete else None
        if parts is None:
            warnings.warn(f"{root}: the dump has not finished; reading the parts committed so far", stacklevel=3)
            parts = _scan_parts(root)
        self.parts = [CachePart(root / PARTS / p.name, p.samples, p.shard) for p in parts]
        self._starts = np.cumsum([0] + [p.num_samples for p in self.parts]).tolist()

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def target(self) -> dict:
        """The target as its adapter described itself at dump time (opaque to the cache: model family specifics)."""
        return self.manifest.target

    @property
    def info(self) -> dict:
        m = self.manifest
        return {
            "model": m.target.get("name_or_path"),
            "model_type": m.target.get("model_type"),
            "hidden_size": m.hidden_size,
            "num_layers": m.num_layers,
            "vocab_size": m.vocab_size,
            "captured_layers": self.layers,
            "dtype": self.dtype,
            "states": m.codec.states,  # exact or fp8: what the readers decode (always into ``dtype``)
            "codec": m.codec.to_dict(),
            "num_samples": len(self),
            "counts": m.counts,
            "complete": m.complete,
        }

    @cached_property
    def rows(self) -> RowReader:
        """The reader of the packed arrays (checked reads straight from the chunk files)."""
        return RowReader(self)

    def read_rows(self, part: int, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of one packed array of part ``part`` (stored dtype; bf16 as uint16)."""
        return self.rows.read(part, name, start, stop)

    def locate(self, index: int) -> tuple[int, int]:
        """(part, sample within the part) of sample ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for a cache of {len(self)}")
        p = bisect.bisect_right(self._starts, index) - 1
        return p, index - self._starts[p]

    def __getitem__(self, index: int) -> dict:
        p, i = self.locate(index)
        commit = self.parts[p].commit
        a, b = commit.token_offsets[i], commit.token_offsets[i + 1]
        names = ["input_ids", "loss_mask", "final_hidden", *map(hidden_name, self.layers)]
        audio_span = ("audio_embeds", commit.audio_offsets[i], commit.audio_offsets[i + 1])
        spans = [*((name, a, b) for name in names), audio_span]
        ids, mask, final, *hidden, audio = self.rows.read_many(p, spans)  # all chunks decoded in parallel
        ids = ids.astype(np.int64)
        return {
            "key": commit.keys[i],
            "shard": commit.shard,
            "input_ids": torch.from_numpy(ids),
            "loss_mask": torch.from_numpy(mask.astype(bool)),
            "hidden_states": {layer: from_stored(h, self.dtype) for layer, h in zip(self.layers, hidden, strict=True)},
            "final_hidden": from_stored(final, self.dtype),
            "inputs_embeds": self.inputs_embeds(ids, from_stored(audio, self.dtype)),
        }

    def inputs_embeds(self, ids: np.ndarray, audio: torch.Tensor) -> torch.Tensor:
        """What the draft reads: the target's token embeddings, audio positions (in order) filled with ``audio``."""
        embeds = torch.empty((len(ids), self.manifest.hidden_size), dtype=self.embed_tokens.dtype)
        put_rows(embeds, embed_ids(embeds, self.embed_tokens, ids, self.audio_token_id), audio)
        return embeds

    @cached_property
    def embed_tokens(self) -> torch.Tensor:
        """The target's input embedding table, memory-mapped (shared by all reader processes, never copied)."""
        return _mmap_safetensor(self.root / HEAD_WEIGHTS, "embed_tokens")

    def head_weights(self) -> dict[str, torch.Tensor]:
        """``embed_tokens``, ``norm``, ``lm_head`` of the target, loaded without pickle."""
        from safetensors.torch import load_file

        return load_file(self.root / HEAD_WEIGHTS)


def embed_ids(out: torch.Tensor, table: torch.Tensor, ids: np.ndarray, audio_token_id: int) -> np.ndarray:
    """``out[i] = table[ids[i]]`` (through numpy, see ``as_stored``); returns the audio positions, which callers fill
    with the cached audio embeddings (``put_rows``) or leave holding the placeholder's embedding."""
    as_stored(out)[...] = as_stored(table)[ids]
    return np.flatnonzero(ids == audio_token_id)


def put_rows(out: torch.Tensor, positions: np.ndarray, rows: torch.Tensor) -> None:
    """``out[positions] = rows``, cast to ``out``'s dtype."""
    as_stored(out)[positions] = as_stored(rows.to(out.dtype))


def open_cache(path: str | Path) -> HiddenStateCache:
    """Open a cache from its manifest alone; ``CacheError`` if it is none, of another format version, or damaged."""
    root = Path(path)
    return HiddenStateCache(root, Manifest.read(root))


def _scan_parts(root: Path) -> list[PartSummary]:
    """The parts of an unfinished dump, from their commit files."""
    parts = []
    for commit_path in sorted((root / PARTS).glob(f"*/{COMMIT}")):
        c = PartCommit.read(commit_path)
        name = commit_path.parent.name
        parts.append(PartSummary(name, c.shard, c.num_samples, c.tokens, c.audio_tokens, c.raw_bytes, c.complete))
    return parts


def _mmap_safetensor(path: Path, name: str) -> torch.Tensor:
    # safetensors layout: u64 little-endian header size, JSON header, then raw little-endian tensor bytes.
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    entry = header[name]
    dtype_name = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[entry["dtype"]]
    begin, end = entry["data_offsets"]
    storage = np.memmap(
        path,
        dtype=STORED_DTYPES[dtype_name][0],
        mode="r",
        offset=8 + header_len + begin,
        shape=tuple(entry["shape"]),
    )
    with warnings.catch_warnings():  # read-only mapping; we never write through it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(storage).view(STORED_DTYPES[dtype_name][1])
