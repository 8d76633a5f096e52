"""Train the small Qwen2-Audio target on synthetic melody transcription and save it as an HF model directory.

python -m stages.bench.train_small_target OUT [--seed S] [--steps N] [--batch-size B] [--lr LR] [--train-clips N]
    [--eval-clips N] [--threads T]

OUT (which must not exist) gets the model, its processor and small_target.json (config, timings, held-out greedy
exact match). Use it anywhere a model is expected, e.g. `just dump-hidden SHARDS CACHE --model OUT`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from pipeline.testing.small_target import RECORD, SmallTargetConfig, train_small_target

DEFAULTS = SmallTargetConfig()


def parse_args(argv: list[str] | None = None) -> tuple[Path, SmallTargetConfig]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output model directory (must not exist)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="initialisation, data and data order")
    p.add_argument("--steps", type=int, default=DEFAULTS.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="clips per step")
    p.add_argument("--lr", type=float, default=DEFAULTS.lr, help="peak AdamW learning rate")
    p.add_argument("--train-clips", type=int, default=DEFAULTS.train_clips, help="training clips")
    p.add_argument("--eval-clips", type=int, default=DEFAULTS.eval_clips, help="held-out clips for the greedy eval")
    p.add_argument(
        "--threads", type=int, default=DEFAULTS.threads, help="torch CPU threads (results depend on the count)"
    )
    a = p.parse_args(argv)
    if min(a.steps, a.batch_size, a.train_clips, a.eval_clips, a.threads) < 1 or not a.lr > 0:
        p.error("--steps, --batch-size, --train-clips, --eval-clips, --threads and --lr must be positive")
    if a.out.exists():
        p.error(f"{a.out} already exists; choose a new directory")
    cfg = dataclasses.replace(
        DEFAULTS,
        seed=a.seed,
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        train_clips=a.train_clips,
        eval_clips=a.eval_clips,
        threads=a.threads,
    )
    return a.out, cfg


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
