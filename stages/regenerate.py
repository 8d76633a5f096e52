"""Rewrite the assistant turns of webdataset shards with the target's own answers.

python -m stages.regenerate SHARDS OUT [--model tiny] [--max-new-tokens N] [--sample --temperature T --top-p P]
    [--seed S] [--batch-size B] [--strict]            (also under torchrun / accelerate launch)

OUT gets one shard per input shard (same basename), ready for `just dump-hidden "OUT/*.tar" ...`.
Re-run the same command to resume: finished shards are skipped.
"""

from __future__ import annotations

import argparse

from pipeline.regenerate import RegenerateConfig, describe_regenerate, run_regenerate
from stages.exits import run_long_job
from stages.flags import add_flags, config_from_args


def parse_args(argv: list[str] | None = None) -> RegenerateConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, RegenerateConfig, positional=("shards", "out"))
    a = p.parse_args(argv)
    if not a.do_sample and (a.temperature != 1.0 or a.top_p != 1.0):
        p.error("--temperature and --top-p apply to --sample only (the default is greedy decoding)")
    return config_from_args(RegenerateConfig, a, p)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    run_long_job(lambda: run_regenerate(cfg), describe_regenerate, cfg.out, "the shards in")


if __name__ == "__main__":
    main()
