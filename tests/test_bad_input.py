"""Bad input is skipped, counted and reported with key and reason; nothing valid is lost; --strict fails fast."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

from pipeline.cache.reader import open_cache
from pipeline.inputs.shards import iter_raw_samples
from tests.conftest import REPO, run_stage, write_tar

pytestmark = pytest.mark.slow  # each test launches a stage

VALID_SHARD = REPO / "data/sample/shards/sample-000000.tar"
POISON_WORD = "Zyxwvut"  # spelled only by the poisoned sample, so only its states go NaN


def wav_bytes(seconds: float, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    tone = 0.1 * np.sin(np.arange(int(seconds * rate)) * 0.05).astype(np.float32)
    sf.write(buf, tone, rate, format="WAV")
    return buf.getvalue()


def conversation(answer: str | None = "A short answer.") -> bytes:
    turns = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "What is said?"}]}]
    if answer is not None:
        turns.append({"role": "assistant", "content": answer})
    return json.dumps({"conversations": turns}).encode()


BAD = {  # key -> (members, expected words in the recorded reason)
    "bad-undecodable": ({"wav": b"RIFF\x00\x00not really audio at all" * 4, "json": conversation()}, "undecodable"),
    "bad-empty-audio": ({"wav": wav_bytes(0.0), "json": conversation()}, "zero-length"),
    "bad-no-json": ({"wav": wav_bytes(1.0)}, "missing json"),
    "bad-malformed-json": ({"wav": wav_bytes(1.0), "json": b"{'conversations': oops"}, "malformed json"),
    "bad-no-assistant": ({"wav": wav_bytes(1.0), "json": conversation(None)}, "no assistant turn"),
    "bad-no-audio": ({"json": conversation()}, "missing audio"),
    "bad-too-long": ({"wav": wav_bytes(8.0), "json": conversation()}, "over the length limit"),
    "bad-overlong-audio": ({"wav": wav_bytes(12.0), "json": conversation()}, "over the 10.0 s limit"),
    "bad-nan-states": ({"wav": wav_bytes(1.0), "json": conversation(f"{POISON_WORD} {POISON_WORD}")}, "NaN or Inf"),
}


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory) -> tuple[Path, list[str]]:
    """Shard 0: valid samples interleaved with every kind of bad one; shard 1: a tar cut short."""
    root = tmp_path_factory.mktemp("bad")
    valid = [(r.key, {r.audio_ext: r.audio, "json": r.json}) for r in iter_raw_samples(str(VALID_SHARD))]
    mixed = []
    for i, (key, members) in enumerate(BAD.items()):
        mixed += [(key, members[0]), valid[i % len(valid)]]
    write_tar(root / "mixed-000000.tar", mixed)
    write_tar(root / "whole.tar", valid[:4])
    data = (root / "whole.tar").read_bytes()
    (root / "cut-000001.tar").write_bytes(data[: len(data) // 2 + 100])
    return root, [key for key, _ in valid]


@pytest.fixture(scope="module")
def poisoned_model(tmp_path_factory, tiny_dir) -> Path:
    """The tiny target with the embedding rows of the poison word's tokens set to NaN."""
    out = tmp_path_factory.mktemp("poisoned") / "model"
    shutil.copytree(tiny_dir, out)
    tokenizer = AutoProcessor.from_pretrained(out).tokenizer
    model = Qwen2AudioForConditionalGeneration.from_pretrained(out)
    poison = set(tokenizer.encode(f" {POISON_WORD}")) - set(tokenizer.encode(" A short answer. What is said?"))
    with torch.no_grad():
        model.get_input_embeddings().weight[sorted(poison)] = float("nan")
    model.save_pretrained(out)
    return out


def dump_args(root: Path, out: Path, model: Path) -> list[str]:
    shards = f"{root}/mixed-000000.tar,{root}/cut-000001.tar"
    return [
        "stages.dump_hidden", shards, str(out), "--model", str(model), "--max-length", "150",
        "--max-audio-seconds", "10", "--overlong-audio", "reject",
    ]  # fmt: skip


def test_each_bad_sample_is_reported_and_every_valid_one_kept(tmp_path, bad_shards, poisoned_model):
    root, valid_keys = bad_shards
    proc = run_stage(*dump_args(root, tmp_path / "cache", poisoned_model))
    manifest = json.loads((tmp_path / "cache/manifest.json").read_text())
    reasons = {r["key"]: r["reason"] for r in manifest["rejects"]}
    assert set(reasons) == set(BAD)
    for key, (_, words) in BAD.items():
        assert words in reasons[key], f"{key}: {reasons[key]}"
        assert f"rejected {key} " in proc.stdout  # the summary lists it
    # the cut shard: its readable samples are kept and the shard itself is reported, not silently dropped
    [error] = manifest["shard_errors"]
    assert error["shard"].endswith("cut-000001.tar") and "UNREADABLE" in proc.stdout
    assert not manifest["complete"]  # until the cut shard is repaired and the dump re-run (it retries the shard)
    cache = open_cache(tmp_path / "cache")
    keys: dict[str, list[str]] = {}
    for sample in (cache[i] for i in range(len(cache))):
        keys.setdefault(Path(sample["shard"]).name, []).append(sample["key"])
    assert keys["mixed-000000.tar"] == valid_keys[: len(BAD)]  # the valid sample after each bad one: none lost
    assert keys["cut-000001.tar"] == ["clip-000"]  # the cut shard: its one intact sample before the cut is kept
    assert manifest["counts"]["rejected"] == len(BAD) and manifest["counts"]["unreadable_shards"] == 1


def test_strict_fails_on_the_first_bad_sample(tmp_path, bad_shards, poisoned_model):
    root, _ = bad_shards
    proc = run_stage(*dump_args(root, tmp_path / "cache", poisoned_model), "--strict", check=False)
    assert proc.returncode != 0
    assert "bad-undecodable" in proc.stderr and "drop --strict" in proc.stderr
    assert not json.loads((tmp_path / "cache/manifest.json").read_text())["complete"]


def test_wrong_shard_path_says_what_to_fix(tmp_path):
    proc = run_stage("stages.dump_hidden", str(tmp_path / "nope-{000..003}.tar"), str(tmp_path / "c"), check=False)
    assert proc.returncode != 0 and "does not exist" in proc.stderr
    assert not (tmp_path / "c").exists()


def test_unreadable_model_says_what_to_fix(tmp_path):
    proc = run_stage("stages.dump_hidden", str(VALID_SHARD), str(tmp_path / "c"), "--model", str(tmp_path), check=False)
    assert proc.returncode != 0 and "cannot read a model config" in proc.stderr and "--model tiny" in proc.stderr
    assert not (tmp_path / "c").exists()


def test_full_disk_stops_with_a_message_and_no_complete_cache(tmp_path, tiny_dir):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        shards = str(REPO / "data/sample/shards/sample-{000000..000003}.tar")
        proc = run_stage("stages.dump_hidden", shards, str(mount / "cache"), check=False)
        assert proc.returncode != 0
        assert "No space left on device" in proc.stderr and "re-run the same command" in proc.stderr
        manifest = json.loads((mount / "cache/manifest.json").read_text())
        assert not manifest["complete"]
        cache = open_cache(mount / "cache")  # what was committed before the disk filled is readable
        assert all(len(cache[i]["input_ids"]) > 0 for i in range(len(cache)))
    finally:
        subprocess.run(["umount", str(mount)])
