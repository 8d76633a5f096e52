"""Stage two on the tiny cache: it learns, exports what the servers load, resumes exactly, and scales to 2 ranks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.cache.reader import open_cache
from pipeline.draft.export import load_sglang_export
from pipeline.train.loop import TrainConfig, train
from tests.conftest import REPO, run_stage

pytestmark = pytest.mark.slow  # every test here trains (module fixture) or launches stages

SMALL = ["--draft-vocab-size", "256", "--max-tokens", "1024", "--num-workers", "0", "--eval-percent", "20"]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    last = sorted((run / "checkpoints").glob("step-*"))[-1]
    return load_file(last / "model.safetensors")


@pytest.fixture(scope="module")
def trained(reference_cache, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    cfg = TrainConfig(
        cache=str(reference_cache), name="learn", runs_dir=str(runs), draft_vocab_size=256, max_tokens=1024,
        num_workers=0, eval_percent=20, ttt_steps=3, max_steps=80, lr=3e-3, warmup_steps=5, eval_every=20,
        log_every=10, checkpoint_every=40,
    )  # fmt: skip
    return train(cfg)


def test_loss_falls_and_acc_rises_above_chance(trained):
    history = json.loads((trained / "eval.json").read_text())
    first, last = history[0], history[-1]
    # the random tiny target's distribution is nearly flat, so the loss is mostly its entropy: the KL must fall
    assert last["kl_0"] < 0.5 * first["kl_0"] and last["loss_0"] < first["loss_0"], (first, last)
    assert last["acc_0"] > max(2 * first["acc_0"], 0.15)  # chance over a 256-token draft vocab: 0.004
    assert last["expected_accept_len"] > first["expected_accept_len"]
    assert (trained / "acceptance.png").stat().st_size > 10_000
    assert any((trained / "tensorboard").iterdir())
    log = [json.loads(line) for line in (trained / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(10, 81, 10))  # log_every 10 of 80 steps
    assert all(row["tokens_per_s"] > 0 and 0 <= row["data_wait_fraction"] <= 1 for row in log)
    # The share of answer tokens the draft vocab can draft at all: set by the data and the vocab, not learned.
    assert all(0 < row["vocab_coverage"] <= 1 for row in log) and 0 < last["vocab_coverage"] <= 1


def test_export_reloads_with_the_same_logits(trained):
    config = json.loads((trained / "draft/config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == 256
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]  # HF [2, 4, 5] - 1
    spec = json.loads((trained / "draft-speculators/config.json").read_text())
    assert spec["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
    assert spec["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3
    reloaded = load_sglang_export(trained / "draft")
    weights = final_weights(trained)
    for name, tensor in reloaded.state_dict().items():
        if name in weights:  # the export is bf16: equal to the trained weights rounded to bf16
            assert torch.equal(tensor.to(torch.bfloat16), weights[name].to(torch.bfloat16)), name


def test_other_layers_vocab_and_ttt_from_the_same_cache(reference_cache, tmp_path):
    manifest_before = (reference_cache / "manifest.json").read_text()
    for name, flags in {
        "two-layers": ["--layers", "2,5"],
        "vocab-128": ["--draft-vocab-size", "128"],
        "ttt-2": ["--ttt-steps", "2"],
        "merged": ["--audio-embeds", "merged"],
        "mixed": ["--audio-embeds", "mixed", "--placeholder-share", "0.25"],
        "random-head": ["--head-init", "random"],
    }.items():
        args = [*SMALL, *flags, "--name", name, "--runs-dir", str(tmp_path), "--max-steps", "2"]
        proc = run_stage("stages.train_draft", str(reference_cache), *args)
        config = json.loads((tmp_path / name / "config.json").read_text())
        if name == "two-layers":
            assert config["draft"]["aux_layers"] == [2, 5] and "not exported" in proc.stdout
        if name == "vocab-128":
            assert config["draft"]["draft_vocab_size"] == 128
        if name == "ttt-2":
            assert config["train"]["ttt_steps"] == 2
        if name in ("vocab-128", "random-head"):  # two steps at a warm-up learning rate move a weight by < 1e-4
            weights = final_weights(tmp_path / name)
            draft_ids = weights["d2t"] + torch.arange(len(weights["d2t"]))
            from_target = open_cache(reference_cache).head_weights()["lm_head"][draft_ids].float()
            moved = (weights["lm_head.weight"] - from_target).abs().max()
            assert moved < 1e-3 if name == "vocab-128" else moved > 1e-2, (name, moved)
        if name in ("merged", "mixed"):  # what it was trained for, in both exports and the console
            engines = {"merged": ["sglang"], "mixed": ["sglang", "vllm"]}[name]
            for export in ("draft", "draft-speculators"):
                record = json.loads((tmp_path / name / export / "config.json").read_text())["audio_eagle"]
                assert record["trained_audio_embeds"] == name and record["serve"] == engines
            history = json.loads((tmp_path / name / "eval.json").read_text())
            assert all(0 < h["tau_replay_sglang"] and 0 < h["tau_replay_vllm"] for h in history)
            assert ("warning: this draft was trained on merged" in proc.stdout) == (name == "merged")
    assert (reference_cache / "manifest.json").read_text() == manifest_before  # no new dump


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--layers", "3"], "the cache captured [2, 4, 5], not [3]"),
        (["--target", "Qwen/Qwen2-Audio-7B-Instruct"], "not --target"),
        (["--draft-vocab-size", "5000"], "exceeds the target vocab"),
        (["--hidden-size", "32"], "its width is the target's hidden size 64"),
    ],
)
def test_a_cache_that_does_not_fit_stops_before_training(reference_cache, tmp_path, flags, message):
    proc = run_stage("stages.train_draft", str(reference_cache), "--runs-dir", str(tmp_path), *flags, check=False)
    assert proc.returncode != 0 and message in proc.stderr
    assert not (tmp_path / "draft").exists()  # nothing started


def train_args(cache: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return [
        "stages.train_draft", str(cache), *SMALL, "--runs-dir", str(runs), "--name", name, "--max-steps", "12",
        "--checkpoint-every", "3", "--eval-every", "100", "--ttt-steps", "2", "--lr", "1e-3", *extra,
    ]  # fmt: skip


def test_kill_and_resume_equals_uninterrupted(reference_cache, tmp_path):
    run_stage(*train_args(reference_cache, tmp_path, "clean"))
    cmd = [sys.executable, "-m", *train_args(reference_cache, tmp_path, "killed")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed/checkpoints"
    deadline = time.time() + 300
    while not (ckpts / "step-0000006").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (ckpts / "step-0000012").exists(), "the kill must land before the end"
    run_stage(*train_args(reference_cache, tmp_path, "killed", "--resume"))
    clean, resumed = final_weights(tmp_path / "clean"), final_weights(tmp_path / "killed")
    assert clean.keys() == resumed.keys()
    for name in clean:
        assert torch.equal(clean[name], resumed[name]), name


@pytest.mark.distributed
def test_two_gloo_ranks_equal_one_rank_at_the_same_global_batch(reference_cache, tmp_path):
    run_stage(*train_args(reference_cache, tmp_path, "one", "--grad-accum", "2", "--max-steps", "4"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    proc = subprocess.run(
        [*torchrun, *train_args(reference_cache, tmp_path, "two", "--max-steps", "4")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    trainer = json.loads(sorted((tmp_path / "two/checkpoints").glob("step-*"))[-1].joinpath("trainer.json").read_text())
    assert len(trainer["data"]) == 2  # really two ranks
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for name in one:  # gradients summed in another order: equal to float32 rounding
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.distributed
def test_fsdp_shards_the_draft_equals_one_rank_and_resumes_exactly(reference_cache, tmp_path):
    steps = ["--max-steps", "4", "--checkpoint-every", "2", "--eval-every", "2"]
    run_stage(*train_args(reference_cache, tmp_path, "one", "--grad-accum", "2", *steps))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    fsdp = [*torchrun, *train_args(reference_cache, tmp_path, "fsdp", *steps, "--fsdp")]
    proc = subprocess.run(fsdp, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FSDP: rank 0 holds 50%" in proc.stdout and "FSDP: rank 1 holds 50%" in proc.stdout  # really sharded
    one, sharded = final_weights(tmp_path / "one"), final_weights(tmp_path / "fsdp")
    for name in one:  # gradients reduce-scattered in another order: equal to float32 rounding
        torch.testing.assert_close(one[name], sharded[name], rtol=1e-4, atol=1e-6, msg=name)
    evals = [json.loads((tmp_path / run / "eval.json").read_text()) for run in ("one", "fsdp")]
    assert [e["step"] for e in evals[1]] == [0, 2, 4]  # evaluation kept the ranks in step
    for a, b in zip(*evals, strict=True):
        assert a["acc_0"] == pytest.approx(b["acc_0"], abs=1e-6) and a["kl_0"] == pytest.approx(b["kl_0"], rel=1e-3)
    # Resume from the step-2 checkpoint (sharded optimizer state scattered back) and reach the same weights.
    shutil.rmtree(tmp_path / "fsdp/checkpoints/step-0000004")
    proc = subprocess.run([*fsdp, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    resumed = final_weights(tmp_path / "fsdp")
    for name in sharded:
        assert torch.equal(sharded[name], resumed[name]), name


@pytest.mark.distributed
def test_a_ddp_checkpoint_resumes_under_fsdp(reference_cache, tmp_path):
    """Checkpoints hold full tensors keyed by name in both modes, so a DDP run can go on sharded."""
    steps = ["--max-steps", "4", "--checkpoint-every", "2", "--eval-every", "100"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    for name in ("ddp", "mixed"):  # the same DDP run twice; "mixed" then loses its last checkpoint
        proc = subprocess.run([*torchrun, *train_args(reference_cache, tmp_path, name, *steps)], cwd=REPO,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.rmtree(tmp_path / "mixed/checkpoints/step-0000004")
    resume = [*torchrun, *train_args(reference_cache, tmp_path, "mixed", *steps, "--fsdp", "--resume")]
    proc = subprocess.run(resume, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "FSDP: rank 1 holds 50%" in proc.stdout
    ddp, mixed = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "mixed")
    for name in ddp:
        torch.testing.assert_close(ddp[name], mixed[name], rtol=1e-5, atol=1e-7, msg=name)
