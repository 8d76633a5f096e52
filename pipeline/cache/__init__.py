"""The hidden-state cache: its on-disk format, the writer stage one uses and the reader everything else uses.

This package alone knows the format (``format``): stage one writes through ``writer`` (``create_or_resume``,
``CacheWriter``, ``PartWriter``), everything else reads through ``reader`` (``open_cache``) and ``rows``.
"""

from pipeline.cache.format import FORMAT_VERSION, CodecConfig, Manifest, PartCommit, SampleStates
from pipeline.cache.reader import CachePart, HiddenStateCache, open_cache
from pipeline.cache.rows import RowReader
from pipeline.cache.writer import CacheWriter, PartWriter, SampleRecord, create_or_resume

__all__ = [
    "FORMAT_VERSION",
    "CachePart",
    "CacheWriter",
    "CodecConfig",
    "HiddenStateCache",
    "Manifest",
    "PartCommit",
    "PartWriter",
    "RowReader",
    "SampleRecord",
    "SampleStates",
    "create_or_resume",
    "open_cache",
]
