"""`AnalyzeSettings` (the command line is generated from it), the checks before any model loads, and `analyze`."""

from __future__ import annotations

import datetime as _dt
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from routed_llama import io
from routed_llama.hardware import hardware

from . import record
from .figures import write_figures
from .record import ROUTER_CLASS, AnalysisError, Item, Recording
from .report import (
    DEFINITIONS,
    FORMAT_VERSION,
    TestOptions,
    checkpoint_record,
    describe,
    public,
    rounded,
    tokens_per_task,
)
from .statistics import STATISTICS
from .summary import format_p, summary_markdown

PROG = "python -m finetune.analysis"
SPLITS = ("validation", "train")


@dataclass(kw_only=True)
class AnalyzeSettings:
    """Record which clusters every token keeps in every routed layer (GLUE inputs) and write routing.json, PNGs and
    summary.md: load, entropy, co-selection, specialisation by task and label, change after fine-tuning."""

    out: str = field(metadata={"help": "output folder (routing.json, PNGs, summary.md)"})
    checkpoint: Optional[str] = field(
        default=None,
        metadata={"help": "routed checkpoint folder (from convert.py); default with --adapter: the adapter's base"},
    )
    adapter: Optional[str] = field(
        default=None, metadata={"help": "LoRA adapter folder from the fine-tuning harness (optional)"}
    )
    tasks: list[str] = field(default_factory=lambda: ["rte", "sst2", "cola"], metadata={"help": "GLUE tasks"})
    data_dir: Optional[str] = field(
        default=None, metadata={"help": "local GLUE folder (default: the Hub, through `datasets`)"}
    )
    split: str = field(default="validation", metadata={"choices": SPLITS, "help": "GLUE split (validation = dev)"})
    max_examples: int = field(default=200, metadata={"help": "examples per task, a seeded subset"})
    n_permutations: int = field(default=1000, metadata={"help": "permutations per test (0: no p-values)"})
    statistic: str = field(default="tv", metadata={"choices": STATISTICS, "help": "specialisation statistic"})
    coselection_layers: Optional[list[int]] = field(
        default=None,
        metadata={"help": "layers for co-selection heatmaps (default: the first and last routed layer)"},
    )
    top_k: Optional[int] = field(default=None, metadata={"help": "analyze at this k instead of the checkpoint's"})
    device: str = field(default="cpu", metadata={"help": "torch device to run the model on"})
    batch_size: int = 16
    max_length: int = field(default=512, metadata={"help": "tokens per input (longer ones are truncated)"})
    seed: int = field(default=0, metadata={"help": "seed of the example subset and of the permutations"})
    top: int = field(default=10, metadata={"help": "rows of the top-cluster tables"})
    overwrite: bool = field(default=False, metadata={"help": "replace --out if it exists and is not empty"})
    save_selections: bool = field(
        default=False, metadata={"help": "also write selections.npz (every token's kept cluster ids)"}
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar (--no-progress: none)"})

    def __post_init__(self):
        """The checks that need no file and no model (so parsing a command line touches nothing)."""
        from ..tasks import TaskError, get_task

        self.tasks = list(self.tasks)
        if self.max_examples < 1:
            raise AnalysisError(f"--max-examples must be >= 1, got {self.max_examples}")
        for name, lo in (("n_permutations", 0), ("batch_size", 1), ("max_length", 1), ("top", 1)):
            if getattr(self, name) < lo:
                raise AnalysisError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(self, name)}")
        for name, choices in (("split", SPLITS), ("statistic", STATISTICS)):
            if getattr(self, name) not in choices:
                raise AnalysisError(f"--{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if not self.tasks:
            raise AnalysisError("--tasks selects no task")
        try:
            names = [get_task(t).name for t in self.tasks]
        except TaskError as exc:
            raise AnalysisError(str(exc)) from None
        if len(set(names)) != len(names):
            raise AnalysisError(f"--tasks lists a task twice: {self.tasks}")

    @property
    def options(self) -> TestOptions:
        return TestOptions(self.n_permutations, self.seed, self.statistic, self.top)


@dataclass
class Inputs:
    """What `preflight` found: the checkpoint to load and its config, the adapter's record, k, and the inputs."""

    checkpoint: str
    config: dict
    adapter_info: dict | None
    top_k: int
    items: list[Item]


def _checkpoint_of(settings: AnalyzeSettings) -> tuple[str, dict | None]:
    """(checkpoint folder, adapter info): --checkpoint, else the base the adapter names."""
    from ..adapters import RUN_FILE, AdapterError, read_info

    info = None
    checkpoint = settings.checkpoint
    if settings.adapter is not None:
        try:
            info = read_info(settings.adapter)
        except AdapterError as exc:
            raise AnalysisError(str(exc)) from None
        if checkpoint is None:
            checkpoint = info.get("base")
            if checkpoint is None:
                raise AnalysisError(f"{settings.adapter}: its {RUN_FILE} names no base")
    if checkpoint is None:
        raise AnalysisError("pass --checkpoint (a routed checkpoint folder) or --adapter")
    return checkpoint, info


def _check_top_k_and_layers(settings: AnalyzeSettings, cfg: dict, info: dict | None) -> int:
    """k to analyze at (--top-k, else the adapter's, else the checkpoint's); --coselection-layers must be routed."""
    n = cfg["num_experts"]
    k = settings.top_k if settings.top_k is not None else (info or {}).get("top_k") or cfg.get("num_experts_per_tok") or n
    if not 1 <= k <= n:
        raise AnalysisError(f"--top-k must be in [1, num_experts={n}], got {k}")
    if k == n:
        raise AnalysisError(f"k = N = {n}: every token keeps every cluster, there is no routing to analyze")
    routed = record.routed_layers_of(cfg)
    if settings.coselection_layers is not None:
        bad = [i for i in settings.coselection_layers if i not in routed]
        if bad:
            raise AnalysisError(f"--coselection-layers {bad} are not routed layers; routed: {routed}")
    return k


def _check_device_and_paths(settings: AnalyzeSettings):
    import torch

    try:
        dev = torch.device(settings.device)
    except (RuntimeError, ValueError):
        raise AnalysisError(f"--device {settings.device!r} is not a torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AnalysisError("--device cuda: no CUDA device is available")
    if settings.data_dir is not None and not Path(settings.data_dir).is_dir():
        raise AnalysisError(f"no GLUE folder {settings.data_dir}")
    out = Path(settings.out)
    if out.exists() and not out.is_dir():
        raise AnalysisError(f"--out {out} is a file")
    io.check_output(out, settings.overwrite)


def preflight(settings: AnalyzeSettings) -> Inputs:
    """Every check that reads files but loads no model: checkpoint, adapter, k, layers, device, output, inputs."""
    from ..tasks import TaskError

    checkpoint, info = _checkpoint_of(settings)
    cfg = record.check_checkpoint(checkpoint)
    k = _check_top_k_and_layers(settings, cfg, info)
    _check_device_and_paths(settings)
    try:
        items = record.load_items(settings.tasks, settings.data_dir, settings.split, settings.max_examples, settings.seed)
    except TaskError as exc:
        raise AnalysisError(str(exc)) from None
    if not items:
        raise AnalysisError("the selection holds no example")
    return Inputs(checkpoint, cfg, info, k, items)


def _load(settings: AnalyzeSettings, inputs: Inputs):
    """(model on the device, tokenizer, base fingerprint); a model that cannot load is one line, not a traceback."""
    from ..adapters import AdapterError
    from ..models import ModelError, base_fingerprint

    try:
        model, tokenizer, _ = record.load_model(inputs.checkpoint, settings.adapter, inputs.top_k)
    except (AdapterError, ModelError) as exc:
        raise AnalysisError(str(exc)) from None
    except (OSError, ValueError, RuntimeError) as exc:  # unreadable weights, a wrong remote code, ...: one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AnalysisError(f"cannot load {settings.adapter or inputs.checkpoint}: {reason}") from None
    model.to(settings.device)
    if not record.find_routers(model):
        raise AnalysisError(f"{inputs.checkpoint} loaded without any {ROUTER_CLASS}: nothing to analyze")
    fingerprint = inputs.adapter_info["base_fingerprint"] if inputs.adapter_info else base_fingerprint(model)
    return model, tokenizer, fingerprint


def _record(model, tokenizer, settings: AnalyzeSettings, items: list[Item]) -> tuple[Recording, Recording | None]:
    """(recording of the model as loaded, recording with the adapter disabled: the converted model, or None)."""
    kw = dict(batch_size=settings.batch_size, max_length=settings.max_length, progress=settings.progress)
    base = None
    if settings.adapter is not None:
        with model.disable_adapter():
            base = record.record_routing(model, tokenizer, items, **kw)
    rec = record.record_routing(model, tokenizer, items, **kw)
    if rec.token_example.size == 0:
        raise AnalysisError("the inputs hold no non-padding token")
    return rec, base


@dataclass
class _Run:
    """What one run of `analyze` produced besides the numbers: provenance, recordings, figures, timings."""

    date: str
    command: str
    fingerprint: str
    rec: Recording
    base: Recording | None
    figures: dict[str, str]
    seconds: dict[str, float]  # load, record, statistics; "total" is added when the record is made
    t_start: float


def _routing_record(settings: AnalyzeSettings, inputs: Inputs, run: _Run, result: dict) -> dict:
    """The routing.json record: provenance, inputs, settings, definitions, every number, figures, timings."""
    rec = run.rec
    report = {
        "format_version": FORMAT_VERSION,
        "tool": "finetune.analysis",
        "date": run.date,
        "command": run.command,
        "hardware": hardware(settings.device),
        "checkpoint": checkpoint_record(inputs.checkpoint, inputs.config, rec, run.fingerprint),
        "adapter": None if settings.adapter is None else {"path": str(settings.adapter), "info": inputs.adapter_info},
        "tasks": tokens_per_task(rec, inputs.items),
        "split": settings.split,
        "data_dir": settings.data_dir,
        "max_examples_per_task": settings.max_examples,
        "n_examples": len(inputs.items),
        "n_tokens": int(rec.token_example.size),
        "n_text_tokens": None if rec.token_is_text is None else int(rec.token_is_text.sum()),
        "n_truncated": rec.n_truncated,
        "max_length": settings.max_length,
        "seed": settings.seed,
        "n_permutations": settings.n_permutations,
        "statistic": settings.statistic,
        "definitions": DEFINITIONS,
        **public(result),
        "figures": run.figures,
        "seconds": {**run.seconds, "total": round(time.perf_counter() - run.t_start, 2)},
    }
    return rounded(report)


def _write_outputs(settings: AnalyzeSettings, inputs: Inputs, run: _Run, result: dict) -> dict:
    """Figures, selections.npz (if asked), routing.json and summary.md, written into a temporary folder that
    replaces `settings.out` only when complete."""
    with io.atomic_output(settings.out, settings.overwrite) as out:
        run.figures.update(write_figures(result, run.rec.layout, out, fine_tuned=settings.adapter is not None))
        if settings.save_selections:
            np.savez_compressed(
                out / "selections.npz",
                token_example=run.rec.token_example,
                **{f"layer_{i}": s.astype(np.int16) for i, s in run.rec.selections.items()},
            )
        report = _routing_record(settings, inputs, run, result)
        io.write_json(out / "routing.json", report, indent=1)
        (out / "summary.md").write_text(summary_markdown(report, run.figures))
    return report


def analyze(settings: AnalyzeSettings, *, command: str | None = None, log: Callable[[str], object] = print) -> dict:
    """Check everything cheap, load the model, record its routing, and write routing.json, PNGs and summary.md into
    `settings.out`; returns the routing.json record. Bad input raises `AnalysisError` before any model is loaded."""
    t_start = time.perf_counter()
    date = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    inputs = preflight(settings)
    t0 = time.perf_counter()
    model, tokenizer, fingerprint = _load(settings, inputs)
    load_seconds = time.perf_counter() - t0
    rec, base = _record(model, tokenizer, settings, inputs.items)
    layers = rec.layout.layers
    cos_layers = settings.coselection_layers or sorted({layers[0], layers[-1]})
    t1 = time.perf_counter()
    result = describe(rec, inputs.items, cos_layers, settings.options, base)
    seconds = {
        "load": round(load_seconds, 2),
        "record": round(rec.seconds + (base.seconds if base else 0), 2),
        "statistics": round(time.perf_counter() - t1, 2),
    }
    run = _Run(date, command or io.command_line(), fingerprint, rec, base, {}, seconds, t_start)
    report = _write_outputs(settings, inputs, run, result)
    task_p = report["specialisation"]["all"].get("by_task", {}).get("p_value")
    ent = ", ".join(f"{report['layers'][str(i)]['normalised_entropy']:.3f}" for i in layers)
    log(
        f"wrote {settings.out}: {len(inputs.items)} examples, {report['n_tokens']} tokens, {len(layers)} routed layers "
        f"(N={rec.layout.num_experts}, k={rec.layout.top_k}); normalised entropy {ent}; task p = {format_p(task_p)}"
    )
    return report


def main(argv: list[str] | None = None) -> int:
    """`python -m finetune.analysis [flags]`: returns the exit status (2 for bad input, with a one-line message)."""
    from routed_llama.cli import run_cli

    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]

    def run(settings: AnalyzeSettings) -> None:
        analyze(settings, command=io.command_line(argv, PROG))

    return run_cli(run, AnalyzeSettings, argv, PROG, AnalyzeSettings.__doc__)
