"""Training speed of the fine-tuning harness: solo runs per arm and engine, and runs trained together (packed).

    python benchmarks/train_speed.py --model BASE --arm plain=BASE --arm last8=CKPT --arm all30=CKPT \
        --data-dir GLUE --task rte --epochs 5 --jobs 1 4 8 --output results/train-speed

Rows {arm, mode, jobs, epochs, train_seconds, run_seconds, tokens_per_s, peak_gpu_mem_bytes, runs_per_gpu_hour,
final, precision, compile}: `mode` is the engine ("fast": one CUDA graph per step; "fast+compile": the same with
every decoder layer under torch.compile, `--compile`; "trainer": transformers.Trainer, eager);
`jobs` is how many runs (seeds 0..jobs-1 of one arm) train together in one process, packed into one model
(finetune/packed.py; `--group` of compare and sweep); `runs_per_gpu_hour` = 3600 * jobs / run_seconds, where run_seconds is the whole call (loading, tokenising,
capturing, training, evaluating); `precision` is the runs' resolved precision (`--precision`, e.g. bf16-base: a frozen
base stored in bf16, timed beside bf16 rows). All rows run in one process, in order (solo rows, then --jobs, then
the trainer): with --compile the first row of a layer class and pack size pays the compilation (its run_seconds),
later rows reuse the compiled code as a `compare` worker does from its second pack on; repeat a --jobs value
(`--jobs 8 8`) to see both. Writes train_speed.json and runs_per_gpu_hour.png to --output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from routed_llama.hardware import hardware_name
from routed_llama.io import command_line, write_json

from finetune import train
from finetune.config import RunConfig, resolve_precision


def row(arm: str, mode: str, results: list[dict], wall: float) -> dict:
    r = results[0]
    return {
        "arm": arm, "mode": mode, "jobs": len(results), "epochs": r["config"]["epochs"],
        "train_seconds": r["train_seconds"], "run_seconds": round(wall, 3),
        "tokens_per_s": round(sum(x["train_tokens"] for x in results) / r["train_seconds"], 1),
        "peak_gpu_mem_bytes": r["peak_gpu_mem_bytes"], "runs_per_gpu_hour": round(3600 * len(results) / wall, 1),
        "final": [x["final"][x["primary_metric"]] for x in results], "shapes": r.get("shapes"),
        "precision": r["precision"], "compile": r["config"].get("compile", False),
        "phase_seconds": r.get("phase_seconds"), "gpu_pools": r.get("gpu_pools"),
    }  # fmt: skip


def measure(base: RunConfig, arm: str, ckpt: str, engine: str, jobs: int, epochs: float) -> dict:
    cfgs = [replace(base, model=ckpt, arm=arm, engine=engine, seed=s, epochs=epochs) for s in range(jobs)]
    t0 = time.perf_counter()
    results = train.run_group(cfgs)
    mode = engine + ("+compile" if base.compile and engine == "fast" else "")
    out = row(arm, mode, results, time.perf_counter() - t0)
    print(json.dumps(out), flush=True)
    return out


def plot(rows: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for (arm, mode) in sorted({(r["arm"], r["mode"]) for r in rows}):
        pts = sorted((r["jobs"], r["runs_per_gpu_hour"]) for r in rows if (r["arm"], r["mode"]) == (arm, mode))
        ax.plot(*zip(*pts), marker="o", label=f"{arm} ({mode})")
    ax.axhline(600, color="grey", ls="--", lw=1, label="target 600")
    ax.set_xlabel("runs trained together on one GPU, packed (jobs)")
    ax.set_ylabel("runs per GPU-hour")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", action="append", required=True, metavar="NAME=CHECKPOINT",
                   help="an arm; the first one is also timed with more jobs and with the trainer engine")  # fmt: skip
    p.add_argument("--data-dir", required=True)
    p.add_argument("--task", default="rte")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--epochs", type=float, default=5.0)
    p.add_argument("--trainer-epochs", type=float, default=1.0, help="the eager reference is slow: time fewer epochs")
    p.add_argument("--jobs", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "bf16-base", "fp32"],
                   help="RunConfig's precision (the fast engine has no fp16)")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="RunConfig.compile: decoder layers under torch.compile")
    p.add_argument("--jobs-arms", type=int, nargs="*", default=[],
                   help="also time every other arm with these many runs packed (memory and time beside the first)")
    p.add_argument("--output", default="results/train-speed")
    args = p.parse_args(argv)
    arms = [a.split("=", 1) for a in args.arm]
    if any(len(a) != 2 for a in arms) or any(j < 1 for j in args.jobs):
        print("train_speed: error: --arm wants NAME=CHECKPOINT and --jobs positive integers", file=sys.stderr)
        return 2
    try:
        base = RunConfig(task=args.task, data_dir=args.data_dir, lr=args.lr, precision=args.precision,
                         compile=args.compile).validate()  # fmt: skip
    except ValueError as exc:
        print(f"train_speed: error: {exc}", file=sys.stderr)
        return 2
    rows = [measure(base, name, ckpt, "fast", 1, args.epochs) for name, ckpt in arms]
    first, ckpt = arms[0]
    rows += [measure(base, first, ckpt, "fast", j, args.epochs) for j in args.jobs if j > 1]
    rows += [measure(base, name, c, "fast", j, args.epochs) for j in args.jobs_arms for name, c in arms[1:]]
    if args.trainer_epochs > 0:
        rows.append(measure(replace(base, compile=False), first, ckpt, "trainer", 1, args.trainer_epochs))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    record = {"hardware": hardware_name(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": command_line(argv, "python benchmarks/train_speed.py"),
              "precision": resolve_precision(args.precision),
              "recipe": {"task": args.task, "lr": args.lr, "batch_size": base.batch_size, "lora_r": base.lora_r,
                         "buckets": base.buckets, "compile": base.compile}, "rows": rows}  # fmt: skip
    write_json(out / "train_speed.json", record, indent=1)
    plot(rows, out / "runs_per_gpu_hour.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
