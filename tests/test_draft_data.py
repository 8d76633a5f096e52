"""The draft's training loader on the reference dump: exact contents, budget, determinism, splits, resume."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from pipeline.cache.reader import CachePart, open_cache
from pipeline.draft.serving import reads_merged
from pipeline.inputs.split import eval_fraction
from pipeline.train.data import (
    LoaderConfig,
    coalesce,
    count_batches,
    make_loader,
    split_keys,
)

LAYERS = [5, 2]  # not the cache's order: aux follows the config
# small budget and window: several windows and several batches per window on 36 samples of ~80-120 tokens
SEED = 0  # LoaderConfig's default seed
# merged: every batch's embeddings are then the cache's samples exactly (the other kinds are tested against it)
SMALL = dict(layers=LAYERS, max_tokens=400, shuffle_window=12, mix_parts=2, eval_percent=10.0, audio_embeds="merged")


def run(path, split="train", epoch=0, rank=0, world_size=1, skip=0, **overrides) -> list[dict]:
    cfg = LoaderConfig(**{**SMALL, "num_workers": 0, **overrides})
    return list(make_loader(path, cfg, split, epoch, rank, world_size, skip))


def keys(batches: list[dict]) -> list[list[str]]:
    return [b["keys"] for b in batches]


def flat_keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert keys(a) == keys(b)
    for x, y in zip(a, b, strict=True):
        for name in ("input_ids", "loss_mask", "aux", "inputs_embeds", "final_hidden", "lengths"):
            assert torch.equal(x[name], y[name]), name


@pytest.fixture(scope="module")
def cache(reference_cache):
    return open_cache(reference_cache)


@pytest.fixture(scope="module")
def samples(cache) -> dict[str, dict]:
    return {s["key"]: s for s in (cache[i] for i in range(len(cache)))}


def check_batch(batch: dict, samples: dict, layers: list[int], merged: bool = True) -> None:
    """Every row equals the cache's sample (cut to its length); padding is zero, masked out and on the right."""
    b, t = batch["input_ids"].shape
    h = next(iter(samples.values()))["final_hidden"].shape[1]
    assert batch["input_ids"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.bool
    assert batch["aux"].shape == (b, t, len(layers) * h)
    assert batch["inputs_embeds"].shape == batch["final_hidden"].shape == (b, t, h)
    assert len(batch["keys"]) == len(batch["lengths"]) == b
    assert int(batch["lengths"].max()) == t
    for j, key in enumerate(batch["keys"]):
        s, n = samples[key], int(batch["lengths"][j])
        assert n == min(len(s["input_ids"]), t)  # only cut when the sample is longer than the batch allows
        assert torch.equal(batch["input_ids"][j, :n], s["input_ids"][:n])
        assert torch.equal(batch["loss_mask"][j, :n], s["loss_mask"][:n])
        assert torch.equal(batch["aux"][j, :n], torch.cat([s["hidden_states"][i][:n] for i in layers], dim=-1))
        assert torch.equal(batch["final_hidden"][j, :n], s["final_hidden"][:n])
        if merged:
            assert torch.equal(batch["inputs_embeds"][j, :n], s["inputs_embeds"][:n])
        assert not batch["loss_mask"][j, n:].any() and not batch["input_ids"][j, n:].any()
        for name in ("aux", "inputs_embeds", "final_hidden"):
            assert not batch[name][j, n:].any(), name


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"max_tokens": 100_000, "shuffle_window": 64, "mix_parts": 1},  # one batch: neighbours share reads
        {"max_length": 30},  # cut inside the audio: the first audio rows only
        {"layers": [2, 4, 5]},
    ],
)
def test_batches_equal_cache_samples(reference_cache, samples, overrides):
    batches = run(reference_cache, **overrides)
    for batch in batches:
        check_batch(batch, samples, overrides.get("layers", LAYERS))
    if "max_length" in overrides:
        assert all(b["input_ids"].shape[1] == 30 for b in batches)


