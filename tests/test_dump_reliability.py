"""Stage one on multi-terabyte runs: unreadable shards retried, the target identified by its content, memory bounded
per sample, one dump per cache directory, and every odd input or damaged cache ending in a reason or a message."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from pipeline.cache.format import COMMIT, MANIFEST, PARTS, PartCommit
from pipeline.cache.reader import open_cache
from pipeline.cache.report import describe_dump
from pipeline.cache.writer import create_or_resume
from pipeline.dump import DumpConfig, run_dump
from pipeline.errors import ConfigError
from pipeline.inputs.conversation import BadSample, parse_conversations
from pipeline.inputs.prompt import build_prompt
from pipeline.inputs.shards import iter_raw_samples
from pipeline.targets import load_target
from tests.conftest import REPO, SAMPLE_SHARDS, run_stage, write_tar
from tests.test_cache import manifest, record
from tests.test_dump_scale import assert_same_cache, committed

VALID_SHARD = REPO / "data/sample/shards/sample-000000.tar"


@pytest.fixture(scope="module")
def valid() -> list[tuple[str, dict[str, bytes]]]:
    """The nine samples of one bundled shard, as (key, members) for ``write_tar``."""
    return [(r.key, {r.audio_ext: r.audio, "json": r.json}) for r in iter_raw_samples(str(VALID_SHARD))]


@pytest.fixture(scope="module")
def target(tiny_dir):
    return load_target(str(tiny_dir), "float32", "cpu")


def dump(shards: str | Path, out: Path, target, **settings):
    """A one-rank dump in this process (the stage's loop without its process start-up)."""
    return run_dump(DumpConfig(shards=str(shards), out=out, **settings), target)


def keys_of(out: Path) -> list[str]:
    cache = open_cache(out)
    return [cache[i]["key"] for i in range(len(cache))]


def conversation(question: str = "What is said?", answer: str = "A short answer.") -> bytes:
    turns = [
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": answer},
    ]
    return json.dumps({"conversations": turns}).encode()


def clip(members: dict[str, bytes]) -> dict[str, bytes]:
    """The audio member of a sample, under its own extension."""
    return {ext: data for ext, data in members.items() if ext != "json"}


def no_traceback(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


# ------------------------------------------------------------------------------- 1. unreadable shards are retried


def test_an_unreadable_shard_is_retried_once_repaired(tmp_path, valid, target):
    shard = tmp_path / "shard-000000.tar"
    write_tar(shard, valid[:6])
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2 + 100])  # a copy cut short
    out = tmp_path / "cache"

    first = dump(shard, out, target)
    kept = keys_of(out)
    assert 0 < len(kept) < 6 and kept == [key for key, _ in valid[: len(kept)]]
    assert not first.complete and first.counts["unreadable_shards"] == 1  # not "complete" with samples missing
    summary = describe_dump(first)
    assert "INCOMPLETE" in summary and "UNREADABLE" in summary and "re-run" in summary.split("UNREADABLE")[1]

    again = dump(shard, out, target)  # still broken: retried, nothing cached twice, still reported
    assert keys_of(out) == kept and not again.complete and len(again.shard_errors) == 1

    shard.write_bytes(whole)  # repaired, as the message advises
    done = dump(shard, out, target)
    assert done.complete and done.shard_errors == [] and done.counts["unreadable_shards"] == 0
    commit = PartCommit.read(next((out / PARTS).glob(f"*/{COMMIT}")))
    assert commit.keys == [key for key, _ in valid[:6]] and commit.positions == list(range(6))
    assert commit.complete and commit.error is None and len(commit.writers) == 3
    write_tar(tmp_path / "clean.tar", valid[:6])
    dump(tmp_path / "clean.tar", tmp_path / "clean", target)
    assert_same_cache(out, tmp_path / "clean")


# --------------------------------------------------------------------------- 2. the target is known by its content


def changed(model: Path, what: str) -> None:
    """Change one thing of a model directory in place."""
    if what == "weights":
        weights = load_file(model / "model.safetensors")
        lm_head = next(name for name in weights if name.endswith("lm_head.weight"))
        weights[lm_head][0, 0] += 1.0
        save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    elif what == "tokenizer":  # one merge less: same class and size, other ids for some words
        doc = json.loads((model / "tokenizer.json").read_text())
        doc["model"]["merges"] = doc["model"]["merges"][:-1]
        (model / "tokenizer.json").write_text(json.dumps(doc))
    elif what == "chat template":
        path = model / "chat_template.jinja"
        path.write_text(path.read_text().replace("You are a helpful assistant.", "You are a terse assistant."))
    elif what == "audio features":
        path = model / "processor_config.json"
        path.write_text(path.read_text().replace('"dither": 0.0', '"dither": 0.5'))
        assert "0.5" in path.read_text()


