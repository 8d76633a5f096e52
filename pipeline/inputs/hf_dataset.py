"""Convert a local Hugging Face ``datasets`` dataset of audio into webdataset shards.

This is the form users hold LibriSpeech, AISHELL or Common Voice in: a ``save_to_disk`` directory (a ``Dataset``, or
a ``DatasetDict`` of which one split is converted) with an ``Audio`` column and either a transcript column or a
conversations column. Each usable row becomes one shard sample exactly as the JSONL-manifest converter writes it:
``<key>.<wav|flac|mp3|ogg>`` with the audio file's original bytes and ``<key>.json`` with ``{"conversations": ...}``.

Audio is read with ``Audio(decode=False)``: datasets 4+ decodes through torchcodec, which this project does not
depend on, and the shards keep the encoded bytes anyway (the dump decodes them). A row that cannot become a sample
(no audio, unreadable audio, empty transcript, malformed conversation, duplicate key) is skipped and reported with
its key and the reason, never fatal: one bad row in a million must not stop a conversion.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import soundfile as sf
from tqdm import tqdm

from pipeline.errors import ConfigError
from pipeline.inputs.conversation import BadSample, parse_conversations
from pipeline.inputs.shards import (
    AUDIO_EXTENSIONS,
    DEFAULT_MAX_SIZE,
    ManifestError,
    ShardSample,
    check_conversations,
    check_key,
    check_out_pattern,
    write_samples,
)

DEFAULT_INSTRUCTION = "Transcribe the audio."
_BATCH_ROWS = 64  # rows read from Arrow at a time: row-by-row access costs a Python round trip per cell


@dataclass(frozen=True)
class HfColumns:
    """Which columns of the dataset make a sample: the audio, and EITHER a transcript OR a conversation.

    ``text``: the assistant's answer to a user turn of [audio, ``instruction``]. ``conversations``: the conversation
    in this project's json form (a list of ``{"role", "content"}`` turns, or that list as a JSON string, which is
    how a column holds turns whose content is sometimes a string and sometimes a list). ``key``: a column whose
    values name the samples (dots and whitespace become ``_``, since the key is a tar member name); by default the
    key is ``<split or "row">-<row index>``, stable for a given dataset.
    """

    audio: str = "audio"
    text: str | None = None
    conversations: str | None = None
    key: str | None = None
    instruction: str = DEFAULT_INSTRUCTION

    def __post_init__(self) -> None:
        if (self.text is None) == (self.conversations is None):
            raise ConfigError(
                "choose the answer column: a transcript column (--text-column) or a conversations column "
                "(--conversations-column), exactly one"
            )
        if self.text is not None and not self.instruction.strip():
            raise ConfigError("the instruction for transcripts (--instruction) must not be empty")

    @property
    def used(self) -> list[str]:
        return [name for name in (self.audio, self.text, self.conversations, self.key) if name is not None]


@dataclass(frozen=True)
class SkippedRow:
    """A row left out: its index, its key (None when the key itself is unusable), what is wrong and the details."""

    index: int
    key: str | None
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.key or f'row {self.index}'}: {self.kind}: {self.detail}"


@dataclass
class ConversionReport:
    """What a conversion wrote and what it left out."""

    rows: int
    shards: list[str] = field(default_factory=list)
    written: int = 0
    skipped: list[SkippedRow] = field(default_factory=list)

    def summary(self) -> str:
        shards = len(self.shards)
        text = f"{self.rows} rows: wrote {self.written} samples in {shards} shard(s), skipped {len(self.skipped)}"
        kinds = Counter(row.kind for row in self.skipped)
        return text + "".join(f"\n  {count} {kind}" for kind, count in sorted(kinds.items()))


class BadRow(ValueError):
    """A row that cannot become a sample; ``kind`` groups the summary, ``detail`` says what exactly."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_local_dataset(path: Path, split: str | None = None) -> Any:
    """Load a ``save_to_disk`` directory as one ``datasets.Dataset`` (``split`` picks one of a ``DatasetDict``)."""
    import datasets  # ~1.5 s of pyarrow and pandas: only the HF-dataset path pays for it

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"--hf-dataset {str(path)!r} is not a directory (expected a datasets save_to_disk folder)")
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise ConfigError(
            f"{str(path)!r} is not a dataset saved with save_to_disk ({err}); load yours with datasets and "
            "call .save_to_disk(PATH) first"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            raise ConfigError(f"{str(path)!r} is a DatasetDict (splits: {', '.join(loaded)}); choose one with --split")
        if split not in loaded:
            raise ConfigError(f"{str(path)!r} has no split {split!r}; it has: {', '.join(loaded)}")
        return loaded[split]
    if split is not None:
        raise ConfigError(f"{str(path)!r} is a single dataset, not a DatasetDict: drop --split {split}")
    return loaded


def prepare_columns(dataset: Any, columns: HfColumns) -> Any:
    """Keep the columns a sample needs, with the audio column cast to undecoded ``{"bytes", "path"}``."""
    from datasets import Audio

    missing = [name for name in columns.used if name not in dataset.column_names]
    if missing:
        raise ConfigError(
            f"the dataset has no column {', '.join(map(repr, missing))}; its columns are: "
            f"{', '.join(dataset.column_names)} (choose with --audio-column, --text-column, --conversations-column, "
            "--key-column)"
        )
    dataset = dataset.select_columns(list(dict.fromkeys(columns.used)))
    try:
        # decode=False: no torchcodec, and the shards keep the original encoded bytes.
        return dataset.cast_column(columns.audio, Audio(decode=False))
    except (TypeError, ValueError, NotImplementedError) as err:  # pyarrow's "cannot cast" errors are among these
        raise ConfigError(
            f"column {columns.audio!r} ({dataset.features[columns.audio]}) is not audio: expected an Audio "
            f"column, file paths, or {{'bytes', 'path'}} records ({err})"
        ) from None


# ---------------------------------------------------------------------------------------------
# One row
# ---------------------------------------------------------------------------------------------


def sniff_audio_ext(data: bytes) -> str | None:
    """The container of encoded audio bytes from their magic number: wav, flac, ogg, mp3, or None."""
    if data[:4] in (b"RIFF", b"RF64") and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"fLaC":
        return "flac"
    if data[:4] == b"OggS":
        return "ogg"
    # An ID3 tag, or straight into an MPEG audio frame: sync bits, then a layer other than 00 (which is AAC's ADTS).
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0 and data[1] & 0x06):
        return "mp3"
    return None