def test_placeholder_embeddings_differ_exactly_at_audio(reference_cache, cache, samples):
    placeholder = run(reference_cache, audio_embeds="placeholder")
    merged = run(reference_cache)
    assert keys(placeholder) == keys(merged)
    for p, m in zip(placeholder, merged, strict=True):
        check_batch(p, samples, LAYERS, merged=False)
        for j, n in enumerate(p["lengths"].tolist()):
            ids = p["input_ids"][j, :n]
            assert torch.equal(p["inputs_embeds"][j, :n], cache.embed_tokens[ids])
            audio = ids == cache.audio_token_id
            assert audio.any()
            differs = (p["inputs_embeds"][j, :n] != m["inputs_embeds"][j, :n]).any(dim=-1)
            assert torch.equal(differs, audio)


def test_mixed_gives_each_sample_merged_or_placeholder_embeddings_as_drawn(reference_cache, cache):
    """``mixed``: each sample exactly as the merged or the placeholder loader gives it, as ``reads_merged`` drew,
    some of each, drawn again each epoch."""
    by_epoch = []
    for epoch in (0, 1):
        merged, placeholder = (
            run(reference_cache, epoch=epoch),
            run(reference_cache, epoch=epoch, audio_embeds="placeholder"),
        )
        mixed = run(reference_cache, epoch=epoch, audio_embeds="mixed", placeholder_share=0.5)
        assert keys(mixed) == keys(merged)
        drawn = {}
        for x, m, p in zip(mixed, merged, placeholder, strict=True):
            for j, key in enumerate(x["keys"]):
                drawn[key] = reads_merged("mixed", key, SEED, epoch, 0.5)
                assert torch.equal(x["inputs_embeds"][j], (m if drawn[key] else p)["inputs_embeds"][j]), key
                for name in ("input_ids", "loss_mask", "aux", "final_hidden"):
                    assert torch.equal(x[name][j], m[name][j])
        assert 0 < sum(drawn.values()) < len(drawn)
        by_epoch.append(drawn)
    assert by_epoch[0] != by_epoch[1]


def test_token_budget_and_long_samples(reference_cache, samples):
    for batches, budget in [(run(reference_cache), 400), (run(reference_cache, max_tokens=150), 150)]:
        assert all(b["input_ids"].numel() <= budget for b in batches)
    cut = run(reference_cache, max_tokens=64)  # every sample is longer: alone in its batch, cut to the budget
    assert all(b["input_ids"].shape == (1, 64) for b in cut)
    for batch in cut:
        check_batch(batch, samples, LAYERS)


def test_deterministic_whatever_the_workers(reference_cache):
    reference = run(reference_cache, num_workers=0)
    assert len(reference) >= 6
    for workers in (1, 2):
        assert_same_batches(run(reference_cache, num_workers=workers), reference)
    assert_same_batches(run(reference_cache, num_workers=0), reference)


def test_two_ranks_together_see_the_one_rank_sequence(reference_cache):
    one = run(reference_cache)
    assert count_batches(reference_cache, LoaderConfig(**SMALL), "train", 0) == len(one)
    r0 = run(reference_cache, rank=0, world_size=2, num_workers=2)
    r1 = run(reference_cache, rank=1, world_size=2, num_workers=1)
    assert keys(r0) == keys(one)[0::2] and keys(r1) == keys(one)[1::2]
    assert_same_batches(r0, one[0::2])


