"""`just bench-train`: stage two's data loading, measured side by side in one run.

1. Loader throughput (tokens/s and MB/s of decompressed aux + final states) over one epoch of a synthetic bf16
   cache, with the same plan (batches), workers and batch assembly for every source:
   (i) our loader from the Zarr cache; (ii) the same packed arrays as uncompressed .npy memmaps (the limit:
   nothing to decode); (iii) one ``torch.save`` file per sample (dict of ids, loss mask, 3 aux states, final
   state, as the reference trainers store them) read with ``torch.load(weights_only=True)``. Target: (i) >= 2x
   (iii). Each with a warm page cache and, where the OS lets us drop it, a cold one.
   Then random access in one process: ``open_cache(...)[i]`` against ``torch.load`` of the same samples' files, in
   the same random order, warm page cache (target >= 0.5x).
2. Time to the first batch for a small cache and one with 100x the parts and samples (target: the same).
3. Training from the cache: tokens/s and the share of time the trainer waited for data (``--train-steps``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path

import numcodecs
import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.cache.format import COMMIT, HEAD_WEIGHTS, PARTS, CodecConfig, Manifest, hidden_name, part_name
from pipeline.cache.reader import HiddenStateCache, open_cache
from pipeline.cache.rows import RowReader
from pipeline.cache.writer import CacheWriter, SampleRecord, create_or_resume
from pipeline.train.data import (
    BatchBuilder,
    BatchReader,
    LoaderConfig,
    make_loader,
    plan_batches,
    rank_batches,
)
from pipeline.train.loop import TrainConfig, train
from pipeline.train.run_dir import TRAIN_LOG
from stages.bench.dump import synthetic_states

LAYERS = [2, 16, 29]  # EAGLE-3's layers of a 32-layer 7B target (names only here)
NUM_LAYERS = 32
AUDIO_TOKEN = 7


@dataclass
class Built:
    samples: int
    tokens: int
    audio_tokens: int
    zarr_bytes: int
    npy_bytes: int
    torch_bytes: int


def sample_shapes(rng: np.random.Generator, total_tokens: int) -> list[tuple[int, int, int]]:
    """(tokens, audio tokens, answer tokens) of audio chat samples: 2-30 s clips at 25 tokens/s plus text."""
    shapes, total = [], 0
    while total < total_tokens:
        audio = int(rng.uniform(2, 30) * 25)
        answer = int(np.clip(rng.lognormal(4.3, 0.7), 5, 400))
        tokens = 10 + int(rng.integers(15, 60)) + audio + answer  # template, prompt, clip, answer
        shapes.append((tokens, audio, answer))
        total += tokens
    return shapes


def synthetic_target(hidden: int, vocab: int) -> dict:
    """The identity a target adapter records in the manifest, for a 7B-shaped audio LLM (32 layers, MLP 11008/4096 of
    the width) at this width and vocab: what training reads of it (``draft_defaults``, ``architectures``) and the
    names ``info`` shows. No adapter exists for it: stage two never needs one."""
    heads = max(1, hidden // 128)
    return {
        "name_or_path": "synthetic",
        "model_type": "synthetic_audio_lm",
        "architectures": ["SyntheticAudioLM"],
        "draft_defaults": {
            "hidden_size": hidden,
            "intermediate_size": hidden * 11008 // 4096,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "head_dim": hidden // heads,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 8192,
            "vocab_size": vocab,
        },
    }


def build(
    root: Path, hidden: int, total_tokens: int, parts: int, vocab: int, codec: CodecConfig, training: bool = False
) -> Built:
    """The same synthetic samples three ways: a Zarr cache (written by the cache's writer), .npy copies of its packed
    arrays, one file per sample. ``training``: the cache alone, with the lm_head and norm training needs."""
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    shapes = sample_shapes(rng, total_tokens)
    cache, npy, files = root / "cache", root / "npy", root / "files"
    if not training:
        npy.mkdir(parents=True)
        files.mkdir()
    shards = [f"part-{p:04d}" for p in range(parts)]
    manifest = Manifest(
        target=synthetic_target(hidden, vocab), audio_token_id=AUDIO_TOKEN, hidden_size=hidden,
        num_layers=NUM_LAYERS, vocab_size=vocab, captured_layers=LAYERS, dtype="bfloat16", codec=codec, shards=shards,
    )  # fmt: skip
    writer = create_or_resume(cache, manifest, lambda: _head_weights(hidden, vocab, training, gen))
    for shard, chunk in zip(shards, np.array_split(np.arange(len(shapes)), parts), strict=True):
        part = writer.part(shard)
        copies = None if training else _NpyCopies(npy / part.path.name, [shapes[i] for i in chunk], hidden)
        for i in chunk.tolist():
            tokens, audio, answer = shapes[i]
            ids = rng.integers(AUDIO_TOKEN + 1, vocab, tokens).astype(np.int32)
            ids[20 : 20 + audio] = AUDIO_TOKEN
            mask = np.zeros(tokens, np.uint8)
            mask[-answer:] = 1
            states = synthetic_states(tokens, audio, hidden, LAYERS, gen)
            record = SampleRecord(f"{shard}-{i:06d}", i, ids, mask, states)
            part.append(record)
            if copies is not None:
                copies.add(record)
                _torch_file(record, files / f"{record.key}.pt")
        part.finish()
        if copies is not None:
            copies.flush()
    writer.finalise()
    return Built(
        samples=len(shapes),
        tokens=sum(s[0] for s in shapes),
        audio_tokens=sum(s[1] for s in shapes),
        zarr_bytes=_du(cache / PARTS),
        npy_bytes=_du(npy) if not training else 0,
        torch_bytes=_du(files) if not training else 0,
    )


def _head_weights(hidden: int, vocab: int, training: bool, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """embed_tokens; for training also lm_head and norm (all a real cache holds of its target)."""
    weights = {"embed_tokens": torch.randn(vocab, hidden, generator=gen).to(torch.bfloat16)}
    if training:
        weights["lm_head"] = (torch.randn(vocab, hidden, generator=gen) * 0.02).to(torch.bfloat16)
        weights["norm"] = torch.ones(hidden, dtype=torch.bfloat16)
    return weights


class _NpyCopies:
    """A part's packed arrays as uncompressed .npy memory maps, filled sample by sample (baseline (ii))."""

    def __init__(self, directory: Path, shapes: list[tuple[int, int, int]], hidden: int):
        directory.mkdir()
        rows, audio_rows = sum(s[0] for s in shapes), sum(s[1] for s in shapes)
        states = ["final_hidden", *map(hidden_name, LAYERS)]
        self.maps = {n: _npy(directory / n, (rows, hidden), np.uint16) for n in states}
        self.maps["audio_embeds"] = _npy(directory / "audio_embeds", (audio_rows, hidden), np.uint16)
        self.maps["input_ids"] = _npy(directory / "input_ids", (rows,), np.int32)
        self.maps["loss_mask"] = _npy(directory / "loss_mask", (rows,), np.uint8)
        self.at = self.audio_at = 0

    def add(self, record: SampleRecord) -> None:
        s, n, a = record.states, len(record.input_ids), len(record.states.audio_embeds)
        for layer, h in s.hidden_states.items():
            self.maps[hidden_name(layer)][self.at : self.at + n] = h.view(torch.uint16).numpy()
        self.maps["final_hidden"][self.at : self.at + n] = s.final_hidden.view(torch.uint16).numpy()
        self.maps["audio_embeds"][self.audio_at : self.audio_at + a] = s.audio_embeds.view(torch.uint16).numpy()
        self.maps["input_ids"][self.at : self.at + n] = record.input_ids
        self.maps["loss_mask"][self.at : self.at + n] = record.loss_mask
        self.at, self.audio_at = self.at + n, self.audio_at + a

    def flush(self) -> None:
        for m in self.maps.values():
            m.flush()


def _torch_file(record: SampleRecord, path: Path) -> None:
    """Baseline (iii): the sample as the reference trainers store it (no audio embeddings)."""
    s = record.states
    torch.save(
        {
            "input_ids": torch.from_numpy(record.input_ids.astype(np.int64)),
            "loss_mask": torch.from_numpy(record.loss_mask.astype(bool)),
            **{hidden_name(layer): h for layer, h in s.hidden_states.items()},
            "final_hidden": s.final_hidden,
        },
        path,
    )


def _npy(path: Path, shape: tuple, dtype) -> np.memmap:
    return np.lib.format.open_memmap(path.with_suffix(".npy"), mode="w+", dtype=dtype, shape=shape)


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


# ----------------------------------------------------------------------------------------------- the baselines


class NpySource:
    """(ii) the cache's packed arrays, uncompressed, memory-mapped: reading is a copy out of the page cache."""

    def __init__(self, cache: HiddenStateCache):
        self.root = cache.root.parent / "npy"
        self.names = [p.path.name for p in cache.parts]
        self.maps: dict[tuple[int, str], np.ndarray] = {}

    def pieces(self, part: int, name: str, start: int, stop: int) -> Iterator[tuple[int, np.ndarray]]:
        if (part, name) not in self.maps:
            self.maps[part, name] = np.load(self.root / self.names[part] / f"{name}.npy", mmap_mode="r")
        yield start, self.maps[part, name][start:stop]

    def chunk_rows(self, name: str) -> int:
        return 1

    def done(self, part: int) -> None:
        pass


class TorchFileDataset(IterableDataset):
    """(iii) one torch.save file per sample, same plan, workers and batch assembly as ours (placeholder embeds)."""

    def __init__(self, cache_path: Path, cfg: LoaderConfig):
        self.cache_path, self.cfg = cache_path, cfg

    def __iter__(self) -> Iterator[dict]:
        cache = open_cache(self.cache_path)
        files, shared = self.cache_path.parent / "files", get_worker_info() is not None
        for refs in rank_batches(plan_batches(cache, self.cfg, "train", 0), 0, 1):
            out = BatchBuilder([r.length for r in refs], cache, len(self.cfg.layers), shared)
            for b, ref in enumerate(refs):
                s = torch.load(files / f"{ref.key}.pt", weights_only=True)
                for name in ("input_ids", "loss_mask", "final_hidden"):
                    out.put(name, b, 0, _np(s[name]))
                for j, layer in enumerate(self.cfg.layers):
                    out.put("aux", b, 0, _np(s[hidden_name(layer)]), column=j)
                out.embed(b)
            yield out.finish([r.key for r in refs])


def _np(t: torch.Tensor) -> np.ndarray:
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()


# ------------------------------------------------------------------------------------------------- measuring


def evict(paths: list[Path]) -> None:
    """Drop these files (not the whole system's) from the page cache: a cold read, without disturbing others."""
    os.sync()  # dirty pages cannot be dropped
    for root in paths:
        for f in root.rglob("*"):
            if f.is_file() and not f.is_symlink():
                fd = os.open(f, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)


def timed_pass(loader) -> tuple[int, float]:
    start, tokens = time.perf_counter(), 0
    for batch in loader:
        tokens += int(batch["lengths"].sum())
    return tokens, time.perf_counter() - start


def decode_overhead(cache_path: Path, cfg: LoaderConfig, batches: int = 40) -> float:
    """Bytes our reader decompresses per byte it delivers (blosc blocks shared with neighbouring samples)."""
    cache = open_cache(cache_path)
    source = RowReader(cache)
    reader = BatchReader(cache, cfg, source)
    row = cache.info["hidden_size"] * 2
    delivered = 0
    for refs in islice(plan_batches(cache, cfg, "train", 0), batches):
        reader.read(refs)
        delivered += sum(
            r.length * (5 + (len(cfg.layers) + 1) * row) + (r.audio_stop - r.audio_start) * row for r in refs
        )
    return source.decoded_bytes / delivered


def bench_throughput(root: Path, built: Built, hidden: int, cfg: LoaderConfig, rounds: int, cold: bool) -> None:
    cache_path = root / "cache"
    state_bytes = (len(cfg.layers) + 1) * hidden * 2  # aux + final, bf16, per token
    sources = {
        "(i)   ours, Zarr cache, merged": (lambda: make_loader(cache_path, cfg, "train", 0), [cache_path]),
        "(i)   ours, Zarr cache, placeholder": (
            lambda: make_loader(cache_path, _with(cfg, audio_embeds="placeholder"), "train", 0),
            [cache_path],
        ),
        "(ii)  raw .npy memmaps, placeholder": (
            lambda: make_loader(cache_path, _with(cfg, audio_embeds="placeholder"), "train", 0, source=NpySource),
            [root / "npy"],
        ),
        "(iii) torch.save per sample, placeholder": (
            lambda: DataLoader(
                TorchFileDataset(cache_path, cfg),
                batch_size=None,
                num_workers=cfg.num_workers,
                prefetch_factor=cfg.prefetch_factor if cfg.num_workers else None,
            ),
            [root / "files"],
        ),
    }
    print(
        f"\n[1] one epoch, {built.samples} samples, {built.tokens} tokens ({built.audio_tokens / built.tokens:.0%} "
        f"audio), H={hidden} bf16, {cfg.num_workers} workers, max_tokens {cfg.max_tokens}; MB/s = decompressed "
        f"aux+final states delivered ({state_bytes} B/token); warm = best of {rounds} passes after a warm-up (median "
        "in tok/s); cold = one pass"
    )
    # Rounds go over the sources in turn, so that a burst of other work on the machine hits them alike; the best
    # round of each is reported (the least disturbed), with the median.
    warm: dict[str, list[float]] = {name: [] for name in sources}
    for r in range(rounds + 1):
        for name, (loader, _) in sources.items():
            tokens, seconds = timed_pass(loader())
            if r:  # round 0 warms the page cache and lazy imports
                warm[name].append(tokens / seconds)
    results = {name: {"warm": max(rates), "median": statistics.median(rates)} for name, rates in warm.items()}
    if cold:
        for name, (loader, paths) in sources.items():
            evict([*paths, cache_path / HEAD_WEIGHTS])
            tokens, seconds = timed_pass(loader())
            results[name]["cold"] = tokens / seconds
    width = max(map(len, results))
    for name, r in results.items():
        cells = [f"warm {r['warm']:7.0f} tok/s {r['warm'] * state_bytes / 1e6:5.0f} MB/s (median {r['median']:6.0f})"]
        if "cold" in r:
            cells.append(f"cold {r['cold']:7.0f} tok/s {r['cold'] * state_bytes / 1e6:5.0f} MB/s")
        print(f"    {name:<{width}}  " + "   ".join(cells))
    ours, ref = results["(i)   ours, Zarr cache, placeholder"], results["(iii) torch.save per sample, placeholder"]
    ratios = ", ".join(f"{k} {ours[k] / ref[k]:.2f}x" for k in ours if k != "median")
    print(f"    ours / torch.save per sample (same content): {ratios} (target >= 2x)")
    if cold:
        print(
            "    cold = the source's files (and embed_tokens) dropped from the page cache with posix_fadvise(DONTNEED) "
            "before the pass (this is a VM: the host may still cache its disk)"
        )
    amp = decode_overhead(cache_path, cfg)
    print(
        f"    bytes on disk: Zarr {built.zarr_bytes / 1e9:.2f} GB (incl. audio embeds), .npy "
        f"{built.npy_bytes / 1e9:.2f} GB (same arrays), torch.save {built.torch_bytes / 1e9:.2f} GB (no audio "
        f"embeds); our reader decompresses {amp:.3f} bytes per byte delivered (blosc blocks shared by neighbouring "
        "samples)"
    )


def bench_random_access(root: Path, hidden: int, rounds: int) -> None:
    """open_cache(...)[i] against torch.load of one file per sample: the same samples in the same random order, one
    process, warm page cache (a pass before the timed ones)."""
    cache, files = open_cache(root / "cache"), root / "files"
    order = np.random.default_rng(1).permutation(len(cache)).tolist()
    where = [cache.locate(i) for i in order]
    keys = [cache.parts[p].commit.keys[i] for p, i in where]
    tokens = sum(cache.parts[p].commit.token_offsets[i + 1] - cache.parts[p].commit.token_offsets[i] for p, i in where)

    def ours() -> None:
        for i in order:
            cache[i]

    def per_sample_files() -> None:
        for key in keys:
            torch.load(files / f"{key}.pt", weights_only=True)

    times: dict[str, list[float]] = {"ours": [], "files": []}
    for r in range(rounds + 1):  # in turn, so that other work on the machine hits both alike; round 0 warms up
        for name, fn in (("ours", ours), ("files", per_sample_files)):
            start = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - start)
    state_bytes = (len(LAYERS) + 1) * hidden * 2 * tokens  # aux + final, bf16: what both deliver
    ours_rate, files_rate = (state_bytes / min(times[k]) / 1e6 for k in ("ours", "files"))
    print(
        f"\n[1b] random access, one process, warm page cache, {len(order)} samples in random order, best of {rounds}: "
        f"open_cache(...)[i] {ours_rate:.0f} MB/s, torch.load per-sample file {files_rate:.0f} MB/s (aux + final "
        f"states delivered): ratio {ours_rate / files_rate:.2f}x (target >= 0.5x; open_cache also reads the audio "
        "embeddings and builds inputs_embeds, the files hold neither)"
    )


