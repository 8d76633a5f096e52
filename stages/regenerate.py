"""Rewrite the assistant turns of webdataset shards with the target's own answers.

python -m stages.regenerate SHARDS OUT [--model tiny] [--max-new-tokens N] [--sample --temperature T --top-p P]
    [--seed S] [--batch-size B] [--strict]            (also under torchrun / accelerate launch)

OUT gets one shard per input shard (same basename), ready for `just dump-hidden "OUT/*.tar" ...`.
Re-run the same command to resume: finished shards are skipped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.inputs.audio import AudioPolicy
from pipeline.regenerate import RegenerateConfig, describe_regenerate, run_regenerate
from stages.exits import run_long_job


def parse_args(argv: list[str] | None = None) -> RegenerateConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", help="tar shards: path, glob, brace pattern {000..009}, comma list or URL")
    p.add_argument("out", type=Path, help="output directory for the regenerated shards (re-run to resume)")
    p.add_argument("--model", default="tiny", help="'tiny' (built-in test target), an HF id or a local directory")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer per assistant turn")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="with --sample")
    p.add_argument("--top-p", type=float, default=1.0, help="with --sample")
    p.add_argument("--seed", type=int, default=0, help="with --sample: answers depend on it and the sample key only")
    p.add_argument("--batch-size", type=int, default=4, help="samples generated together (left-padded)")
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="model dtype (default: bfloat16 on GPU, float32 on CPU)",
    )
    p.add_argument("--max-audio-seconds", type=float, default=30.0, help="longer clips are cut for generation")
    p.add_argument("--strict", action="store_true", help="fail on the first bad sample instead of skipping it")
    a = p.parse_args(argv)
    if not a.sample and (a.temperature != 1.0 or a.top_p != 1.0):
        p.error("--temperature and --top-p apply to --sample only (the default is greedy decoding)")
    try:
        return RegenerateConfig(
            shards=a.shards,
            out=a.out,
            model=a.model,
            max_new_tokens=a.max_new_tokens,
            do_sample=a.sample,
            temperature=a.temperature,
            top_p=a.top_p,
            seed=a.seed,
            batch_size=a.batch_size,
            strict=a.strict,
            dtype=a.dtype,
            audio=AudioPolicy(max_seconds=a.max_audio_seconds),
        )
    except ValueError as err:
        p.error(str(err))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    run_long_job(lambda: run_regenerate(cfg), describe_regenerate, cfg.out, "the shards in")


if __name__ == "__main__":
    main()