def test_even_ranks_get_as_many_batches(reference_cache):
    one = run(reference_cache)
    ranks = [run(reference_cache, rank=r, world_size=4, even_ranks=True) for r in range(4)]
    assert len(one) % 4 and all(len(r) == len(one) // 4 for r in ranks)  # the last incomplete round is dropped
    assert [keys(r)[i] for i in range(len(one) // 4) for r in ranks] == keys(one)[: len(one) // 4 * 4]


@pytest.mark.parametrize("split", ["train", "eval"])
def test_every_sample_once_per_epoch(reference_cache, cache, split):
    expected = Counter(split_keys(cache, split, SMALL["eval_percent"]))
    assert expected and max(expected.values()) == 1
    for workers in (1, 2):
        assert Counter(flat_keys(run(reference_cache, split, num_workers=workers))) == expected
    two_ranks = [run(reference_cache, split, rank=r, world_size=2, num_workers=2) for r in (0, 1)]
    assert Counter(flat_keys(two_ranks[0]) + flat_keys(two_ranks[1])) == expected


def test_held_out_split_is_disjoint_and_stable(cache):
    every = [k for part in cache.parts for k in part.read_commit().keys]
    train, held = split_keys(cache, "train", 10.0), split_keys(cache, "eval", 10.0)
    assert set(train).isdisjoint(held) and sorted(train + held) == sorted(every)
    assert 0 < len(held) < len(every) // 2
    assert split_keys(cache, "eval", 10.0) == held
    assert set(split_keys(cache, "eval", 20.0)) >= set(held)  # a larger share only adds samples
    assert split_keys(cache, "eval", 0.0) == []
    # pinned: the held-out set must not move between versions or machines (sha1 of the key)
    assert eval_fraction("clip-000") == pytest.approx(89.79902771627056)
    assert eval_fraction("clip-001") == pytest.approx(24.58121885151379)


@pytest.mark.parametrize("world_size,workers", [(1, 0), (1, 2), (2, 2)])
def test_skip_batches_equals_dropping_them(reference_cache, world_size, workers):
    for rank in range(world_size):
        full = run(reference_cache, rank=rank, world_size=world_size)
        for skip in (1, 3):
            resumed = run(reference_cache, rank=rank, world_size=world_size, skip=skip, num_workers=workers)
            assert_same_batches(resumed, full[skip:])
    assert run(reference_cache, skip=1000) == []


def test_epochs_and_seeds_change_the_order(reference_cache):
    orders = [keys(run(reference_cache, epoch=e)) for e in (0, 1)] + [keys(run(reference_cache, seed=1))]
    assert orders[0] != orders[1] and orders[0] != orders[2]
    assert all(sorted(sum(o, [])) == sorted(sum(orders[0], [])) for o in orders)


def test_first_batch_reads_only_the_parts_it_needs(reference_cache, monkeypatch):
    reads = []
    original = CachePart.read_commit
    monkeypatch.setattr(CachePart, "read_commit", lambda self: reads.append(self.path.name) or original(self))
    cfg = LoaderConfig(**{**SMALL, "num_workers": 0, "mix_parts": 1, "shuffle_window": 4})
    first = next(iter(make_loader(reference_cache, cfg, "train", 0)))
    assert first["keys"] and len(reads) == 1  # one part of four: no scan before the first batch


def test_coalesce_merges_spans_sharing_or_adjoining_chunks():
    # chunk 16: [0,10) and [12,20) share chunk 0; up to [70,80) no gap holds a whole chunk, so the merged read
    # decodes only chunks some span needs; the chunk [80,96) lies wholly in the gap before [100,110): two reads
    spans = [(0, 10), (12, 20), (40, 50), (70, 80), (100, 110)]
    assert coalesce(spans, 16) == [(0, 80, [0, 1, 2, 3]), (100, 110, [4])]
    assert coalesce([(0, 16), (32, 40)], 16) == [(0, 16, [0]), (32, 40, [1])]  # chunk [16,32) lies between
    assert coalesce([], 16) == []


def test_rejects_layers_not_in_the_cache(reference_cache):
    with pytest.raises(ValueError, match="not in the cache"):
        make_loader(reference_cache, LoaderConfig(layers=[3]), "train", 0)
    with pytest.raises(ValueError, match="audio_embeds"):
        LoaderConfig(layers=[2], audio_embeds="zeros")
