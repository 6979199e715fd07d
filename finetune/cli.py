"""python -m finetune {run,compare,collect,evaluate,merge,analyze,sweep}: LoRA fine-tuning of plain and routed Llamas
on GLUE.

Each subcommand's flags are generated from its settings dataclass(es) with `transformers.HfArgumentParser`, so every
default lives in one place: the dataclass. Bad input is one line on stderr and exit code 2, before any model is
loaded; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Callable

from routed_llama import cli as settings_cli
from routed_llama import io
from routed_llama.errors import UserError, first_line

from . import adapters, models
from .config import RunConfig
from .evaluate import EvaluateSettings

PROG = "finetune"
RECORDED_PROG = "python -m finetune"  # how a command line is recorded in results (provenance)


class UsageError(UserError):
    """A flag that does not parse or a settings value its dataclass refuses; `main` prints it as one line."""

    def __init__(self, message: str, prog: str = PROG):
        super().__init__(message)
        self.prog = prog


class _Repeatable(argparse.Action):
    """A list flag that may be given several times: `--arm A --arm B` -> [A, B]; the default is replaced, not
    extended, by the first use."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_repeated", set())
        before = list(getattr(namespace, self.dest)) if self.dest in given else []
        given.add(self.dest)
        setattr(namespace, self.dest, before + list(values))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help keeps the docstrings' line breaks and shows each default that is a value (not None or False) and that
    the help text does not already state."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:  # not 0 (0 == False)
            return text
        return super()._get_help_string(action)


class SettingsParser(settings_cli.SettingsParser):
    """The project's settings parser (one spelling per flag, `--flag`/`--no-flag` switches) for subcommands: errors
    raise `UsageError` instead of exiting, list flags are repeatable, positional fields (metadata `positional`, or
    named in `positional`) take their element type and as many values as a list needs, and every flag's help shows
    its default."""

    def __init__(self, dataclass_types=(), positional=(), **kwargs):
        self.positional = set(positional)  # read while the base class adds the fields
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(list(dataclass_types), **kwargs)

    def error(self, message: str):
        raise UsageError(message, self.prog)

    def _parse_dataclass_field(self, parser: argparse.ArgumentParser, field: dataclasses.Field):
        meta = dict(field.metadata)
        elem, many = _element_type(field.type)
        if meta.pop("positional", False) or field.name in self.positional:
            has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
            if has_default:
                meta["default"] = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default  # fmt: skip
            nargs = ("*" if has_default else "+") if many else ("?" if has_default else None)
            parser.add_argument(field.name, type=elem, nargs=nargs, **meta)
            return
        shown = field.type is not bool and field.default is not None  # HelpFormatter hides None defaults too
        meta.setdefault("help", "default: %(default)s" if shown else "")
        if many:
            meta["action"] = _Repeatable
        shim = _with_metadata(field, meta)
        super()._parse_dataclass_field(parser, shim)


def _with_metadata(field: dataclasses.Field, metadata: dict) -> dataclasses.Field:
    """A copy of `field` with other metadata (the dataclass keeps its own field)."""
    out = dataclasses.field(default=field.default, default_factory=field.default_factory, metadata=metadata)
    out.name, out.type = field.name, field.type
    return out


