"""One definition per setting: a config dataclass field with its default and its help text.

    @dataclass
    class DumpConfig:
        max_length: int = setting(2048, "truncate prompts to this many tokens")

The stages build their command-line flags from these fields (``stages/flags.py``), so a setting's default and
help exist once, in the library, and ``--help`` shows them. ``flag`` renames the command-line flag where the field
name would read badly there; ``flag=None`` keeps a field off the command line.
"""

from __future__ import annotations

import dataclasses
from typing import Any

_NO_DEFAULT: Any = dataclasses.MISSING
KEEP = object()  # flag=KEEP: the field's own name, dashed


def setting(
    default: Any = _NO_DEFAULT,
    help: str = "",  # noqa: A002 - the argparse word
    *,
    factory: Any = _NO_DEFAULT,
    flag: Any = KEEP,
    choices: tuple | None = None,
) -> Any:
    """A config field with its help text. ``factory``: a default built per instance (lists, nested configs)."""
    metadata = {"help": help, "flag": flag, "choices": choices}
    if factory is not _NO_DEFAULT:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)
