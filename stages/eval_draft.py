"""Evaluate an exported EAGLE-3 draft by real speculative decoding with its target (greedy, batch size 1).

    python -m stages.eval_draft RUN_OR_DRAFT_DIR SHARDS [--model tiny|HF id|dir] [--limit N] [--k 7]
        [--max-new-tokens 64] [--out DIR]

RUN_OR_DRAFT_DIR is a training run (runs/<name>, its SGLang export runs/<name>/draft is used) or an SGLang export
directory. Each sample's conversation is cut before its first assistant answer and the target generates instead.
Both speculative decoding and the target's plain greedy decoding run on every sample and must agree token for
token: a mismatch is a bug, reported with the sample key (and the target's logit gap between the two choices, to
tell a floating-point tie of batched vs one-token forwards from a real bug) and the stage fails, after writing
``eval.json`` (mean acceptance length tau, acceptance per draft position, target forwards per token, tokens/s of
both) and ``eval.png`` into --out (default RUN/eval, or DRAFT_DIR-eval for a bare export).

With a run directory the samples are its held-out split (the keys training left out, ``--eval-percent``); pass the
shards the cache was dumped from. ``--split all`` takes every sample.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.evaluate.eval_draft import EvalConfig, run_eval
from stages.exits import user_errors
from stages.flags import add_flags, config_from_args


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, EvalConfig, positional=("draft", "shards"))
    return config_from_args(EvalConfig, p.parse_args(argv), p)


def main(argv: list[str] | None = None) -> None:
    with user_errors():
        run_eval(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
