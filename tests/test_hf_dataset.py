"""Tests for pipeline.inputs.hf_dataset and `make_shards --hf-dataset`: local HF audio datasets -> shards.

The datasets are built here from numpy noise encoded by soundfile (no espeak-ng, no downloads, no torchcodec).
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from datasets import Audio, Dataset, DatasetDict

from pipeline.errors import ConfigError
from pipeline.inputs.hf_dataset import (
    HfColumns,
    SkippedRow,
    convert_dataset,
    member_name,
    sniff_audio_ext,
    write_hf_shards,
)
from pipeline.inputs.shards import RawSample, iter_raw_samples
from stages import make_shards
from tests.conftest import REPO, run_stage

SUBTYPES = {"wav": "PCM_16", "flac": "PCM_16", "ogg": "VORBIS", "mp3": "MPEG_LAYER_III"}
INSTRUCTION = "Transcribe the audio."


def encoded(seed: int, ext: str = "wav", seconds: float = 0.25) -> bytes:
    """A short clip of seeded noise, encoded as ``ext`` by soundfile (ogg's stream serial is random: not repeatable)."""
    wave = np.random.default_rng(seed).normal(0.0, 0.1, int(16000 * seconds)).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, wave, 16000, format=ext.upper(), subtype=SUBTYPES[ext])
    return buffer.getvalue()


def transcript_conversation(text: str, instruction: str = INSTRUCTION) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": instruction}]},
        {"role": "assistant", "content": text},
    ]


def read_shards(shards: list[str]) -> list[RawSample]:
    return [sample for shard in shards for sample in iter_raw_samples(shard)]


def audio_dataset(columns: dict[str, list]) -> Dataset:
    """An in-memory dataset whose "audio" column is an Audio feature, as load_dataset gives for LibriSpeech."""
    return Dataset.from_dict(columns).cast_column("audio", Audio(sampling_rate=16000))


@pytest.fixture
def transcripts(tmp_path: Path) -> tuple[Path, list[bytes], list[str]]:
    """A saved dataset of five clips, one of each format plus a second wav, with transcripts."""
    exts = ["wav", "flac", "ogg", "mp3", "wav"]
    audio = [encoded(i, ext) for i, ext in enumerate(exts)]
    texts = [f"Sentence number {i}." for i in range(5)]
    rows = {
        "audio": [{"bytes": a, "path": f"clip{i}.{e}"} for i, (a, e) in enumerate(zip(audio, exts, strict=True))],
        "text": texts,
    }
    path = tmp_path / "transcripts"
    audio_dataset(rows).save_to_disk(str(path))
    return path, audio, texts


def test_text_column_round_trip(tmp_path: Path, transcripts: tuple) -> None:
    path, audio, texts = transcripts
    report = write_hf_shards(path, str(tmp_path / "out" / "s-%06d.tar"), HfColumns(text="text"), max_count=2)

    assert report.shards == [str(tmp_path / "out" / f"s-{i:06d}.tar") for i in range(3)]
    assert (report.rows, report.written, report.skipped) == (5, 5, [])
    samples = read_shards(report.shards)
    assert [s.key for s in samples] == [f"row-{i:08d}" for i in range(5)]
    assert [s.audio_ext for s in samples] == ["wav", "flac", "ogg", "mp3", "wav"]
    assert [s.audio for s in samples] == audio  # the original encoded bytes, not re-encoded
    assert [json.loads(s.json) for s in samples] == [{"conversations": transcript_conversation(t)} for t in texts]
    assert "torchcodec" not in sys.modules  # audio was never decoded by datasets


def test_shards_are_reproducible(tmp_path: Path, transcripts: tuple) -> None:
    path = transcripts[0]
    first = write_hf_shards(path, str(tmp_path / "a" / "s-%06d.tar"), HfColumns(text="text"), progress=False)
    second = write_hf_shards(path, str(tmp_path / "b" / "s-%06d.tar"), HfColumns(text="text"), progress=False)
    assert [Path(s).read_bytes() for s in first.shards] == [Path(s).read_bytes() for s in second.shards]


def test_conversations_column_of_turns(tmp_path: Path) -> None:
    """A list-of-structs column: Arrow adds a None "text" to audio items, which must not reach the json."""
    turns = [
        [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": f"What is said in {i}?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"Answer {i}."}]},
        ]
        for i in range(3)
    ]
    dataset = audio_dataset({"audio": [{"bytes": encoded(i), "path": None} for i in range(3)], "chat": turns})
    report = convert_dataset(dataset, str(tmp_path / "s-%06d.tar"), HfColumns(conversations="chat"))

    samples = read_shards(report.shards)
    assert [json.loads(s.json) for s in samples] == [{"conversations": t} for t in turns]


