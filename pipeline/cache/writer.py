"""Writing a cache: its manifest (``create_or_resume``, ``CacheWriter.finalise``) and its parts, off the forward's
critical path.

``CacheWriter`` owns the manifest: ``create_or_resume`` writes it (and the target's head weights) or checks that
an existing cache was made with the same settings; ``finalise`` gathers every part's commit into it at the end.

``PartWriter`` packs samples along the token axis, writes whole chunks as they fill (zarr compresses the chunks
of one write in parallel threads), and commits after each write: ``commit.json`` then names the samples whose
rows are all on disk. After a crash, reopening the part resumes at the first uncommitted sample of the shard.

``BackgroundWriter`` runs every PartWriter call on one thread behind a bounded queue, so the model never waits
for compression unless the writer falls behind by more than ``max_pending`` samples (which bounds memory).

``CacheLock`` lets one dump at a time write a cache (two processes appending to one Zarr array lose rows).
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import zarr
from safetensors import SafetensorError
from safetensors.torch import save_file

from pipeline.cache.encoding import check_encoding, encode_fp8, encoded
from pipeline.cache.format import (
    COMMIT,
    HEAD_WEIGHTS,
    LOCK,
    MANIFEST,
    PARTS,
    STORED_DTYPES,
    CodecConfig,
    Manifest,
    PartCommit,
    PartSummary,
    SampleStates,
    hidden_name,
    part_name,
    to_storable,
)
from pipeline.errors import CacheError, ConfigError

FLUSH_CHUNKS = 16  # whole chunks buffered per array before a write and a commit: fewer, larger writes


@dataclass
class SampleRecord:
    """One cached sample as the writer receives it (CPU tensors)."""

    key: str
    position: int  # index of the sample in its shard, rejects included
    input_ids: np.ndarray  # [T] int32
    loss_mask: np.ndarray  # [T] uint8
    states: SampleStates

    @property
    def num_bytes(self) -> int:
        s = self.states
        tensors = [*s.hidden_states.values(), s.final_hidden, s.audio_embeds]
        return self.input_ids.nbytes + self.loss_mask.nbytes + sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class WriteStats:
    """Running totals for the progress bar: bytes handed to the writer, and raw vs stored bytes of finished parts."""

    samples: int = 0
    tokens: int = 0
    raw_bytes: int = 0
    finished_raw: int = 0
    finished_stored: int = 0

    def add(self, record: SampleRecord) -> None:
        self.samples += 1
        self.tokens += len(record.input_ids)
        self.raw_bytes += record.num_bytes

    def describe(self, seconds: float) -> str:
        """The progress bar's text after ``seconds`` of dumping."""
        ratio = f"{self.finished_raw / self.finished_stored:.2f}x" if self.finished_stored else "n/a"
        return f"{self.tokens / seconds:.0f} tok/s, {self.raw_bytes / 1e6:.0f} MB in, compression {ratio}"


