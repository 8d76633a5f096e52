"""Train the small test target (pipeline.testing.small_target) on synthetic melody transcription or on English
speech; save it as an HF model directory.

python -m stages.bench.train_small_target OUT [--task melody|speech] [--seed S] [--steps N] [--batch-size B]
    [--lr LR] [--train-clips N] [--eval-clips N] [--threads T] ...

--task melody (the default): names the notes of tone melodies (pipeline/testing/tone_data.py), ~5 CPU minutes.
--task speech: transcribes fortune sentences spoken by espeak-ng (pipeline/testing/speech_target.py; needs espeak-ng
and Debian's fortunes). The other flags' defaults are the task's: see `--task speech --help`.

OUT (which must not exist) gets the model, its processor and small_target.json (task, config, timings, held-out
figures: greedy exact match for melodies, CER and WER for speech). Use it anywhere a model is expected, e.g.
`just dump-hidden SHARDS CACHE --model OUT`. An interrupted run keeps its last checkpoint in .OUT.partial next to
OUT; the same command resumes it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.testing.small_target import CHECKPOINT, RECORD, SmallTargetConfig, partial_dir, train_small_target
from pipeline.testing.speech_target import SpeechTargetConfig
from stages.flags import add_flags, config_from_args

TASKS: dict[str, type[SmallTargetConfig] | type[SpeechTargetConfig]] = {
    "melody": SmallTargetConfig,
    "speech": SpeechTargetConfig,
}


def parse_args(argv: list[str] | None = None) -> tuple[Path, SmallTargetConfig | SpeechTargetConfig]:
    # The task decides which settings exist and their defaults, so it is read before the parser is built.
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--task", choices=TASKS, default="melody")
    task = first.parse_known_args(argv)[0].task
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output model directory (must not exist)")
    p.add_argument("--task", choices=TASKS, default="melody", help="what the target learns (default: melody)")
    add_flags(p, TASKS[task])
    a = p.parse_args(argv)
    if a.out.exists():
        p.error(f"{a.out} already exists; choose a new directory")
    return a.out, config_from_args(TASKS[task], a, p)


def main(argv: list[str] | None = None) -> None:
    out, cfg = parse_args(argv)
    if (partial_dir(out) / CHECKPOINT).exists():
        print(f"resuming from the checkpoint in {partial_dir(out)}", flush=True)
    try:
        train_small_target(out, cfg)
    except (FileExistsError, PipelineError) as err:
        sys.exit(str(err))
    record = json.loads((out / RECORD).read_text())
    result = record["eval"]
    print(f"saved {out} ({record['parameters'] / 1e6:.2f}M parameters) in {record['seconds']['total']:.0f} s")
    for example in result["answers"][:3]:
        print(f"  expected  {example['expected']}\n  generated {example['generated']}")
    if record["task"] == "speech":
        print(
            f"held-out greedy CER {result['cer']:.1%}, WER {result['wer']:.1%} ({result['clips']} clips; "
            f"case and punctuation counted: CER {result['cer_raw']:.1%}), exact {result['exact_match']:.1%}"
        )
    else:
        print(
            f"held-out greedy exact match {result['exact_match']:.1%} ({result['clips']} clips), "
            f"note accuracy {result['note_accuracy']:.1%}"
        )


if __name__ == "__main__":
    main()
