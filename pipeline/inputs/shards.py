"""WebDataset shard I/O: expand shard specs, read raw samples, write shards from a JSONL manifest or any samples.

A sample in a shard is ``<key>.<wav|flac|mp3|ogg>`` (the audio file's original bytes) plus
``<key>.json`` (``{"conversations": [...], ...}``). Reading returns the members undecoded so that
the dump stage, not this module, decides what counts as a bad sample and reports it by key.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import re
import tarfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import braceexpand
from webdataset import tariterators
from webdataset.handlers import reraise_exception
from webdataset.writer import ShardWriter

from pipeline.errors import StrictModeError

AUDIO_EXTENSIONS: tuple[str, ...] = ("wav", "flac", "mp3", "ogg")
ROLES: frozenset[str] = frozenset({"system", "user", "assistant"})
DEFAULT_MAX_SIZE = 1_000_000_000  # bytes per shard; ShardWriter starts a new shard once it is exceeded

# Fixed member mtime so that the same manifest and audio give byte-identical shards.
_TAR_MTIME = 0.0
_TAR_BLOCK = 512


class ShardReadError(RuntimeError):
    """A shard could not be read: missing, unreadable, corrupt or truncated."""


class ManifestError(ValueError):
    """A manifest line is malformed or points at audio that cannot be used."""


@dataclass(frozen=True)
class RawSample:
    """One sample exactly as stored in a tar shard, not decoded.

    ``audio``/``audio_ext`` are None when the sample has no audio member and ``json`` is None when
    it has no json member; ``other_audio`` names the extensions of any further audio members (a sample
    holds one clip). The consumer reports such samples instead of this reader raising.
    """

    key: str
    shard: str
    audio: bytes | None
    audio_ext: str | None
    json: bytes | None
    other_audio: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# Shard specs
# ---------------------------------------------------------------------------------------------


def _is_url(spec: str) -> bool:
    # "pipe:cmd", "http://..", "s3://..", "file://..": anything with a scheme goes to webdataset's
    # gopen untouched. A one-letter "scheme" is a Windows drive letter, i.e. a local path.
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*):", spec)
    return match is not None and len(match.group(1)) > 1


def _split_top_level_commas(spec: str) -> list[str]:
    # Commas inside braces belong to brace expansion ("shard-{a,b}.tar"), so only split outside them.
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for char in spec:
        if char == "{":
            depth += 1
        elif char == "}":
            depth = max(0, depth - 1)
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _expand_local(pattern: str, original: str) -> list[str]:
    path = os.path.expanduser(pattern)
    if glob.has_magic(path):
        matches = sorted(glob.glob(path))
        if not matches:
            raise FileNotFoundError(
                f"shard pattern {pattern!r} (from {original!r}) matched no file; check the path "
                f"and the glob relative to the working directory {os.getcwd()!r}"
            )
        return matches
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"shard spec {pattern!r} (from {original!r}) is a directory; pass the shards inside it, "
            f"e.g. {os.path.join(pattern, '*.tar')!r}"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"shard {pattern!r} (from {original!r}) does not exist; check the path, the brace "
            f"range, and the working directory {os.getcwd()!r}"
        )
    return [path]


def expand_shard_urls(spec: str | list[str]) -> list[str]:
    """Expand a shard spec into an ordered list of shard paths/URLs.

    Accepts a local path, a glob (``data/x/*.tar``, sorted), a brace pattern
    (``shard-{000000..000003}.tar``), a comma- or ``::``-separated list of any of these, a list of
    specs, or any URL webdataset can open (``pipe:``, ``http://``, ...; passed through unchecked).
    Duplicates are dropped, keeping the first occurrence, so overlapping globs do not read a shard
    twice. Raises FileNotFoundError when a local pattern matches nothing.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in specs:
        for part in _split_top_level_commas(item):
            for piece in part.split("::"):  # webdataset's own list separator
                piece = piece.strip()
                if not piece:
                    continue
                for expanded in braceexpand.braceexpand(piece):
                    urls.extend([expanded] if _is_url(expanded) else _expand_local(expanded, item))
    if not urls:
        raise ValueError(f"shard spec {spec!r} names no shard; pass a path, glob, brace pattern or URL")
    return list(dict.fromkeys(urls))


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _exception_text(exc: BaseException) -> str:
    # webdataset appends the stream object and URL to exc.args, which makes str(exc) a tuple repr;
    # the first argument is the actual message.
    first = exc.args[0] if exc.args else ""
    return f"{type(exc).__name__}: {first}" if first != "" else type(exc).__name__


def _check_tar_end(path: str) -> None:
    """Raise if an uncompressed local tar does not end with the end-of-archive marker.

    Python's streaming tar reader treats EOF exactly at a member boundary as a normal end, so a
    shard cut at a 512-byte boundary (a copy interrupted at a buffer edge) would silently lose
    its tail. Walking the headers seeks over member data, so this costs little.
    """
    with open(path, "rb") as handle:
        magic = handle.read(6)
    # gzip/bz2/xz/zstd shards: the decompressor sees truncation, and seeking is not possible.
    if magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00" or magic[:4] == b"\x28\xb5\x2f\xfd":
        return
    end = 0
    with tarfile.open(path, "r:") as archive:
        for info in archive:
            end = info.offset_data + -(-info.size // _TAR_BLOCK) * _TAR_BLOCK
    with open(path, "rb") as handle:
        handle.seek(end)
        # The standard marker is two zero blocks; one is enough to know nothing was cut off.
        marker = handle.read(_TAR_BLOCK)
    if len(marker) < _TAR_BLOCK or any(marker):
        raise tarfile.ReadError(
            f"no end-of-archive marker after the last member at byte {end} "
            f"(file is {os.path.getsize(path)} bytes): the shard is truncated"
        )


def iter_tar_members(url: str) -> Iterator[tuple[str, bytes]]:
    """Yield (member name, bytes) in stored order, turning any read failure into ShardReadError."""
    try:
        # reraise_exception: webdataset's default handlers would otherwise be free to skip members.
        streams = tariterators.url_opener([{"url": url}], handler=reraise_exception)
        members = iter(tariterators.tar_file_expander(streams, handler=reraise_exception, eof_value=None))
    except Exception as exc:
        raise ShardReadError(f"cannot read shard {url!r}: {_exception_text(exc)}") from exc
    while True:
        # Only the read is guarded, so an exception thrown into this generator at the yield by the
        # consumer is not mislabelled as a shard error.
        try:
            member = next(members)
        except StopIteration:
            # Checked at the end, not up front, so the samples before a cut are still read and cached.
            if not _is_url(url) and os.path.isfile(url):
                try:
                    _check_tar_end(url)
                except Exception as exc:
                    raise ShardReadError(f"shard {url!r} is truncated ({_exception_text(exc)})") from exc
            return
        except Exception as exc:
            raise ShardReadError(
                f"shard {url!r} is corrupt or truncated ({_exception_text(exc)}); regenerate or re-copy it"
            ) from exc
        yield member["fname"], member["data"]


def split_member_name(name: str) -> tuple[str, str] | None:
    # Same rule as webdataset's base_plus_ext: the key is everything before the first dot of the
    # basename, so "a/b.c.wav" is key "a/b" with suffix "c.wav".
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    if match is None:
        return None
    return match.group(1), match.group(2).lower()


def make_sample(key: str, shard: str, members: dict[str, bytes]) -> RawSample:
    audio_exts = [ext for ext in members if ext in AUDIO_EXTENSIONS]  # in tar order
    audio_ext = audio_exts[0] if audio_exts else None
    return RawSample(
        key=key,
        shard=shard,
        audio=members[audio_ext] if audio_ext is not None else None,
        audio_ext=audio_ext,
        json=members.get("json"),
        other_audio=tuple(audio_exts[1:]),
    )


def iter_raw_samples(url: str) -> Iterator[RawSample]:
    """Yield the samples of one shard in stored order, undecoded.

    Consecutive members sharing a key form one sample (webdataset's convention). A missing audio
    or json member gives None in that field; members with other suffixes are ignored. A member
    suffix that repeats within a key starts a new sample with the same key rather than raising
    (webdataset would), so one malformed sample cannot hide the rest of the shard and the consumer
    can report the duplicate key. Raises ShardReadError if the shard cannot be opened or is
    corrupt or truncated.
    """
    key: str | None = None
    members: dict[str, bytes] = {}
    try:
        for name, data in iter_tar_members(url):
            split = split_member_name(name)
            if split is None:
                continue  # no extension: not part of any sample, as in webdataset
            member_key, suffix = split
            if key is not None and (member_key != key or suffix in members):
                yield make_sample(key, url, members)
                members = {}
            key = member_key
            members[suffix] = data
    except ShardReadError:
        # Members are read whole, so a pending sample that has its audio and json is intact: keep it.
        sample = make_sample(key, url, members) if key is not None else None
        if sample is not None and sample.audio is not None and sample.json is not None:
            yield sample
        raise
    if key is not None:
        yield make_sample(key, url, members)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ManifestEntry:
    line: int
    key: str
    audio_path: Path
    audio_ext: str
    meta: dict[str, Any]


def _check_content(content: Any, where: str) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise ManifestError(f"{where}: content must be a string or a list of items, got {type(content).__name__}")
    for index, item in enumerate(content):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "audio":
            continue
        if kind == "text" and isinstance(item.get("text"), str):
            continue
        raise ManifestError(
            f'{where}, item {index}: expected {{"type": "audio"}} or {{"type": "text", "text": "..."}}, got {item!r}'
        )


def check_conversations(conversations: Any, where: str) -> None:
    if not isinstance(conversations, list) or not conversations:
        raise ManifestError(f'{where}: "conversations" must be a non-empty list of {{"role", "content"}} turns')
    for index, turn in enumerate(conversations):
        turn_where = f"{where}, turn {index}"
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or "content" not in turn:
            raise ManifestError(
                f'{turn_where}: expected {{"role": "system"|"user"|"assistant", "content": ...}}, got {turn!r}'
            )
        _check_content(turn["content"], turn_where)


def check_key(key: Any, where: str) -> str:
    # A dot would move the key/extension split (webdataset splits at the first dot of the
    # basename) and whitespace/leading "/" make awkward tar member names.
    if not isinstance(key, str) or not re.fullmatch(r"[^./\s][^.\s]*", key):
        raise ManifestError(
            f'{where}: "key" must be a non-empty string without dots or whitespace and not starting '
            f"with '/', got {key!r}"
        )
    return key


def _parse_manifest(manifest: Path) -> list[_ManifestEntry]:
    base = manifest.parent
    entries: list[_ManifestEntry] = []
    seen: dict[str, int] = {}
    with manifest.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{manifest}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ManifestError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); fix the line") from exc
            if not isinstance(record, dict):
                raise ManifestError(f'{where}: expected a JSON object {{"audio": ..., "conversations": [...]}}')
            audio = record.get("audio")
            if not isinstance(audio, str) or not audio:
                raise ManifestError(f'{where}: "audio" must be a path to an audio file')
            audio_path = Path(audio).expanduser()
            if not audio_path.is_absolute():
                audio_path = base / audio_path
            ext = audio_path.suffix.lower().lstrip(".")
            if ext not in AUDIO_EXTENSIONS:
                raise ManifestError(
                    f"{where}: audio {audio!r} has extension {ext!r}; "
                    f"convert it to one of {', '.join(AUDIO_EXTENSIONS)}"
                )
            if not audio_path.is_file():
                raise ManifestError(
                    f"{where}: audio file {str(audio_path)!r} does not exist (relative paths resolve "
                    f"against the manifest's directory {str(base)!r}); fix the path or add the file"
                )
            check_conversations(record.get("conversations"), where)
            key = check_key(record["key"], where) if "key" in record else f"sample-{line_no:06d}"
            if key in seen:
                raise ManifestError(f"{where}: key {key!r} already used on line {seen[key]}; keys must be unique")
            seen[key] = line_no
            # The key is the tar member name and the audio lives in its own member, so neither is
            # repeated in the json.
            meta = {name: value for name, value in record.items() if name not in ("audio", "key")}
            entries.append(_ManifestEntry(line_no, key, audio_path, ext, meta))
    return entries


def write_shards(
    manifest: Path,
    out_pattern: str,
    max_count: int = 100,
    max_size: int = DEFAULT_MAX_SIZE,
) -> list[str]:
    """Convert a JSONL manifest into webdataset tar shards; return the shard paths in order.

    Each manifest line is ``{"audio": path, "conversations": [...], "key"?: str, ...}``; relative
    audio paths resolve against the manifest's directory and a missing key becomes
    ``sample-<line number>``. Each sample is stored as ``<key>.<audio ext>`` (raw file bytes, not
    re-encoded) plus ``<key>.json`` (every manifest field except "audio" and "key").
    ``out_pattern`` is a %-pattern such as ``out/shard-%06d.tar``; its directory is created.
    The whole manifest is validated before anything is written and problems raise ManifestError
    naming the line, so a bad manifest fails before any GPU work.
    """
    manifest = Path(manifest)
    check_out_pattern(out_pattern, max_count, max_size)
    entries = _parse_manifest(manifest)
    if not entries:
        raise ManifestError(f"{manifest}: no samples; the manifest is empty")

    def samples() -> Iterator[ShardSample]:
        for entry in entries:
            try:
                audio = entry.audio_path.read_bytes()
            except OSError as exc:
                raise ManifestError(
                    f"{manifest}:{entry.line}: cannot read audio {str(entry.audio_path)!r}: {exc}"
                ) from exc
            yield ShardSample(entry.key, entry.audio_ext, audio, entry.meta)

    return write_samples(samples(), out_pattern, max_count=max_count, max_size=max_size)


@dataclass(frozen=True)
class ShardSample:
    """One sample to write: the audio file's bytes as they are (not re-encoded) and the fields of its json."""

    key: str
    audio_ext: str
    audio: bytes
    meta: dict[str, Any]


def check_out_pattern(out_pattern: str, max_count: int, max_size: int) -> None:
    """Raise ValueError unless ``out_pattern`` has one integer placeholder and the shard limits are positive."""
    try:
        out_pattern % 0
    except TypeError as exc:
        raise ValueError(
            f"out_pattern {out_pattern!r} needs one integer placeholder, e.g. 'out/shard-%06d.tar'"
        ) from exc
    if max_count < 1 or max_size < 1:
        raise ValueError(f"max_count and max_size must be positive, got {max_count} and {max_size}")


def write_samples(
    samples: Iterable[ShardSample],
    out_pattern: str,
    max_count: int = 100,
    max_size: int = DEFAULT_MAX_SIZE,
) -> list[str]:
    """Write ``samples`` in order as ``<key>.<audio ext>`` + ``<key>.json`` into shards; return their paths.

    The caller has validated the samples (keys unique, usable as member names; conversations well formed).
    Shards are byte-identical for the same samples. Nothing is created when ``samples`` is empty.
    """
    check_out_pattern(out_pattern, max_count, max_size)
    iterator = iter(samples)
    # ShardWriter opens its first shard on construction: peek so that no samples leave no empty shard behind.
    first = next(iterator, None)
    if first is None:
        return []
    first_shard = out_pattern % 0
    if not _is_url(first_shard):
        Path(first_shard).parent.mkdir(parents=True, exist_ok=True)

    written: list[str] = []
    # encoder=False: every value is already bytes, so webdataset must not re-encode anything.
    with ShardWriter(
        out_pattern,
        maxcount=max_count,
        maxsize=max_size,
        post=written.append,
        verbose=0,
        encoder=False,
        mtime=_TAR_MTIME,
    ) as writer:
        for sample in itertools.chain([first], iterator):
            meta_json = json.dumps(sample.meta, ensure_ascii=False).encode("utf-8")
            writer.write({"__key__": sample.key, sample.audio_ext: sample.audio, "json": meta_json})

    _warn_stale_shards(out_pattern, len(written))
    return written


def _warn_stale_shards(out_pattern: str, count: int) -> None:
    # A shard numbered past the ones just written is left over from an earlier, longer run and
    # would be picked up by a glob over the output directory.
    following = out_pattern % count
    if not _is_url(following) and os.path.exists(following):
        warnings.warn(
            f"{following!r} exists but was not written by this run (only {count} shard(s) were); "
            "delete stale shards before reading the directory with a glob",
            stacklevel=3,
        )


def unreadable_shard(url: str, samples_read: int, err: Exception, strict: bool) -> str:
    """Why a shard ended early (recorded; the samples before it are kept), or StrictModeError under --strict."""
    reason = (
        f"shard unreadable after {samples_read} samples: {type(err).__name__}: {err}. Once it is repaired, re-run "
        "the same command: the dump retries the shard, keeping the samples already cached"
    )
    if strict:
        raise StrictModeError(f"--strict: {url}: {reason}") from err
    return reason