def _read_path(path: str, base_dir: Path | None) -> bytes:
    candidates = [Path(path).expanduser()]
    if base_dir is not None and not candidates[0].is_absolute():
        candidates.append(base_dir / path)  # relative to the dataset directory
    for candidate in candidates:
        if candidate.is_file():
            try:
                return candidate.read_bytes()
            except OSError as err:
                raise BadRow("unreadable audio", f"cannot read {str(candidate)!r}: {err.strerror}") from None
    raise BadRow("unreadable audio", f"no audio bytes and no file at {path!r}")


def row_audio(value: Any, base_dir: Path | None = None) -> tuple[str, bytes]:
    """(extension, encoded bytes) of an undecoded Audio cell; BadRow when there is no usable audio."""
    if not isinstance(value, dict) or (not value.get("bytes") and not value.get("path")):
        raise BadRow("missing audio", "the audio cell is empty")
    data = value.get("bytes")
    path = value.get("path") or ""
    if data is None:
        data = _read_path(path, base_dir)
    if not data:
        raise BadRow("missing audio", "the audio is 0 bytes")
    suffix = Path(path).suffix.lower().lstrip(".")
    ext = sniff_audio_ext(data) or (suffix if suffix in AUDIO_EXTENSIONS else None)
    if ext is None:
        raise BadRow(
            "unsupported audio format",
            f"{path or 'bytes'!r} is none of {', '.join(AUDIO_EXTENSIONS)}; convert the column's audio to one of them",
        )
    try:
        # Reads the header only: catches garbage and wrong-format bytes cheaply, before any GPU work.
        sf.info(io.BytesIO(data))
    except sf.SoundFileError as err:
        # error_string is libsndfile's reason without the repr of the in-memory file that str(err) carries.
        raise BadRow("unreadable audio", f"{ext} bytes do not decode: {getattr(err, 'error_string', err)}") from None
    return ext, data


def _drop_none(value: Any) -> Any:
    # Arrow gives every struct all fields of its column: {"type": "audio"} comes back with "text": None.
    if isinstance(value, dict):
        return {name: _drop_none(item) for name, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_drop_none(item) for item in value]
    return value


def row_conversations(row: dict[str, Any], columns: HfColumns) -> list[dict[str, Any]]:
    """The row's conversation in this project's json form; BadRow when it would not make a sample."""
    if columns.text is not None:
        text = row[columns.text]
        if text is not None and not isinstance(text, str):
            raise BadRow("bad text", f"column {columns.text!r} holds a {type(text).__name__}, not a transcript")
        if text is None or not text.strip():
            raise BadRow("empty text", f"column {columns.text!r} holds {text!r}")
        user = [{"type": "audio"}, {"type": "text", "text": columns.instruction}]
        return [{"role": "user", "content": user}, {"role": "assistant", "content": text.strip()}]
    value = row[columns.conversations]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise BadRow("bad conversations", f"not valid JSON: {err}") from None
    conversations = _drop_none(value)
    try:
        check_conversations(conversations, f"column {columns.conversations!r}")
        # The dump's own checks (turn order, an assistant turn, one clip), so that such rows fail here, not later.
        parse_conversations(json.dumps({"conversations": conversations}).encode("utf-8"))
    except (ManifestError, BadSample) as err:
        raise BadRow("bad conversations", str(err)) from None
    return conversations


