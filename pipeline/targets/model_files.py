"""A model known by its content, not by where it lies: digests of its weight files and of its tokenizer.

A dump resumes only with the target it began with, so the target must be recognised after a move or a copy and
told apart after any change of its weights or tokenizer. Weight files are hashed whole with SHA-256 (exact: no
sampling, which would miss a fine-tune that touches a few tensors). What that costs:

- A file in the HF hub cache is a link to ``blobs/<sha256 of its bytes>`` (the hub's LFS object id): its digest
  is read from the link, nothing is hashed. A model loaded by its hub id is identified at no cost.
- Any other file is read and hashed, one thread per file (hashlib releases the GIL): SHA-256 runs at about
  1.2 GB/s per core (SHA-NI), so a 16 GB checkpoint in five files takes about 3 s once the model load has put it in
  the page cache, and at most the time of reading it again from disk when it has not.

The same SHA-256 in both cases, so a hub snapshot and a plain copy of it have the same digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# What transformers loads weights from: safetensors when a model has them, else the pickled formats.
SAFETENSORS = "*.safetensors"
PICKLED = ("*.bin", "*.pt", "*.pth")
# A blob of the HF hub cache is named by the SHA-256 of its bytes when it is an LFS file (weights are).
HUB_BLOB = re.compile(r"[0-9a-f]{64}")


def model_directory(name_or_path: str) -> Path:
    """The local directory a model was loaded from: the directory itself, or its snapshot in the HF cache."""
    from transformers.utils import cached_file

    if os.path.isdir(name_or_path):
        return Path(name_or_path)
    return Path(cached_file(name_or_path, "config.json")).parent


def weights_digest(directory: Path) -> dict[str, str]:
    """``{file name: "sha256:<hex>"}`` of the weight files transformers loads from ``directory``."""
    directory = Path(directory)
    files = sorted(directory.glob(SAFETENSORS)) or sorted(f for pattern in PICKLED for f in directory.glob(pattern))
    if not files:
        return {}
    with ThreadPoolExecutor(max_workers=min(len(files), os.cpu_count() or 1)) as pool:
        digests = list(pool.map(file_digest, files))
    return {f.name: digest for f, digest in zip(files, digests, strict=True)}


def file_digest(path: Path) -> str:
    return f"sha256:{hub_blob_sha256(path) or sha256_of_file(path)}"


def hub_blob_sha256(path: Path) -> str | None:
    """The SHA-256 an HF cache link names its blob by, or None for any other file."""
    if not path.is_symlink():
        return None
    blob = path.resolve()
    return blob.name if blob.parent.name == "blobs" and HUB_BLOB.fullmatch(blob.name) else None


def sha256_of_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """SHA-256 of what a tokenizer does: its whole serialised pipeline (vocabulary, merges, normalisation, added
    tokens), or its vocabulary for a tokenizer without one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        doc = json.loads(backend.to_str())
        # Run-time state that calls switch on and off, not the tokenizer itself.
        doc.pop("truncation", None)
        doc.pop("padding", None)
    else:
        doc = {"class": type(tokenizer).__name__, "vocab": tokenizer.get_vocab()}
    text = json.dumps(doc, sort_keys=True, ensure_ascii=False)
    return f"sha256:{hashlib.sha256(text.encode()).hexdigest()}"
