"""How long conversion takes on this machine (prints a table; writes JSON).

1. The stand-in (SmolLM2-135M-Instruct, 30 layers of 1536 x 576 keys) converted end to end with convert.py's
   defaults (N=32, k=16, all layers); model loading is timed separately and excluded.
2. Clustering alone (k-means + exact balanced assignment) for 22 TinyLlama-sized layers (5632 x 2048 keys, N=32).
   TinyLlama's weights cannot be downloaded here, so the keys are Gaussian: with no cluster structure k-means
   needs its most iterations, so this errs on the slow side.

    python benchmarks/convert_speed.py --out results/convert-speed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import convert  # noqa: E402


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=22, help="TinyLlama-sized layers to cluster")
    p.add_argument("--num-experts", type=int, default=32)
    p.add_argument("--skip-standin", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    doc = {
        "format_version": 1,
        "hardware": f"{cpu_name()}, {os.cpu_count()} cores",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/convert_speed.py " + " ".join(sys.argv[1:]),
        "load_average_at_start": os.getloadavg()[0],
    }
    if not args.skip_standin:
        with tempfile.TemporaryDirectory() as tmp:
            out = convert.convert(convert.STAND_IN, Path(tmp) / "routed", progress=False)
            conv = json.loads((out / "conversion.json").read_text())
        per_layer = [r["seconds"] for r in conv["layers"].values()]
        doc["standin"] = {"layers": len(per_layer), "convert_seconds": conv["convert_seconds"],
                          "load_seconds": conv["load_seconds"], "cluster_seconds_per_layer": per_layer,
                          "target_seconds": 60}  # fmt: skip
        print(f"stand-in, 30 layers: {conv['convert_seconds']:.1f} s to convert (target <= 60 s), "
              f"model loading {conv['load_seconds']:.1f} s excluded")  # fmt: skip
    rng = np.random.default_rng(0)
    rows = []
    for i in range(args.layers):
        keys = rng.standard_normal((5632, 2048), dtype=np.float32) * 0.02
        t0 = time.perf_counter()
        labels = convert.kmeans_partition(keys, args.num_experts, seed=i)
        seconds = time.perf_counter() - t0
        sizes = np.bincount(labels, minlength=args.num_experts)
        rows.append({"layer": i, "seconds": round(seconds, 3), "min_size": int(sizes.min()), "max_size": int(sizes.max())})
        print(f"TinyLlama-sized layer {i:2d}: {seconds:5.2f} s (cluster sizes {sizes.min()}-{sizes.max()})", flush=True)
    secs = [r["seconds"] for r in rows]
    doc["tinyllama_layers"] = {"shape": [5632, 2048], "num_experts": args.num_experts, "keys": "Gaussian (random)",
                               "rows": rows, "mean_seconds": round(float(np.mean(secs)), 3),
                               "max_seconds": round(float(np.max(secs)), 3), "total_seconds": round(float(np.sum(secs)), 2),
                               "target_seconds_per_layer": 10}  # fmt: skip
    print(f"TinyLlama-sized layers: mean {np.mean(secs):.2f} s, max {np.max(secs):.2f} s per layer (target <= 10 s), "
          f"{np.sum(secs):.1f} s for all {len(secs)}")  # fmt: skip
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "convert_speed.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
