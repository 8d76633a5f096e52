"""Pack audio conversations into webdataset tar shards, from a JSONL manifest or a local Hugging Face dataset.

python -m stages.make_shards data/sample/manifest.jsonl out/shards/shard-%06d.tar --max-count 100
python -m stages.make_shards --hf-dataset librispeech/ --split validation out/ls-%06d.tar --text-column text
python -m stages.make_shards --hf-dataset chats/ out/chat-%06d.tar --conversations-column conversations

A Hugging Face dataset is a `save_to_disk` directory (a Dataset, or a DatasetDict with --split) with an audio column
and either a transcript (--text-column: the user turn is the audio and --instruction, the assistant turn the
transcript) or a conversation (--conversations-column: turns in the manifest's "conversations" form, or that as a
JSON string). Rows without usable audio or text are skipped and listed with their key and the reason.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.inputs.shards import DEFAULT_MAX_SIZE, iter_raw_samples, write_shards
from stages.exits import user_errors

USAGE = """
  python -m stages.make_shards MANIFEST OUT_PATTERN [--max-count N] [--max-size BYTES]
  python -m stages.make_shards --hf-dataset PATH OUT_PATTERN (--text-column C | --conversations-column C)
                               [--split S] [--audio-column C] [--key-column C] [--instruction TEXT] ..."""
HF_ONLY = ("split", "audio_column", "text_column", "conversations_column", "key_column", "instruction")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, usage=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # A string, not a Path: with --hf-dataset this positional is the output pattern, which may be a URL ("//").
    parser.add_argument("manifest", nargs="?", help='JSONL, one {"audio": path, "conversations": [...]} per line')
    parser.add_argument(
        "out_pattern", nargs="?", help="output shard pattern with one integer placeholder, e.g. out/shard-%%06d.tar"
    )
    parser.add_argument("--max-count", type=int, default=100, help="samples per shard (default 100)")
    parser.add_argument(
        "--max-size", type=int, default=DEFAULT_MAX_SIZE, help=f"bytes per shard (default {DEFAULT_MAX_SIZE})"
    )
    _add_hf_flags(parser.add_argument_group("a Hugging Face dataset instead of a manifest"))
    args = parser.parse_args(argv)
    _check_inputs(parser, args)
    return args


def _add_hf_flags(group: argparse._ArgumentGroup) -> None:
    from pipeline.inputs.hf_dataset import DEFAULT_INSTRUCTION  # a constant: datasets itself is imported lazily

    group.add_argument("--hf-dataset", type=Path, metavar="PATH", help="a datasets save_to_disk directory")
    group.add_argument("--split", help="the split to convert when PATH holds a DatasetDict")
    group.add_argument("--audio-column", help="the audio column: Audio, paths, or {bytes, path} (default audio)")
    answer = group.add_mutually_exclusive_group()
    answer.add_argument("--text-column", metavar="C", help="a transcript column: the assistant's answer")
    answer.add_argument("--conversations-column", metavar="C", help="a column of conversations (list or JSON)")
    group.add_argument("--key-column", metavar="C", help="sample keys (default: <split or row>-<row index>)")
    group.add_argument(
        "--instruction", help=f"the user's text next to the audio with --text-column (default {DEFAULT_INSTRUCTION!r})"
    )


def _check_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    # Both positionals are optional so that "--hf-dataset PATH OUT" parses; which were meant is decided here.
    if args.hf_dataset is None:
        given = [f"--{name.replace('_', '-')}" for name in HF_ONLY if getattr(args, name) is not None]
        if given:
            parser.error(f"these flags need --hf-dataset PATH: {', '.join(given)}")
        if args.out_pattern is None:
            parser.error("pass MANIFEST and OUT_PATTERN, or --hf-dataset PATH and OUT_PATTERN")
        args.manifest = Path(args.manifest)
        return
    if args.out_pattern is not None:
        parser.error("--hf-dataset replaces the JSONL manifest: pass either MANIFEST or --hf-dataset PATH, not both")
    if args.manifest is None:
        parser.error("pass OUT_PATTERN, the shard pattern to write, e.g. out/shard-%06d.tar")
    args.out_pattern, args.manifest = args.manifest, None
    if args.text_column is None and args.conversations_column is None:
        parser.error("with --hf-dataset, choose the answer: --text-column C (transcripts) or --conversations-column C")
    if args.instruction is not None and args.text_column is None:
        parser.error("--instruction applies to --text-column only (a conversations column has its own user turns)")


def _report_shards(shards: list[str]) -> int:
    # Count by reading the shards back, which also checks that they were written completely.
    total = 0
    for shard in shards:
        count = sum(1 for _ in iter_raw_samples(shard))
        total += count
        print(f"{shard}\t{count} samples")
    print(f"wrote {len(shards)} shard(s), {total} samples")
    return total


def convert_hf(args: argparse.Namespace) -> None:
    from pipeline.inputs.hf_dataset import DEFAULT_INSTRUCTION, HfColumns, write_hf_shards

    with user_errors():
        columns = HfColumns(
            audio=args.audio_column or "audio",
            text=args.text_column,
            conversations=args.conversations_column,
            key=args.key_column,
            instruction=args.instruction or DEFAULT_INSTRUCTION,
        )
        report = write_hf_shards(
            args.hf_dataset,
            args.out_pattern,
            columns,
            split=args.split,
            max_count=args.max_count,
            max_size=args.max_size,
        )
    for row in report.skipped:
        print(f"skipped {row}", file=sys.stderr)
    _report_shards(report.shards)
    print(report.summary())
    if report.written == 0:
        sys.exit("no row made a sample (reasons above); nothing was written")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.hf_dataset is not None:
        convert_hf(args)
        return
    try:
        shards = write_shards(args.manifest, args.out_pattern, max_count=args.max_count, max_size=args.max_size)
    except (ValueError, FileNotFoundError) as err:  # ManifestError is a ValueError: a line to fix, no traceback
        sys.exit(str(err))
    _report_shards(shards)


if __name__ == "__main__":
    main()
