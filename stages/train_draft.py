"""Stage two: `python -m stages.train_draft CACHE [--config FILE] [options]` (also under accelerate launch).

Trains an EAGLE-3 draft from a hidden-state cache without loading the target, then exports it to
runs/<name>/draft (SGLang) and runs/<name>/draft-speculators (vLLM). A JSON --config file sets any TrainConfig
field; flags given on the command line override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from pipeline.train.loop import TrainConfig, train
from stages.exits import user_errors


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", help="cache directory written by `just dump-hidden`")
    p.add_argument("--config", help="JSON file with TrainConfig fields")
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("cache", "extra"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action="store_true", default=None)
        else:
            kind = {"int": int, "float": float, "list[int] | None": ints, "int | None": int}.get(f.type, str)
            p.add_argument(flag, type=kind, default=None, help=f"default: {f.default}")
    a = vars(p.parse_args(argv))
    fields = json.loads(open(a.pop("config")).read()) if a.get("config") else {}
    a.pop("config", None)
    fields.update({k: v for k, v in a.items() if v is not None})
    return TrainConfig(**fields)


def main(argv: list[str] | None = None) -> None:
    with user_errors():
        run = train(parse_args(argv))
    print(f"run directory: {run}")


if __name__ == "__main__":
    main()
