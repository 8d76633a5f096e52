"""Training checkpoints: written whole or not at all, read without pickle.

    RUN/checkpoints/step-000200/  model.safetensors  optimizer.pt  trainer.json
A checkpoint is built in a temp directory and renamed into place, so a kill at any moment leaves the previous
ones intact; ``optimizer.pt`` holds only tensors and numbers and is read with ``torch.load(weights_only=True)``.
``trainer.json`` holds the step, the data position of each rank, the schedule, and what makes the run that run
(its settings, draft shape and cache identity), which ``--resume`` compares before loading anything else.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"


def save_checkpoint(run_dir: Path, step: int, model: dict, optimizer: dict, trainer: dict, keep: int = 2) -> Path:
    root = run_dir / CHECKPOINTS
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.items()}, tmp / "model.safetensors")
    torch.save(optimizer, tmp / "optimizer.pt")
    (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / CHECKPOINTS).glob("step-*"))
    return found[-1] if found else None


def read_trainer(path: Path) -> dict:
    """The checkpoint's ``trainer.json`` alone: enough to check a resume before any tensor is loaded."""
    return json.loads((path / "trainer.json").read_text())


def load_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    model = load_file(path / "model.safetensors")
    optimizer = torch.load(path / "optimizer.pt", weights_only=True)
    return model, optimizer, read_trainer(path)
