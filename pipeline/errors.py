"""The errors the library raises for problems a user can fix; the stages print them without a traceback.

The library never exits the process: it raises one of these with a message that says what is wrong and what to
do about it, and ``stages`` turn it into an exit status and that message. A bad *sample* is not among them: it is
skipped and recorded (``pipeline.inputs.conversation.BadSample``), never fatal unless ``--strict``.
"""

from __future__ import annotations


class PipelineError(Exception):
    """A problem the user can fix; the message says how."""


class ConfigError(PipelineError):
    """Settings that cannot work (out of range, contradicting each other, or not matching the data)."""


class TargetError(PipelineError):
    """The target model cannot be loaded or has no adapter."""


class CacheError(PipelineError):
    """Not a cache, a cache of another format version, or damaged data (the message names the part)."""


class StrictModeError(PipelineError):
    """--strict: a job stops at its first bad sample instead of skipping it."""
