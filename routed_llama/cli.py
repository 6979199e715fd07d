"""Command lines generated from settings dataclasses ("the CLI is the function signature").

`parse_settings` builds a `transformers.HfArgumentParser` from a dataclass, so each flag's name, type, default,
choices and help live in one place: the dataclass field. Fields with `metadata={"positional": True}` become
positional arguments. The dataclass validates itself on construction (`__post_init__`) and raises `UserError`;
`run_cli` prints a `UserError` as one line `prog: error: ...` and returns exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
import types
import typing
from collections.abc import Callable

from transformers import HfArgumentParser

from .errors import UserError, first_line


class SettingsParser(HfArgumentParser):
    """HfArgumentParser with positional fields, plain boolean switches and one-line errors."""

    @staticmethod
    def _parse_dataclass_field(parser, field: dataclasses.Field):
        meta = dict(field.metadata)
        if meta.pop("positional", False):
            parser.add_argument(field.name, metavar=meta.pop("metavar", field.name.upper()), **meta)
            return
        if field.type is bool:  # `--flag` sets a False default; `--no-flag` clears a True one
            dashed = field.name.replace("_", "-")
            names = [f"--{dashed}"] if field.default is False else [f"--no-{dashed}"]
            action = "store_true" if field.default is False else "store_false"
            parser.add_argument(*names, dest=field.name, action=action, default=field.default, **meta)
            return
        HfArgumentParser._parse_dataclass_field(parser, field)
        underscored = f"--{field.name}"
        if "_" in field.name:  # one spelling per flag: --num-clusters, not also --num_clusters
            action = parser._option_string_actions.pop(underscored)
            action.option_strings.remove(underscored)

    def error(self, message: str):
        """One line on stderr and exit 2 (argparse prints the whole usage first)."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def join_dash_values(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`--opt -8--1` -> `--opt=-8--1` for options that take a value, when the value starts with '-' but is no
    option of the parser (argparse would read it as one)."""
    takes_value = {s for a in parser._actions if a.option_strings and a.nargs != 0 for s in a.option_strings}
    known = set(parser._option_string_actions)
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in takes_value and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1] not in known:
            out.append(f"{a}={argv[i + 1]}")
            i += 2
        else:
            out.append(a)
            i += 1
    return out


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help keeps the description's line breaks and shows every default."""


def build_parser(cls, prog: str, description: str | None = None) -> SettingsParser:
    description = inspect.cleandoc(description) if description else None
    return SettingsParser(cls, prog=prog, description=description, formatter_class=_Formatter)


def option_name(name: str) -> str:
    """How a settings field is spelled on the command line."""
    return "--" + name.replace("_", "-")


def _type_ok(value, tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return value in args
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # a type this check does not know: the dataclass checks it itself


def check_types(settings) -> None:
    """Raise `UserError` naming the field if a field of the dataclass `settings` holds a value of the wrong type
    or outside its `Literal` choices (settings built in Python skip argparse's conversion)."""
    hints = typing.get_type_hints(type(settings))
    for f in dataclasses.fields(settings):
        value, tp = getattr(settings, f.name), hints[f.name]
        if not _type_ok(value, tp):
            if typing.get_origin(tp) is typing.Literal:
                raise UserError(f"{option_name(f.name)} must be one of {list(typing.get_args(tp))}, got {value!r}")
            raise UserError(f"{option_name(f.name)} must be of type {getattr(tp, '__name__', tp)}, got {value!r}")


def parse_settings(cls, argv: list[str] | None = None, prog: str | None = None, description: str | None = None):
    """An instance of the dataclass `cls` from command-line arguments (validated by its `__post_init__`).

    A bad flag exits 2 with one line (argparse); a bad value raises `UserError`."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser(cls, prog or cls.__name__, description)
    settings, unknown = parser.parse_args_into_dataclasses(args=join_dash_values(argv, parser),
                                                           look_for_args_file=False, return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return settings


def run_cli(fn: Callable, cls, argv: list[str] | None = None, prog: str | None = None,
            description: str | None = None) -> int:  # fmt: skip
    """Parse `argv` into `cls`, call `fn(settings)` and return its exit status (0 for None). A bad flag, or a
    `UserError` from validation or from `fn`, becomes one line `prog: error: ...` and status 2 (`--help`: 0); other
    exceptions propagate with their traceback."""
    prog = prog or cls.__name__
    try:
        settings = parse_settings(cls, argv, prog, description)
    except SystemExit as exc:  # argparse has printed --help, or a bad flag in one line
        return exc.code if isinstance(exc.code, int) else 2
    except UserError as exc:
        print(f"{prog}: error: {first_line(exc)}", file=sys.stderr)
        return 2
    try:
        rc = fn(settings)
    except UserError as exc:
        print(f"{prog}: error: {first_line(exc)}", file=sys.stderr)
        return 2
    return 0 if rc is None else int(rc)
