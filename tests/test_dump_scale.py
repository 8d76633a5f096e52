"""Real processes: a dump killed with SIGKILL and re-run, and two torchrun ranks, equal one clean run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.cache.format import COMMIT, PARTS
from pipeline.cache.reader import open_cache
from tests.conftest import REPO, SAMPLE_SHARDS, run_stage


def contents(path: Path) -> dict[str, dict]:
    cache = open_cache(path)
    return {s["key"]: s for s in (cache[i] for i in range(len(cache)))}


def assert_same_cache(a: Path, b: Path) -> None:
    ca, cb = contents(a), contents(b)
    assert sorted(ca) == sorted(cb)
    for key, sa in ca.items():
        sb = cb[key]
        for name in ("input_ids", "loss_mask", "final_hidden", "inputs_embeds"):
            assert torch.equal(sa[name], sb[name]), f"{key}: {name}"
        assert sa["hidden_states"].keys() == sb["hidden_states"].keys()
        for layer in sa["hidden_states"]:
            assert torch.equal(sa["hidden_states"][layer], sb["hidden_states"][layer]), f"{key}: layer {layer}"


def committed(out: Path) -> int:
    total = 0
    for path in (out / PARTS).glob(f"*/{COMMIT}"):
        try:
            total += len(json.loads(path.read_text())["keys"])
        except (OSError, ValueError):
            pass
    return total


@pytest.mark.slow
def test_kill_during_dump_then_rerun_equals_uninterrupted(tmp_path, reference_cache):
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "stages.dump_hidden", SAMPLE_SHARDS, str(out), "--chunk-tokens", "16"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while committed(out) < 8 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = committed(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert 8 <= done < 36 and not manifest["complete"], f"the kill must land mid-dump ({done} committed)"
    assert len(open_cache(out)) == done  # a reader sees the committed samples only

    rerun = run_stage(*cmd[2:])
    assert "cache: complete" in rerun.stdout
    assert_same_cache(out, reference_cache)
    assert json.loads((out / "manifest.json").read_text())["counts"]["samples"] == 36


@pytest.mark.slow
def test_rerun_of_a_finished_dump_redoes_nothing(tmp_path):
    out = tmp_path / "cache"
    shard = str(REPO / "data/sample/shards/sample-000000.tar")
    run_stage("stages.dump_hidden", shard, str(out))
    commit = next((out / PARTS).glob(f"*/{COMMIT}"))
    before = (commit.stat().st_mtime_ns, commit.read_text())
    run_stage("stages.dump_hidden", shard, str(out))
    assert (commit.stat().st_mtime_ns, commit.read_text()) == before


@pytest.mark.distributed
def test_two_torchrun_ranks_equal_one_rank(tmp_path, reference_cache):
    out = tmp_path / "cache"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*torchrun, "-m", "stages.dump_hidden", SAMPLE_SHARDS, str(out), "--chunk-tokens", "16"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    writers = [json.loads(p.read_text())["writers"] for p in (out / PARTS).glob(f"*/{COMMIT}")]
    assert {w[0]["world_size"] for w in writers} == {2}
    assert sorted(w[0]["rank"] for w in writers) == [0, 0, 1, 1]  # 4 shards dealt to 2 ranks, one writer each
    assert_same_cache(out, reference_cache)


def test_cache_opens_without_touching_samples(reference_cache, monkeypatch):
    """Opening reads the manifest only: no commit file and no array is read until a sample is asked for."""
    import pipeline.cache.format as cache_format

    reads = []
    real = cache_format.read_json
    monkeypatch.setattr(cache_format, "read_json", lambda p: reads.append(Path(p).name) or real(p))
    cache = open_cache(reference_cache)
    assert reads == ["manifest.json"] and len(cache) == 36
    cache[35]
    assert reads == ["manifest.json", COMMIT]  # only the part holding sample 35
