"""Batched, overlapped stage one: samples prepared by worker processes and forwarded in padded batches give the
one-sample cache, within a stated tolerance on every state, with identical ids, masks, commits and rejects.

The tolerance is relative to each state tensor's largest magnitude (max |batched - one| <= tol * max |one|), per
sample and per state: batched kernels add in another order, nothing else changes. Measured on the tiny and small
targets (BENCHMARKS.md): float32 <= 7.2e-7, bfloat16 <= 1.8e-2, the size of bfloat16's own rounding (the
one-sample bf16 forward is 1.2-1.7e-2 from the float32 one).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache.format import COMMIT, PARTS, CodecConfig, PartCommit, SampleStates
from pipeline.cache.reader import open_cache
from pipeline.cache.writer import PartWriter
from pipeline.dump import GPU_BATCH_TOKENS, Batching, DumpConfig, _batches, _forward, _Item, run_dump
from pipeline.errors import StrictModeError
from pipeline.inputs.audio import AudioPolicy, decode_audio
from pipeline.inputs.conversation import parse_conversations
from pipeline.inputs.prefetch import Prefetcher
from pipeline.inputs.shards import RawSample, expand_shard_urls, iter_raw_samples
from pipeline.targets import TargetInputs, load_target
from tests.conftest import REPO, SAMPLE_SHARDS, write_tar
from tests.test_bad_input import BAD, bad_shards, poisoned_model  # noqa: F401 - fixtures used below
from tests.test_dump_scale import assert_same_cache, committed, contents

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
SHARD = str(REPO / "data/sample/shards/sample-000000.tar")
# Several samples per forward (the bundled clips give 85-114 tokens) and windows that do not divide a shard.
BATCHED = {"batch_tokens": 400, "batch_size": 4, "batch_window": 7, "prepare_workers": 2}


@pytest.fixture(scope="module")
def target(tiny_dir):
    return load_target(str(tiny_dir), "float32", "cpu")


@pytest.fixture(scope="module")
def small_dir(tiny_home) -> Path:
    """The small target's architecture (SmallTargetConfig's sizes), untrained: what its forward costs and rounds."""
    from pipeline.testing.small_target import SmallTargetConfig
    from pipeline.testing.tiny_target import ensure_tiny_target

    return ensure_tiny_target(config=SmallTargetConfig().tiny_config())


def dump(shards: str | Path, out: Path, target, **settings):
    return run_dump(DumpConfig(shards=str(shards), out=out, **settings), target)


def worst_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|: the tolerance's measure."""
    assert a.shape == b.shape and a.dtype == b.dtype
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def assert_states_close(a: SampleStates | dict, b: SampleStates | dict, dtype: torch.dtype, what: str) -> None:
    pairs = _state_pairs(a, b)
    for name, (x, y) in pairs.items():
        assert worst_difference(x, y) <= TOLERANCE[dtype], f"{what}: {name} off by {worst_difference(x, y):.2e}"


def _state_pairs(a, b) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(a, SampleStates):
        assert a.hidden_states.keys() == b.hidden_states.keys()
        pairs = {f"layer {i}": (a.hidden_states[i], b.hidden_states[i]) for i in a.hidden_states}
        return pairs | {"final": (a.final_hidden, b.final_hidden), "audio": (a.audio_embeds, b.audio_embeds)}
    assert a["hidden_states"].keys() == b["hidden_states"].keys()
    pairs = {f"layer {i}": (a["hidden_states"][i], b["hidden_states"][i]) for i in a["hidden_states"]}
    return pairs | {"final": (a["final_hidden"], b["final_hidden"]), "embeds": (a["inputs_embeds"], b["inputs_embeds"])}


def assert_close_cache(a: Path, b: Path, dtype: torch.dtype = torch.float32) -> None:
    """Same samples, ids and masks exactly; every state within the tolerance; the same commits and rejects."""
    ca, cb = contents(a), contents(b)
    assert sorted(ca) == sorted(cb)
    for key, sa in ca.items():
        sb = cb[key]
        assert torch.equal(sa["input_ids"], sb["input_ids"]) and torch.equal(sa["loss_mask"], sb["loss_mask"])
        assert_states_close(sa, sb, dtype, key)
    assert commits(a) == commits(b)


