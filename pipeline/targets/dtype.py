"""The dtype a target runs in when the user names none: one rule for every stage that loads the target.

On a GPU: bfloat16. On the CPU: float32 (exact, and what the tests compare bit for bit) when the weights in float32
fit in the memory available now with a margin, else bfloat16 (half the bytes; CPUs with AVX512-BF16 or AMX run
it natively). A 7B audio LLM (8.4B parameters) is 33.6 GB in float32 and 16.8 GB in bfloat16: on a 24 GiB
machine only the latter loads. The choice and its reason are printed in one line.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.targets.model_files import PICKLED, SAFETENSORS, model_directory

# float32 weights must fit in available memory this many times over: activations, the KV cache, the full-vocab
# logits and the stage's own buffers come on top of the weights.
FLOAT32_MARGIN = 1.5
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str
    reason: str

    def line(self) -> str:
        return f"dtype: {self.dtype} ({self.reason}; --dtype overrides)"


def parameter_count(directory: Path) -> int:
    """Parameters in a model directory's weight files: read from the safetensors headers (no tensor is read);
    pickled checkpoints are estimated from their size and the config's dtype."""
    files = sorted(Path(directory).glob(SAFETENSORS))
    if files:
        return sum(_safetensors_numel(f) for f in files)
    config = json.loads((Path(directory) / "config.json").read_text())
    stored = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    size = sum(f.stat().st_size for pattern in PICKLED for f in Path(directory).glob(pattern))
    return size // BYTES.get(stored, 4)


def _safetensors_numel(path: Path) -> int:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        n = 1
        for d in entry["shape"]:
            n *= d
        total += n
    return total


def available_memory() -> int:
    """Bytes the kernel reports as available now (MemAvailable), or total physical memory where it cannot."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_dtype(device: str | torch.device, params: int, available: int, copies: int = 1) -> DtypeChoice:
    """The default dtype for a target of ``params`` parameters on ``device`` with ``available`` bytes free, loaded
    ``copies`` times on this machine (one per local rank)."""
    if torch.device(device).type != "cpu":
        return DtypeChoice("bfloat16", f"on {torch.device(device).type}")
    need, gib = params * BYTES["float32"] * copies, 2**30
    what = f"{need / gib:.1f} GiB of float32 weights" + (f" ({copies} ranks)" if copies > 1 else "")
    if need * FLOAT32_MARGIN <= available:
        return DtypeChoice("float32", f"CPU: {what} fit in the {available / gib:.1f} GiB available")
    return DtypeChoice(
        "bfloat16", f"CPU: {what} x{FLOAT32_MARGIN} margin exceed the {available / gib:.1f} GiB available"
    )


def resolve_dtype(requested: str | None, device: str | torch.device, model: str) -> str:
    """``requested`` if given, else the default for ``model`` (an alias, HF id or directory) on ``device``,
    printed with its reason."""
    if requested:
        return requested
    if torch.device(device).type == "cpu":
        from pipeline.targets import resolve_model

        try:
            params = parameter_count(model_directory(resolve_model(model)))
        except (OSError, ValueError, KeyError, PipelineError) as err:
            # Not a readable model: loading it, next, says what to fix; no size, no reason to leave float32.
            print(f"dtype: float32 (the model's size could not be read: {type(err).__name__})", flush=True)
            return "float32"
        copies = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        choice = choose_dtype(device, params, available_memory(), copies)
    else:
        choice = choose_dtype(device, 0, 0)
    print(choice.line(), flush=True)
    return choice.dtype
