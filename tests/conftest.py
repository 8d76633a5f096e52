"""Shared fixtures: the tiny target, the bundled sample shards, and one reference dump of them."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

# One torch thread per pytest worker and per stage it launches: `just test` runs a worker per core, and more
# threads would only oversubscribe the cores (OpenMP threads spin while they wait). Set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
SAMPLE_SHARDS = str(REPO / "data/sample/shards/sample-{000000..000003}.tar")


def shared_dir(tmp_path_factory) -> Path:
    """A temp directory every pytest worker of this run sees: under xdist each worker's base temp dir is its own,
    inside the run's; what is built here once serves them all."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(root: Path, build: Callable[[], None]) -> None:
    """Run ``build`` (which fills ``root``) in the first worker that asks; the others wait for it, then reuse."""
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root.with_name(root.name + ".lock")):
        if not (root / ".built").exists():
            build()
            (root / ".built").touch()


@pytest.fixture(scope="session", autouse=True)
def tiny_home(tmp_path_factory) -> Path:
    """Build the tiny target once per run in a temp home shared by the workers (subprocesses inherit it)."""
    home = shared_dir(tmp_path_factory) / "home"
    home.mkdir(exist_ok=True)  # the tiny target's builder is safe to call from several processes at once
    os.environ["AUDIO_EAGLE_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_dir(tiny_home) -> Path:
    from pipeline.testing.tiny_target import ensure_tiny_target

    return ensure_tiny_target()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A webdataset shard built by hand: members ``<key>.<ext>`` in the order given (bad samples included)."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def run_stage(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a stage in its own process, as a user would."""
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def reference_cache(tmp_path_factory, tiny_dir) -> Path:
    """An uninterrupted one-rank dump of the bundled sample (float32, the CPU default), made once per run. Tests
    read it (training adds its draft vocab files, written atomically); those that damage or extend a cache copy it."""
    root = shared_dir(tmp_path_factory) / "ref"
    out = root / "cache"
    build_once(root, lambda: run_stage("stages.dump_hidden", SAMPLE_SHARDS, str(out), "--chunk-tokens", "16"))
    return out
