"""Stage one: `python -m stages.dump_hidden SHARDS OUT [options]` (also under torchrun / accelerate launch)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cache.format import CodecConfig
from pipeline.cache.report import describe_dump
from pipeline.dump import DumpConfig, run_dump
from pipeline.inputs.audio import AudioPolicy
from stages.exits import run_long_job


def parse_args(argv: list[str] | None = None) -> DumpConfig:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("shards", help="tar shards: path, glob, brace pattern {000..009}, comma list or URL")
    p.add_argument("out", type=Path, help="cache directory (re-run the same command to resume)")
    p.add_argument("--model", default="tiny", help="'tiny' (built-in test target), an HF id or a local directory")
    p.add_argument(
        "--layers",
        type=lambda s: [int(x) for x in s.split(",")],
        help="HF hidden_states indices to cache, e.g. 2,16,29 (default: EAGLE-3's 2, L//2, L-3); "
        "capture more so one dump serves drafts that use other layers",
    )
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="model and cache dtype (default: bfloat16 on GPU, float32 on CPU)",
    )
    p.add_argument("--max-length", type=int, default=2048, help="truncate prompts to this many tokens")
    p.add_argument("--max-audio-seconds", type=float, default=30.0)
    p.add_argument(
        "--overlong-audio",
        choices=["cut", "reject"],
        default="cut",
        help="a clip over --max-audio-seconds is cut to it, or rejected",
    )
    p.add_argument("--codec", default="zstd", help="blosc compressor: zstd, lz4, lz4hc, zlib, blosclz")
    p.add_argument("--level", type=int, default=3, help="compression level 0-9")
    p.add_argument("--chunk-tokens", type=int, default=256, help="rows per stored chunk")
    p.add_argument("--strict", action="store_true", help="fail on the first bad sample instead of skipping it")
    a = p.parse_args(argv)
    return DumpConfig(
        shards=a.shards,
        out=a.out,
        model=a.model,
        layers=a.layers,
        dtype=a.dtype,
        max_length=a.max_length,
        audio=AudioPolicy(max_seconds=a.max_audio_seconds, overlong=a.overlong_audio),
        codec=CodecConfig(cname=a.codec, clevel=a.level, chunk_tokens=a.chunk_tokens),
        strict=a.strict,
    )


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    run_long_job(lambda: run_dump(cfg), describe_dump, cfg.out, "the cache at")


if __name__ == "__main__":
    main()
