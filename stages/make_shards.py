"""Pack a JSONL manifest of audio conversations into webdataset tar shards.

python -m stages.make_shards data/sample/manifest.jsonl out/shards/shard-%06d.tar --max-count 100
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.inputs.shards import DEFAULT_MAX_SIZE, iter_raw_samples, write_shards


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path, help='JSONL, one {"audio": path, "conversations": [...]} per line')
    parser.add_argument(
        "out_pattern", help="output shard pattern with one integer placeholder, e.g. out/shard-%%06d.tar"
    )
    parser.add_argument("--max-count", type=int, default=100, help="samples per shard (default 100)")
    parser.add_argument(
        "--max-size", type=int, default=DEFAULT_MAX_SIZE, help=f"bytes per shard (default {DEFAULT_MAX_SIZE})"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    shards = write_shards(args.manifest, args.out_pattern, max_count=args.max_count, max_size=args.max_size)
    # Count by reading the shards back, which also checks that they were written completely.
    total = 0
    for shard in shards:
        count = sum(1 for _ in iter_raw_samples(shard))
        total += count
        print(f"{shard}\t{count} samples")
    print(f"wrote {len(shards)} shard(s), {total} samples")


if __name__ == "__main__":
    main()
