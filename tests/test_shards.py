"""Tests for pipeline.inputs.shards: shard spec expansion, raw sample reading, manifest -> shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from pipeline.inputs.shards import (
    AUDIO_EXTENSIONS,
    ManifestError,
    RawSample,
    ShardReadError,
    expand_shard_urls,
    iter_raw_samples,
    write_shards,
)

REPO = Path(__file__).resolve().parent.parent
SAMPLE_SHARDS = REPO / "data" / "sample" / "shards"


def _conversation(text: str) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Transcribe the audio."}]},
        {"role": "assistant", "content": text},
    ]


def _write_manifest(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def _make_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def manifest(tmp_path: Path) -> tuple[Path, dict[str, bytes], dict[str, dict]]:
    """A five-line manifest with mixed extensions, explicit and derived keys, one absolute path."""
    audio_dir = tmp_path / "clips"
    audio_dir.mkdir()
    audio: dict[str, bytes] = {}
    records: list[dict] = []
    expected_json: dict[str, dict] = {}
    for index, ext in enumerate(["wav", "flac", "mp3", "ogg", "WAV"]):
        data = bytes([index]) * (100 + index) + b"RIFF-ish payload"  # raw bytes need not decode
        file = audio_dir / f"clip{index}.{ext}"
        file.write_bytes(data)
        record: dict = {
            "audio": f"clips/clip{index}.{ext}",
            "conversations": _conversation(f"sentence {index}"),
        }
        if index == 2:
            record["audio"] = str(file)  # absolute paths are used as they are
        if index % 2 == 0:
            record["key"] = f"utt-{index}"
        record["extra"] = {"n": index}
        key = record.get("key", f"sample-{index + 1:06d}")
        audio[key] = data
        expected_json[key] = {"conversations": record["conversations"], "extra": {"n": index}}
        records.append(record)
    return _write_manifest(tmp_path / "manifest.jsonl", records), audio, expected_json


def test_write_shards_round_trip(tmp_path: Path, manifest: tuple) -> None:
    path, audio, expected_json = manifest
    shards = write_shards(path, str(tmp_path / "out" / "shard-%06d.tar"), max_count=2)

    assert shards == [str(tmp_path / "out" / f"shard-{i:06d}.tar") for i in range(3)]
    samples = [sample for shard in shards for sample in iter_raw_samples(shard)]
    assert [s.key for s in samples] == list(audio)  # manifest order is kept
    assert [s.shard for s in samples] == [shards[0]] * 2 + [shards[1]] * 2 + [shards[2]]
    for sample in samples:
        assert sample.audio == audio[sample.key]
        assert json.loads(sample.json) == expected_json[sample.key]
    assert [s.audio_ext for s in samples] == ["wav", "flac", "mp3", "ogg", "wav"]


def test_write_shards_is_reproducible(tmp_path: Path, manifest: tuple) -> None:
    path, _, _ = manifest
    first = write_shards(path, str(tmp_path / "a" / "s-%03d.tar"))
    second = write_shards(path, str(tmp_path / "b" / "s-%03d.tar"))
    assert [Path(p).read_bytes() for p in first] == [Path(p).read_bytes() for p in second]


def test_write_shards_missing_audio_names_line(tmp_path: Path) -> None:
    (tmp_path / "ok.wav").write_bytes(b"x")
    path = _write_manifest(
        tmp_path / "m.jsonl",
        [
            {"audio": "ok.wav", "conversations": _conversation("a")},
            {"audio": "missing.wav", "conversations": _conversation("b")},
        ],
    )
    out = tmp_path / "out" / "s-%06d.tar"
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: audio file .*missing\.wav.* does not exist"):
        write_shards(path, str(out))
    assert not (tmp_path / "out" / "s-000000.tar").exists()  # validated before writing anything


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r":2: not valid JSON"),
        ('["a list"]', r":2: expected a JSON object"),
        ('{"audio": "ok.wav"}', r':2: "conversations" must be a non-empty list'),
        ('{"audio": "ok.wav", "conversations": [{"role": "bot", "content": "x"}]}', r":2, turn 0: expected"),
        (
            '{"audio": "ok.wav", "conversations": [{"role": "user", "content": [{"type": "image"}]}]}',
            r"item 0",
        ),
        ('{"audio": "ok.txt", "conversations": [{"role": "user", "content": "x"}]}', r"extension 'txt'"),
        (
            '{"audio": "ok.wav", "key": "a.b", "conversations": [{"role": "user", "content": "x"}]}',
            r"without dots",
        ),
        (
            '{"audio": "ok.wav", "key": "sample-000001", "conversations": [{"role": "user", "content": "x"}]}',
            "line 1",
        ),
    ],
)
def test_write_shards_bad_line(tmp_path: Path, line: str, message: str) -> None:
    (tmp_path / "ok.wav").write_bytes(b"x")
    (tmp_path / "ok.txt").write_bytes(b"x")
    good = json.dumps({"audio": "ok.wav", "conversations": _conversation("a")})
    path = tmp_path / "m.jsonl"
    path.write_text(f"{good}\n{line}\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=message):
        write_shards(path, str(tmp_path / "s-%06d.tar"))


def test_write_shards_rejects_pattern_without_placeholder(tmp_path: Path, manifest: tuple) -> None:
    with pytest.raises(ValueError, match="placeholder"):
        write_shards(manifest[0], str(tmp_path / "shard.tar"))


def test_expand_brace_glob_list_and_urls(tmp_path: Path) -> None:
    for i in range(4):
        _make_tar(tmp_path / f"shard-{i:06d}.tar", [])
    names = [str(tmp_path / f"shard-{i:06d}.tar") for i in range(4)]

    assert expand_shard_urls(str(tmp_path / "shard-{000000..000003}.tar")) == names
    assert expand_shard_urls(str(tmp_path / "shard-*.tar")) == names  # globs come back sorted
    assert expand_shard_urls(f"{names[2]},{tmp_path}/shard-{{000000,000001}}.tar") == [names[2], *names[:2]]
    assert expand_shard_urls([names[3], str(tmp_path / "*.tar")]) == [names[3], *names[:3]]  # deduplicated
    assert expand_shard_urls(f"{names[0]}::{names[1]}") == names[:2]
    urls = ["pipe:curl -s http://host/a.tar", "http://host/shard-000001.tar", "s3://b/x.tar"]
    assert expand_shard_urls(urls) == urls  # URLs pass through unchecked
    assert expand_shard_urls("http://host/s-{0..1}.tar") == ["http://host/s-0.tar", "http://host/s-1.tar"]


def test_expand_missing_pattern_says_which(tmp_path: Path) -> None:
    _make_tar(tmp_path / "shard-000000.tar", [])
    pattern = str(tmp_path / "nothing-*.tar")
    with pytest.raises(FileNotFoundError, match=r"nothing-\*\.tar.*matched no file"):
        expand_shard_urls(f"{tmp_path}/shard-000000.tar,{pattern}")
    with pytest.raises(FileNotFoundError, match=r"shard-000001\.tar.*does not exist"):
        expand_shard_urls(str(tmp_path / "shard-{000000..000001}.tar"))
    with pytest.raises(IsADirectoryError, match=r"\*\.tar"):
        expand_shard_urls(str(tmp_path))
    with pytest.raises(ValueError, match="names no shard"):
        expand_shard_urls(" , ")


def test_missing_members_give_none(tmp_path: Path) -> None:
    shard = _make_tar(
        tmp_path / "odd.tar",
        [
            ("a.wav", b"A"),
            ("a.json", b"{}"),
            ("noaudio.json", b'{"conversations": []}'),
            ("nojson.FLAC", b"F"),
            ("notes.txt", b"other members are ignored"),
            ("broken.json", b"{not json"),  # reading never parses json: the consumer decides
            ("dup.mp3", b"1"),
            ("dup.mp3", b"2"),
            ("dup.json", b"{}"),
        ],
    )
    samples = list(iter_raw_samples(str(shard)))
    assert samples == [
        RawSample("a", str(shard), b"A", "wav", b"{}"),
        RawSample("noaudio", str(shard), None, None, b'{"conversations": []}'),
        RawSample("nojson", str(shard), b"F", "flac", None),
        RawSample("notes", str(shard), None, None, None),
        RawSample("broken", str(shard), None, None, b"{not json"),
        # A repeated member starts a second sample with the same key instead of raising.
        RawSample("dup", str(shard), b"1", "mp3", None),
        RawSample("dup", str(shard), b"2", "mp3", b"{}"),
    ]


# Layout: a.wav header at 0, data from 512; a.json header at 1536, data from 2048; b.wav header at
# 2560, data from 3072; end-of-archive marker at 3584. Cuts at 2560 and 3584 fall exactly on a
# member boundary, which Python's streaming tar reader alone would take for a clean end.
@pytest.mark.parametrize("cut", [100, 700, 512 * 3, 512 * 4 + 100, 512 * 5, 512 * 6, 512 * 7, 512 * 7 + 200])
def test_truncated_tar_raises(tmp_path: Path, cut: int) -> None:
    full = _make_tar(tmp_path / "full.tar", [("a.wav", b"x" * 1000), ("a.json", b"{}"), ("b.wav", b"y" * 600)])
    truncated = tmp_path / "cut.tar"
    truncated.write_bytes(full.read_bytes()[:cut])
    with pytest.raises(ShardReadError, match="cut.tar"):
        list(iter_raw_samples(str(truncated)))


def test_lone_end_block_is_accepted(tmp_path: Path) -> None:
    # Nothing is lost when only the second block of the end marker is missing.
    full = _make_tar(tmp_path / "full.tar", [("a.wav", b"x" * 1000), ("a.json", b"{}")])
    lone = tmp_path / "lone.tar"
    lone.write_bytes(full.read_bytes()[: 512 * 6])
    assert [(s.key, s.audio, s.json) for s in iter_raw_samples(str(lone))] == [("a", b"x" * 1000, b"{}")]


def test_unreadable_shards_raise(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file" * 50)
    with pytest.raises(ShardReadError, match="garbage.tar"):
        list(iter_raw_samples(str(garbage)))
    with pytest.raises(ShardReadError, match="absent.tar"):
        list(iter_raw_samples(str(tmp_path / "absent.tar")))


def test_bundled_sample_shards() -> None:
    shards = expand_shard_urls(str(SAMPLE_SHARDS / "*.tar"))
    assert len(shards) == 4
    samples = [sample for shard in shards for sample in iter_raw_samples(shard)]
    assert len(samples) >= 30
    assert len({s.key for s in samples}) == len(samples)
    assert len({s.audio_ext for s in samples}) >= 4
    for sample in samples:
        assert sample.audio and sample.audio_ext in AUDIO_EXTENSIONS, sample.key
        conversations = json.loads(sample.json)["conversations"]
        assert conversations[0]["role"] in ("system", "user")
        assert any(turn["role"] == "assistant" and turn["content"] for turn in conversations), sample.key
        audio_items = [
            item
            for turn in conversations
            if isinstance(turn["content"], list)
            for item in turn["content"]
            if item["type"] == "audio"
        ]
        assert len(audio_items) == 1, sample.key