def _element_type(tp) -> tuple[type, bool]:
    """(element type, is a list) of a resolved field type: `list[str]` -> (str, True), `int | None` -> (int, False)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return _element_type(args[0])
    if typing.get_origin(tp) is list:
        return args[0], True
    return tp, False


# --- the recipe: RunConfig less what a comparison sets per run -------------------------------------------------------

PER_RUN = ("arm", "seed", "output_dir", "holdout_fraction")


def _recipe_class() -> type:
    """`Recipe`: RunConfig's fields less the per-run ones, with the same types and defaults (the flags `compare`
    shares with `run`); `to_config()` is the RunConfig, validated."""
    hints = typing.get_type_hints(RunConfig)
    fields = [(f.name, hints[f.name], _with_metadata(f, dict(f.metadata)))
              for f in dataclasses.fields(RunConfig) if f.name not in PER_RUN]  # fmt: skip

    def to_config(self) -> RunConfig:
        return RunConfig(**dataclasses.asdict(self)).validate()

    return dataclasses.make_dataclass("Recipe", fields, namespace={"to_config": to_config, "validate": to_config})


Recipe = _recipe_class()


# --- subcommands ----------------------------------------------------------------------------------------------------


@dataclass
class RoutedArm:
    """The one flag `run` adds to the recipe."""

    routed: str | None = field(default=None, metadata={"metavar": "CKPT", "help": (
        "a routed checkpoint folder: the routed arm (sets --model to CKPT, and --arm to 'routed' unless given)")})  # fmt: skip


def run(cfg: RunConfig, arm: RoutedArm):
    """One LoRA fine-tune of one arm: the plain model (--model) or a routed checkpoint (--routed CKPT)."""
    from .train import run_one

    if arm.routed is not None:
        if not models.is_routed_checkpoint(arm.routed):
            raise models.ModelError(f"--routed {arm.routed}: not a routed checkpoint folder (no config.json with "
                                    "model_type 'routed_llama')")  # fmt: skip
        cfg = dataclasses.replace(cfg, model=arm.routed, arm="routed" if cfg.arm == "baseline" else cfg.arm)
    result = run_one(cfg)
    keys = ("arm", "seed", "lr", "before", "per_epoch", "final", "final_routing_off", "train_seconds",
            "train_tokens_per_s", "peak_gpu_mem_bytes")  # fmt: skip
    print(io.dumps({k: result.get(k) for k in keys}, indent=1), end="")
    m = result["primary_metric"]
    print(f"{result['arm']}: {m} {result['final'][m]:.2f} after {cfg.epochs:g} epochs ({result['train_seconds']:.1f} s)")


def compare(settings, recipe, command: str):
    """Both arms x seeds (x an optional lr grid chosen on a train slice) with one recipe: writes results.json,
    report.md and curves.png to --output; --resume continues an interrupted comparison."""
    from .compare import compare as compare_arms, report

    if settings.command is None:  # record the command line given, not the caller's sys.argv
        settings.command = command
    print(report(compare_arms(settings, recipe.to_config(), log=lambda msg: print(msg, flush=True))))


def collect(settings):
    """Assemble the comparison report (results.json, report.md, curves.png) from finished runs' result.json files,
    e.g. those of runs made one by one on several machines."""
    from .compare import collect as collect_runs, report

    print(report(collect_runs(settings)))


def evaluate(settings: EvaluateSettings):
    """Score a saved adapter (over the base it was trained on, checked by fingerprint) on its task's dev set."""
    from .evaluate import evaluate_adapter

    r = evaluate_adapter(settings)
    print(io.dumps({"task": r["task"], "metrics": r["metrics"], "trained_final": r["info"].get("final")}, indent=1), end="")


def merge(settings: adapters.MergeSettings):
    """Merge an adapter into its base and write a standalone checkpoint (remote code included for routed bases)."""
    print(f"wrote {adapters.merge(settings)}")


def analyze(settings, command: str):
    """Record which clusters every token keeps in every routed layer (GLUE inputs) and write routing.json, PNGs and
    summary.md: load, entropy, co-selection, specialisation by task and label, change after fine-tuning."""
    from .analysis import analyze as analyze_routing

    analyze_routing(settings, command=command)


def sweep(settings, command: str):
    """The pre-registered sweep of a plan file: run its stages (resumably) and write results.json, report.md and
    the figures from every finished run."""
    from .sweep import sweep as run_sweep

    run_sweep(settings, command=command)


@dataclass(frozen=True)
class Command:
    """A subcommand: the settings dataclasses its flags are generated from, and the function called with one
    instance of each (and `command=`, the command line as run, where it takes one)."""

    name: str
    call: Callable
    settings: tuple[type, ...]
    positional: tuple[str, ...] = ()  # settings fields given as positional arguments

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.call) or ""


