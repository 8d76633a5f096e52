"""Train the small test target (pipeline.testing.small_target) on synthetic melody transcription; save it as an
HF model directory.

python -m stages.bench.train_small_target OUT [--seed S] [--steps N] [--batch-size B] [--lr LR] [--train-clips N]
    [--eval-clips N] [--threads T]

OUT (which must not exist) gets the model, its processor and small_target.json (config, timings, held-out greedy
exact match). Use it anywhere a model is expected, e.g. `just dump-hidden SHARDS CACHE --model OUT`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.testing.small_target import RECORD, SmallTargetConfig, train_small_target
from stages.flags import add_flags, config_from_args


def parse_args(argv: list[str] | None = None) -> tuple[Path, SmallTargetConfig]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output model directory (must not exist)")
    add_flags(p, SmallTargetConfig)
    a = p.parse_args(argv)
    if a.out.exists():
        p.error(f"{a.out} already exists; choose a new directory")
    return a.out, config_from_args(SmallTargetConfig, a, p)


def main(argv: list[str] | None = None) -> None:
    out, cfg = parse_args(argv)
    try:
        train_small_target(out, cfg)
    except FileExistsError as err:
        sys.exit(str(err))
    record = json.loads((out / RECORD).read_text())
    result = record["eval"]
    print(f"saved {out} ({record['parameters'] / 1e6:.2f}M parameters) in {record['seconds']['total']:.0f} s")
    for example in result["answers"][:3]:
        print(f"  expected  {example['expected']}\n  generated {example['generated']}")
    print(
        f"held-out greedy exact match {result['exact_match']:.1%} ({result['clips']} clips), "
        f"note accuracy {result['note_accuracy']:.1%}"
    )


if __name__ == "__main__":
    main()
