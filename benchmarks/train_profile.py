"""Where a training step's time goes: torch.profiler over training steps and one evaluation, eager vs one CUDA
graph per step (the fast engine), on one arm; `--group K` profiles K seeds packed into one model. Needs a CUDA
device.

    python benchmarks/train_profile.py --model BASE --data-dir GLUE --task rte --steps 30 [--group 8] \
        --output results/train-profile

Writes profile.json (per mode: wall ms per step, device (kernel) ms per step, host ms per step, kernel launches per
step, the top operators by self CPU and self CUDA time) and profile.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from routed_llama.hardware import hardware_name
from routed_llama.io import command_line, write_json

from finetune import fast, packed, tasks, train
from finetune.config import RunConfig


def top(events, key: str, n: int = 12) -> list[dict]:
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:n]
    return [{"name": e.key[:80], "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3),
             "self_device_ms": round(getattr(e, "self_device_time_total", 0) / 1e3, 3)} for e in rows]  # fmt: skip


def profile_mode(engine: fast.FastEngine, batches, eval_items, steps: int) -> dict:
    for b in batches[:3]:  # warm (and, for graphs, replay once) outside the profile
        engine.train_step(b)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for b in batches[3 : 3 + steps]:
            engine.train_step(b)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        t1 = time.perf_counter()
        engine.predict(eval_items)
        eval_wall = time.perf_counter() - t1
    ev = prof.key_averages()
    device_us = sum(getattr(e, "self_device_time_total", 0) for e in ev)
    kernels = sum(e.count for e in ev if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    launches = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                    "cuLaunchKernelEx", "cudaGraphLaunch"))  # fmt: skip
    return {
        "steps": steps, "wall_ms_per_step": round(1e3 * wall / steps, 3),
        "device_ms_per_step": round(device_us / 1e3 / (steps + 1), 3),  # one evaluation is in the profile too
        "kernels_per_step": round(kernels / (steps + 1), 1), "host_launch_calls_per_step": round(launches / steps, 1),
        "eval_wall_s": round(eval_wall, 3),
        "top_self_cpu": top(ev, "self_cpu_time_total"), "top_self_device": top(ev, "self_device_time_total"),
    }  # fmt: skip


def write(out: Path, record: dict):
    """profile.json and profile.md with the modes measured so far (written after each mode: a run cut short keeps
    what it measured)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "profile.json", record, indent=1)
    rows = record["modes"]
    lines = [f"# Training-step profile ({record['hardware']}, {record['date']})", "", f"`{record['command']}`", "",
             f"{record['group']} run(s) per step (packed when more than one); ms are per packed step.", "",
             "| mode | wall ms/step | device ms/step | kernels/step | host launch calls/step | one evaluation (s) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for mode, r in rows.items():
        lines.append(f"| {mode} | {r['wall_ms_per_step']} | {r['device_ms_per_step']} | {r['kernels_per_step']} | "
                     f"{r['host_launch_calls_per_step']} | {r['eval_wall_s']} |")  # fmt: skip
    for mode, r in rows.items():
        lines += ["", f"## {mode}: top operators by self device time", "", "| op | calls | self device ms | self CPU ms |",
                  "|---|---|---|---|"]  # fmt: skip
        lines += [f"| `{t['name']}` | {t['calls']} | {t['self_device_ms']} | {t['self_cpu_ms']} |" for t in r["top_self_device"]]
    (out / "profile.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--task", default="rte")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--group", type=int, default=1, help="runs (seeds) per step, packed into one model")
    p.add_argument("--modes", nargs="+", default=["graphs", "eager"], choices=["graphs", "eager"])
    p.add_argument("--output", default="results/train-profile")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("train_profile: error: needs a CUDA device", file=sys.stderr)
        return 2
    if args.group < 1 or args.steps < 1:
        print("train_profile: error: --group and --steps must be >= 1", file=sys.stderr)
        return 2
    cfgs = [RunConfig(task=args.task, model=args.model, data_dir=args.data_dir, lr=5e-4, engine="fast",
                      seed=s).validate() for s in range(args.group)]  # fmt: skip
    task = tasks.get_task(args.task)
    record = {"hardware": hardware_name(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": command_line(argv, "python benchmarks/train_profile.py"), "group": args.group,
              "modes": {}}  # fmt: skip
    for mode in args.modes:
        setups = train.prepare_group(cfgs, task)
        pack = packed.Pack([s.model for s in setups]) if args.group > 1 else None
        model = (setups[0].model if pack is None else pack.model).cuda()
        engine = fast.FastEngine(model, cfgs[0], task, setups[0].tokenizer.pad_token_id, "bf16", torch.device("cuda"),
                                 args.group)  # fmt: skip
        engine.graphs = mode == "graphs"
        batches = fast.packed_batches(cfgs, setups[0].train_ds.items, engine.pad_id, task.is_regression, pin=True)[0]
        engine.prepare_training([batches])
        record["modes"][mode] = profile_mode(engine, batches, setups[0].eval_ds.items, args.steps)
        print(mode, json.dumps({k: v for k, v in record["modes"][mode].items() if not k.startswith("top")}), flush=True)
        write(Path(args.output), record)
        del engine, setups, pack, model
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