def commands() -> dict[str, Command]:
    """Every subcommand, in the order `--help` lists them."""
    from .analysis import AnalyzeSettings
    from .compare import CollectSettings, CompareSettings
    from .sweep import SweepSettings

    table = [Command("run", run, (RunConfig, RoutedArm)), Command("compare", compare, (CompareSettings, Recipe)),
             Command("collect", collect, (CollectSettings,), positional=("results",)),
             Command("evaluate", evaluate, (EvaluateSettings,)), Command("merge", merge, (adapters.MergeSettings,)),
             Command("analyze", analyze, (AnalyzeSettings,)), Command("sweep", sweep, (SweepSettings,))]  # fmt: skip
    return {c.name: c for c in table}


# --- parsing --------------------------------------------------------------------------------------------------------


def build_parser(table: dict[str, Command]) -> SettingsParser:
    """The parser of `python -m finetune`; `.subcommands` maps each subcommand's name to its parser."""
    p = SettingsParser(prog=PROG, description=__doc__)
    sub = p.add_subparsers(dest="subcommand", required=True, metavar="{" + ",".join(table) + "}",
                           parser_class=SettingsParser)  # fmt: skip
    p.subcommands = {c.name: sub.add_parser(c.name, dataclass_types=c.settings, positional=c.positional,
                                            help=c.doc.split("\n\n")[0], description=c.doc, prog=f"{PROG} {c.name}")
                     for c in table.values()}  # fmt: skip
    return p


@dataclass
class Parsed:
    """What one command line asks for: the subcommand, one settings instance per settings dataclass, and the
    command line as it is recorded in results."""

    command: Command
    settings: tuple
    command_line: str

    def __call__(self):
        takes_command = "command" in inspect.signature(self.command.call).parameters
        extra = {"command": self.command_line} if takes_command else {}
        return self.command.call(*self.settings, **extra)


def parse_args(argv: list[str]) -> Parsed:
    """Parse and validate the flags of one command line; reads and writes no file. Bad flags raise `UsageError`
    (a `UserError`)."""
    given = [str(a) for a in argv]
    table = commands()
    parser = build_parser(table)
    argv = given
    if argv and argv[0] in table:  # `--layers -8--1`: a value that starts with '-' is no option of the subcommand
        argv = argv[:1] + settings_cli.join_dash_values(argv[1:], parser.subcommands[argv[0]])
    ns, extra = parser.parse_known_args(argv)
    command = table[ns.subcommand]
    prog = f"{PROG} {command.name}"
    if extra:
        raise UsageError(f"unrecognized arguments: {' '.join(extra)}", prog)
    settings = []
    for cls in command.settings:
        settings.append(_build(cls, {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if f.init}, prog))
    return Parsed(command, tuple(settings), io.command_line(given, prog=RECORDED_PROG))


def _build(cls, kwargs: dict, prog: str):
    """One settings instance, validated by its `__post_init__` (and `validate()` where it has one)."""
    try:
        obj = cls(**kwargs)
        if callable(getattr(obj, "validate", None)):
            obj.validate()
    except ValueError as exc:  # UserError, or a ValueError of a check on flag values alone (no file is read)
        raise UsageError(first_line(exc), prog) from exc
    return obj


def main(argv: list[str] | None = None) -> int:
    """Run one command line; a `UserError` is printed as one line on stderr and gives exit code 2."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    prog = PROG
    try:
        parsed = parse_args(argv)
        prog = f"{PROG} {parsed.command.name}"
        out = parsed()
    except UserError as exc:
        print(f"{getattr(exc, 'prog', prog)}: error: {first_line(exc)}", file=sys.stderr)
        return 2
    return out if isinstance(out, int) else 0


if __name__ == "__main__":
    sys.exit(main())