def _with(cfg: LoaderConfig, **changes) -> LoaderConfig:
    return LoaderConfig(**{**cfg.__dict__, **changes})


def grown_copy(cache: Path, out: Path, copies: int) -> None:
    """A cache of ``copies`` x the parts and samples: each part's metadata is its own (own shard, keys, commit,
    zarr.json files), its chunk directories are symlinks to the original part's (the disk holds one copy of the
    chunks); the manifest is gathered from the commits by the cache's writer."""
    source = open_cache(cache)
    (out / PARTS).mkdir(parents=True)
    shutil.copy(cache / HEAD_WEIGHTS, out / HEAD_WEIGHTS)
    shards = []
    for copy in range(copies):
        for part in source.parts:
            commit = part.read_commit()
            commit.shard = f"{commit.shard}-x{copy:05d}"
            commit.keys = [f"{k}-x{copy:05d}" for k in commit.keys]
            dst = out / PARTS / part_name(commit.shard)
            for array in part.path.iterdir():
                if array.is_dir():
                    (dst / array.name).mkdir(parents=True)
                    shutil.copy(array / "zarr.json", dst / array.name / "zarr.json")
                    (dst / array.name / "c").symlink_to((array / "c").resolve())
                elif array.name != COMMIT:
                    shutil.copy(array, dst / array.name)
            commit.write(dst / COMMIT)
            shards.append(commit.shard)
    CacheWriter(out, replace(source.manifest, shards=shards)).finalise()


