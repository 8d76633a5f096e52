"""Training batches for the draft, streamed from a hidden-state cache.

    loader = make_loader("caches/train", LoaderConfig(layers=[2, 16, 29]), "train", epoch=0, rank=r, world_size=w)
    for batch in loader:  # input_ids loss_mask [B, T]; aux [B, T, k*H]; inputs_embeds final_hidden [B, T, H]
        ...               # lengths [B]; keys list[str]; right-padded (ids 0, mask False, states 0)

How an epoch is planned (from metadata only, identically in every rank and DataLoader worker):

1. The parts (one per input shard) are shuffled with (seed, epoch); ``mix_parts`` of them are open at a time and
   samples are drawn from them at random, so one window mixes several shards. A part's ``commit.json`` is read
   when the walk reaches it: nothing scans the cache, so the first batch costs one shuffle window of metadata
   whether the cache holds ten thousand samples or ten million.
2. Every ``shuffle_window`` samples are sorted by length (ties in random order) and cut into batches whose padded
   size B * T_max fits ``max_tokens``; the window's batches are shuffled. This global sequence of batches depends
   on the cache, the config, the split and the epoch only.
3. Batch b goes to rank b % world_size; a rank's j-th batch (after ``skip_batches``) to DataLoader worker
   j % num_workers. The DataLoader collects its workers round robin, so each rank sees its batches in the global
   order whatever the number of workers, and the ranks together see every batch exactly once.

Reads: a worker reads only the samples of its own batches (any other sample is some other worker's), straight
into the batch tensors, which live in shared memory, so handing a batch to the main process copies nothing.
Decompression runs in the workers, through the cache's own row reader (``pipeline.cache.rows.RowReader``: checked
chunks, only the blosc blocks that hold the wanted rows decoded); samples that touch in a part share their reads.
Damaged data stops the loader with a ``CacheError`` naming the part, never zeros.
"""

from __future__ import annotations

import math
import multiprocessing
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal, NamedTuple, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.cache.format import STORED_DTYPES, hidden_name
from pipeline.cache.reader import HiddenStateCache, embed_ids, open_cache, put_rows
from pipeline.cache.rows import RowReader
from pipeline.draft.serving import check_audio_embeds, reads_merged
from pipeline.inputs.split import Split, in_split
from pipeline.settings import setting


# Settings the loader shares with the training run (``TrainConfig``): defined once here, fields in both.
def max_tokens_setting():
    return setting(8192, "padded tokens (batch x longest sample) per micro-batch; a longer sample is cut to this")


def audio_embeds_setting():
    # mixed by default: on the quality benchmark it matched the draft trained for each engine under both (README)
    return setting(
        "mixed",
        "what the draft reads at audio positions: the cached merged audio embeddings (what SGLang feeds a served "
        "draft), the placeholder token's embedding (what vLLM feeds it), or mixed: each sample one or the other "
        "(seeded), so that one draft serves under both engines",
    )


def placeholder_share_setting():
    return setting(0.5, "under --audio-embeds mixed: the share of samples (per epoch) given placeholder embeddings")


def eval_percent_setting():
    return setting(5.0, "held-out share of samples, chosen by a hash of the key (stable across runs)")


def num_workers_setting():
    return setting(2, "DataLoader worker processes that read and decode the cache")


def seed_setting():
    return setting(0, "seed of the draft's initialisation and of the data order")