def commits(out: Path) -> dict[str, dict]:
    """Each part's commit record, without who wrote it."""
    records = {}
    for path in sorted((out / PARTS).glob(f"*/{COMMIT}")):
        record = json.loads(path.read_text())
        record.pop("writers")
        records[path.parent.name] = record
    return records


def prepared(target, count: int) -> list[TargetInputs]:
    raws = [r for url in expand_shard_urls(SAMPLE_SHARDS) for r in iter_raw_samples(url)][:count]
    return [target.prepare(parse_conversations(r.json), decode_audio(r.audio, AudioPolicy()), 2048) for r in raws]


# ------------------------------------------------------------------------------------- the adapter's batches


@pytest.mark.parametrize(
    ("model", "dtype"),
    [
        ("tiny", torch.float32),
        ("tiny", torch.bfloat16),
        pytest.param("small", torch.float32, marks=pytest.mark.slow),
        pytest.param("small", torch.bfloat16, marks=pytest.mark.slow),
    ],
)
def test_a_padded_batch_and_trimmed_audio_equal_the_one_sample_forward(model, dtype, tiny_dir, request):
    path = tiny_dir if model == "tiny" else request.getfixturevalue("small_dir")
    target = load_target(str(path), str(dtype).removeprefix("torch."), "cpu")
    inputs = prepared(target, 10)
    layers = [1, 2, 4, 5, 7]
    one = [target.forward(x, layers) for x in inputs]
    assert len({len(x.input_ids) for x in inputs}) > 1  # lengths differ: the batch holds padding
    for trim in (False, True):
        for states, x, reference in zip(target.forward_batch(inputs, layers, trim), inputs, one, strict=True):
            # padding removed: the rows are the sample's own tokens and audio tokens, nothing more
            assert states.final_hidden.shape == (len(x.input_ids), target.hidden_size)
            assert len(states.audio_embeds) == int((x.input_ids == target.audio_token_id).sum())
            assert_states_close(states, reference, dtype, f"{model} {dtype} trim={trim}")
    # one sample, not trimmed: the plain forward itself
    alone = target.forward_batch(inputs[:1], layers)[0]
    assert all(torch.equal(alone.hidden_states[i], one[0].hidden_states[i]) for i in layers)


def test_batches_are_sorted_by_length_within_the_token_budget():
    lengths = [90, 30, 60, 31, 200, 60, 10]
    ready = [(_item(p), TargetInputs(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool))) for p, n in
             enumerate(lengths)]  # fmt: skip
    batches = _batches(ready, Batching(batch_tokens=130, batch_size=3, window=7, workers=0, trim_audio_padding=False))
    assert [[item.position for item, _ in b] for b in batches] == [[6, 1, 3], [2, 5], [0], [4]]
    for batch in batches:  # the budget holds, except for a sample longer than it alone
        longest = max(len(x.input_ids) for _, x in batch)
        assert len(batch) == 1 or (len(batch) * longest <= 130 and len(batch) <= 3)
    unbatched = Batching(batch_tokens=0, batch_size=3, window=1, workers=0, trim_audio_padding=False)
    assert [[item.position for item, _ in b] for b in _batches(ready, unbatched)] == [[p] for p in range(7)]


def _item(position: int) -> _Item:
    return _Item(position, RawSample(f"k{position}", "s", None, None, None), position)


class FlakyTarget:
    """Fails batches over two samples as out of memory, and any batch holding the poisoned sample."""

    def __init__(self, poisoned: int):
        self.poisoned, self.calls = poisoned, []

    def forward_batch(self, inputs, layers, trim_audio_padding=False):
        lengths = [len(x.input_ids) for x in inputs]
        self.calls.append(lengths)
        if len(inputs) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        if self.poisoned in lengths:
            raise RuntimeError("bad sample")
        return [SampleStates({}, torch.full((n, 2), float(n)), torch.zeros(0, 2)) for n in lengths]


def test_a_failing_batch_is_split_until_the_failure_has_one_sample():
    inputs = [TargetInputs(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool)) for n in range(1, 8)]
    fake = FlakyTarget(poisoned=6)
    results = [r if isinstance(r, str) else len(r.final_hidden) for r in _forward(inputs, fake, [], False)]
    assert results == [1, 2, 3, 4, 5, "RuntimeError: bad sample", 7]
    assert max(len(c) for c in fake.calls[1:]) <= 4  # halves, then halves again


