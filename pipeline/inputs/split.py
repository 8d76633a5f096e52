"""The held-out split: a sample belongs to it by a hash of its key alone, so training and evaluation agree on it
across runs, ranks, workers and caches without storing a list of keys."""

from __future__ import annotations

import hashlib
from typing import Literal

Split = Literal["train", "eval"]


def eval_fraction(key: str) -> float:
    """A stable position in [0, 100) for a sample key: the held-out split is those below ``eval_percent``."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") / 2**64 * 100


def in_split(key: str, split: Split, eval_percent: float) -> bool:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    return (eval_fraction(key) < eval_percent) == (split == "eval")
