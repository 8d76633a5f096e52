"""Command-line flags built from the library's config dataclasses (``pipeline.settings.setting`` fields).

    parser = argparse.ArgumentParser()
    add_flags(parser, DumpConfig, positional=("shards", "out"))
    cfg = config_from_args(DumpConfig, parser.parse_args(), parser)

Each field becomes ``--field-name`` (or its ``flag``) with its type, default and help; a nested config dataclass
(e.g. ``DumpConfig.audio``) contributes its own fields' flags. Values come back as the dataclass, built once, so
its ``__post_init__`` checks apply; a ``ValueError`` there is reported as a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pipeline.settings import KEEP


@dataclasses.dataclass(frozen=True)
class _Leaf:
    dest: str  # dotted path from the top config, e.g. "audio.max_seconds"
    field: dataclasses.Field
    kind: Any  # the resolved type annotation

    @property
    def default(self) -> Any:
        f = self.field
        if f.default is not dataclasses.MISSING:
            return f.default
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def add_flags(parser: argparse.ArgumentParser, cls: type, positional: tuple[str, ...] = (), skip=()) -> None:
    """Add a flag for every command-line field of ``cls`` (and of its nested config dataclasses)."""
    for leaf in _leaves(cls, skip):
        flag = leaf.field.metadata.get("flag", KEEP)
        help_text = leaf.field.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        if flag is None:
            continue
        if leaf.dest in positional:
            parser.add_argument(leaf.dest, metavar=leaf.dest.upper(), type=_parser_for(leaf.kind), help=help_text)
            continue
        name = "--" + (leaf.field.name.replace("_", "-") if flag is KEEP else flag)
        default = leaf.default
        if _optional_inner(leaf.kind) is bool:
            action = argparse.BooleanOptionalAction if default else "store_true"
            parser.add_argument(name, dest=leaf.dest, action=action, default=default, help=help_text)
            continue
        choices = leaf.field.metadata.get("choices") or _literal_choices(leaf.kind)
        parser.add_argument(
            name,
            dest=leaf.dest,
            type=_parser_for(leaf.kind),
            default=default,
            choices=choices,
            metavar=None if choices else name[2:].replace("-", "_").upper(),
            help=help_text + (f" (default: {_show(default)})" if default is not None else ""),
        )


def config_from_args(cls: type, args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> Any:
    """The config dataclass from parsed flags (nested configs included); a bad value is a usage error."""
    try:
        return _build(cls, vars(args))
    except ValueError as err:
        if parser is None:
            raise
        parser.error(str(err))


def given_values(cls: type, args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The top-level fields whose flags differ from their defaults (to layer over a config file)."""
    return {
        leaf.dest: getattr(args, leaf.dest)
        for leaf in _leaves(cls, ())
        if "." not in leaf.dest
        and hasattr(args, leaf.dest)
        and getattr(args, leaf.dest) != parser.get_default(leaf.dest)
    }


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if _nested(f, hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], values, f"{prefix}{f.name}.")
        elif f"{prefix}{f.name}" in values:
            kwargs[f.name] = values[f"{prefix}{f.name}"]
    return cls(**kwargs)


def _leaves(cls: type, skip, prefix: str = "") -> Iterator[_Leaf]:
    """Every command-line field of ``cls``, nested config dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if _nested(f, hints[f.name]):
            yield from _leaves(hints[f.name], skip, f"{prefix}{f.name}.")
        elif not dataclasses.is_dataclass(hints[f.name]):
            yield _Leaf(prefix + f.name, f, hints[f.name])


def _nested(f: dataclasses.Field, kind: Any) -> bool:
    """A nested config whose fields are flags (``flag=None`` keeps it whole: its default applies)."""
    return dataclasses.is_dataclass(kind) and f.metadata.get("flag", KEEP) is not None


def _optional_inner(kind: Any) -> Any:
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else kind
    return kind


def _literal_choices(kind: Any) -> tuple | None:
    kind = _optional_inner(kind)
    return typing.get_args(kind) if typing.get_origin(kind) is Literal else None


def _parser_for(kind: Any):
    kind = _optional_inner(kind)
    if typing.get_origin(kind) is Literal:
        return type(typing.get_args(kind)[0])
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        return lambda s: [item(x) for x in s.split(",") if x.strip()]
    if kind in (int, float, str, Path):
        return kind
    raise TypeError(f"no command-line parser for a setting of type {kind}")


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)
