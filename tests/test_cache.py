"""The cache format: records, versions, exact read-back, and damaged data refused by every reader with the part named.

Small caches are written through the cache's own writer (no model); the last test trains on a damaged copy of the
tiny target's reference dump.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import torch

from pipeline.cache.format import COMMIT, MANIFEST, CodecConfig, Manifest, PartCommit, SampleStates
from pipeline.cache.reader import open_cache
from pipeline.cache.rows import RowReader
from pipeline.cache.writer import SampleRecord, create_or_resume
from pipeline.draft.vocab import count_masked_tokens
from pipeline.errors import CacheError, ConfigError
from pipeline.train.data import LoaderConfig, make_loader
from tests.conftest import run_stage

H, LAYERS, VOCAB, AUDIO = 16, [1, 3], 64, 5
TARGET = {"name_or_path": "synthetic", "model_type": "test", "opaque": {"anything": [1, 2]}}


def manifest(shards: list[str], chunk_tokens: int = 4, hidden: int = H) -> Manifest:
    return Manifest(
        target=TARGET, audio_token_id=AUDIO, hidden_size=hidden, num_layers=4, vocab_size=VOCAB,
        captured_layers=LAYERS, dtype="bfloat16", codec=CodecConfig(chunk_tokens=chunk_tokens), shards=shards,
    )  # fmt: skip


def record(key: str, position: int, tokens: int, audio: int, gen: torch.Generator, hidden: int = H) -> SampleRecord:
    ids = torch.randint(AUDIO + 1, VOCAB, (tokens,), generator=gen).to(torch.int32)
    ids[1 : 1 + audio] = AUDIO
    mask = (torch.arange(tokens) >= tokens // 2).to(torch.uint8)

    def state(n: int) -> torch.Tensor:
        return torch.randn(n, hidden, generator=gen).to(torch.bfloat16)

    states = SampleStates({layer: state(tokens) for layer in LAYERS}, state(tokens), state(audio))
    return SampleRecord(key, position, ids.numpy(), mask.numpy(), states)


def write_cache(root: Path, parts: int = 3, samples: int = 6) -> list[SampleRecord]:
    """A finished cache of ``parts`` parts written by the writer; chunks of 4 rows, so samples span several."""
    gen = torch.Generator().manual_seed(0)
    embed = torch.randn(VOCAB, H, generator=gen).to(torch.bfloat16)
    writer = create_or_resume(root, manifest([f"shard-{p}.tar" for p in range(parts)]), lambda: {"embed_tokens": embed})
    records = []
    for p, shard in enumerate(writer.manifest.shards):
        part = writer.part(shard)
        for i in range(samples):
            records.append(record(f"{shard}-{i}", i, 5 + (3 * i + p) % 7, 1 + i % 3, gen))
            part.append(records[-1])
        part.finish()
    writer.finalise()
    return records


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, list[SampleRecord]]:
    root = tmp_path_factory.mktemp("cache") / "cache"
    return root, write_cache(root)


@pytest.fixture
def copy(written, tmp_path) -> Path:
    """A copy of the written cache that a test may damage."""
    return Path(shutil.copytree(written[0], tmp_path / "cache"))


# ------------------------------------------------------------------------------------------ records and versions


def test_manifest_and_commit_round_trip(written, tmp_path):
    root, _ = written
    m = Manifest.read(root)
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict())), tmp_path) == m
    assert m.format_version == 3 and m.complete and m.target == TARGET and m.audio_token_id == AUDIO
    assert m.codec == CodecConfig(chunk_tokens=4) and [p.name for p in m.parts] == sorted(p.name for p in m.parts)
    assert m.counts["samples"] == 18 and m.counts["shards_done"] == 3
    commit = PartCommit.read(root / "parts" / m.parts[0].name / COMMIT)
    assert PartCommit.from_dict(json.loads(json.dumps(commit.to_dict())), tmp_path) == commit
    assert commit.num_samples == 6 and commit.complete and commit.tokens == m.parts[0].tokens
    assert commit.keys == [f"shard-0.tar-{i}" for i in range(6)] and commit.writers == [{}]


def test_info_and_target(written):
    cache = open_cache(written[0])
    assert cache.target == TARGET and isinstance(cache.manifest, Manifest)
    info = cache.info
    assert (info["model"], info["model_type"]) == ("synthetic", "test")
    assert (info["hidden_size"], info["num_layers"], info["vocab_size"]) == (H, 4, VOCAB)
    assert info["captured_layers"] == LAYERS and info["num_samples"] == 18 and info["complete"]


def test_another_format_version_is_refused(copy):
    doc = json.loads((copy / MANIFEST).read_text())
    (copy / MANIFEST).write_text(json.dumps({**doc, "format_version": 1}))
    with pytest.raises(CacheError) as err:
        open_cache(copy)
    assert str(err.value) == (
        f"{copy} is a cache of format version 1, but this code reads versions 2, 3 only: dump it again with this "
        "version (`just dump-hidden SHARDS OUT` into a new or emptied directory)"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "is not a hidden-state cache (no manifest.json)"),
        ("{not json", "manifest.json: unreadable manifest"),
        ('["a list"]', "manifest.json: malformed manifest (not a JSON object)"),
        (json.dumps({"format_version": 2, "hidden_size": 16}), "manifest.json: malformed manifest ("),
    ],
)
def test_missing_or_malformed_manifest(copy, content, message):
    (copy / MANIFEST).unlink()
    if content is not None:
        (copy / MANIFEST).write_text(content)
    with pytest.raises(CacheError, match=re.escape(message)):
        open_cache(copy)


@pytest.mark.parametrize("content", [None, "{", json.dumps({"shard": "x", "keys": ["a"]})])
def test_missing_or_malformed_commit(copy, content):
    cache = open_cache(copy)
    path = cache.parts[1].path / COMMIT
    path.unlink()
    if content is not None:
        path.write_text(content)
    cache[0]  # another part: still readable
    with pytest.raises(CacheError, match=f"{re.escape(str(path))}: (commit record missing|unreadable|malformed)"):
        cache[6]


def test_resume_needs_the_same_settings(copy):
    head = lambda: pytest.fail("an existing cache keeps its head weights")  # noqa: E731
    same = manifest([f"shard-{p}.tar" for p in range(3)])
    same.target = {**TARGET, "name_or_path": "/elsewhere/synthetic"}  # loaded by another name: still the same
    create_or_resume(copy, same, head)
    assert not Manifest.read(copy).complete  # unfinished until the resumed dump finalises it
    other = manifest(same.shards, chunk_tokens=8)
    other.target = {**TARGET, "opaque": {"anything": [3]}}
    with pytest.raises(
        ConfigError,
        match=r"other settings \(codec: this cache was written with --state-encoding exact "
        r"--codec zstd --level 1 --shuffle shuffle --block-kib 1024 --chunk-tokens 4, target model "
        r"\(opaque\) differ\)",
    ):
        create_or_resume(copy, other, head)


# ------------------------------------------------------------------------------------------------ reading back


def test_samples_read_back_exactly(written):
    root, records = written
    cache = open_cache(root)
    embed = cache.embed_tokens
    assert len(cache) == len(records)
    for i, r in enumerate(records):
        s = cache[i]
        ids = torch.from_numpy(r.input_ids).long()
        assert s["key"] == r.key and s["shard"] == r.key.rsplit("-", 1)[0]
        assert torch.equal(s["input_ids"], ids) and torch.equal(s["loss_mask"], torch.from_numpy(r.loss_mask).bool())
        assert s["hidden_states"].keys() == r.states.hidden_states.keys()
        for layer, h in r.states.hidden_states.items():
            assert torch.equal(s["hidden_states"][layer], h)
        assert torch.equal(s["final_hidden"], r.states.final_hidden)
        audio = ids == AUDIO
        assert torch.equal(s["inputs_embeds"][audio], r.states.audio_embeds)
        assert torch.equal(s["inputs_embeds"][~audio], embed[ids[~audio]])


def test_all_zero_chunks_are_stored(tmp_path):
    """An all-zero chunk (zarr skips those by default) is written, so it is not taken for a missing one."""
    gen = torch.Generator().manual_seed(0)
    writer = create_or_resume(tmp_path, manifest(["s"]), lambda: {"embed_tokens": torch.zeros(VOCAB, H).bfloat16()})
    part = writer.part("s")
    records = [record(f"k{i}", i, 40, 2, gen) for i in range(4)]  # 160 rows: more than one 64-row mask chunk
    for r in records:
        r.loss_mask[:] = 0
        part.append(r)
    part.finish()
    writer.finalise()
    cache = open_cache(tmp_path)
    assert sorted(p.name for p in (cache.parts[0].path / "loss_mask" / "c").iterdir()) == ["0", "1", "2"]
    assert cache.rows.verify_part(0) == [] and not cache[3]["loss_mask"].any()


def _reverse_blocks(frame: bytes) -> bytes:
    """The same blosc frame with its blocks stored in reverse order (as multi-threaded compression may store them)."""
    nbytes, blocksize, cbytes = struct.unpack("<III", frame[4:16])
    n = -(-nbytes // blocksize)
    starts = list(struct.unpack(f"<{n}i", frame[16 : 16 + 4 * n]))
    ends = [*starts[1:], cbytes]
    body, new_starts = b"", [0] * n
    for j in reversed(range(n)):
        new_starts[j] = 16 + 4 * n + len(body)
        body += frame[starts[j] : ends[j]]
    return frame[:16] + struct.pack(f"<{n}i", *new_starts) + body


def test_partial_block_decoding_equals_the_rows_written(tmp_path):
    """Rows decoded block by block equal what was written, whatever the blocks' storage order, also for chunks
    stored as is (incompressible); a small read decodes a block or two, not the chunk."""
    h, chunk = 4096, 256  # bf16 at the real hidden size: 2 MiB chunks of 16 blosc blocks
    gen = torch.Generator().manual_seed(0)
    head = {"embed_tokens": torch.zeros(VOCAB, h, dtype=torch.bfloat16)}
    m = manifest(["s"], chunk, h)
    m.codec = CodecConfig(chunk_tokens=chunk, block_kib=128)
    writer = create_or_resume(tmp_path, m, lambda: head)
    part = writer.part("s")
    records = [record(f"k{i}", i, n, 1, gen, h) for i, n in enumerate([256, 300, 212, 256, 256])]
    noise = np.random.default_rng(0).integers(0, 2**16, (chunk, h), dtype=np.uint16)
    records[3].states.final_hidden = torch.from_numpy(noise).view(torch.bfloat16)  # rows 768:1024, chunk 3
    for r in records:
        part.append(r)
    part.finish()
    writer.finalise()
    first = part.path / "final_hidden" / "c" / "1" / "0"
    frame = _reverse_blocks(first.read_bytes()[:-4])
    first.write_bytes(frame + struct.pack("<I", google_crc32c.value(frame)))
    expected = torch.cat([r.states.final_hidden for r in records]).view(torch.uint16).numpy()
    source = RowReader(open_cache(tmp_path))
    rng = np.random.default_rng(1)
    for start, stop in [(0, 5 * chunk), (3, 9), (250, 530), (chunk + 17, chunk + 18), *rng.integers(0, 1280, (20, 2))]:
        start, stop = sorted((int(start), int(stop)))
        pieces = [(at, rows.copy()) for at, rows in source.pieces(0, "final_hidden", start, stop)]
        assert [at for at, _ in pieces][:1] == ([start] if stop > start else [])
        got = np.concatenate([rows for _, rows in pieces]) if pieces else np.empty((0, h), np.uint16)
        assert np.array_equal(got, expected[start:stop]), (start, stop)
        assert np.array_equal(source.read(0, "final_hidden", start, stop), expected[start:stop]), (start, stop)
    before = source.decoded_bytes
    list(source.pieces(0, "final_hidden", 10, 12))
    assert source.decoded_bytes - before <= 2 * chunk * h // 16  # one or two blocks, not the 2 MiB chunk


# ------------------------------------------------------------------------------------------------- damaged data


def damage(root: Path, part: int, name: str, kind: str) -> tuple[str, int]:
    """Delete or corrupt (one flipped byte) the chunk holding the third sample of a part's array: (part, sample)."""
    cache = open_cache(root)
    p = cache.parts[part]
    offsets = p.commit.audio_offsets if name == "audio_embeds" else p.commit.token_offsets
    chunk_shape = json.loads((p.path / name / "zarr.json").read_text())["chunk_grid"]["configuration"]["chunk_shape"]
    path = p.path / name / "c" / str(offsets[2] // chunk_shape[0]) / "/".join("0" * (len(chunk_shape) - 1))
    if kind == "missing":
        path.unlink()
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    return p.name, cache._starts[part] + 2


@pytest.mark.parametrize("kind", ["missing", "flipped"])
@pytest.mark.parametrize("name", ["input_ids", "final_hidden", "audio_embeds"])
def test_every_reader_refuses_a_damaged_chunk(copy, name, kind):
    part, index = damage(copy, 1, name, kind)
    problem = "is missing" if kind == "missing" else "does not match its checksum"
    cache = open_cache(copy)
    cache[0]  # the other parts are intact
    with pytest.raises(CacheError, match=f"damaged cache part {part} .*: {name} chunk [0-9]+ {problem}"):
        cache[index]
    # in the main process, and re-raised from a DataLoader worker (once: torch then waits 5 s for the worker to end)
    for workers in (0, 1) if name == "final_hidden" else (0,):
        cfg = LoaderConfig(layers=LAYERS, eval_percent=0.0, num_workers=workers, max_tokens=64)
        with pytest.raises(CacheError, match=f"damaged cache part {part} "):
            list(make_loader(copy, cfg, "train", 0))
    if name == "input_ids":
        with pytest.raises(CacheError, match=f"damaged cache part {part} "):
            count_masked_tokens(open_cache(copy))


def inspect(root: Path) -> subprocess.CompletedProcess:
    return run_stage("stages.inspect_cache", str(root), "--verify", check=False)


@pytest.mark.parametrize("kind", ["missing", "flipped"])
def test_verify_names_the_damaged_part(copy, kind):
    part, _ = damage(copy, 2, "final_hidden", kind)
    proc = inspect(copy)
    problem = "is missing" if kind == "missing" else "does not match its checksum (corrupted)"
    assert proc.returncode == 1
    names = [p.name for p in open_cache(copy).parts]
    assert [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("  OK ")] == names[:2]
    assert f"  DAMAGED {part} (shard shard-2.tar):\n      final_hidden chunk " in proc.stdout
    assert problem in proc.stdout
    assert f"1 of 3 parts damaged: {part}." in proc.stderr


def test_intact_cache_verifies(written):
    proc = inspect(written[0])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n  OK ") == 3 and "all 3 parts intact" in proc.stdout


@pytest.mark.slow
def test_training_on_a_damaged_cache_stops_naming_the_part(reference_cache, tmp_path):
    cache = Path(shutil.copytree(reference_cache, tmp_path / "cache"))
    names = [p.name for p in open_cache(cache).parts]
    for chunk in (cache / "parts").glob("*/final_hidden/c/*/0"):  # every one: the first batch read is damaged
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0x10
        chunk.write_bytes(bytes(data))
    args = ["--draft-vocab-size", "256", "--max-tokens", "1024", "--num-workers", "1", "--max-steps", "2"]
    proc = run_stage("stages.train_draft", str(cache), *args, "--runs-dir", str(tmp_path / "runs"), check=False)
    assert proc.returncode != 0
    named = [name for name in names if f"damaged cache part {name} " in proc.stderr]
    assert len(named) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "DataLoader worker" not in proc.stderr, proc.stderr
