"""Shared fixtures: the tiny target, the bundled sample shards, and one reference dump of them."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

# One torch thread per pytest worker and per stage it launches: `just test` runs a worker per core, and more
# threads would only oversubscribe the cores (OpenMP threads spin while they wait). Set before torch is imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
SAMPLE_SHARDS = str(REPO / "data/sample/shards/sample-{000000..000003}.tar")


@pytest.fixture(scope="session", autouse=True)
def tiny_home(tmp_path_factory) -> Path:
    """Build the tiny target once per session in a temp home (subprocesses inherit it)."""
    home = tmp_path_factory.mktemp("home")
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
    """An uninterrupted one-rank dump of the bundled sample (float32, the CPU default)."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    run_stage("stages.dump_hidden", SAMPLE_SHARDS, str(out), "--chunk-tokens", "16")
    return out
