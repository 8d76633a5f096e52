"""Stage two: `python -m stages.train_draft CACHE [--config FILE] [options]` (also under accelerate launch).

Trains an EAGLE-3 draft from a hidden-state cache without loading the target, then exports it to
runs/<name>/draft (SGLang) and runs/<name>/draft-speculators (vLLM). A JSON --config file sets any TrainConfig
field; flags given on the command line override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import warnings
from pathlib import Path

from pipeline.train.loop import TrainConfig, train
from stages.exits import user_errors
from stages.flags import add_flags, config_from_args


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="JSON file of TrainConfig fields; flags given here override it")
    add_flags(p, TrainConfig, positional=("cache",))
    known, _ = p.parse_known_args(argv)
    if known.config:  # the file's values become the defaults the flags override
        p.set_defaults(**config_file(known.config, p))
    return config_from_args(TrainConfig, p.parse_args(argv), p)


def config_file(path: Path, parser: argparse.ArgumentParser) -> dict:
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        parser.error(f"--config {path}: {err}")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        parser.error(f"--config {path}: not TrainConfig fields: {unknown}")
    return values


def main(argv: list[str] | None = None) -> None:
    # Training says itself whether it refuses an unfinished cache or reads it (--allow-partial): the reader's own
    # warning, repeated by every loader that opens the cache, would only bury that line.
    warnings.filterwarnings("ignore", message=".*the dump has not finished")
    with user_errors():
        run = train(parse_args(argv))
    print(f"run directory: {run}")


if __name__ == "__main__":
    main()