@pytest.mark.parametrize(
    ("what", "named"),
    [("weights", "weights"), ("tokenizer", "tokenizer"), ("chat template", "chat_template"),
     ("audio features", "feature_extractor")],
)  # fmt: skip
def test_resume_refuses_a_target_whose_content_changed(tmp_path, tiny_dir, what, named):
    model = Path(shutil.copytree(tiny_dir, tmp_path / "model"))
    out = tmp_path / "cache"
    dump(VALID_SHARD, out, load_target(str(model), "float32", "cpu"))
    head = (out / "target_head.safetensors").read_bytes()
    changed(model, what)
    with pytest.raises(ConfigError, match=rf"other settings \(target model \(.*{named}.*\) differ\)"):
        dump(VALID_SHARD, out, load_target(str(model), "float32", "cpu"))
    assert (out / "target_head.safetensors").read_bytes() == head  # the teacher is still the first target's


def test_the_same_model_at_another_path_resumes(tmp_path, tiny_dir, valid):
    first, second = (Path(shutil.copytree(tiny_dir, tmp_path / name)) for name in ("a", "b"))
    shard = tmp_path / "shard.tar"
    write_tar(shard, valid[:3])
    out = tmp_path / "cache"
    dump(shard, out, load_target(str(first), "float32", "cpu"))
    write_tar(tmp_path / "more.tar", valid[3:5])
    resumed = dump(f"{shard},{tmp_path / 'more.tar'}", out, load_target(str(second), "float32", "cpu"))
    assert resumed.complete and resumed.counts["samples"] == 5
    assert str(first) not in json.dumps(resumed.target["config"])  # the path is no part of the identity


def test_a_resume_without_dtype_keeps_the_caches_dtype(tmp_path, tiny_dir, valid, capsys):
    """The default dtype depends on the memory free at the time; resuming, the cache's own dtype is used instead, so
    a bfloat16 cache started when memory was short still resumes (float32 would be refused as another dtype)."""
    shard, more, out = tmp_path / "shard.tar", tmp_path / "more.tar", tmp_path / "cache"
    write_tar(shard, valid[:2])
    write_tar(more, valid[2:3])
    dump(shard, out, load_target(str(tiny_dir), "bfloat16", "cpu"), dtype="bfloat16")
    resumed = run_dump(DumpConfig(shards=f"{shard},{more}", out=out, model=str(tiny_dir)))
    assert resumed.complete and resumed.dtype == "bfloat16" and resumed.counts["samples"] == 3
    assert "dtype: bfloat16 (the cache's, resuming it" in capsys.readouterr().out


def test_weights_are_hashed_once_per_file_and_hub_blobs_not_at_all(tmp_path, tiny_dir, monkeypatch):
    import pipeline.targets.model_files as model_files

    plain = model_files.weights_digest(tiny_dir)
    data = (tiny_dir / "model.safetensors").read_bytes()
    assert plain == {"model.safetensors": f"sha256:{hashlib.sha256(data).hexdigest()}"}
    # The HF hub cache names a weight file's blob by its sha256: the same digest without reading 16 GB again.
    repo = tmp_path / "hub/models--org--model"
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    snapshot = repo / "snapshots/0123abc"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(Path("../..") / "blobs" / blob.name)
    monkeypatch.setattr(model_files, "sha256_of_file", lambda path: pytest.fail(f"{path} was read"))
    assert model_files.weights_digest(snapshot) == plain


# ----------------------------------------------------------------------- 7. memory is bounded before tokenising


class CountingTokenizer:
    """The target's tokenizer, refusing to tokenise more than ``limit`` characters at once."""

    def __init__(self, tokenizer, limit: int):
        self._tokenizer, self.limit, self.longest = tokenizer, limit, 0

    def __call__(self, text, *args, **kwargs):
        self.longest = max(self.longest, len(text))
        assert len(text) <= self.limit, f"tokenised {len(text)} characters at once"
        return self._tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __len__(self) -> int:
        return len(self._tokenizer)


def test_an_oversized_conversation_is_cut_before_tokenising(tmp_path, valid, target, monkeypatch):
    huge = "word " * 2_000_000  # a 10 MB json member
    audio = clip(valid[0][1])
    samples = [
        valid[0],
        ("huge-answer", {**audio, "json": conversation(answer=huge)}),
        ("huge-question", {**audio, "json": conversation(question=huge)}),
        valid[1],
    ]
    write_tar(tmp_path / "shard.tar", samples)
    assert len(samples[1][1]["json"]) > 10_000_000
    spy = CountingTokenizer(target.tokenizer, limit=64 * 2048 + 4096)
    monkeypatch.setattr(target, "tokenizer", spy)
    m = dump(tmp_path / "shard.tar", tmp_path / "cache", target)
    cache = open_cache(tmp_path / "cache")
    assert [cache[i]["key"] for i in range(len(cache))] == [valid[0][0], "huge-answer", valid[1][0]]
    assert len(cache[1]["input_ids"]) == 2048 and cache[1]["loss_mask"].any()  # cut to --max-length, learnt from
    [reject] = m.rejects
    assert reject["key"] == "huge-question" and reject["reason"].startswith("over the length limit")
    assert spy.longest <= spy.limit


