"""The draft vocabulary of a cache: the N target tokens seen most often under the loss mask.

Counting reads only the committed rows of the 1-D ``input_ids`` and ``loss_mask`` arrays of each part (through the
cache's checked reader), never a hidden state, so it costs a few bytes per token. The result is stored once per
cache and size, next to the parts:

    CACHE/draft_vocab/size-<N>.safetensors   d2t [N] int64, t2d [V] bool, counts [V] int64
                                             metadata: num_samples (of the cache when counted)
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.cache.reader import HiddenStateCache
from pipeline.draft.model import draft_vocab_from_counts

DRAFT_VOCAB_DIR = "draft_vocab"
READ_ROWS = 1 << 22  # tokens per read: ~20 MB of ids and mask, whatever the part's size


def count_masked_tokens(cache: HiddenStateCache) -> torch.Tensor:
    """How often each target id occurs under the loss mask, over every committed sample -> [vocab] int64."""
    vocab = cache.info["vocab_size"]
    counts = np.zeros(vocab, dtype=np.int64)
    for p, part in enumerate(cache.parts):
        # The arrays may hold rows past the last commit (a crashed or running writer): count committed rows only.
        end = part.commit.tokens
        for start in range(0, end, READ_ROWS):
            stop = min(start + READ_ROWS, end)
            mask = cache.read_rows(p, "loss_mask", start, stop).astype(bool)
            ids = cache.read_rows(p, "input_ids", start, stop)[mask].astype(np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= vocab):
                raise ValueError(f"{part.path}: token id out of range for a vocab of {vocab}")
            counts += np.bincount(ids, minlength=vocab)
        cache.rows.done(p)
    return torch.from_numpy(counts)


def draft_vocab_path(cache: HiddenStateCache, size: int) -> Path:
    return cache.root / DRAFT_VOCAB_DIR / f"size-{size}.safetensors"


def load_or_build_draft_vocab(cache: HiddenStateCache, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t, t2d) for this cache and size: read from the stored file, or counted once and stored.

    A stored vocab counted over a different number of samples (the dump was resumed since) is rebuilt.
    """
    path = draft_vocab_path(cache, size)
    if path.exists():
        with safe_open(path, framework="pt") as f:
            if f.metadata().get("num_samples") == str(len(cache)):
                return f.get_tensor("d2t"), f.get_tensor("t2d")
    counts = count_masked_tokens(cache)
    d2t, t2d = draft_vocab_from_counts(counts, size)
    try:
        path.parent.mkdir(exist_ok=True)
        # Write-then-rename: a concurrent reader (another rank) sees no file or a whole one.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"d2t": d2t, "t2d": t2d, "counts": counts}, tmp, metadata={"num_samples": str(len(cache))})
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache still trains; it just recounts next time
        warnings.warn(f"could not store the draft vocab in {path}: {e}", stacklevel=2)
    return d2t, t2d
