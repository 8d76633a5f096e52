"""Stage one: `python -m stages.dump_hidden SHARDS OUT [options]` (also under torchrun / accelerate launch)."""

from __future__ import annotations

import argparse

from pipeline.cache.report import describe_dump
from pipeline.dump import DumpConfig, run_dump
from stages.exits import run_long_job
from stages.flags import add_flags, config_from_args


def parse_args(argv: list[str] | None = None) -> DumpConfig:
    p = argparse.ArgumentParser(description=__doc__)
    add_flags(p, DumpConfig, positional=("shards", "out"))
    return config_from_args(DumpConfig, p.parse_args(argv), p)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    run_long_job(lambda: run_dump(cfg), describe_dump, cfg.out, "the cache at")


if __name__ == "__main__":
    main()
