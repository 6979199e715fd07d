"""Summarise a multi-GPU measurement: data-parallel runs on 1 vs G GPUs, and a comparison spread over 1 vs G GPUs.

    python benchmarks/multi_gpu.py results/multi-gpu

The folder holds what `scripts/gpu_results.sh` (step "multi-gpu") writes on a machine with two or more GPUs:
- `data-parallel/TASK-1gpu.json`, `TASK-{G}gpu.json`: `python -m finetune run --engine trainer` on one GPU, and the
  same command under `torchrun --nproc-per-node G` (the batch size is per device: G GPUs take G x the examples
  per step and make 1/G of the steps);
- `compare-1gpu/`, `compare-{G}gpu/`: one `python -m finetune compare` with CUDA_VISIBLE_DEVICES naming 1 or G
  GPUs (its results.json and runs/*.json).
Writes `summary.json` (rows with the speed-ups, metrics and whether the spread-out runs equal the one-GPU runs) into
the folder and prints it. Every number is read from the run files; nothing is measured here.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from routed_llama.io import write_json

from finetune.compare import run_files
from finetune.runner import read_json_strict


def gpus_of(result: dict) -> int:
    """World size of a run: its `world_size` field, else the GPU count in its hardware name ("NVIDIA H200 x2")."""
    if result.get("world_size"):
        return int(result["world_size"])
    m = re.search(r" x(\d+)$", result.get("hardware") or "")
    return int(m.group(1)) if m else 1


def data_parallel_rows(folder: Path) -> list[dict]:
    runs = [json.loads(p.read_text()) for p in sorted((folder / "data-parallel").glob("*.json"))]
    rows = []
    for task in sorted({r["task"] for r in runs}):
        by_gpus = {gpus_of(r): r for r in runs if r["task"] == task}
        one = by_gpus.get(1)
        for g, r in sorted(by_gpus.items()):
            m = r["primary_metric"]
            rows.append({
                "task": task, "gpus": g, "per_device_batch": r["config"]["batch_size"],
                "global_batch": g * r["config"]["batch_size"], "train_examples": r["train_examples"],
                "epochs": r["config"]["epochs"], "train_seconds": r["train_seconds"],
                "speedup": None if one is None else round(one["train_seconds"] / r["train_seconds"], 3),
                "metric": m, "final": r["final"][m], "eval_examples": len(r["predictions"]),
                "hardware": r["hardware"], "date": r["date"],
            })  # fmt: skip
    return rows


def compare_rows(folder: Path) -> list[dict]:
    found = sorted(folder.glob("compare-*gpu"))
    runs = {p.name: {(r["arm"], r["seed"]): r for r in map(read_json_strict, run_files([p / "runs"]))} for p in found}
    base = runs.get("compare-1gpu", {})
    rows = []
    for p in found:
        prov = json.loads((p / "results.json").read_text())["provenance"]
        n = len(runs[p.name])
        same = sum(1 for k, r in runs[p.name].items() if k in base and r["predictions"] == base[k]["predictions"]
                   and r["train_loss"] == base[k]["train_loss"])  # fmt: skip
        # each pack's training time and whole time (loading, capture, evaluation; its runs share both): the first
        # is equal across folders when the GPUs trained alike, the rest is host work
        packs = sorted({(r.get("device"), r["train_seconds"], r.get("run_seconds")) for r in runs[p.name].values()})
        rows.append({"folder": p.name, "gpus": int(p.name.split("-")[1].removesuffix("gpu")), "jobs": prov["jobs"],
                     "runs": n, "wall_seconds": prov["wall_seconds"],
                     "pack_train_seconds": [t for _, t, _ in packs], "pack_run_seconds": [w for _, _, w in packs],
                     "runs_per_hour": round(3600 * n / prov["wall_seconds"], 1), "identical_to_1gpu": same,
                     "command": prov["command"], "date": prov["date"]})  # fmt: skip
    one = next((r for r in rows if r["gpus"] == 1), None)
    for r in rows:
        r["speedup"] = None if one is None else round(r["runs_per_hour"] / one["runs_per_hour"], 3)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("multi_gpu: error: usage: python benchmarks/multi_gpu.py FOLDER (a multi-GPU results folder)",
              file=sys.stderr)  # fmt: skip
        return 2
    folder = Path(argv[0])
    summary = {"data_parallel": data_parallel_rows(folder), "compare": compare_rows(folder)}
    write_json(folder / "summary.json", summary, indent=1)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