def member_name(value: str) -> str:
    """``value`` usable as a sample key: webdataset splits a tar member name from its extension at the first dot,
    so dots and whitespace become ``_`` (``common_voice_en_1.mp3`` -> ``common_voice_en_1_mp3``)."""
    return re.sub(r"[.\s]+", "_", value.strip()).lstrip("/")


def row_key(row: dict[str, Any], index: int, columns: HfColumns, prefix: str) -> str:
    """The sample's key: the key column's value made a valid member name, or ``<prefix>-<index>``."""
    if columns.key is None:
        return f"{member_name(prefix)}-{index:08d}"
    value = row[columns.key]
    if value is None or not str(value).strip():
        raise BadRow("missing key", f"column {columns.key!r} is empty")
    try:
        return check_key(member_name(str(value)), f"column {columns.key!r}")
    except ManifestError as err:
        raise BadRow("bad key", str(err)) from None


# ---------------------------------------------------------------------------------------------
# Converting
# ---------------------------------------------------------------------------------------------


def _rows(dataset: Any) -> Iterator[dict[str, Any]]:
    for batch in dataset.iter(batch_size=_BATCH_ROWS):
        names = list(batch)
        for values in zip(*(batch[name] for name in names), strict=True):
            yield dict(zip(names, values, strict=True))


def _samples(
    dataset: Any, columns: HfColumns, prefix: str, base_dir: Path | None, report: ConversionReport, progress: bool
) -> Iterator[ShardSample]:
    seen: dict[str, int] = {}
    bar = tqdm(total=len(dataset), unit="row", desc="converting", disable=not progress, dynamic_ncols=True)
    with bar:
        for index, row in enumerate(_rows(dataset)):
            bar.update(1)
            key: str | None = None
            try:
                key = row_key(row, index, columns, prefix)
                if key in seen:
                    raise BadRow("duplicate key", f"row {seen[key]} has the same key")
                conversations = row_conversations(row, columns)
                ext, audio = row_audio(row[columns.audio], base_dir)
            except BadRow as bad:
                report.skipped.append(SkippedRow(index, key, bad.kind, bad.detail))
                bar.set_postfix(skipped=len(report.skipped), refresh=False)
                continue
            seen[key] = index
            report.written += 1
            yield ShardSample(key, ext, audio, {"conversations": conversations})


def convert_dataset(
    dataset: Any,
    out_pattern: str,
    columns: HfColumns,
    *,
    key_prefix: str = "row",
    base_dir: Path | None = None,
    max_count: int = 100,
    max_size: int = DEFAULT_MAX_SIZE,
    progress: bool = True,
) -> ConversionReport:
    """Write the rows of an in-memory or loaded ``datasets.Dataset`` as shards; bad rows are skipped and reported.

    ``base_dir`` resolves relative audio paths (rows whose bytes are not stored). Shards are byte-identical for the
    same dataset and arguments. Raises ConfigError for a missing column or a bad ``out_pattern``, before writing.
    """
    try:
        check_out_pattern(out_pattern, max_count, max_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    dataset = prepare_columns(dataset, columns)
    report = ConversionReport(rows=len(dataset))
    samples = _samples(dataset, columns, key_prefix, base_dir, report, progress)
    report.shards = write_samples(samples, out_pattern, max_count=max_count, max_size=max_size)
    return report


def write_hf_shards(
    path: Path,
    out_pattern: str,
    columns: HfColumns,
    *,
    split: str | None = None,
    max_count: int = 100,
    max_size: int = DEFAULT_MAX_SIZE,
    progress: bool = True,
) -> ConversionReport:
    """Convert the ``save_to_disk`` dataset at ``path`` (its ``split``, for a DatasetDict) into shards.

    Default keys are ``<split>-<row index>`` (``row-<row index>`` without a split), so the splits of one
    DatasetDict can share an output directory without clashing.
    """
    dataset = load_local_dataset(path, split)
    return convert_dataset(
        dataset,
        out_pattern,
        columns,
        key_prefix=split or "row",
        base_dir=Path(path),
        max_count=max_count,
        max_size=max_size,
        progress=progress,
    )