def test_conversations_column_of_json_strings(tmp_path: Path) -> None:
    """JSON strings hold what one Arrow column cannot: string content in one turn, item lists in another."""
    turns = [
        [
            {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Who speaks?"}]},
            {"role": "assistant", "content": "A woman."},
            {"role": "user", "content": "And what does she say?"},
            {"role": "assistant", "content": f"Line {i}."},
        ]
        for i in range(2)
    ]
    rows = {
        "audio": [{"bytes": encoded(i, "flac"), "path": None} for i in range(2)],
        "chat": list(map(json.dumps, turns)),
    }
    report = convert_dataset(audio_dataset(rows), str(tmp_path / "s-%06d.tar"), HfColumns(conversations="chat"))

    samples = read_shards(report.shards)
    assert [(s.audio_ext, json.loads(s.json)) for s in samples] == [("flac", {"conversations": t}) for t in turns]


def test_dataset_dict_split(tmp_path: Path) -> None:
    def split(first: int, count: int) -> Dataset:
        ids = range(first, first + count)
        return audio_dataset(
            {"audio": [{"bytes": encoded(i), "path": None} for i in ids], "text": [f"t{i}" for i in ids]}
        )

    path = tmp_path / "dd"
    DatasetDict({"train": split(0, 3), "validation.clean": split(10, 2)}).save_to_disk(str(path))
    report = write_hf_shards(path, str(tmp_path / "s-%06d.tar"), HfColumns(text="text"), split="validation.clean")

    samples = read_shards(report.shards)
    # The split names the keys (its dot made a valid member name), so splits can share one output directory.
    assert [s.key for s in samples] == ["validation_clean-00000000", "validation_clean-00000001"]
    assert [s.audio for s in samples] == [encoded(10), encoded(11)]
    with pytest.raises(
        ConfigError, match=r"is a DatasetDict \(splits: train, validation.clean\); choose one with --split"
    ):
        write_hf_shards(path, str(tmp_path / "x-%06d.tar"), HfColumns(text="text"))
    with pytest.raises(ConfigError, match="has no split 'test'; it has: train, validation.clean"):
        write_hf_shards(path, str(tmp_path / "x-%06d.tar"), HfColumns(text="text"), split="test")
    split(0, 1).save_to_disk(str(tmp_path / "single"))
    with pytest.raises(ConfigError, match="is a single dataset, not a DatasetDict: drop --split train"):
        write_hf_shards(tmp_path / "single", str(tmp_path / "x-%06d.tar"), HfColumns(text="text"), split="train")


def test_bad_rows_are_skipped_and_reported(tmp_path: Path) -> None:
    """Every kind of bad row is skipped with its key and reason; the good rows around them are written."""
    on_disk = tmp_path / "on-disk.ogg"
    on_disk.write_bytes(encoded(7, "ogg"))
    audio = [
        {"bytes": encoded(0), "path": None},  # good
        None,  # missing audio
        {"bytes": encoded(2), "path": None},  # empty text
        {"bytes": b"RIFF\x00\x00\x00\x00WAVEjunk", "path": "x.wav"},  # a wav header and nothing else
        {"bytes": b"plain text, not audio", "path": "notes.txt"},  # no known format
        {"bytes": None, "path": str(tmp_path / "gone.wav")},  # path-only, file missing
        {"bytes": None, "path": str(on_disk)},  # path-only, file present: good
        {"bytes": encoded(8), "path": None},  # duplicate key
        {"bytes": encoded(9), "path": None},  # missing key
        {"bytes": b"", "path": "empty.wav"},  # stored bytes, but 0 of them
    ]
    keys = ["a", "b", "c", "d", "e", "f", "utt.7 x", "a", None, "j"]
    texts = ["one", "two", "  ", "four", "five", "six", "seven", "eight", "nine", "ten"]
    # A plain {bytes, path} struct column: save_to_disk would embed (or fail on) the paths of an Audio column.
    dataset = Dataset.from_dict({"audio": audio, "text": texts, "key": keys})
    report = convert_dataset(dataset, str(tmp_path / "s-%06d.tar"), HfColumns(text="text", key="key"), progress=False)

    assert [(row.index, row.key, row.kind) for row in report.skipped] == [
        (1, "b", "missing audio"),
        (2, "c", "empty text"),
        (3, "d", "unreadable audio"),
        (4, "e", "unsupported audio format"),
        (5, "f", "unreadable audio"),
        (7, "a", "duplicate key"),
        (8, None, "missing key"),
        (9, "j", "missing audio"),
    ]
    assert str(report.skipped[5]) == "a: duplicate key: row 0 has the same key"
    assert str(report.skipped[6]) == "row 8: missing key: column 'key' is empty"
    assert report.skipped[4].detail == f"no audio bytes and no file at {str(tmp_path / 'gone.wav')!r}"
    assert report.skipped[1].detail == "column 'text' holds '  '"
    assert report.skipped[2].detail == "wav bytes do not decode: Error in WAV file. No 'data' chunk marker."
    assert report.skipped[7].detail == "the audio is 0 bytes"
    samples = read_shards(report.shards)
    assert [(s.key, s.audio_ext, s.audio) for s in samples] == [
        ("a", "wav", encoded(0)),
        ("utt_7_x", "ogg", on_disk.read_bytes()),
    ]
    assert report.summary() == (
        "10 rows: wrote 2 samples in 1 shard(s), skipped 8\n  1 duplicate key\n  1 empty text\n  2 missing audio\n"
        "  1 missing key\n  2 unreadable audio\n  1 unsupported audio format"
    )


def test_bad_conversations_are_skipped(tmp_path: Path) -> None:
    good = transcript_conversation("fine")
    chats = [
        json.dumps(good),
        "{not json",
        json.dumps([{"role": "user", "content": "no answer"}]),
        json.dumps([{"role": "narrator", "content": "hi"}]),
        json.dumps([{"role": "assistant", "content": "answer first"}, {"role": "user", "content": "q"}]),
        json.dumps(None),
    ]
    rows = {"audio": [{"bytes": encoded(i), "path": None} for i in range(len(chats))], "chat": chats}
    report = convert_dataset(Dataset.from_dict(rows), str(tmp_path / "s-%06d.tar"), HfColumns(conversations="chat"))

    assert [(row.index, row.kind) for row in report.skipped] == [(i, "bad conversations") for i in range(1, 6)]
    details = [row.detail for row in report.skipped]
    assert details[0].startswith("not valid JSON: ")
    assert details[1] == "conversation has no assistant turn (nothing to learn from)"
    assert details[2].startswith("column 'chat', turn 0: expected {\"role\": ")
    assert details[3] == "turn 0 is an assistant turn before any user turn (turns go: system, then user and assistant)"
    assert details[4].startswith("column 'chat': \"conversations\" must be a non-empty list")
    assert [json.loads(s.json) for s in read_shards(report.shards)] == [{"conversations": good}]


def test_path_column_resolves_against_the_dataset_directory(tmp_path: Path) -> None:
    """A column of file paths (relative ones against the dataset directory) is read from disk."""
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.flac").write_bytes(encoded(1, "flac"))
    (tmp_path / "b.mp3").write_bytes(encoded(2, "mp3"))
    dataset = Dataset.from_dict({"file": ["clips/a.flac", str(tmp_path / "b.mp3")], "text": ["x", "y"]})
    report = convert_dataset(
        dataset, str(tmp_path / "out" / "s-%06d.tar"), HfColumns(audio="file", text="text"), base_dir=tmp_path
    )
    samples = read_shards(report.shards)
    assert [(s.audio_ext, s.audio) for s in samples] == [("flac", encoded(1, "flac")), ("mp3", encoded(2, "mp3"))]


def test_nothing_usable_writes_nothing(tmp_path: Path) -> None:
    dataset = Dataset.from_dict({"audio": [None, None], "text": ["a", "b"]})
    report = convert_dataset(dataset, str(tmp_path / "out" / "s-%06d.tar"), HfColumns(text="text"), progress=False)
    assert (report.written, report.shards, len(report.skipped)) == (0, [], 2)
    assert not (tmp_path / "out").exists()


def test_configuration_errors_name_what_to_fix(tmp_path: Path, transcripts: tuple) -> None:
    path = transcripts[0]
    with pytest.raises(ConfigError, match="no column 'sentence'; its columns are: audio, text"):
        write_hf_shards(path, str(tmp_path / "s-%06d.tar"), HfColumns(text="sentence"))
    with pytest.raises(ConfigError, match="exactly one"):
        HfColumns(text="text", conversations="chat")
    with pytest.raises(ConfigError, match="exactly one"):
        HfColumns()
    with pytest.raises(ConfigError, match="needs one integer placeholder"):
        write_hf_shards(path, str(tmp_path / "s.tar"), HfColumns(text="text"))
    with pytest.raises(ConfigError, match="is not a dataset saved with save_to_disk"):
        write_hf_shards(tmp_path, str(tmp_path / "s-%06d.tar"), HfColumns(text="text"))
    dataset = Dataset.from_dict({"audio": [3, 4], "text": ["a", "b"]})
    with pytest.raises(ConfigError, match="column 'audio' .* is not audio"):
        convert_dataset(dataset, str(tmp_path / "s-%06d.tar"), HfColumns(text="text"))


def test_keys_and_formats() -> None:
    assert member_name("common_voice_en_1.mp3") == "common_voice_en_1_mp3"
    assert member_name(" /spk 1/utt.2 ") == "spk_1/utt_2"
    assert [sniff_audio_ext(encoded(0, ext)) for ext in SUBTYPES] == list(SUBTYPES)
    assert sniff_audio_ext(b"ID3\x04rest") == "mp3"
    assert sniff_audio_ext(b"\xff\xf1\x50\x80") is None  # AAC in ADTS: the MPEG sync with layer bits 00
    assert str(SkippedRow(3, None, "empty text", "x")) == "row 3: empty text: x"


def test_usage_errors() -> None:
    def usage_error(*argv: str) -> None:
        with pytest.raises(SystemExit) as exit_info:
            make_shards.parse_args(list(argv))
        assert exit_info.value.code == 2

    usage_error("manifest.jsonl")  # no output pattern
    usage_error("--hf-dataset", "ds", "manifest.jsonl", "out-%06d.tar", "--text-column", "text")  # both inputs
    usage_error("--hf-dataset", "ds", "out-%06d.tar")  # neither text nor conversations
    usage_error("--hf-dataset", "ds", "out-%06d.tar", "--text-column", "t", "--conversations-column", "c")
    usage_error("manifest.jsonl", "out-%06d.tar", "--text-column", "text")  # an HF flag without --hf-dataset
    usage_error("--hf-dataset", "ds", "o-%06d.tar", "--conversations-column", "c", "--instruction", "x")
    args = make_shards.parse_args(["--hf-dataset", "ds", "s3://bucket/o-%06d.tar", "--text-column", "t"])
    assert (args.manifest, args.out_pattern, args.hf_dataset) == (None, "s3://bucket/o-%06d.tar", Path("ds"))


def test_manifest_path_still_works(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The JSONL-manifest form of the stage is unchanged: the bundled sample gives the bundled shards."""
    make_shards.main([str(REPO / "data/sample/manifest.jsonl"), str(tmp_path / "sample-%06d.tar"), "--max-count", "9"])
    for i in range(4):
        name = f"sample-{i:06d}.tar"
        assert (tmp_path / name).read_bytes() == (REPO / "data/sample/shards" / name).read_bytes()
    assert capsys.readouterr().out.endswith("wrote 4 shard(s), 36 samples\n")


@pytest.mark.slow
def test_stage_end_to_end(tmp_path: Path) -> None:
    """`python -m stages.make_shards --hf-dataset` with custom columns: shards, the skipped row, the summary."""
    audio = [{"bytes": encoded(i, "flac"), "path": f"{i}.flac"} for i in range(4)]
    dataset = Dataset.from_dict({"speech": audio, "sentence": ["Hello there.", "Good bye.", "", "Again."]})
    DatasetDict({"test": dataset.cast_column("speech", Audio())}).save_to_disk(str(tmp_path / "ds"))
    pattern = str(tmp_path / "shards" / "t-%06d.tar")
    proc = run_stage(
        "stages.make_shards",
        "--hf-dataset",
        str(tmp_path / "ds"),
        pattern,
        "--split",
        "test",
        "--audio-column",
        "speech",
        "--text-column",
        "sentence",
        "--instruction",
        "Write down what you hear.",
        "--max-count",
        "2",
    )
    assert "skipped test-00000002: empty text: column 'sentence' holds ''" in proc.stderr
    assert proc.stdout.endswith(
        "wrote 2 shard(s), 3 samples\n4 rows: wrote 3 samples in 2 shard(s), skipped 1\n  1 empty text\n"
    )
    samples = read_shards([pattern % 0, pattern % 1])
    assert [s.key for s in samples] == ["test-00000000", "test-00000001", "test-00000003"]
    assert [s.audio for s in samples] == [encoded(i, "flac") for i in (0, 1, 3)]
    expected = [
        transcript_conversation(t, "Write down what you hear.") for t in ("Hello there.", "Good bye.", "Again.")
    ]
    assert [json.loads(s.json)["conversations"] for s in samples] == expected

    refused = run_stage(
        "stages.make_shards", "--hf-dataset", str(tmp_path / "ds"), pattern, "--text-column", "x", check=False
    )
    assert refused.returncode == 1
    assert refused.stderr.endswith("is a DatasetDict (splits: test); choose one with --split\n")