@dataclass
class _Stream:
    """One array grown along axis 0: rows already on disk plus rows buffered for the next chunk-aligned write."""

    array: zarr.Array
    written: int
    pending: list[np.ndarray] = field(default_factory=list)
    pending_rows: int = 0

    def add(self, rows: np.ndarray) -> None:
        self.pending.append(rows)
        self.pending_rows += len(rows)

    def flush(self, chunk: int, everything: bool) -> None:
        end = self.written + self.pending_rows
        upto = end if everything else (end // chunk) * chunk
        if upto <= self.written:
            return
        data = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        if upto > self.array.shape[0]:  # grow geometrically: few metadata rewrites
            self.array.resize((max(upto, 2 * self.array.shape[0]), *self.array.shape[1:]))
        self.array[self.written : upto] = data[: upto - self.written]
        rest = data[upto - self.written :]
        self.pending, self.pending_rows, self.written = ([rest] if len(rest) else []), len(rest), upto


class PartWriter:
    """Appends samples of one input shard to its own Zarr group; the only writer of that group."""

    def __init__(
        self,
        path: Path,
        shard: str,
        layers: list[int],
        hidden_size: int,
        dtype: str,
        codec: CodecConfig,
        writer: dict | None = None,
        stats: WriteStats | None = None,
    ):
        self.path, self.shard, self.codec = path, shard, codec
        self.chunk = codec.chunk_tokens
        self.commit = _read_commit(path) if (path / COMMIT).exists() else PartCommit(shard)
        self.commit.writers.append(writer or {})  # which rank of which run wrote it
        self.stats = stats or WriteStats()
        self._layers, self._hidden_size, self._dtype = layers, hidden_size, dtype
        self._streams: dict[str, _Stream] | None = None
        # Samples accepted but not yet committed: (key, position, token end, audio end, raw bytes); rejects wait
        # with them. A sample's raw bytes count when it commits: one lost to a kill is counted once, when redone.
        self.uncommitted: list[tuple[str, int, int, int, int]] = []
        self.pending_rejects: list[tuple[int, dict]] = []  # (samples cached before it, reject)
        self.tokens_end = self.commit.tokens
        self.audio_end = self.commit.audio_tokens

    @property
    def streams(self) -> dict[str, _Stream]:
        """The arrays, opened or created on first use: in the writer thread, off the model's path."""
        if self._streams is None:
            group = zarr.open_group(zarr.storage.LocalStore(self.path), mode="a")
            exact, fp8 = (STORED_DTYPES[self._dtype][0], (self._hidden_size,)), (np.uint8, (self._hidden_size + 1,))
            rows = ["final_hidden", "audio_embeds", *map(hidden_name, self._layers)]
            specs = {
                "input_ids": (np.int32, ()),
                "loss_mask": (np.uint8, ()),
                **{name: fp8 if encoded(self.codec.states, name) else exact for name in rows},
            }
            rows = {"audio_embeds": self.commit.audio_tokens}
            self._streams = {
                name: _Stream(self._array(group, name, dt, tail), rows.get(name, self.commit.tokens))
                for name, (dt, tail) in specs.items()
            }
        return self._streams

    def _array(self, group: zarr.Group, name: str, dtype, tail: tuple) -> zarr.Array:
        # Every chunk is stored, all-zero ones included (zarr skips those by default): a reader can then tell a
        # missing chunk (damage) from one that was never written.
        config = {"write_empty_chunks": True}
        if name in group:
            return group[name].with_config(config)
        attributes = {"torch_dtype": self._dtype if tail else str(np.dtype(dtype))}
        if encoded(self.codec.states, name):
            attributes["state_encoding"] = "fp8"  # self-describing; readers go by the manifest
        return group.create_array(
            name,
            shape=(0, *tail),
            chunks=(self.chunk * (1 if tail else 16), *tail),  # ids and masks are tiny: longer chunks
            dtype=dtype,
            compressors=self.codec.compressors(np.dtype(dtype).itemsize),
            fill_value=0,
            attributes=attributes,
            config=config,
        )

    @property
    def complete(self) -> bool:
        """The shard was read to its end (a part whose shard could not be read is retried by the next run)."""
        return _finished(self.commit)

    @property
    def position(self) -> int:
        """Samples of the shard already dealt with (cached or rejected) and committed."""
        return self.commit.position

    def append(self, record: SampleRecord) -> None:
        s = record.states
        rows = {
            "input_ids": record.input_ids,
            "loss_mask": record.loss_mask,
            **{
                name: encode_fp8(t) if encoded(self.codec.states, name) else to_storable(t)  # on the writer's thread
                for name, t in [
                    ("final_hidden", s.final_hidden),
                    ("audio_embeds", s.audio_embeds),
                    *((hidden_name(i), h) for i, h in s.hidden_states.items()),
                ]
            },
        }
        for name, data in rows.items():
            self.streams[name].add(data)
        self.tokens_end += len(record.input_ids)
        self.audio_end += len(s.audio_embeds)
        self.uncommitted.append((record.key, record.position, self.tokens_end, self.audio_end, record.num_bytes))
        if self.streams["final_hidden"].pending_rows >= FLUSH_CHUNKS * self.chunk:
            self._flush(everything=False)

    def reject(self, key: str, position: int, reason: str) -> None:
        before = self.commit.num_samples + len(self.uncommitted)
        self.pending_rejects.append((before, {"key": key, "position": position, "reason": reason}))
        if not self.uncommitted:
            self._commit(next_position=position + 1)

    def finish(self, error: str | None = None) -> None:
        """Write every buffered row and mark the part complete, or with ``error`` (the shard could not be read to its
        end) unfinished: the next run retries the shard from its first uncommitted sample, and the error stays
        recorded until a retry reads the shard to its end."""
        self._flush(everything=True)
        self.commit.complete = error is None
        self.commit.error = error
        self.commit.write(self.path / COMMIT)
        self.stats.finished_raw += self.commit.raw_bytes
        self.stats.finished_stored += sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def _flush(self, everything: bool) -> None:
        for stream in self.streams.values():
            # ids and masks are tiny: always written whole (their chunks are long, a rewrite costs nothing)
            stream.flush(self.chunk, everything or stream.array.ndim == 1)
        self._commit(next_position=None)

    def _commit(self, next_position: int | None) -> None:
        tok_done, audio_done = self.streams["input_ids"].written, self.streams["audio_embeds"].written
        tok_done = min(tok_done, *(s.written for n, s in self.streams.items() if n != "audio_embeds"))
        c = self.commit
        while self.uncommitted and self.uncommitted[0][2] <= tok_done and self.uncommitted[0][3] <= audio_done:
            key, position, tok_end, audio_end, raw_bytes = self.uncommitted.pop(0)
            c.keys.append(key)
            c.positions.append(position)
            c.token_offsets.append(tok_end)
            c.audio_offsets.append(audio_end)
            c.raw_bytes += raw_bytes
            c.position = position + 1
        while self.pending_rejects and self.pending_rejects[0][0] <= c.num_samples:
            reject = self.pending_rejects.pop(0)[1]
            c.rejects.append(reject)
            c.position = max(c.position, reject["position"] + 1)
        if next_position is not None and not self.uncommitted:
            c.position = max(c.position, next_position)
        c.write(self.path / COMMIT)


def _read_commit(part: Path) -> PartCommit:
    try:
        return PartCommit.read(part / COMMIT)
    except CacheError as err:
        raise CacheError(f"{err}\nTo redo that shard, delete {part} and re-run the same command.") from None


def _finished(commit: PartCommit) -> bool:
    # Commits of older versions marked a part whose shard could not be read complete, with its error.
    return commit.complete and not commit.error


class BackgroundWriter:
    """Runs writer calls in order on one thread; errors surface in the caller at its next call or at close."""

    def __init__(self, max_pending: int = 8):
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self._thread.start()
        self.wait_seconds = 0.0  # time callers spent blocked on a full queue: the model waiting on the writer

    def submit(self, fn, *args) -> None:
        self._raise_if_failed()
        try:
            self._queue.put_nowait((fn, args))
        except queue.Full:
            start = time.perf_counter()
            self._queue.put((fn, args))
            self.wait_seconds += time.perf_counter() - start

    def close(self) -> None:
        """Drain the queue, stop the thread, and re-raise the writer's error if it had one."""
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                fn, args = item
                try:
                    fn(*args)
                except BaseException as err:  # noqa: BLE001 - handed to the main thread
                    self._error = err

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error


# ------------------------------------------------------------------------------------------------ the manifest

# Manifest fields that must match to resume a cache: anything else would mix two kinds of samples in one cache.
RESUME_FIELDS = (
    "format_version",
    "audio_token_id",
    "hidden_size",
    "num_layers",
    "vocab_size",
    "captured_layers",
    "dtype",
    "codec",
    "settings",
)


class CacheWriter:
    """A cache being written: its manifest and one ``PartWriter`` per input shard (``manifest.shards``).

    Every rank holds one (built from the same manifest); only the main process calls ``create_or_resume`` and
    ``finalise``."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root, self.manifest = root, manifest

    def part(self, shard: str, writer: dict | None = None, stats: WriteStats | None = None) -> PartWriter:
        """The writer of ``shard``'s part, resumed at its first uncommitted sample. ``writer``: who writes it."""
        m = self.manifest
        path = self.root / PARTS / part_name(shard)
        return PartWriter(path, shard, m.captured_layers, m.hidden_size, m.dtype, m.codec, writer, stats)

    def finalise(self) -> Manifest:
        """Gather every part's commit into the manifest; it says complete only if every shard is done."""
        m = self.manifest
        m.parts, m.rejects, m.shard_errors = [], [], []
        for shard in m.shards:
            name = part_name(shard)
            if not (self.root / PARTS / name / COMMIT).exists():
                continue
            c = PartCommit.read(self.root / PARTS / name / COMMIT)
            done = _finished(c)
            m.parts.append(PartSummary(name, shard, c.num_samples, c.tokens, c.audio_tokens, c.raw_bytes, done))
            m.rejects += [{**r, "shard": shard} for r in c.rejects]
            if c.error:
                m.shard_errors.append({"shard": shard, "error": c.error})
        m.counts = {
            "shards": len(m.shards),
            "shards_done": sum(p.complete for p in m.parts),
            "samples": sum(p.samples for p in m.parts),
            "tokens": sum(p.tokens for p in m.parts),
            "audio_tokens": sum(p.audio_tokens for p in m.parts),
            "rejected": len(m.rejects),
            "reject_reasons": dict(Counter(r["reason"].split(":")[0] for r in m.rejects)),
            "unreadable_shards": len(m.shard_errors),
            "stored_bytes": sum(f.stat().st_size for f in (self.root / PARTS).rglob("*") if f.is_file()),
            "raw_bytes": sum(p.raw_bytes for p in m.parts),
        }
        m.complete = m.counts["shards_done"] == len(m.shards)  # an unreadable shard leaves the cache incomplete
        m.write(self.root)
        return m


class CacheLock:
    """The right to write a cache: an exclusive ``flock`` on ``<cache>/dump.lock``, which records its holder.

    One run holds it from before its manifest is created or resumed until the end (its main process: the other
    ranks of that run write their own parts under it). The OS releases a flock when its process ends, however it
    ends (``kill -9`` included), so no stale lock is ever left behind to clear by hand."""

    def __init__(self, root: Path):
        self.root = root
        self._file = None

    def acquire(self) -> None:
        """Take the lock (again: no-op), or raise ConfigError naming the dump that holds it."""
        if self._file is not None:
            return
        _make_directory(self.root)
        f = open(self.root / LOCK, "a+")  # noqa: SIM115 - held open for the run: closing it releases the lock
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(f)
            f.close()
            raise ConfigError(
                f"{self.root} is being written by another dump ({holder}); wait for it to finish or stop it, or "
                "choose another --out (the lock goes with that process, however it ends)"
            ) from None
        f.seek(0)
        f.truncate()
        started = datetime.now().astimezone().isoformat(timespec="seconds")
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": started}, f)
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> CacheLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_cache(root: Path) -> CacheLock:
    """``with lock_cache(root):`` write the cache at ``root``, no other dump meanwhile."""
    return CacheLock(root)


def _holder(f) -> str:
    """Who holds the lock, as its lock file says (it may be caught half-written)."""
    f.seek(0)
    try:
        who = json.loads(f.read())
        return f"pid {who['pid']} on {who['host']}, started {who['started']}"
    except (ValueError, KeyError, TypeError):
        return f"holder not recorded in {f.name}"


def _make_directory(root: Path) -> None:
    try:
        (root / PARTS).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the cache directory {root}: {err}") from None


def create_or_resume(
    root: Path, manifest: Manifest, head_weights: Callable[[], dict[str, torch.Tensor]]
) -> CacheWriter:
    """Create the cache at ``root`` (manifest and the target's head weights), or check that the cache already
    there was made with the same settings and mark it unfinished again (the dump resumes it).

    ``head_weights``: ``embed_tokens``, ``norm``, ``lm_head`` of the target, asked for only when creating.
    The caller holds the cache's ``CacheLock``."""
    check_encoding(manifest.codec.states, manifest.dtype)
    _make_directory(root)
    if (root / MANIFEST).exists():
        changed = _differences(_read_manifest(root), manifest)
        if changed:
            raise ConfigError(
                f"{root} holds a cache made with other settings ({', '.join(changed)} differ); "
                "re-run with the original settings and target to resume it, or choose another --out"
            )
    else:
        _write_head(root, head_weights)
    manifest.complete = False
    manifest.write(root)
    return CacheWriter(root, manifest)


def _read_manifest(root: Path) -> Manifest:
    try:
        return Manifest.read(root)
    except CacheError as err:
        raise CacheError(
            f"{err}\nThe dump cannot tell how this cache was made, so it cannot resume it: choose another --out, or "
            f"delete {root} to dump it again."
        ) from None


def _write_head(root: Path, head_weights: Callable[[], dict[str, torch.Tensor]]) -> None:
    """Write the head weights (then renamed into place: a full disk leaves no half file behind)."""
    weights = {k: v.contiguous().clone() for k, v in head_weights().items()}
    tmp = root / f".{HEAD_WEIGHTS}.{os.getpid()}.tmp"
    try:
        save_file(weights, tmp)
        os.replace(tmp, root / HEAD_WEIGHTS)
    except (OSError, SafetensorError) as err:  # safetensors reports a full disk as its own error type
        tmp.unlink(missing_ok=True)
        raise OSError(f"writing the target's head weights failed: {err}") from None


_CODEC_FLAGS = {"states": "state-encoding", "cname": "codec", "clevel": "level"}  # CodecConfig's renamed flags


def _differences(old: Manifest, new: Manifest) -> list[str]:
    """The settings in which two manifests differ (compared as stored: tuples become lists, keys strings)."""
    a, b = old.to_dict(), json.loads(json.dumps(new.to_dict()))
    changed = [name for name in RESUME_FIELDS if a[name] != b[name]]
    if "codec" in changed:  # defaults move between versions: say which flags resume this cache
        flags = " ".join(f"--{_CODEC_FLAGS.get(k, k.replace('_', '-'))} {v}" for k, v in a["codec"].items())
        changed[changed.index("codec")] = f"codec: this cache was written with {flags}"
    # The target's identity is opaque here: all of it must match, except the name it was loaded by (a model moves).
    old_target, new_target = ({**t, "name_or_path": None} for t in (a["target"], b["target"]))
    if old_target != new_target:
        keys = sorted(k for k in old_target.keys() | new_target.keys() if old_target.get(k) != new_target.get(k))
        changed.append(f"target model ({', '.join(keys)})")
    return changed
