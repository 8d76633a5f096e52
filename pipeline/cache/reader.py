"""Reading a hidden-state cache: ``open_cache(path)`` -> a sequence of samples as torch tensors.

    c = open_cache("caches/sample")
    len(c), c.info["captured_layers"]
    s = c[0]   # input_ids [T], loss_mask [T], hidden_states {layer: [T, H]}, final_hidden [T, H],
               # inputs_embeds [T, H] (audio positions filled with the merged audio embeddings), key, shard

Opening reads the manifest only (one entry per part, none per sample); a part's commit file and arrays are
opened on first use, so a cache of ten million samples opens as fast as one of ten.
"""

from __future__ import annotations

import bisect
import json
import warnings
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import zarr

from pipeline.cache.format import (
    COMMIT,
    HEAD_WEIGHTS,
    MANIFEST,
    PARTS,
    STORED_DTYPES,
    from_stored,
    hidden_name,
    read_json,
)
from pipeline.errors import CacheError


class CachePart:
    """The committed samples of one input shard."""

    def __init__(self, path: Path, num_samples: int):
        self.path = path
        self.num_samples = num_samples
        self._arrays: dict[str, zarr.Array] = {}

    @cached_property
    def commit(self) -> dict:
        return self.read_commit()

    def read_commit(self) -> dict:
        """``commit.json`` read afresh and not kept: a loader walking a huge cache holds only the parts in use."""
        return read_json(self.path / COMMIT)

    @cached_property
    def group(self) -> zarr.Group:
        return zarr.open_group(zarr.storage.LocalStore(self.path, read_only=True), mode="r")

    def array(self, name: str) -> zarr.Array:
        """One array of the part, opened once (opening reads and parses its metadata file)."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Packed rows ``start:stop`` of one array in one read (a run of consecutive samples, split by offsets)."""
        return self.array(name)[start:stop]

    def rows(self, name: str, i: int, audio: bool = False) -> np.ndarray:
        offsets = self.commit["audio_offsets" if audio else "token_offsets"]
        return self.read_rows(name, offsets[i], offsets[i + 1])

    def release(self) -> None:
        """Forget the commit and the open arrays (a loader walking many parts keeps only the recent ones open)."""
        self._arrays.clear()
        for name in ("commit", "group"):
            self.__dict__.pop(name, None)


class HiddenStateCache:
    def __init__(self, root: Path):
        self.root = root
        self.manifest = read_json(root / MANIFEST)
        self.layers: list[int] = self.manifest["captured_layers"]
        self.dtype: str = self.manifest["dtype"]
        self.audio_token_id: int = self.manifest["target"]["audio_token_id"]
        parts = self.manifest.get("parts") if self.manifest.get("complete") else None
        if parts is None:
            warnings.warn(f"{root}: the dump has not finished; reading the parts committed so far", stacklevel=3)
            parts = _scan_parts(root)
        self.parts = [CachePart(root / PARTS / p["name"], p["samples"]) for p in parts]
        self._starts = np.cumsum([0] + [p.num_samples for p in self.parts]).tolist()

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def target(self) -> dict:
        """The target as its adapter described itself at dump time (opaque to the cache: model family specifics)."""
        return self.manifest["target"]

    @property
    def info(self) -> dict:
        m = self.manifest
        return {
            "model": m["target"]["name_or_path"],
            "model_type": m["target"]["model_type"],
            "hidden_size": m["hidden_size"],
            "num_layers": m["num_layers"],
            "vocab_size": m["vocab_size"],
            "captured_layers": self.layers,
            "dtype": self.dtype,
            "codec": m["codec"],
            "num_samples": len(self),
            "counts": m.get("counts", {}),
            "complete": m.get("complete", False),
        }

    def locate(self, index: int) -> tuple[CachePart, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for a cache of {len(self)}")
        p = bisect.bisect_right(self._starts, index) - 1
        return self.parts[p], index - self._starts[p]

    def __getitem__(self, index: int) -> dict:
        part, i = self.locate(index)
        ids = torch.from_numpy(part.rows("input_ids", i).astype(np.int64))
        hidden = {layer: from_stored(part.rows(hidden_name(layer), i), self.dtype) for layer in self.layers}
        audio = from_stored(part.rows("audio_embeds", i, audio=True), self.dtype)
        embeds = self.embed_tokens[ids]
        embeds[ids == self.audio_token_id] = audio
        return {
            "key": part.commit["keys"][i],
            "shard": part.commit["shard"],
            "input_ids": ids,
            "loss_mask": torch.from_numpy(part.rows("loss_mask", i).astype(bool)),
            "hidden_states": hidden,
            "final_hidden": from_stored(part.rows("final_hidden", i), self.dtype),
            "inputs_embeds": embeds,
        }

    @cached_property
    def embed_tokens(self) -> torch.Tensor:
        """The target's input embedding table, memory-mapped (shared by all reader processes, never copied)."""
        return _mmap_safetensor(self.root / HEAD_WEIGHTS, "embed_tokens")

    def head_weights(self) -> dict[str, torch.Tensor]:
        """``embed_tokens``, ``norm``, ``lm_head`` of the target, loaded without pickle."""
        from safetensors.torch import load_file

        return load_file(self.root / HEAD_WEIGHTS)


def open_cache(path: str | Path) -> HiddenStateCache:
    root = Path(path)
    if not (root / MANIFEST).exists():
        raise CacheError(f"{root} is not a hidden-state cache (no {MANIFEST}); run `just dump-hidden` first")
    return HiddenStateCache(root)


def _scan_parts(root: Path) -> list[dict]:
    parts = []
    for commit_path in sorted((root / PARTS).glob(f"*/{COMMIT}")):
        parts.append({"name": commit_path.parent.name, "samples": len(read_json(commit_path)["keys"])})
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
