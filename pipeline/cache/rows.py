"""Reading rows of a cache's packed arrays straight from the chunk files, checked: the one reader of the states.

``open_cache(...)[i]``, the training loader and the draft vocab count all read through ``RowReader``. A chunk is
read whole (one file read), its CRC32C checked, and only the blosc blocks (128 KiB of rows) that hold the wanted
rows are decoded (c-blosc's ``blosc_getitem``), straight into the caller's buffer. A zarr slice would decode
whole chunks (1.5x the work for ~500-token samples in 256-token chunks) into fresh arrays, and would return
zeros for a missing chunk.

A chunk that holds committed rows must exist and match its checksum; otherwise the read raises ``CacheError``
naming the part (never zeros). ``verify_part`` checks every committed chunk of a part (`inspect-cache --verify`).

States stored as fp8 (``encoding.py``) are decoded chunk by chunk, in the same task that decompresses them, into
the cache's stored dtype: every caller gets [rows, H] in that dtype whatever the encoding.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import google_crc32c
import numcodecs.blosc
import numpy as np
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
from zarr.core.common import ZARR_JSON
from zarr.core.metadata.v3 import ArrayV3Metadata

from pipeline.cache.encoding import decode_fp8, encoded
from pipeline.cache.format import STORED_DTYPES, hidden_name
from pipeline.errors import CacheError

if TYPE_CHECKING:
    from pipeline.cache.reader import CachePart, HiddenStateCache

# c-blosc 1 frames start with version, versionlz, flags, typesize (one byte each), nbytes, blocksize, cbytes (u32 LE)
BLOSC_HEADER = 16
CHECKSUM = 4  # zarr's crc32c codec appends the CRC32C of the frame, in native byte order


class Damage(Exception):
    """A chunk that cannot be trusted: missing, cut short or not matching its checksum (the text says which)."""


@dataclass(frozen=True)
class Layout:
    """An array stored as this package writes it: one checksummed blosc frame per chunk, chunked along rows."""

    meta: dict  # its zarr.json without the shape (the one field that differs between parts)
    chunk: int  # rows per chunk
    row_shape: tuple[int, ...]
    dtype: np.dtype
    encode_key: Callable

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    def chunk_key(self, c: int) -> str:
        return self.encode_key((c,) + (0,) * len(self.row_shape))


class Held:
    """Per array name, the last chunk read (compressed and checked), kept for the next read, which mostly starts in
    the chunk where the last one ended. One per thread."""

    def __init__(self):
        self.raw: dict[str, np.ndarray] = {}  # name -> buffer holding the frame
        self.chunk: dict[str, tuple[int, int, int]] = {}  # name -> (part, chunk, frame size)
        self.codes: dict[tuple, np.ndarray] = {}  # (chunk rows, width) -> decompressed fp8 rows before decoding


class RowReader:
    """Rows of a cache's arrays, part by part; keeps per-array metadata and buffers for compressed chunks.

    ``read_many`` (one sample's arrays: ``open_cache(...)[i]``) decodes its chunks in parallel threads (c-blosc and
    the checksum release the GIL); ``read`` (long runs: the draft vocab count) and ``pieces`` (the training loader,
    already one process per worker) decode in the calling thread, so that no threads are alive when the trainer's
    DataLoader forks its workers."""

    def __init__(self, cache: HiddenStateCache, threads: int | None = None):
        self.cache = cache
        self.threads = threads or min(8, os.cpu_count() or 1)
        self.layouts: dict[str, Layout] = {}  # per array name, from the first part read
        self.checked: set[tuple[int, str]] = set()  # (part, name) whose zarr.json equals the layout's
        self.scratch: dict[tuple, np.ndarray] = {}  # one decoded chunk per (chunk, row shape, dtype)
        self.decoded_bytes = 0  # what was decompressed, wanted or not (the benchmark reports the overhead)
        self.states = cache.manifest.codec.states
        self.state_dtype = np.dtype(STORED_DTYPES[cache.dtype][0])
        self._local = threading.local()  # each thread's Held
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0  # the process that made the pool (a forked child needs its own)

    # -------------------------------------------------------------------------------------------- reading

    def read(self, part: int, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of one array of one part, as a new array (in the stored dtype)."""
        return self.read_many(part, [(name, start, stop)], parallel=False)[0]

    def read_many(self, part: int, spans: list[tuple[str, int, int]], parallel: bool = True) -> list[np.ndarray]:
        """Rows ``start:stop`` of several arrays of one part, as new arrays: one task per chunk, run in threads
        (``parallel``) or in this one."""
        outs, tasks = [], []
        for name, start, stop in spans:
            layout = self._layout(part, name)
            out = np.empty((stop - start, *self._row_shape(name, layout)), self._dtype(name, layout))
            outs.append(out)
            for c, lo, hi in _chunk_spans(start, stop, layout.chunk):
                at = c * layout.chunk + lo - start
                tasks.append((part, name, layout, c, lo, hi, out[at : at + hi - lo]))
        if parallel and len(tasks) > 1 and self.threads > 1:
            self.decoded_bytes += sum(self._executor().map(lambda task: self._rows(*task), tasks))
        else:
            self.decoded_bytes += sum(self._rows(*task) for task in tasks)
        return outs

    def pieces(self, part: int, name: str, start: int, stop: int) -> Iterator[tuple[int, np.ndarray]]:
        """Rows ``start:stop`` as consecutive (first row, rows) pieces, one per chunk, each valid until the next
        is produced (they live in a reused buffer): the training loader copies them into its batch."""
        layout = self._layout(part, name)
        row_shape, dtype = self._row_shape(name, layout), self._dtype(name, layout)
        key = (layout.chunk, row_shape, dtype.str)
        if key not in self.scratch:
            self.scratch[key] = np.empty((layout.chunk, *row_shape), dtype)
        buffer = self.scratch[key]
        for c, lo, hi in _chunk_spans(start, stop, layout.chunk):
            self.decoded_bytes += self._rows(part, name, layout, c, lo, hi, buffer[lo:hi])
            yield c * layout.chunk + lo, buffer[lo:hi]

    def chunk_rows(self, name: str) -> int:
        """The unit of decoding, in rows: reads of spans closer than this are merged (blocks: merging pays only
        when spans touch)."""
        return 1 if _blosc_getitem() else self.cache.manifest.codec.chunk_tokens

    def done(self, part: int) -> None:
        """The caller has moved on from this part: forget its commit and checked metadata."""
        self.cache.parts[part].release()
        self.checked = {(p, n) for p, n in self.checked if p != part}

    # ---------------------------------------------------------------------------------------- verifying

    def verify_part(self, part: int) -> list[str]:
        """Every committed chunk of every array of the part read and checked: what is damaged (empty: intact)."""
        held = Held()  # every chunk read afresh
        try:
            commit = self.cache.parts[part].read_commit()
        except CacheError as err:
            return [str(err)]
        names = ["input_ids", "loss_mask", "final_hidden", *map(hidden_name, self.cache.layers), "audio_embeds"]
        problems = []
        for name in names:
            rows = commit.audio_tokens if name == "audio_embeds" else commit.tokens
            if not rows:
                continue
            try:
                layout = self._check_layout(part, name)
            except Damage as err:
                problems.append(str(err))
                continue
            for c in range(-(-rows // layout.chunk)):
                try:
                    self._frame(part, name, layout, c, held)
                except Damage as err:
                    problems.append(f"{name} chunk {c} {err}")
        return problems

    # ------------------------------------------------------------------------------------------- internals

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool, self._pool_pid = ThreadPoolExecutor(self.threads, "cache-rows"), os.getpid()
        return self._pool

    def _encoded(self, name: str) -> bool:
        """Stored as fp8 codes (the aux and final states of an fp8 cache, and its audio embeddings if fp8-audio)."""
        return encoded(self.states, name)

    def _row_shape(self, name: str, layout: Layout) -> tuple[int, ...]:
        return (layout.row_shape[0] - 1,) if self._encoded(name) else layout.row_shape

    def _dtype(self, name: str, layout: Layout) -> np.dtype:
        return self.state_dtype if self._encoded(name) else layout.dtype

    def _rows(self, part: int, name: str, layout: Layout, c: int, lo: int, hi: int, out: np.ndarray) -> int:
        """Rows ``lo:hi`` of chunk ``c`` into ``out`` as callers see them (fp8 states decoded); bytes decompressed."""
        if not self._encoded(name):
            return self._decode(part, name, layout, c, lo, hi, out)
        if not hasattr(self._local, "held"):
            self._local.held = Held()
        codes = self._local.held.codes
        if layout.row_shape not in codes:
            codes[layout.row_shape] = np.empty((layout.chunk, *layout.row_shape), np.uint8)
        stored = codes[layout.row_shape][: hi - lo]
        done = self._decode(part, name, layout, c, lo, hi, stored)
        decode_fp8(stored, out)
        return done

    def _decode(self, part: int, name: str, layout: Layout, c: int, lo: int, hi: int, out: np.ndarray) -> int:
        """Rows ``lo:hi`` of chunk ``c`` into ``out`` (contiguous, ``hi - lo`` rows); returns the bytes decoded."""
        if not hasattr(self._local, "held"):
            self._local.held = Held()
        try:
            frame = self._frame(part, name, layout, c, self._local.held)
        except Damage as err:
            raise damaged(self.cache.parts[part], f"{name} chunk {c} {err}") from None
        row, typesize, getitem = layout.row_bytes, int(frame[3]), _blosc_getitem()
        begin, end = lo * row, hi * row
        if (lo, hi) == (0, layout.chunk) or getitem is None or begin % typesize or end % typesize:
            whole = (lo, hi) == (0, layout.chunk)
            full = out if whole else np.empty((layout.chunk, *layout.row_shape), layout.dtype)
            numcodecs.blosc.decompress(frame, full)
            if not whole:
                out[...] = full[lo:hi]
            return layout.chunk * row
        done = getitem(frame.ctypes.data, begin // typesize, (end - begin) // typesize, out.ctypes.data)
        if done != end - begin:
            raise damaged(self.cache.parts[part], f"{name} chunk {c}: blosc could not decode rows {lo}:{hi}")
        blocksize = struct.unpack_from("<I", frame, 8)[0]
        return min(-(-end // blocksize) * blocksize, layout.chunk * row) - begin // blocksize * blocksize

    def _frame(self, part: int, name: str, layout: Layout, c: int, held: Held) -> np.ndarray:
        """Chunk ``c``'s blosc frame, read whole and checked against its CRC32C (a view of ``held``'s buffer)."""
        last = held.chunk.pop(name, None)
        if last is not None and last[:2] == (part, c):
            held.chunk[name] = last
            return held.raw[name][: last[2]]
        path = self.cache.parts[part].path / name / layout.chunk_key(c)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                raw = held.raw.get(name)
                if raw is None or len(raw) < size:  # with room for the next chunks, which compress differently
                    raw = held.raw[name] = np.empty(size * 5 // 4, np.uint8)
                got = f.readinto(memoryview(raw)[:size])
        except FileNotFoundError:
            raise Damage("is missing") from None
        except OSError as err:
            raise Damage(f"is unreadable ({err})") from None
        if got != size or size < BLOSC_HEADER + CHECKSUM:
            raise Damage(f"is cut short ({got} bytes)")
        frame, stored = raw[: size - CHECKSUM], raw[size - CHECKSUM : size]
        if google_crc32c.value(frame) != int.from_bytes(stored.tobytes(), sys.byteorder):
            raise Damage("does not match its checksum (corrupted)")
        nbytes, _, cbytes = struct.unpack_from("<III", frame, 4)
        if cbytes != len(frame) or nbytes != layout.chunk * layout.row_bytes:
            raise Damage(f"holds a blosc frame of another size ({nbytes} bytes in {cbytes})")
        held.chunk[name] = (part, c, len(frame))
        return frame

    def _layout(self, part: int, name: str) -> Layout:
        try:
            return self._check_layout(part, name)
        except Damage as err:
            raise damaged(self.cache.parts[part], str(err)) from None

    def _check_layout(self, part: int, name: str) -> Layout:
        """How the part stores the array. Every part of a cache is written alike, so zarr parses the metadata once
        per array name; for the other parts their zarr.json is only compared with that one (parsing costs ~1 ms
        per array: it would dominate the first batch, which touches a dozen parts)."""
        if (part, name) in self.checked:
            return self.layouts[name]
        path = self.cache.parts[part].path / name / ZARR_JSON
        try:
            meta = json.loads(path.read_bytes())
            shape = meta.pop("shape")
        except FileNotFoundError:
            raise Damage(f"array {name} is missing ({path})") from None
        except (OSError, ValueError, KeyError, AttributeError) as err:
            raise Damage(f"array {name} has unreadable metadata ({path}: {err!r})") from None
        if name not in self.layouts:
            self.layouts[name] = _layout_of(name, meta, shape)
            if self._encoded(name) and self.layouts[name].dtype != np.uint8:
                raise Damage(f"array {name} does not hold fp8 codes, as the manifest says it does ({path})")
        layout = self.layouts[name]
        if layout.meta != meta or tuple(shape[1:]) != layout.row_shape:
            raise Damage(f"array {name} is stored unlike the same array of the other parts ({path})")
        self.checked.add((part, name))
        return layout


def damaged(part: CachePart, what: str) -> CacheError:
    """The error every reader raises for damaged data: it names the part and says how to repair it."""
    return CacheError(
        f"damaged cache part {part.name} (shard {part.shard}): {what}.\n"
        f"`just inspect-cache {part.path.parent.parent} --verify` lists every damaged part; to repair one, delete "
        f"{part.path} and re-run the dump command that made the cache (it redoes only the missing parts)."
    )


def _layout_of(name: str, meta: dict, shape: list[int]) -> Layout:
    try:
        m = ArrayV3Metadata.from_dict({**meta, "shape": shape})
    except (KeyError, TypeError, ValueError) as err:
        raise Damage(f"array {name} has unreadable metadata ({err!r})") from None
    codecs, chunks = m.codecs, m.chunk_grid.chunk_shape
    plain = (
        len(codecs) == 3
        and isinstance(codecs[0], BytesCodec)
        and (codecs[0].endian is None or codecs[0].endian.value == sys.byteorder)
        and isinstance(codecs[1], BloscCodec)
        and isinstance(codecs[2], Crc32cCodec)
    )
    if not plain or tuple(chunks[1:]) != tuple(shape[1:]):
        raise Damage(f"array {name} is not stored as this code writes it (codecs {codecs}, chunks {chunks})")
    return Layout(meta, chunks[0], tuple(chunks[1:]), np.dtype(m.dtype.to_native_dtype()), m.encode_chunk_key)


def _chunk_spans(start: int, stop: int, chunk: int) -> Iterator[tuple[int, int, int]]:
    """(chunk index, first row, end row within it) of each chunk that rows ``start:stop`` touch."""
    if start >= stop:
        return
    for c in range(start // chunk, -(-stop // chunk)):
        yield c, max(start - c * chunk, 0), min(stop - c * chunk, chunk)


@lru_cache(maxsize=1)
def _blosc_getitem() -> Callable | None:
    """c-blosc's ``blosc_getitem`` (decode a range of items, touching only their blocks), from numcodecs' build."""
    try:
        fn = ctypes.CDLL(numcodecs.blosc.__file__).blosc_getitem
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn
