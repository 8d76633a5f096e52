"""On-disk layout of a hidden-state cache, shared by its writer and its reader.

    CACHE/
      manifest.json            target identity, captured layers, dtype, codec; at the end of a run: parts,
                               counts, rejects (the reader opens a cache from this file alone)
      target_head.safetensors  embed_tokens, norm, lm_head: all stage two needs of the target
      parts/<shard-name>/      one Zarr v3 group per input shard, written by exactly one rank
        commit.json            what is committed: sample keys, token and audio offsets, rejects, position in
                               the shard; replaced atomically, so a reader never sees a half-written sample
        input_ids  loss_mask  final_hidden  hidden_<i> ...   [tokens, ...]  ragged samples packed by offsets
        audio_embeds                                          [audio tokens, H]  merged input embeddings at
                                                              audio positions (text positions = embed_tokens)

Hidden-state arrays are chunked along tokens (``chunk_tokens`` rows, one chunk ~ one compressed file), so a
sequential pass streams whole chunks and a random read of one sample touches one or two chunks per array.
Zarr has no bfloat16: bf16 is stored bit-exact as uint16 and viewed back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from zarr.codecs import BloscCodec

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
HEAD_WEIGHTS = "target_head.safetensors"
PARTS = "parts"
COMMIT = "commit.json"

# torch dtype name -> (numpy dtype it is stored as, torch dtype to view it back as)
STORED_DTYPES = {
    "bfloat16": (np.uint16, torch.bfloat16),
    "float16": (np.float16, torch.float16),
    "float32": (np.float32, torch.float32),
}


@dataclass(frozen=True)
class CodecConfig:
    """Blosc compression of the state arrays (lossless; bitshuffle suits floats best)."""

    cname: str = "zstd"
    clevel: int = 3
    shuffle: str = "bitshuffle"
    chunk_tokens: int = 256

    def compressor(self, itemsize: int) -> BloscCodec:
        return BloscCodec(cname=self.cname, clevel=self.clevel, shuffle=self.shuffle, typesize=itemsize)

    def to_dict(self) -> dict:
        return asdict(self)


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
