"""Settings dataclasses as command-line flags: a field is its default, its help text (metadata) and its type.

GenerationConfig (decoding) and train.config.TrainConfig (training) are both declared with `setting` and turned
into argparse flags by `add_flags`, so a new setting is one field, and its --flag and help follow.
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, field, fields
from typing import Any

_KINDS = {"int": int, "float": float, "str": str, "bool": bool}


def setting(default: Any, help: str) -> Any:
    """A dataclass field with its help text (what --help prints)."""
    return field(default=default, metadata={"help": help})


def kind(cls, name: str) -> type:
    """The plain type of field `name` of a settings dataclass, read from its annotation ("int | None" -> int)."""
    annotation = next(f.type for f in fields(cls) if f.name == name)
    return _KINDS[str(annotation).split(" | ")[0]]


def add_flags(parser: argparse.ArgumentParser, cls, *, only: tuple[str, ...] | None = None,
              choices: dict[str, tuple] | None = None) -> None:
    """One --flag per field of `cls` (or of the fields named in `only`); a bool field is a --flag/--no-flag pair.
    Flags not given are absent from the parsed namespace (argparse.SUPPRESS), so defaults stay the dataclass's."""
    for f in fields(cls):
        if only is not None and f.name not in only:
            continue
        default = f.default if f.default is not MISSING else None
        shown = "" if default is None else f" (default: {default})"
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                              "help": (f.metadata["help"] + shown).replace("%", "%%")}  # argparse formats help with %
        if f.name in (choices or {}):
            kw["choices"] = list(choices[f.name])
        flag = "--" + f.name.replace("_", "-")
        if kind(cls, f.name) is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(flag, type=kind(cls, f.name), **kw)


def given(cls, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of `cls` that were given as flags in `args`."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
