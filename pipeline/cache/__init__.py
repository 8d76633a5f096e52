"""The hidden-state cache: its on-disk format, the writer stage one uses and the reader everything else uses."""

from pipeline.cache.reader import HiddenStateCache, open_cache

__all__ = ["HiddenStateCache", "open_cache"]
