"""How long conversion takes on this machine (prints a table; writes JSON).

1. The stand-in (SmolLM2-135M-Instruct, 30 layers of 1536 x 576 keys) converted end to end with convert.py's
   defaults (N=32, k=16, all layers); model loading is timed separately and excluded.
2. Clustering alone (k-means + exact balanced assignment) for 22 TinyLlama-sized layers (5632 x 2048 keys, N=32).
   TinyLlama's weights cannot be downloaded here, so the keys are Gaussian: with no cluster structure k-means
   needs its most iterations, so this errs on the slow side.

    python benchmarks/convert_speed.py --out results/convert-speed
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from convert import ConvertSettings, convert
from routed_llama.cli import run_cli
from routed_llama.errors import UserError
from routed_llama.hardware import hardware_name
from routed_llama.io import command_line, write_json
from routed_llama.partition import kmeans_partition
from routed_llama.source import STAND_IN


@dataclass
class SpeedSettings:
    layers: int = field(default=22, metadata={"help": "TinyLlama-sized layers to cluster"})
    num_clusters: int = field(default=32, metadata={"help": "N for the TinyLlama-sized layers"})
    skip_standin: bool = field(default=False, metadata={"help": "do not convert the stand-in"})
    out: str | None = field(default=None, metadata={"help": "folder for convert_speed.json"})

    def __post_init__(self):
        if self.layers < 1 or self.num_clusters < 1:
            raise UserError("--layers and --num-clusters must be >= 1")


def standin_timing() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = convert(ConvertSettings(STAND_IN, str(Path(tmp) / "routed"), progress=False))
        conv = json.loads((out / "conversion.json").read_text())
    per_layer = [r["seconds"] for r in conv["layers"].values()]
    print(f"stand-in, 30 layers: {conv['convert_seconds']:.1f} s to convert (target <= 60 s), "
          f"model loading {conv['load_seconds']:.1f} s excluded")  # fmt: skip
    return {"layers": len(per_layer), "convert_seconds": conv["convert_seconds"], "load_seconds": conv["load_seconds"],
            "cluster_seconds_per_layer": per_layer, "target_seconds": 60}  # fmt: skip


def tinyllama_timing(n_layers: int, num_clusters: int) -> dict:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_layers):
        keys = rng.standard_normal((5632, 2048), dtype=np.float32) * 0.02
        t0 = time.perf_counter()
        labels = kmeans_partition(keys, num_clusters, seed=i)
        seconds = time.perf_counter() - t0
        sizes = np.bincount(labels, minlength=num_clusters)
        rows.append({"layer": i, "seconds": round(seconds, 3), "min_size": int(sizes.min()),
                     "max_size": int(sizes.max())})  # fmt: skip
        print(f"TinyLlama-sized layer {i:2d}: {seconds:5.2f} s (cluster sizes {sizes.min()}-{sizes.max()})", flush=True)
    secs = [r["seconds"] for r in rows]
    print(f"TinyLlama-sized layers: mean {np.mean(secs):.2f} s, max {np.max(secs):.2f} s per layer (target <= 10 s), "
          f"{np.sum(secs):.1f} s for all {len(secs)}")  # fmt: skip
    return {"shape": [5632, 2048], "num_experts": num_clusters, "keys": "Gaussian (random)", "rows": rows,
            "mean_seconds": round(float(np.mean(secs)), 3), "max_seconds": round(float(np.max(secs)), 3),
            "total_seconds": round(float(np.sum(secs)), 2), "target_seconds_per_layer": 10}  # fmt: skip


def run(s: SpeedSettings) -> None:
    doc = {
        "format_version": 1,
        "hardware": hardware_name("cpu"),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line(prog="python benchmarks/convert_speed.py"),
        "load_average_at_start": os.getloadavg()[0],
    }
    if not s.skip_standin:
        doc["standin"] = standin_timing()
    doc["tinyllama_layers"] = tinyllama_timing(s.layers, s.num_clusters)
    if s.out:
        Path(s.out).mkdir(parents=True, exist_ok=True)
        write_json(Path(s.out) / "convert_speed.json", doc, indent=1)


if __name__ == "__main__":
    sys.exit(run_cli(run, SpeedSettings, prog="convert_speed.py", description=__doc__))
