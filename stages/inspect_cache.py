"""`python -m stages.inspect_cache CACHE [--verify]`: what a hidden-state cache holds and what it costs on disk.

``--verify`` reads every committed chunk of every part and checks it (present, whole, matching its checksum); it
prints one line per part and exits non-zero if any part is damaged.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cache.reader import HiddenStateCache, open_cache
from pipeline.cache.report import describe_dump
from stages.exits import user_errors

SHOWN = 10  # damaged chunks listed per part


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", help="cache directory written by `just dump-hidden`")
    p.add_argument("--verify", action="store_true", help="read and check every committed chunk of every part")
    a = p.parse_args(argv)
    with user_errors():
        cache = open_cache(a.cache)
    info = cache.info
    print(
        f"{a.cache}: {len(cache)} samples readable, model {info['model']} ({info['model_type']}), "
        f"hidden {info['hidden_size']}, {info['num_layers']} layers"
    )
    print(describe_dump(cache.manifest))
    if a.verify and not verify(cache):
        sys.exit(1)


def verify(cache: HiddenStateCache) -> bool:
    """Check every part, printing OK or what is damaged; True if the whole cache is intact."""
    print(f"verifying {len(cache.parts)} parts:")
    damaged = []
    for p, part in enumerate(cache.parts):
        problems = cache.rows.verify_part(p)
        cache.rows.done(p)
        if problems:
            damaged.append(part)
            print(f"  DAMAGED {part.name} (shard {part.shard}):")
            print("\n".join(f"      {problem}" for problem in problems[:SHOWN]))
            if len(problems) > SHOWN:
                print(f"      ... and {len(problems) - SHOWN} more")
        else:
            print(f"  OK      {part.name} ({part.num_samples} samples)")
    if not damaged:
        print(f"all {len(cache.parts)} parts intact")
        return True
    print(
        f"{len(damaged)} of {len(cache.parts)} parts damaged: {', '.join(part.name for part in damaged)}.\n"
        "To repair them, delete those directories under parts/ and re-run the dump command that made the cache "
        "(it redoes only the missing parts).",
        file=sys.stderr,
    )
    return False


if __name__ == "__main__":
    main()
