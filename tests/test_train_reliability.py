"""Stage two on long runs: an unfinished cache, a resume that is not the same run, a rerun into a used run
directory, and the training log after a resume (issue 8). Each case ends with a message or the right result."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cache.reader import open_cache
from pipeline.train.loop import TrainConfig, estimate_steps, part_tokens
from tests.conftest import REPO, run_stage

SMALL = ["--draft-vocab-size", "256", "--max-tokens", "1024", "--num-workers", "0", "--eval-percent", "20"]
SHORT = ["--ttt-steps", "2", "--eval-every", "100", "--log-every", "1", "--checkpoint-every", "1"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]


def train_cmd(cache: Path, run: Path, *extra: str) -> list[str]:
    return ["stages.train_draft", str(cache), *SMALL, *SHORT, "--runs-dir", str(run.parent), "--name", run.name,
            *extra]  # fmt: skip


def unfinished_copy(cache: Path, dest: Path, committed_parts: int) -> Path:
    """The cache as a dump still running (or killed) leaves it: a manifest without parts or counts, marked unfinished
    (what the writer writes when a dump starts or resumes), and the first ``committed_parts`` parts on disk."""
    copy = Path(shutil.copytree(cache, dest))
    manifest = json.loads((copy / "manifest.json").read_text())
    for part in manifest["parts"][committed_parts:]:
        shutil.rmtree(copy / "parts" / part["name"])
    manifest.update(complete=False, parts=[], counts={})
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def fewer_shards_copy(cache: Path, dest: Path) -> Path:
    """A finished cache of the same target and dimensions, dumped from the first three of the four shards."""
    copy = Path(shutil.copytree(cache, dest))
    manifest = json.loads((copy / "manifest.json").read_text())
    shutil.rmtree(copy / "parts" / manifest["parts"][-1]["name"])
    parts = manifest["parts"] = manifest["parts"][:-1]
    manifest["shards"] = manifest["shards"][:-1]
    manifest["counts"].update(shards=len(parts), shards_done=len(parts))
    for count in ("samples", "tokens", "audio_tokens"):
        manifest["counts"][count] = sum(part[count] for part in parts)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step-*"))


def logged_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def refused(proc: subprocess.CompletedProcess, *lines: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    for line in lines:
        assert line in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def base_run(reference_cache, tmp_path_factory) -> Path:
    """A finished two-step run with a checkpoint and a log line at each step."""
    run = tmp_path_factory.mktemp("runs") / "base"
    run_stage(*train_cmd(reference_cache, run, "--max-steps", "2"))
    return run


def copy_run(base: Path, dest: Path) -> Path:
    return Path(shutil.copytree(base, dest))


# ------------------------------------------------------------------------------- class 4: an unfinished cache


def test_the_step_estimate_of_an_unfinished_cache_counts_its_committed_tokens(reference_cache, tmp_path):
    finished = open_cache(reference_cache)
    with pytest.warns(UserWarning, match="the dump has not finished"):
        unfinished = open_cache(unfinished_copy(reference_cache, tmp_path / "c", 4))
    assert not unfinished.info["complete"] and unfinished.info["counts"] == {}
    assert part_tokens(unfinished) == part_tokens(finished) and sum(part_tokens(finished)) == 3443
    cfg = TrainConfig(cache="c", max_tokens=512, eval_percent=20)
    assert estimate_steps(sum(part_tokens(unfinished)), cfg, 1) == math.ceil(3443 * 0.8 / 512) == 6


@pytest.mark.slow
def test_an_unfinished_cache_is_refused_saying_what_to_do(reference_cache, tmp_path):
    cache = unfinished_copy(reference_cache, tmp_path / "cache", 2)
    proc = run_stage(*train_cmd(cache, tmp_path / "runs/draft"), check=False)
    refused(proc, "is an unfinished dump", "re-running the same dump command", "pass --allow-partial")
    assert not (tmp_path / "runs").exists()  # refused before any work


@pytest.mark.slow
def test_allow_partial_trains_an_epoch_of_the_committed_samples(reference_cache, tmp_path):
    cache = unfinished_copy(reference_cache, tmp_path / "cache", 2)
    committed = sum(json.loads(commit.read_text())["token_offsets"][-1] for commit in cache.glob("parts/*/commit.json"))
    run = tmp_path / "runs/draft"
    proc = run_stage(*train_cmd(cache, run, "--allow-partial", "--max-tokens", "512"))  # no --max-steps: one epoch
    steps = math.ceil(committed * 0.8 / 512)
    assert steps > 1 and checkpoints(run)[-1] == f"step-{steps:07d}", (committed, checkpoints(run))
    assert f"training on the 18 samples ({committed} tokens) committed so far" in proc.stdout
    assert "the dump has not finished" not in proc.stderr  # said once, above, not by every loader


@pytest.mark.slow
def test_an_unfinished_cache_with_no_sample_yet_says_so(reference_cache, tmp_path):
    cache = unfinished_copy(reference_cache, tmp_path / "cache", 0)
    proc = run_stage(*train_cmd(cache, tmp_path / "runs/draft", "--allow-partial"), check=False)
    refused(proc, "has committed no sample yet: nothing to train on")
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------- class 5: resume only the same run


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "lines"),
    [
        (["--layers", "4,2,5"], ["--layers: [2, 4, 5] in the checkpoint, [4, 2, 5] now"]),  # same count, same shapes
        (
            ["--intermediate-size", "96", "--ttt-steps", "3"],
            ["--intermediate-size: 128 in the checkpoint, 96 now", "--ttt-steps: 2 in the checkpoint, 3 now"],
        ),
        (
            ["--lr", "0.01", "--audio-embeds", "placeholder"],
            ["--lr: 0.0003 in the checkpoint, 0.01 now", "--audio-embeds: 'mixed' in the checkpoint"],
        ),
        ("other cache", ["the cache's samples: 36 in the checkpoint, 27 now"]),  # same target and dimensions
    ],
    ids=["layers", "shapes", "optimiser-and-inputs", "other-cache"],
)
def test_resume_refuses_another_run_naming_each_difference(reference_cache, base_run, tmp_path, flags, lines):
    run = copy_run(base_run, tmp_path / "runs/base")
    cache = reference_cache
    if flags == "other cache":
        cache, flags = fewer_shards_copy(reference_cache, tmp_path / "cache"), []
    proc = run_stage(*train_cmd(cache, run, "--max-steps", "4", "--resume", *flags), check=False)
    refused(proc, f"cannot resume {run} from step-0000002", *lines, "another --name")
    assert checkpoints(run) == checkpoints(base_run) and logged_steps(run) == [1, 2]  # untouched


@pytest.mark.slow
def test_resume_goes_on_with_the_same_run_and_logs_each_step_once(reference_cache, base_run, tmp_path):
    """Classes 5 and 9: the same settings resume (and may run longer); the log holds each step once, although the
    killed run had logged past its last checkpoint, the last line cut short by the kill."""
    run = copy_run(base_run, tmp_path / "runs/base")
    shutil.rmtree(run / "checkpoints/step-0000002")  # killed after step 2 was logged, before its checkpoint
    log = (run / "train_log.jsonl").read_text()
    (run / "train_log.jsonl").write_text(log + log.splitlines()[-1][:20])  # and while writing another line
    proc = run_stage(*train_cmd(reference_cache, run, "--max-steps", "4", "--resume"))
    assert "step-0000001 at step 1" in proc.stdout
    assert checkpoints(run)[-1] == "step-0000004" and logged_steps(run) == [1, 2, 3, 4]


# ------------------------------------------------------------------------ class 6: a run directory holding a run


@pytest.mark.slow
def test_a_new_run_into_a_used_directory_is_refused_and_overwrite_replaces_it(reference_cache, base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "runs/base")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = run_stage(*train_cmd(reference_cache, run, "--max-steps", "1"), check=False)
    refused(proc, f"{run} already holds a run: pass --resume to continue it, --overwrite to replace it, or choose "
            "another --name")  # fmt: skip
    proc = run_stage(*train_cmd(reference_cache, run, "--resume", "--overwrite"), check=False)
    refused(proc, "pass one of them")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing touched
    proc = run_stage(*train_cmd(reference_cache, run, "--max-steps", "1", "--overwrite"))
    assert f"removed the earlier run in {run}" in proc.stdout
    assert checkpoints(run) == ["step-0000001"] and logged_steps(run) == [1]  # the new run's only
    assert json.loads((run / "eval.json").read_text())[-1]["step"] == 1


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_refuse_a_used_directory_together_and_overwrite_it_once(reference_cache, base_run, tmp_path):
    run = copy_run(base_run, tmp_path / "runs/base")
    cmd = [*TORCHRUN, *train_cmd(reference_cache, run, "--max-steps", "1")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    # Each rank stops with the main process's answer (torchrun may end the second before it prints it).
    assert proc.returncode != 0 and f"{run} already holds a run" in proc.stderr, proc.stderr[-3000:]
    assert "ConfigError" not in proc.stderr and "resumed from" not in proc.stdout
    assert checkpoints(run) == checkpoints(base_run)
    proc = subprocess.run([*cmd, "--overwrite"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("removed the earlier run") == 1  # the main process alone
    trainer = json.loads((run / "checkpoints/step-0000001/trainer.json").read_text())
    assert checkpoints(run) == ["step-0000001"] and len(trainer["data"]) == 2 and logged_steps(run) == [1]
