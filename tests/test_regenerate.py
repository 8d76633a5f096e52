"""Regenerate: answers equal the target's own generate, a kill -9 and re-run equal one clean run, bad input is
reported by key, sampling does not depend on batching."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

from pipeline.errors import ConfigError, StrictModeError
from pipeline.inputs.audio import AudioPolicy, decode_audio
from pipeline.inputs.conversation import parse_conversations
from pipeline.inputs.prompt import build_prompt
from pipeline.inputs.shards import iter_raw_samples
from pipeline.regenerate import RegenerateConfig, rejects_name, run_regenerate
from pipeline.targets import load_target
from pipeline.targets.qwen2_audio import AUDIO_TOKEN
from tests.conftest import REPO, SAMPLE_SHARDS, run_stage, write_tar

MAX_NEW_TOKENS = 8
SHARD_NAMES = [f"sample-{i:06d}.tar" for i in range(4)]


@pytest.fixture(scope="module")
def target(tiny_dir):
    return load_target("tiny", "float32", "cpu")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, target) -> Path:
    """An uninterrupted greedy run over the 4 bundled shards, batched 4 at a time."""
    out = tmp_path_factory.mktemp("regen") / "ref"
    summary = run_regenerate(RegenerateConfig(SAMPLE_SHARDS, out, max_new_tokens=MAX_NEW_TOKENS), target)
    assert summary["complete"] and summary["counts"]["samples"] == 36 and summary["counts"]["rejected"] == 0
    return out


@pytest.fixture(scope="module")
def hf(tiny_dir):
    """The tiny target's processor and model loaded straight from transformers, apart from the adapter."""
    return AutoProcessor.from_pretrained(tiny_dir), Qwen2AudioForConditionalGeneration.from_pretrained(tiny_dir).eval()


def samples_of(path: Path) -> dict:
    return {s.key: s for s in iter_raw_samples(str(path))}


