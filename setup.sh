#!/usr/bin/env bash
# One-time, idempotent set-up: a venv in .venv with torch installed FIRST (so no dependency can pull a
# multi-GB CUDA build), then this project with its dev tools (pytest, ruff, just).
# GPU machines: set TORCH_SPEC to the torch build you want, e.g. TORCH_SPEC="torch==2.13.0" with
# PIP_EXTRA_INDEX_URL pointing at the CUDA wheel index of your choice.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[dev]"
echo "set-up done: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