@pytest.mark.parametrize(
    "text",
    ["word " * 4000, "1234567890" * 2000, " " * 20000, "=" * 20000, "x" * 20000, "日本語のテキスト" * 2500],
    ids=["words", "digits", "spaces", "equals", "one-long-word", "cjk"],
)
def test_the_cut_never_changes_the_tokens_kept(target, text):
    """A conversation cut to its character budget gives the tokens the whole one gives, or a reason."""
    messages = parse_conversations(conversation(answer=text))
    args = (target.tokenizer, target.processor.chat_template, messages, "<|AUDIO|>", 20)
    whole = build_prompt(*args, 10**9)
    try:
        cut = build_prompt(*args, 150)
    except BadSample as err:
        assert str(err).startswith("over the length limit")
        return
    assert cut.input_ids.tolist() == whole.input_ids[:150].tolist()
    assert cut.loss_mask.tolist() == whole.loss_mask[:150].tolist()


@pytest.mark.slow
def test_peak_memory_of_a_10_mb_conversation_stays_bounded(tmp_path, valid, tiny_dir):
    write_tar(tmp_path / "plain.tar", valid[:2])
    huge = ("huge", {**clip(valid[0][1]), "json": conversation(answer="word " * 2_000_000)})
    write_tar(tmp_path / "huge.tar", [*valid[:2], huge])

    def peak_mb(name: str) -> float:
        """The stage's peak resident memory in MB, dumping one shard."""
        argv = ["dump_hidden", str(tmp_path / name), str(tmp_path / f"{name}.cache")]
        code = (
            f"import resource, runpy, sys; sys.argv = {argv!r}\n"
            "runpy.run_module('stages.dump_hidden', run_name='__main__')\n"
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
        )
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return float(proc.stdout.rsplit("PEAK", 1)[1])

    plain, huge = peak_mb("plain.tar"), peak_mb("huge.tar")
    assert huge - plain < 300, f"peak {huge:.0f} MB with the 10 MB sample, {plain:.0f} MB without"


# ------------------------------------------------------------------------------------- 8. one dump per cache


@pytest.mark.slow
def test_a_second_dump_into_a_busy_cache_is_refused_and_a_killed_one_leaves_no_lock(tmp_path, reference_cache):
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "stages.dump_hidden", SAMPLE_SHARDS, str(out), "--chunk-tokens", "16"]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while committed(out) < 1 and first.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGSTOP)  # mid-dump, holding the cache
        second = run_stage(*cmd[2:], check=False, timeout=120)
        assert second.returncode != 0
        assert f"pid {first.pid} on {socket.gethostname()}" in no_traceback(second), second.stderr
    finally:
        os.kill(first.pid, signal.SIGKILL)  # no clean exit: the OS releases the lock
        first.wait()
    rerun = run_stage(*cmd[2:])
    assert "cache: complete" in rerun.stdout
    assert_same_cache(out, reference_cache)


def test_the_lock_names_its_holder(tmp_path, target):
    from pipeline.cache.writer import lock_cache

    out = tmp_path / "cache"
    with lock_cache(out):
        with pytest.raises(ConfigError) as err:
            dump(VALID_SHARD, out, target)
    message = str(err.value)
    assert f"pid {os.getpid()} on {socket.gethostname()}, started " in message and "--out" in message
    assert dump(VALID_SHARD, out, target).complete  # released: the next dump runs


# ----------------------------------------------------------------------------------------- 9. smaller things