def direct_answer(hf, turns: list[dict], wave) -> str:
    """What the HF model generates greedily for the conversation ``turns`` (ending in a user turn), built with the
    processor's own chat template and audio expansion, one sample at a time."""
    processor, model = hf
    text = processor.tokenizer.apply_chat_template(
        turns, chat_template=processor.chat_template, tokenize=False, add_generation_prompt=True
    )
    inputs = processor(text=text, audio=wave, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    return processor.tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_answers_equal_the_targets_own_greedy_generate(reference, hf):
    two_turn = 0
    for name in SHARD_NAMES[:2]:
        source, regenerated = samples_of(REPO / "data/sample/shards" / name), samples_of(reference / name)
        assert list(regenerated) == list(source)
        for key, raw in source.items():
            new = regenerated[key]
            assert (new.audio, new.audio_ext) == (raw.audio, raw.audio_ext)
            old_doc, doc = json.loads(raw.json), json.loads(new.json)
            assert doc["regenerated_by"] == "tiny" and doc["regeneration"]["max_new_tokens"] == MAX_NEW_TOKENS
            assert {k: v for k, v in doc.items() if k not in ("conversations", "regenerated_by", "regeneration")} == {
                k: v for k, v in old_doc.items() if k != "conversations"
            }
            wave = decode_audio(raw.audio, AudioPolicy(), raw.audio_ext)
            turns = old_doc["conversations"]
            assistant = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
            two_turn += len(assistant) > 1
            for i, old in enumerate(turns):
                if i not in assistant:
                    assert doc["conversations"][i] == old
            for i in assistant:
                # The prompt holds the regenerated answers of the earlier turns, not the dataset's.
                prompt = [*doc["conversations"][:i]]
                assert doc["conversations"][i]["content"] == direct_answer(hf, prompt, wave), f"{key} turn {i}"
                assert doc["conversations"][i]["content"] != turns[i]["content"]
                if i != assistant[0]:  # the test can tell: the dataset's earlier answers give another answer
                    assert doc["conversations"][i]["content"] != direct_answer(hf, turns[:i], wave)
    assert two_turn == 2  # clip-005 and clip-017


def tars(out: Path) -> list[Path]:
    return sorted(out.glob("*.tar"))


@pytest.mark.slow
def test_kill_during_run_then_rerun_equals_uninterrupted(tmp_path, reference, target):
    out = tmp_path / "out"
    args = ["stages.regenerate", SAMPLE_SHARDS, str(out), "--max-new-tokens", str(MAX_NEW_TOKENS)]
    proc = subprocess.Popen(
        [sys.executable, "-m", *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not tars(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tars(out)}
    assert 1 <= len(finished) < 4, f"the kill must land mid-run ({len(finished)} shards finished)"
    assert all((out / rejects_name(name)).exists() for name in finished)

    rerun = run_stage(*args)
    assert "regenerate: complete" in rerun.stdout and "shards 4/4 done, samples 36" in rerun.stdout
    assert not list(out.glob(".*.tmp"))  # the killed run's temp file was cleared
    for name, stamp in finished.items():  # finished shards were not redone
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == stamp
    for name in SHARD_NAMES:
        got, want = samples_of(out / name), samples_of(reference / name)
        assert [(k, s.json) for k, s in got.items()] == [(k, s.json) for k, s in want.items()], name
        assert (out / name).read_bytes() == (reference / name).read_bytes()

    # Resuming with other settings would mix two kinds of answers: refused.
    with pytest.raises(ConfigError, match="re-run with the original settings"):
        run_regenerate(RegenerateConfig(SAMPLE_SHARDS, out, max_new_tokens=MAX_NEW_TOKENS + 1), target)


@pytest.fixture(scope="module")
def mixed_shard(tmp_path_factory) -> tuple[Path, list[tuple[str, dict[str, bytes]]], dict[str, str]]:
    """Valid samples (one with an extra .txt member) interleaved with bad ones; expected reasons by key."""
    valid = [
        (r.key, {r.audio_ext: r.audio, "json": r.json})
        for r in iter_raw_samples(str(REPO / "data/sample/shards/sample-000000.tar"))
    ][:3]
    valid[1][1]["txt"] = b"kept as is"
    audio = valid[0][1]["flac"]
    no_assistant = json.dumps({"conversations": [{"role": "user", "content": "What is said?"}]}).encode()
    bad = {  # key -> (members, words expected in the recorded reason)
        "bad-garbage-audio": ({"wav": b"RIFF\x00\x00not audio" * 8, "json": valid[0][1]["json"]}, "undecodable"),
        "bad-malformed-json": ({"flac": audio, "json": b"{'conversations': oops"}, "malformed json"),
        "bad-no-assistant": ({"flac": audio, "json": no_assistant}, "no assistant turn"),
        "bad-no-json": ({"flac": audio}, "missing json"),
    }  # fmt: skip
    mixed = []
    for i, (key, (members, _)) in enumerate(bad.items()):  # bad, valid, bad, valid, ..., bad
        mixed += [(key, members), *valid[i : i + 1]]
    path = tmp_path_factory.mktemp("bad") / "mixed-000000.tar"
    write_tar(path, mixed)
    return path, valid, {key: words for key, (_, words) in bad.items()}


def test_bad_samples_are_recorded_by_key_and_valid_ones_kept(tmp_path, target, mixed_shard):
    shard, valid, reasons = mixed_shard
    summary = run_regenerate(RegenerateConfig(str(shard), tmp_path / "out", max_new_tokens=4), target)
    record = json.loads((tmp_path / "out" / "rejects-mixed-000000.json").read_text())
    got = {r["key"]: r["reason"] for r in record["rejects"]}
    assert set(got) == set(reasons)
    for key, words in reasons.items():
        assert words in got[key], f"{key}: {got[key]}"
    assert summary["counts"]["rejected"] == len(reasons) and {r["key"] for r in summary["rejects"]} == set(reasons)

    out = samples_of(tmp_path / "out" / "mixed-000000.tar")
    assert list(out) == [key for key, _ in valid]
    for key, members in valid:
        ext = next(e for e in members if e not in ("json", "txt"))
        assert (out[key].audio, out[key].audio_ext) == (members[ext], ext)
    with tarfile.open(tmp_path / "out" / "mixed-000000.tar") as tar:  # members a RawSample ignores are kept too
        assert tar.extractfile(f"{valid[1][0]}.txt").read() == b"kept as is"

    with pytest.raises(StrictModeError, match="bad-garbage-audio"):
        run_regenerate(RegenerateConfig(str(shard), tmp_path / "strict", max_new_tokens=4, strict=True), target)
    assert not (tmp_path / "strict" / "mixed-000000.tar").exists()


def test_sampling_depends_on_seed_and_key_not_on_batching(tmp_path, target, mixed_shard):
    shard = str(mixed_shard[0])

    def run(name: str, **kw) -> dict[str, bytes]:
        cfg = RegenerateConfig(shard, tmp_path / name, max_new_tokens=6, do_sample=True, temperature=0.8, **kw)
        run_regenerate(cfg, target)
        return {k: s.json for k, s in samples_of(tmp_path / name / "mixed-000000.tar").items()}

    batched, single, other_seed = run("b3", batch_size=3), run("b1", batch_size=1), run("s1", batch_size=3, seed=1)
    assert batched == single
    assert batched != other_seed
    answers = [json.loads(doc)["conversations"][-1]["content"] for doc in batched.values()]
    assert json.loads(next(iter(batched.values())))["regeneration"]["seed"] == 0 and len(set(answers)) > 1


def test_an_answer_cut_at_the_token_limit_is_learned_without_the_end_of_turn_the_target_never_gave(tiny_dir):
    processor = AutoProcessor.from_pretrained(tiny_dir)
    tokenizer, template = processor.tokenizer, processor.chat_template
    doc = {
        "conversations": [
            {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Transcribe the audio."}]},
            {"role": "assistant", "content": "the cat sat on"},
            {"role": "user", "content": "And again?"},
            {"role": "assistant", "content": "the cat sat on the mat"},
        ]
    }
    whole = parse_conversations(json.dumps(doc).encode())
    doc["regeneration"] = {"max_new_tokens": 4, "cut_at_max_new_tokens": [1]}  # what regenerate writes
    cut = parse_conversations(json.dumps(doc).encode())
    assert [m.get("unfinished", False) for m in cut] == [False, True, False, False]
    a = build_prompt(tokenizer, template, whole, AUDIO_TOKEN, 5, 512)
    b = build_prompt(tokenizer, template, cut, AUDIO_TOKEN, 5, 512)
    assert torch.equal(a.input_ids, b.input_ids)  # the same tokens: only what is learned from them differs
    (dropped,) = (a.loss_mask & ~b.loss_mask).nonzero().flatten().tolist()
    assert not (b.loss_mask & ~a.loss_mask).any()
    assert a.input_ids[dropped] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert b.loss_mask[dropped - 1]  # the cut answer's last token is still learned
    # the finished answer keeps its end-of-turn
    assert a.input_ids[a.loss_mask].tolist()[-1] == b.input_ids[b.loss_mask].tolist()[-1]