@dataclass
class LoaderConfig:
    layers: list[int]  # HF hidden_states indices concatenated into ``aux``, in this order; must be in the cache
    max_tokens: int = max_tokens_setting()
    max_length: int | None = None  # cut every sample to this many tokens
    audio_embeds: Literal["merged", "placeholder", "mixed"] = audio_embeds_setting()
    placeholder_share: float = placeholder_share_setting()
    eval_percent: float = eval_percent_setting()
    num_workers: int = num_workers_setting()
    prefetch_factor: int = 4  # batches in flight per worker
    seed: int = seed_setting()
    shuffle_window: int = 4096  # samples sorted by length together; larger: less padding, better mixing
    mix_parts: int = 8  # parts (shards) drawn from at once
    # Drop the epoch's last incomplete round of world_size batches, so that every rank gets as many batches (ranks
    # otherwise differ by one, and a collective inside a loop over them would wait forever on the shorter rank).
    even_ranks: bool = False
    pin_memory: bool | None = None  # default: when CUDA is available

    def __post_init__(self) -> None:
        check_audio_embeds(self.audio_embeds, self.placeholder_share)
        if not self.layers:
            raise ValueError("LoaderConfig.layers: at least one auxiliary layer")
        if self.max_tokens < 1 or self.shuffle_window < 1 or self.mix_parts < 1:
            raise ValueError("max_tokens, shuffle_window and mix_parts must be positive")

    @property
    def sample_limit(self) -> int:
        return min(self.max_tokens, self.max_length or self.max_tokens)


class SampleRef(NamedTuple):
    """Where a planned sample lives: enough to read it without its part's commit file."""

    part: int  # index into HiddenStateCache.parts
    index: int  # sample index within the part
    key: str
    start: int  # first row in the part's token arrays
    length: int  # tokens used (after truncation)
    audio_start: int  # rows of the sample in the part's audio_embeds
    audio_stop: int


# ---------------------------------------------------------------------------------------------------- the split


def split_keys(cache: HiddenStateCache, split: Split, eval_percent: float) -> list[str]:
    """Every key of the split, in cache order (reads every commit file: for tests and reports, not for training)."""
    return [k for part in cache.parts for k in _part_keys(part) if in_split(k, split, eval_percent)]


def _part_keys(part) -> list[str]:
    return part.read_commit().keys[: part.num_samples]


# ------------------------------------------------------------------------------------------------------ planning


def plan_batches(cache: HiddenStateCache, cfg: LoaderConfig, split: Split, epoch: int) -> Iterator[list[SampleRef]]:
    """The epoch's global sequence of batches, from metadata only (commit files, read as the walk reaches them)."""
    seeds = np.random.SeedSequence([cfg.seed, epoch]).spawn(2)
    draw, bucket = np.random.default_rng(seeds[0]), np.random.default_rng(seeds[1])
    window: list[SampleRef] = []
    for ref in _sample_stream(cache, cfg, split, draw):
        window.append(ref)
        if len(window) == cfg.shuffle_window:
            yield from _bucket(window, cfg.max_tokens, bucket)
            window = []
    if window:
        yield from _bucket(window, cfg.max_tokens, bucket)


def _sample_stream(
    cache: HiddenStateCache, cfg: LoaderConfig, split: Split, rng: np.random.Generator
) -> Iterator[SampleRef]:
    """The split's samples in random order: parts shuffled, ``mix_parts`` open at once, samples drawn among them."""
    order = iter(rng.permutation(len(cache.parts)).tolist())
    limit = cfg.sample_limit
    open_parts: list[list[SampleRef]] = []

    def open_next() -> bool:
        for p in order:
            refs = _part_refs(cache, p, split, cfg.eval_percent, limit)
            if refs:
                open_parts.append([refs[i] for i in rng.permutation(len(refs))])
                return True
        return False

    while len(open_parts) < cfg.mix_parts and open_next():
        pass
    uniforms: list[float] = []
    while open_parts:
        if not uniforms:  # drawn in blocks: one Generator call per sample would dominate the planning time
            uniforms = rng.random(1024).tolist()
        j = min(int(uniforms.pop() * len(open_parts)), len(open_parts) - 1)
        yield open_parts[j].pop()
        if not open_parts[j]:
            open_parts.pop(j)
            open_next()


def _part_refs(cache: HiddenStateCache, p: int, split: Split, eval_percent: float, limit: int) -> list[SampleRef]:
    part = cache.parts[p]
    if part.num_samples == 0:
        return []
    commit = part.read_commit()
    tok, aud = commit.token_offsets, commit.audio_offsets
    return [
        SampleRef(p, i, key, tok[i], min(tok[i + 1] - tok[i], limit), aud[i], aud[i + 1])
        for i, key in enumerate(commit.keys[: part.num_samples])
        if in_split(key, split, eval_percent)
    ]


