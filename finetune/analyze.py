"""Temporary bridge: `finetune/cli.py` still wires `python -m finetune analyze` through `add_arguments(parser)` and
`run(args)`. The analysis lives in `finetune.analysis`; delete this file once `finetune/cli.py` builds the subcommand
from `finetune.analysis.AnalyzeSettings` and calls `finetune.analysis.analyze`."""

from __future__ import annotations

import copy
import dataclasses
import typing

from .analysis import AnalyzeSettings, analyze


def add_arguments(parser):
    """The flags of `AnalyzeSettings`, added to an existing argparse parser the way `HfArgumentParser` adds them."""
    from transformers import HfArgumentParser

    hints = typing.get_type_hints(AnalyzeSettings)
    for f in dataclasses.fields(AnalyzeSettings):
        f = copy.copy(f)
        f.type = hints[f.name]
        HfArgumentParser._parse_dataclass_field(parser, f)
    return parser


def run(args) -> int:
    """Record which clusters every token keeps in every routed layer (GLUE inputs) and write routing.json, PNGs and
    summary.md: load, entropy, co-selection, specialisation by task and label, change after fine-tuning."""
    analyze(AnalyzeSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(AnalyzeSettings)}))
    return 0
