"""`just bench-dump`: stage one's speed and size, measured side by side in one run.

1. Dump throughput against a forward-only pass over the same samples with the same loaded target (target >= 0.95):
   the forward-only pass does everything the dump does (read, decode, tokenize, forward, copy to CPU) except hand
   the states to the writer. Also the time the model spent blocked on the writer's queue.
2. The writer's compress-and-write rate on bf16 states at H=4096 (3 aux layers + final + audio embeddings), in
   MB/s with one compression thread and with all cores (target: above the ~450 MB/s a 7B forward produces per GPU,
   given the 12-24 cores per GPU of a GPU node).
3. Bytes per token on disk against the 8H+16 of the reference trainers' per-sample bf16 files (target <= 0.8x).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from pipeline.cache.format import CodecConfig, SampleStates
from pipeline.cache.report import reference_bytes_per_token
from pipeline.cache.writer import PartWriter, SampleRecord
from pipeline.dump import DumpConfig, _check_layers, _process, run_dump
from pipeline.inputs.shards import expand_shard_urls, iter_raw_samples
from pipeline.targets import load_target

SAMPLE = "data/sample/shards/sample-{000000..000003}.tar"


def copies_of_sample(root: Path, repeat: int) -> str:
    """The bundled shards copied ``repeat`` times under new names: more samples, same content."""
    names = []
    for r in range(repeat):
        for url in expand_shard_urls(SAMPLE):
            dst = root / f"r{r}-{Path(url).name}"
            shutil.copy(url, dst)
            names.append(str(dst))
    return ",".join(names)


def forward_only(shards: str, cfg: DumpConfig, target, layers: list[int]) -> tuple[int, float]:
    start, n = time.perf_counter(), 0
    for url in expand_shard_urls(shards):
        for position, raw in enumerate(iter_raw_samples(url)):
            _process(raw, position, target, layers, cfg)
            n += 1
    return n, time.perf_counter() - start


def bench_pipeline(model: str, dtype: str, repeat: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = copies_of_sample(root, repeat)
        target = load_target(model, dtype, "cuda" if torch.cuda.is_available() else "cpu")
        cfg = DumpConfig(shards=shards, out=root / "cache", model=model, dtype=dtype)
        layers = _check_layers(target.default_layers(), target.num_layers)
        forward_only(shards, cfg, target, layers)  # warm-up: lazy imports, allocator, page cache
        fwd, dump = [], []
        for r in range(rounds):
            n, seconds = forward_only(shards, cfg, target, layers)
            fwd.append(n / seconds)
            shutil.rmtree(root / "cache", ignore_errors=True)
            start = time.perf_counter()
            manifest = run_dump(DumpConfig(shards=shards, out=root / "cache", model=model, dtype=dtype), target)
            dump.append(manifest.counts["samples"] / (time.perf_counter() - start))
            print(f"round {r}: forward-only {fwd[-1]:.1f} samples/s, dump {dump[-1]:.1f} samples/s")
        print(f"\n[1] {model} ({dtype}), {n} samples x {rounds} rounds, median of rounds:")
        print(
            f"    forward-only {np.median(fwd):.1f} samples/s, dump {np.median(dump):.1f} samples/s, "
            f"ratio {np.median(dump) / np.median(fwd):.3f} (target >= 0.95)"
        )
        c = manifest.counts
        ref = reference_bytes_per_token(manifest.hidden_size, 2 if dtype != "float32" else 4)
        print(
            f"    this cache: {c['stored_bytes'] / c['tokens']:.0f} bytes/token = "
            f"{c['stored_bytes'] / c['tokens'] / ref:.2f}x the reference's {ref} "
            f"(audio tokens {c['audio_tokens'] / c['tokens']:.0%} of all)"
        )


def synthetic_states(tokens: int, audio: int, hidden: int, layers: list[int], gen: torch.Generator) -> SampleStates:
    # Residual-stream-like values: mostly small, a few large outlier channels (as real LLM states have).
    scale = torch.ones(hidden)
    scale[torch.randperm(hidden, generator=gen)[:8]] = 50.0

    def state(n: int) -> torch.Tensor:
        return (torch.randn(n, hidden, generator=gen) * scale).to(torch.bfloat16)

    return SampleStates({i: state(tokens) for i in layers}, state(tokens), state(audio))


def bench_writer(hidden: int, samples: int, tokens: int, audio: int, codec: CodecConfig) -> None:
    gen = torch.Generator().manual_seed(0)
    layers = [2, hidden // 256, 29]  # names only
    records = [
        SampleRecord(f"s{i}", i, np.zeros(tokens, np.int32), np.ones(tokens, np.uint8),
                     synthetic_states(tokens, audio, hidden, layers, gen))
        for i in range(samples)
    ]  # fmt: skip
    raw = sum(r.num_bytes for r in records)
    cores = os.cpu_count() or 1
    print(
        f"\n[2] writer on bf16 states, H={hidden}, {samples} samples x {tokens} tokens ({audio} audio), "
        f"{raw / 1e6:.0f} MB raw, codec {codec.cname}-{codec.clevel} {codec.shuffle}:"
    )
    for threads in sorted({1, cores}):
        with tempfile.TemporaryDirectory() as tmp, zarr.config.set({"threading.max_workers": threads}):
            part = PartWriter(Path(tmp) / "part", "bench", layers, hidden, "bfloat16", codec)
            start = time.perf_counter()
            for record in records:
                part.append(record)
            part.finish()
            seconds = time.perf_counter() - start
            stored = sum(f.stat().st_size for f in (Path(tmp) / "part").rglob("*") if f.is_file())
        rate = raw / seconds / 1e6
        print(
            f"    {threads} thread(s): {rate:.0f} MB/s ({rate / threads:.0f} MB/s per core); "
            f"compression {raw / stored:.2f}x"
        )
    n_tokens = samples * tokens
    ref = reference_bytes_per_token(hidden)
    print(
        f"[3] bytes per token at H={hidden}: {stored / n_tokens:.0f} vs reference 8H+16 = {ref}: "
        f"{stored / n_tokens / ref:.2f}x (target <= 0.8x; audio tokens {audio / tokens:.0%} of all)"
    )
    print(
        "    a 7B forward at ~20k tokens/s yields ~0.45-1 GB/s per GPU: "
        f"{450 / (rate / threads):.1f}-{1000 / (rate / threads):.1f} cores per GPU at this rate"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeat", type=int, default=3, help="copies of the bundled sample to dump")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--writer-samples", type=int, default=8)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per synthetic sample")
    p.add_argument("--audio", type=int, default=512, help="audio tokens per synthetic sample")
    p.add_argument("--torch-threads", type=int, help="leave cores to the writer, as a GPU node does")
    a = p.parse_args(argv)
    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    print(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}"
    )
    bench_pipeline(a.model, a.dtype, a.repeat, a.rounds)
    bench_writer(a.hidden, a.writer_samples, a.tokens, a.audio, CodecConfig())


if __name__ == "__main__":
    main()