def _bucket(window: list[SampleRef], max_tokens: int, rng: np.random.Generator) -> Iterator[list[SampleRef]]:
    """Sort by length, cut into batches within the token budget, shuffle the batches."""
    shuffled = [window[i] for i in rng.permutation(len(window))]
    batches: list[list[SampleRef]] = [[]]
    for ref in sorted(shuffled, key=lambda r: r.length):  # stable: equal lengths stay in random order
        if batches[-1] and (len(batches[-1]) + 1) * ref.length > max_tokens:
            batches.append([])
        batches[-1].append(ref)
    for i in rng.permutation(len(batches)):
        yield batches[i]


def count_batches(cache_path: str | Path, cfg: LoaderConfig, split: Split, epoch: int = 0) -> int:
    """Global batches in one epoch (rank r gets ``len(range(r, n, world_size))``, so ranks differ by at most one).

    Walks the whole plan, so it reads every commit file (about a second per thousand parts): for learning-rate
    schedules and progress bars, not on the path to the first batch. The count varies slightly between epochs.
    """
    return sum(1 for _ in plan_batches(open_cache(cache_path), cfg, split, epoch))


def rank_batches(
    batches: Iterable[list[SampleRef]], rank: int, world_size: int, skip_batches: int = 0, even: bool = False
) -> Iterator[list[SampleRef]]:
    """This rank's and this DataLoader worker's share of the global batches, in order (see the module notes)."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    for b, batch in enumerate(_whole_rounds(batches, world_size) if even else batches):
        if b % world_size != rank:
            continue
        j = b // world_size - skip_batches  # the rank's j-th batch after the skipped ones
        if j >= 0 and j % workers == worker:
            yield batch


def _whole_rounds(batches: Iterable[list[SampleRef]], n: int) -> Iterator[list[SampleRef]]:
    """The batches up to the last complete round of ``n`` (one for each rank)."""
    round_: list[list[SampleRef]] = []
    for batch in batches:
        round_.append(batch)
        if len(round_) == n:
            yield from round_
            round_ = []


# ------------------------------------------------------------------------------------------------------- reading


class PackedSource(Protocol):
    """Rows of a part's packed arrays: the cache's ``RowReader``; the benchmark plugs in raw copies."""

    def pieces(self, part: int, name: str, start: int, stop: int) -> Iterator[tuple[int, np.ndarray]]:
        """Rows ``start:stop`` as consecutive (first row, rows) pieces, each valid until the next is produced."""
        ...

    def chunk_rows(self, name: str) -> int:
        """The unit of decoding, in rows: reads of spans closer than this are merged."""
        ...

    def done(self, part: int) -> None:
        """The walk has moved on from this part (a hint: close what it holds)."""
        ...


def coalesce(spans: list[tuple[int, int]], chunk: int) -> list[tuple[int, int, list[int]]]:
    """Merge sorted row spans into reads: (start, stop, indices of the spans it covers).

    Spans share a read unless a whole ``chunk`` (the unit of decoding) lies between them: the merged read then
    decodes nothing the separate reads would not, and decodes their shared unit once.
    """
    runs: list[tuple[int, int, list[int]]] = []
    for i, (a, b) in enumerate(spans):
        if runs:
            start, stop, members = runs[-1]
            next_boundary = -(-stop // chunk) * chunk
            if next_boundary + chunk > a:
                runs[-1] = (start, max(stop, b), [*members, i])
                continue
        runs.append((a, b, [i]))
    return runs


class BatchReader:
    """Reads the samples of one planned batch straight into the padded batch tensors."""

    def __init__(
        self, cache: HiddenStateCache, cfg: LoaderConfig, source: PackedSource, shared: bool = False, epoch: int = 0
    ):
        self.cache, self.cfg, self.source, self.shared, self.epoch = cache, cfg, source, shared, epoch
        # destination of each token array in the builder: (name, column block)
        self.token_arrays = {"input_ids": ("input_ids", 0), "loss_mask": ("loss_mask", 0)}
        self.token_arrays |= {hidden_name(layer): ("aux", j) for j, layer in enumerate(cfg.layers)}
        self.token_arrays |= {"final_hidden": ("final_hidden", 0)}
        self.open_parts: list[int] = []  # most recent last; older ones are released

    def read(self, refs: list[SampleRef]) -> dict:
        out = BatchBuilder([r.length for r in refs], self.cache, len(self.cfg.layers), self.shared)
        by_part: dict[int, list[int]] = defaultdict(list)  # batch rows per part, in the part's order
        for b in sorted(range(len(refs)), key=lambda b: refs[b].start):
            by_part[refs[b].part].append(b)
        chunk = self.source.chunk_rows("final_hidden")
        for part, members in by_part.items():
            spans = [(refs[b].start, refs[b].start + refs[b].length) for b in members]
            for name, (dest, column) in self.token_arrays.items():
                self._copy_runs(part, name, spans, members, chunk, partial(out.put, dest, column=column))
        for b in range(len(refs)):
            out.embed(b)
        merged = {b for b, ref in enumerate(refs) if self._reads_merged(ref.key)}  # the rest keep placeholders
        for b in sorted(merged):
            ref = refs[b]
            if len(out.audio_at[b]) > ref.audio_stop - ref.audio_start:
                raise ValueError(
                    f"sample {ref.key}: {len(out.audio_at[b])} audio positions but only "
                    f"{ref.audio_stop - ref.audio_start} cached audio embeddings"
                )
        for part, members in by_part.items():
            audio_members = [b for b in members if b in merged]
            if audio_members:
                spans = [(refs[b].audio_start, refs[b].audio_stop) for b in audio_members]
                self._copy_runs(part, "audio_embeds", spans, audio_members, chunk, out.put_audio)
        for part in by_part:
            self._touch(part)
        return out.finish([r.key for r in refs])

    def _reads_merged(self, key: str) -> bool:
        cfg = self.cfg
        return reads_merged(cfg.audio_embeds, key, cfg.seed, self.epoch, cfg.placeholder_share)

    def _copy_runs(self, part, name, spans, members, chunk, put: Callable[[int, int, np.ndarray], None]) -> None:
        """One read per run of neighbouring spans; each piece goes to the samples whose rows it holds."""
        for start, stop, covered in coalesce(spans, chunk):
            for first, rows in self.source.pieces(part, name, start, stop):
                last = first + len(rows)
                for i in covered:
                    a, b = max(spans[i][0], first), min(spans[i][1], last)
                    if a < b:
                        put(members[i], a - spans[i][0], rows[a - first : b - first])

    def _touch(self, part: int) -> None:
        if part in self.open_parts:
            self.open_parts.remove(part)
        self.open_parts.append(part)
        if len(self.open_parts) > 4 * self.cfg.mix_parts:
            self.source.done(self.open_parts.pop(0))


class BatchBuilder:
    """Padded batch tensors, written piece by piece from rows in the stored dtype (bf16 as uint16)."""

    def __init__(self, lengths: list[int], cache: HiddenStateCache, k: int, shared: bool):
        b, t, h = len(lengths), max(lengths), cache.info["hidden_size"]
        self.lengths, self.hidden, self.audio_token_id = lengths, h, cache.audio_token_id
        self.table = cache.embed_tokens  # memory-mapped, shared by every worker
        self.dtype = STORED_DTYPES[cache.dtype][1]
        self.t = {
            "input_ids": _empty((b, t), torch.int64, shared),
            "loss_mask": _empty((b, t), torch.bool, shared),
            "aux": _empty((b, t, k * h), self.dtype, shared),
            "inputs_embeds": _empty((b, t, h), self.table.dtype, shared),
            "final_hidden": _empty((b, t, h), self.dtype, shared),
        }
        for x in self.t.values():  # zero the padding only: the rest is written once
            for i, n in enumerate(lengths):
                x[i, n:] = 0
        self.audio_at: dict[int, torch.Tensor] = {}

    def put(self, name: str, b: int, at: int, rows: np.ndarray, column: int = 0) -> None:
        """Rows ``at:at+len(rows)`` of sample ``b`` (cut to its length); ``column``: which block of ``aux``."""
        n = min(len(rows), self.lengths[b] - at)
        if n <= 0:
            return
        dest = self.t[name][b, at : at + n]
        if name == "aux":
            dest = dest[:, column * self.hidden : (column + 1) * self.hidden]
        src = _as_tensor(rows[:n])
        # torch's copy is ~2x numpy's into strided bf16 columns; it also casts int32 ids and uint8 masks
        dest.copy_(src.view(self.dtype) if src.dtype == torch.uint16 else src)

    def embed(self, b: int) -> None:
        """Token embeddings of sample ``b`` (its ids must be in): audio positions are overwritten by put_audio."""
        n = self.lengths[b]
        ids = self.t["input_ids"][b, :n].numpy()
        self.audio_at[b] = embed_ids(self.t["inputs_embeds"][b, :n], self.table, ids, self.audio_token_id)

    def put_audio(self, b: int, at: int, rows: np.ndarray) -> None:
        """Cached merged audio embeddings ``at:at+len(rows)`` of sample ``b``, at its audio positions in order."""
        positions = self.audio_at[b][at : at + len(rows)]  # a cut sample keeps its first audio rows only
        if len(positions):
            put_rows(self.t["inputs_embeds"][b], positions, _as_tensor(rows[: len(positions)]).view(self.dtype))

    def finish(self, keys: list[str]) -> dict:
        return {**self.t, "lengths": torch.tensor(self.lengths, dtype=torch.int64), "keys": keys}


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():  # a read-only memory map (benchmark baselines): only ever read from
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    if not shared:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(max(math.prod(shape) * dtype.itemsize, 1))
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


# ------------------------------------------------------------------------------------------------------ loading


class DraftDataset(IterableDataset):
    """One rank's batches of one epoch; each DataLoader worker opens the cache itself (manifest only)."""

    def __init__(
        self,
        cache_path: str | Path,
        cfg: LoaderConfig,
        split: Split,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        skip_batches: int = 0,
        source: Callable[[HiddenStateCache], PackedSource] = RowReader,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.cache_path, self.cfg, self.split, self.epoch = Path(cache_path), cfg, split, epoch
        self.rank, self.world_size, self.skip_batches, self.source = rank, world_size, skip_batches, source

    def __iter__(self) -> Iterator[dict]:
        cache = open_cache(self.cache_path)
        shared = get_worker_info() is not None
        reader = BatchReader(cache, self.cfg, self.source(cache), shared=shared, epoch=self.epoch)
        plan = plan_batches(cache, self.cfg, self.split, self.epoch)
        for refs in rank_batches(plan, self.rank, self.world_size, self.skip_batches, self.cfg.even_ranks):
            yield reader.read(refs)


def check_config(cache: HiddenStateCache, cfg: LoaderConfig) -> None:
    missing = [i for i in cfg.layers if i not in cache.layers]
    if missing:
        raise ValueError(f"layers {missing} are not in the cache, which captured {cache.layers}")


def make_loader(
    cache_path: str | Path,
    cfg: LoaderConfig,
    split: Split,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    skip_batches: int = 0,
    source: Callable[[HiddenStateCache], PackedSource] = RowReader,
) -> DataLoader:
    """This rank's batches of one epoch as a DataLoader (batches are assembled in the workers)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    check_config(open_cache(cache_path), cfg)  # fail here, not in a worker
    dataset = DraftDataset(cache_path, cfg, split, epoch, rank, world_size, skip_batches, source)
    workers = cfg.num_workers
    pin = torch.cuda.is_available() if cfg.pin_memory is None else cfg.pin_memory
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        prefetch_factor=cfg.prefetch_factor if workers else None,
        pin_memory=pin,
        multiprocessing_context=_worker_context() if workers else None,
    )


def _worker_context():
    """Workers forked from a clean server process, not from the trainer. A worker forked from the trainer shares its
    pages copy-on-write until the trainer updates its parameters and optimizer state in place: from then on each
    worker pins the old copies (4.2 GiB for two workers at 7B draft size, measured in results/scale-check.md). The
    server imports this module once, so each epoch's workers still start in milliseconds."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None  # the platform's default (spawn on macOS and Windows: no shared pages either)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context