def test_the_cpu_default_is_the_bit_exact_one_sample_loop_and_a_gpu_batches():
    cfg = DumpConfig(shards="s.tar", out=Path("out"))
    cpu = Batching.resolve(cfg, torch.device("cpu"))
    assert (cpu.batch_tokens, cpu.window, cpu.workers, cpu.trim_audio_padding) == (0, 1, 0, False)
    gpu = Batching.resolve(cfg, torch.device("cuda"))
    assert gpu.batch_tokens == GPU_BATCH_TOKENS and gpu.window == cfg.batch_window and gpu.workers >= 1
    with pytest.raises(ValueError, match="batch_tokens"):
        DumpConfig(shards="s.tar", out=Path("out"), batch_tokens=-1)


def test_features_computed_over_the_clip_alone_are_the_full_length_ones(target):
    """Features over the clip and a margin, extended with the padding frame: the 30 s computation bit for bit, at any
    length (tiny, about one frame, ~2 s, 15 s, up to and past 30 s, silence); with dithering all 30 s are computed."""
    from pipeline.targets.qwen2_audio import Qwen2AudioInputs

    preparer = target.preparer()
    assert isinstance(preparer, Qwen2AudioInputs)
    extractor = preparer.processor.feature_extractor
    rng = np.random.default_rng(0)
    waves = [(rng.standard_normal(n) * 0.3).astype(np.float32) for n in (400, 1000, 32000, 240000, 478400, 479900,
                                                                          480000, 500000)]  # fmt: skip
    waves += [np.zeros(32000, np.float32), decode_audio(next(iter_raw_samples(SHARD)).audio, AudioPolicy())]
    for wave in waves:
        full, short = preparer._extract(wave, extractor.n_samples), preparer.features(wave)
        assert torch.equal(short["input_features"], full["input_features"]), len(wave)
        assert torch.equal(short["attention_mask"], full["attention_mask"]), len(wave)
    dithered = Qwen2AudioInputs(copy.deepcopy(preparer.processor), torch.float32)
    dithered.processor.feature_extractor.dither = 0.5
    features = dithered.features(waves[2])["input_features"]
    assert features.shape[-1] == extractor.nb_max_frames and not torch.equal(features[..., -1], features[..., -2])


# -------------------------------------------------------------------------------- the preparation workers


def test_the_prefetcher_keeps_order_and_reports_a_source_error_after_the_items_before_it():
    def items():
        yield from range(10)
        raise OSError("cut")

    with Prefetcher(_square, workers=2, ahead=4) as prefetch:
        seen = []
        with pytest.raises(OSError, match="cut"):
            for item, result in prefetch.map(items()):
                seen.append((item, result))
        assert seen == [(i, i * i) for i in range(10)]
        assert list(prefetch.map(range(3))) == [(0, 0), (1, 1), (2, 4)]  # the pool serves the next shard too
    inline = Prefetcher(_square, workers=0, ahead=1)
    assert list(inline.map(range(3))) == [(0, 0), (1, 1), (2, 4)] and inline.wait_seconds > 0


def _square(x: int) -> int:
    return x * x


@pytest.mark.slow  # whole dumps
def test_workers_prepare_exactly_what_the_forward_process_would(tmp_path, target, reference_cache):
    """One sample per forward, preparation in two worker processes: the reference cache bit for bit."""
    dump(SAMPLE_SHARDS, tmp_path / "c", target, batch_tokens=0, prepare_workers=2, codec=CodecConfig(chunk_tokens=16))
    assert_same_cache(tmp_path / "c", reference_cache)
    assert commits(tmp_path / "c") == commits(reference_cache)


# --------------------------------------------------------------------------------------- whole dumps


def test_a_batched_dump_equals_the_one_sample_dump(tmp_path, target, reference_cache):
    out = tmp_path / "batched"
    manifest = dump(SAMPLE_SHARDS, out, target, **BATCHED)
    assert manifest.complete and manifest.counts["samples"] == 36
    assert manifest.counts["tokens"] == open_cache(reference_cache).info["counts"]["tokens"]  # no padding cached
    assert_close_cache(out, reference_cache)
    assert "trim_audio_padding" not in manifest.settings  # batching does not decide the values