def bench_first_batch(root: Path, cfg: LoaderConfig, factor: int, repeats: int, cold: bool) -> None:
    base = open_cache(root / "cache")
    small = -(-cfg.shuffle_window // len(base))  # copies: at least one shuffle window, as any real cache
    start = time.perf_counter()
    grown_copy(root / "cache", root / "small", small)
    grown_copy(root / "cache", root / "large", small * factor)
    print(
        f"\n[2] time to the first batch (make_loader, worker start, first batch), median of {repeats}; the caches "
        f"are {small} and {small * factor} copies of the one above (own metadata per part, chunk files shared "
        f"through symlinks; made in {time.perf_counter() - start:.0f} s):"
    )
    caches = {"small cache": root / "small", f"{factor}x cache": root / "large"}
    modes = ("warm", "cold") if cold else ("warm",)
    times: dict[tuple[str, str], list[float]] = {(label, mode): [] for label in caches for mode in modes}
    for _ in range(repeats):  # in turn, so that other work on the machine hits both alike
        for label, path in caches.items():
            for mode in modes:
                if mode == "cold":
                    evict([path, root / "cache"])
                start = time.perf_counter()
                next(iter(make_loader(path, cfg, "train", 0)))
                times[label, mode].append(time.perf_counter() - start)
    for label, path in caches.items():
        c = open_cache(path)
        cells = "   ".join(f"{m} {statistics.median(times[label, m]) * 1e3:6.0f} ms" for m in modes)
        print(f"    {label:<11} {len(c.parts):6d} parts {len(c):8d} samples: {cells}")


def bench_training(root: Path, a: argparse.Namespace, codec: CodecConfig) -> None:
    """[3] The draft trained from a synthetic cache: training tokens/s and the share of time spent waiting for data.

    The cache is built for it through the cache's writer (``--train-tokens`` tokens of the same kind of samples, with
    a synthetic target's lm_head and draft defaults): on a GPU at the issue's dimensions (the loader benchmark's
    width, a 156032-row lm_head, draft vocab 32000); on a CPU at a width it can train (a 7B-wide draft step would
    take minutes there), which says little about GPUs.
    """
    gpu = torch.cuda.is_available()
    hidden = a.train_hidden or (a.hidden if gpu else 256)
    vocab = a.train_vocab or (156032 if gpu else 8192)
    build(root / "train", hidden, a.train_tokens, a.parts, vocab, codec, training=True)
    cache = root / "train" / "cache"
    steps = a.train_steps
    cfg = TrainConfig(
        cache=str(cache), name="bench", runs_dir=str(root / "runs"), layers=LAYERS,
        draft_vocab_size=min(32000, vocab), max_steps=steps, warmup_steps=1, max_tokens=a.max_tokens,
        num_workers=a.workers, eval_percent=1.0, eval_every=10**9, log_every=max(1, steps // 2),
        checkpoint_every=10**9,
    )  # fmt: skip
    start = time.perf_counter()
    run = train(cfg)
    last = json.loads((run / TRAIN_LOG).read_text().splitlines()[-1])  # steady state: the second half of the run
    print(
        f"\n[3] training from the cache: H={hidden}, target vocab {vocab}, draft vocab {cfg.draft_vocab_size}, "
        f"TTT {cfg.ttt_steps}, {a.max_tokens}-token batches, {a.workers} workers, "
        f"{'GPU ' + torch.cuda.get_device_name() if gpu else 'CPU'}: {steps} steps in "
        f"{time.perf_counter() - start:.0f} s (with evaluation and export)\n"
        f"    second half: {last['tokens_per_s']:.0f} tokens/s, waiting for data {last['data_wait_fraction']:.1%} "
        "of the time"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=100_000, help="tokens in the synthetic cache (~38 KB each at 4096)")
    p.add_argument("--parts", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192, help="rows of the synthetic embed_tokens")
    p.add_argument("--chunk-tokens", type=int, default=CodecConfig.chunk_tokens)
    p.add_argument("--cname", default=CodecConfig.cname, help="blosc codec of the Zarr cache (the dump's default)")
    p.add_argument("--clevel", type=int, default=CodecConfig.clevel)
    p.add_argument("--shuffle", default=CodecConfig.shuffle)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=3, help="timed warm passes per source")
    p.add_argument("--factor", type=int, default=100, help="the large cache's size over the small one's (part [2])")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-cold", action="store_true", help="skip the cold page cache passes")
    p.add_argument("--dir", type=Path, help="where to build the caches (default: a temp dir, removed after)")
    p.add_argument("--train-steps", type=int, default=20, help="[3] draft training steps (0: skip)")
    p.add_argument("--train-hidden", type=int, help="[3] width (default: --hidden on a GPU, 256 on a CPU)")
    p.add_argument("--train-vocab", type=int, help="[3] target vocab (default: 156032 on a GPU, 8192 on a CPU)")
    p.add_argument("--train-tokens", type=int, default=60_000, help="[3] tokens of the training cache")
    a = p.parse_args(argv)
    print(
        f"machine: {_cpu_name()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, torch {torch.__version__}, "
        f"numcodecs {numcodecs.__version__}, zarr {zarr.__version__}, "
        f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}; "
        f"load average before {os.getloadavg()[0]:.2f}"
    )
    codec = CodecConfig(cname=a.cname, clevel=a.clevel, shuffle=a.shuffle, chunk_tokens=a.chunk_tokens)
    cfg = LoaderConfig(layers=LAYERS, max_tokens=a.max_tokens, num_workers=a.workers, eval_percent=0.0)
    if a.dir is not None:
        a.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        built = build(root, a.hidden, a.tokens, a.parts, a.vocab, codec)
        print(f"built the three copies in {time.perf_counter() - start:.0f} s under {root}")
        bench_throughput(root, built, a.hidden, cfg, a.rounds, not a.no_cold)
        bench_random_access(root, a.hidden, a.rounds)
        bench_first_batch(root, cfg, a.factor, a.repeats, not a.no_cold)
        if a.train_steps:
            bench_training(root, a, codec)
    print(f"load average after {os.getloadavg()[0]:.2f} (other work on the machine skews the figures)")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


if __name__ == "__main__":
    main()