def test_duplicate_keys_two_clips_and_turns_out_of_order_are_rejected_with_reasons(tmp_path, valid, target):
    (k0, m0), (k1, m1), (k2, m2), (k3, m3), (k4, m4) = valid[:5]
    assistant_first = [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Hi?"}]
    system_late = [
        {"role": "user", "content": "Hi?"},
        {"role": "system", "content": "Be brief."},
        {"role": "assistant", "content": "Hello."},
    ]
    samples = [
        (k0, m0),
        (k1, m1),
        (k0, m2),  # the same key again, later in the shard
        ("two-clips", {"mp3": b"ID3 not decoded", **clip(m1), "json": m1["json"]}),
        ("assistant-first", {**clip(m1), "json": json.dumps({"conversations": assistant_first}).encode()}),
        ("system-late", {**clip(m1), "json": json.dumps({"conversations": system_late}).encode()}),
        (k3, m3),
        (k3, {**clip(m3), "json": m4["json"]}),  # the same key twice in a row: a repeated member starts a second
        (k4, m4),
    ]
    write_tar(tmp_path / "shard.tar", samples)
    m = dump(tmp_path / "shard.tar", tmp_path / "cache", target)
    assert keys_of(tmp_path / "cache") == [k0, k1, k3, k4]
    reasons = {(r["key"], r["position"]): r["reason"] for r in m.rejects}
    assert reasons == {
        (k0, 2): f"duplicate key {k0!r}: sample 0 of this shard has it too (keys must be unique)",
        ("two-clips", 3): "2 audio members (two-clips.mp3, two-clips.wav); a sample holds one clip",
        ("assistant-first", 4): "turn 0 is an assistant turn before any user turn (turns go: system, then user "
        "and assistant)",
        ("system-late", 5): "turn 1 is a system turn after the conversation began (system turns come first)",
        (k3, 7): f"duplicate key {k3!r}: sample 6 of this shard has it too (keys must be unique)",
    }


def test_raw_bytes_count_each_sample_once_across_a_resume(tmp_path):
    import torch

    gen = torch.Generator().manual_seed(0)
    writer = create_or_resume(tmp_path, manifest(["s"]), lambda: {"embed_tokens": torch.zeros(64, 16).bfloat16()})
    records = [record(f"k{i}", i, 6, 1, gen) for i in range(30)]  # 180 rows: a partial flush at 64 rows
    part = writer.part("s")
    for r in records[:20]:
        part.append(r)
    assert 0 < part.commit.num_samples < 20  # killed here: some samples committed, the rest lost
    resumed = writer.part("s")
    for r in records[resumed.position :]:
        resumed.append(r)
    resumed.finish()
    assert resumed.commit.num_samples == 30
    assert resumed.commit.raw_bytes == sum(r.num_bytes for r in records)


@pytest.mark.slow
def test_damaged_and_empty_caches_end_with_a_message(tmp_path, reference_cache):
    def dump_into(cache: Path) -> subprocess.CompletedProcess:  # the command that made the reference cache
        return run_stage("stages.dump_hidden", SAMPLE_SHARDS, str(cache), "--chunk-tokens", "16", check=False)

    # a part whose commit record is missing: verify names it, a re-run redoes it
    missing = Path(shutil.copytree(reference_cache, tmp_path / "missing"))
    part = sorted((missing / PARTS).iterdir())[1]
    (part / COMMIT).unlink()
    proc = run_stage("stages.inspect_cache", str(missing), "--verify", check=False)
    assert proc.returncode == 1 and f"DAMAGED {part.name}" in proc.stdout and "re-run" in no_traceback(proc)
    proc = dump_into(missing)
    assert proc.returncode == 0 and "cache: complete" in proc.stdout, no_traceback(proc)
    assert_same_cache(missing, reference_cache)

    # a commit record that cannot be read: the message says which part to delete; doing so repairs the cache
    (part / COMMIT).write_text("{")
    proc = dump_into(missing)
    assert proc.returncode != 0 and f"delete {part}" in no_traceback(proc), proc.stderr
    shutil.rmtree(part)
    assert dump_into(missing).returncode == 0
    assert_same_cache(missing, reference_cache)

    # a manifest that cannot be read
    broken = Path(shutil.copytree(reference_cache, tmp_path / "broken"))
    (broken / MANIFEST).write_text("{not json")
    for proc in (run_stage("stages.inspect_cache", str(broken), check=False), dump_into(broken)):
        assert proc.returncode != 0 and "manifest.json: unreadable manifest" in no_traceback(proc)
    assert "another --out" in proc.stderr  # the dump says what to do

    # an empty directory: not a cache yet; a dump into it makes one
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_stage("stages.inspect_cache", str(empty), check=False)
    assert proc.returncode != 0 and "is not a hidden-state cache" in no_traceback(proc)
    assert "cache: complete" in run_stage("stages.dump_hidden", str(VALID_SHARD), str(empty)).stdout


@pytest.mark.slow
def test_a_full_disk_while_writing_the_target_head_ends_with_a_message(tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:  # the tiny target's head is 0.5 MB: it cannot be written
        proc = run_stage("stages.dump_hidden", str(VALID_SHARD), str(mount / "cache"), check=False)
        assert proc.returncode != 0, proc.stdout
        assert "No space left on device" in no_traceback(proc) and "re-run the same command" in proc.stderr
        assert not (mount / "cache" / MANIFEST).exists()
    finally:
        subprocess.run(["umount", str(mount)])