def test_trimmed_audio_padding_equals_the_full_length_encoder(tmp_path, target, reference_cache):
    out = tmp_path / "trimmed"
    manifest = dump(SAMPLE_SHARDS, out, target, trim_audio_padding=True, **BATCHED)
    assert manifest.settings["trim_audio_padding"] is True  # recorded: a resume must not mix the two
    assert_close_cache(out, reference_cache)


@pytest.mark.slow  # whole dumps
def test_a_bfloat16_batched_dump_equals_the_bfloat16_one_sample_dump(tmp_path, tiny_dir):
    bf16 = load_target(str(tiny_dir), "bfloat16", "cpu")
    dump(SHARD, tmp_path / "one", bf16)
    dump(SHARD, tmp_path / "batched", bf16, **BATCHED)
    assert_close_cache(tmp_path / "batched", tmp_path / "one", torch.bfloat16)


@pytest.mark.slow  # whole dumps
def test_rejects_and_positions_are_those_of_the_one_sample_dump(tmp_path, target):
    valid = [(r.key, {r.audio_ext: r.audio, "json": r.json}) for r in iter_raw_samples(SHARD)]
    (k0, m0), (k1, m1), (k2, m2), *rest = valid
    audio = {ext: data for ext, data in m1.items() if ext != "json"}
    samples = [
        (k0, m0),
        ("no-audio", {"json": m1["json"]}),
        (k1, m1),
        ("bad-json", {**audio, "json": b"{not json"}),
        ("undecodable", {"flac": b"fLaC but nothing else", "json": m2["json"]}),
        (k0, m2),  # a duplicate key
        *rest,
        (k2, m2),
    ]
    write_tar(tmp_path / "shard.tar", samples)
    one = dump(tmp_path / "shard.tar", tmp_path / "one", target)
    batched = dump(tmp_path / "shard.tar", tmp_path / "batched", target, **BATCHED)
    assert len(one.rejects) == 4 and batched.rejects == one.rejects
    assert_close_cache(tmp_path / "batched", tmp_path / "one")

    with pytest.raises(StrictModeError, match="'no-audio'.*missing audio member"):
        dump(tmp_path / "shard.tar", tmp_path / "strict", target, strict=True, **BATCHED)


@pytest.mark.slow
def test_every_kind_of_bad_sample_is_rejected_in_batches_as_alone(tmp_path, bad_shards, poisoned_model):  # noqa: F811
    """A NaN sample among others in one forward: only it is rejected; every reason, position and kept sample as in
    the one-sample loop (the cut shard included)."""
    root, _ = bad_shards
    target = load_target(str(poisoned_model), "float32", "cpu")
    shards = f"{root}/mixed-000000.tar,{root}/cut-000001.tar"
    settings = {"max_length": 150, "audio": AudioPolicy(max_seconds=10.0, overlong="reject")}
    one = dump(shards, tmp_path / "one", target, **settings)
    batched = dump(shards, tmp_path / "batched", target, **settings, **BATCHED)
    assert {r["key"] for r in batched.rejects} == set(BAD) and batched.rejects == one.rejects
    assert batched.shard_errors == one.shard_errors and not batched.complete
    assert_close_cache(tmp_path / "batched", tmp_path / "one")


@pytest.mark.slow  # whole dumps
def test_an_unreadable_shard_ends_as_in_the_one_sample_loop_and_is_retried(tmp_path, target):
    valid = [(r.key, {r.audio_ext: r.audio, "json": r.json}) for r in iter_raw_samples(SHARD)]
    shard = tmp_path / "shard.tar"
    write_tar(shard, valid)
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) * 2 // 3])
    one = dump(shard, tmp_path / "one", target)
    batched = dump(shard, tmp_path / "batched", target, **BATCHED)
    assert not batched.complete and batched.counts["unreadable_shards"] == 1
    assert commits(tmp_path / "batched") == commits(tmp_path / "one") and not one.complete
    shard.write_bytes(whole)
    assert dump(shard, tmp_path / "batched", target, **BATCHED).complete
    dump(shard, tmp_path / "clean", target, **BATCHED)
    assert_close_cache(tmp_path / "batched", tmp_path / "clean")  # the cut changed the last window's batches


