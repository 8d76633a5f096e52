"""`python -m stages.inspect_cache CACHE`: what a hidden-state cache holds and what it costs on disk."""

from __future__ import annotations

import argparse

from pipeline.cache.reader import open_cache
from pipeline.cache.report import describe_dump
from stages.exits import user_errors


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("cache", help="cache directory written by `just dump-hidden`")
    a = p.parse_args(argv)
    with user_errors():
        cache = open_cache(a.cache)
    info = cache.info
    print(
        f"{a.cache}: {len(cache)} samples readable, model {info['model']} ({info['model_type']}), "
        f"hidden {info['hidden_size']}, {info['num_layers']} layers"
    )
    print(describe_dump(cache.manifest))


if __name__ == "__main__":
    main()