def test_a_crash_mid_window_resumes_to_the_uninterrupted_batched_cache_bit_for_bit(tmp_path, target, monkeypatch):
    settings = {**BATCHED, "batch_window": 4, "codec": CodecConfig(chunk_tokens=16)}
    dump(SHARD, tmp_path / "clean", target, **settings)
    real_append, appended = PartWriter.append, []

    def crash_on_the_sixth(self, record):
        appended.append(record.key)
        if len(appended) == 6:
            raise RuntimeError("the machine went away")
        real_append(self, record)

    monkeypatch.setattr(PartWriter, "append", crash_on_the_sixth)
    with pytest.raises(RuntimeError, match="went away"):
        dump(SHARD, tmp_path / "crashed", target, **settings)
    monkeypatch.setattr(PartWriter, "append", real_append)
    position = PartCommit.read(next((tmp_path / "crashed" / PARTS).glob(f"*/{COMMIT}"))).position
    assert 0 < position < 9 and position % 4, f"the crash must leave a window half committed (at {position})"
    assert dump(SHARD, tmp_path / "crashed", target, **settings).complete
    assert_same_cache(tmp_path / "crashed", tmp_path / "clean")
    assert commits(tmp_path / "crashed") == commits(tmp_path / "clean")


@pytest.mark.slow
def test_kill_during_a_batched_dump_then_rerun_equals_uninterrupted(tmp_path, reference_cache):
    """A real process with preparation workers, killed with SIGKILL: no worker outlives it holding the cache lock,
    and the re-run gives the uninterrupted batched cache bit for bit (and the one-sample cache within tolerance)."""
    flags = ["--chunk-tokens", "16", "--batch-tokens", "400", "--batch-size", "4", "--batch-window", "7"]
    flags += ["--prepare-workers", "2"]
    cmd = [sys.executable, "-m", "stages.dump_hidden", SAMPLE_SHARDS, str(tmp_path / "cache"), *flags]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while committed(tmp_path / "cache") < 8 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = committed(tmp_path / "cache")
    assert 8 <= done < 36, f"the kill must land mid-dump ({done} committed)"
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and "cache: complete" in rerun.stdout, rerun.stderr[-3000:]
    clean = subprocess.run([*cmd[:4], str(tmp_path / "clean"), *flags], cwd=REPO, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert_same_cache(tmp_path / "cache", tmp_path / "clean")
    assert_close_cache(tmp_path / "cache", reference_cache)
    assert "the forward waited for input" in rerun.stdout


@pytest.mark.distributed
def test_two_ranks_batched_equal_one_rank(tmp_path, reference_cache):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    flags = ["--batch-tokens", "400", "--batch-size", "4", "--batch-window", "7", "--prepare-workers", "1"]
    out = tmp_path / "cache"
    proc = subprocess.run(
        [*torchrun, "-m", "stages.dump_hidden", SAMPLE_SHARDS, str(out), *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    writers = [json.loads(p.read_text())["writers"] for p in (out / PARTS).glob(f"*/{COMMIT}")]
    assert sorted(w[0]["rank"] for w in writers) == [0, 0, 1, 1]
    assert_close_cache(out, reference_cache)


def test_a_worker_that_dies_on_one_item_costs_that_item_only():
    """A crash (here os._exit in the worker) breaks the pool and every item in flight; the prefetcher restarts it,
    finds the culprit by running it alone, turns it into on_crash's result and carries on in order."""
    prefetch = Prefetcher(_die_on_five, workers=2, ahead=4, on_crash=lambda item, err: f"crashed {item}")
    with prefetch:
        results = list(prefetch.map(range(9)))
    assert results == [(i, "crashed 5" if i == 5 else i * i) for i in range(9)]
    assert prefetch.crashes == 1
    with Prefetcher(_die_on_five, workers=1, ahead=2) as strict, pytest.raises(BrokenProcessPool):
        list(strict.map(range(9)))


def _die_on_five(x: int) -> int:
    if x == 5:
        os._exit(3)
    return x * x
