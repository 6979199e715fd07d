"""Where one decode step's GPU time goes: kernels by name and category, and the idle time between them.

    python benchmarks/decode_profile.py --out results/decode-profile --shapes llama7b --ratios 0.5 0.25 --compile
    python benchmarks/decode_profile.py --device cpu --shapes tiny --steps 3 --profile-steps 2 --out /tmp/dp  # smoke

Per shape and --ratios value r (k = max(1, round(r * N)), N = --num-clusters), the three arms of
benchmarks/decode.py's decode rows, built by its own helpers: "dense" (the Llama, random weights), "ideal" (the same
Llama with an FFN k/N as wide; left out at k = N) and "routed" (the routed model at top-k = k, routing_impl "auto").
Each arm decodes through its own `GreedyDecodeStep` (a CUDA graph per step on CUDA; with --compile the step is
torch.compile'd, as decode.py's compiled rows). After the prefill and a couple of untimed steps, per arm in
OUT/decode_profile.json (with OUT/decode_profile.png: a bar per arm, device time by category, then idle) and a table:
- step_ms: median, min and max time of a step over --steps steps (on CUDA: events between consecutive steps, no
  host sync in between, so a step that waits for the host counts as it does in decode.py's tok/s).
- from one torch.profiler trace of --profile-steps steps (a replayed graph's kernels appear in it one by one):
  device_us (the device events' time per step: kernels, memcpy, memset), kernels_per_step, busy = device_us /
  step_us, gap_us = step_us - device_us (the device idle inside a step: between the graph's kernels, the graph
  launch, the copy of the step's input), `categories` (us per step: routed_ffn, attention, gemm, other; see
  `category`) and the top --top kernels by us per step (calls and us per step, mean us per call).
- ffn_share: routed_ffn us / device_us, the routed arm's Triton FFN kernels (null where none ran). A dense FFN's
  GEMMs have the same kernel names as the attention projections and the LM head (all land in "gemm"), so no FFN
  share is given for the dense and ideal arms: their "gemm" difference is what narrowing the FFN saved.
  "attention" is the fused SDPA kernels only; SDPA's math fallback lands in "gemm" and "other".
On the CPU there is no device trace: device_us, gap_us, busy and kernels_per_step are null, the tables empty.
"""

from __future__ import annotations

import argparse
import itertools
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from decode import (SHAPES, DecodeArm, add_device_args, build_dense, error_text, free, llama_config, narrower,
                    routed_from_dense, sync)

WARM_STEPS = 2  # untimed steps after each prefill: the first eager step allocates, the first replays settle
ROUTED_KERNELS = ("_gate_up_kernel", "_down_kernel", "_centroid_scores_kernel", "_sum_splits_kernel",
                  "_route_rows_kernel", "_mask_rows_kernel", "_cluster_rms_kernel")  # modeling_routed_llama's Triton
ATTENTION = ("flash", "attention", "attn", "sdpa", "fmha")
GEMM = ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "matmul")
MM = re.compile(r"(^|_)(b?mm|addmm|baddbmm)(_|$)")  # inductor's mm templates: triton_tem_fused_mm_0, ..._addmm_1
CATEGORIES = ("routed_ffn", "attention", "gemm", "other")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for decode_profile.json (created)")
    p.add_argument("--shapes", nargs="+", default=["llama7b"], choices=sorted(SHAPES))
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5], help="k/N of the routed and ideal arms")
    p.add_argument("--num-clusters", type=int, default=32, help="N")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens prefilled before the steps")
    p.add_argument("--steps", type=int, default=64, help="timed steps per arm (median)")
    p.add_argument("--profile-steps", type=int, default=20, help="steps in each arm's profiler trace")
    p.add_argument("--top", type=int, default=25, help="kernels listed per arm")
    p.add_argument("--compile", action="store_true", help="every arm's decode step torch.compile'd")
    add_device_args(p)
    args = p.parse_args(argv)
    if args.steps < 1 or args.profile_steps < 1:
        p.error("--steps and --profile-steps must be at least 1")
    return args


def category(name: str) -> str:
    """A kernel's category by its name: "routed_ffn" (the routed FFN's Triton kernels), "attention" (fused SDPA:
    checked before "gemm", as cutlass fmha kernels name both), "gemm" (cuBLAS/cuBLASLt/CUTLASS GEMMs and GEMVs,
    inductor's mm templates) or "other" (elementwise, norms, rotary, copies, fused Triton pointwise, ...)."""
    low = name.lower()
    if any(k in name for k in ROUTED_KERNELS):
        return "routed_ffn"
    if any(k in low for k in ATTENTION):
        return "attention"
    if any(k in low for k in GEMM) or MM.search(low):
        return "gemm"
    return "other"


def step_times(arm: DecodeArm, steps: int) -> list[float]:
    """Milliseconds of each of `steps` steps."""
    tokens = arm.start(WARM_STEPS)
    if arm.prompt.device.type == "cuda":  # device time between consecutive steps' ends: no sync per step
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        for end in events[1:]:
            tokens = arm.step(tokens)
            end.record()
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in itertools.pairwise(events)]
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        tokens = arm.step(tokens)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def device_events(arm: DecodeArm, steps: int) -> list | None:
    """The device events (kernels, memcpy, memset) of `steps` profiled steps; None without CUDA."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = arm.prompt.device.type == "cuda"
    tokens = arm.start(WARM_STEPS)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            tokens = arm.step(tokens)
        sync(arm.prompt.device)
    if not cuda:
        return None
    # record_function ranges (e.g. torch.compile's) are mirrored on the device timeline: not work, skipped
    return [e for e in prof.events() if e.device_type == DeviceType.CUDA and not e.is_user_annotation
            and getattr(e, "activity_type", None) != "gpu_user_annotation"]  # fmt: skip


@torch.no_grad()
def profile_arm(arm: DecodeArm, args) -> dict:
    """One row's measurements: step times, then the profiled steps' device events by name and category."""
    ms = step_times(arm, args.steps)
    step_us = statistics.median(ms) * 1e3
    ran = arm.ran_name() if arm.top_k is not None else "dense"  # what the routed layers ran ("triton/gemv1", ...)
    spread = {"median": round(step_us / 1e3, 4), "min": round(min(ms), 4), "max": round(max(ms), 4)}
    row = {"ran": ran, "step_ms": spread}
    events, n = device_events(arm, args.profile_steps), args.profile_steps
    if events is None:
        return {**row, "device_us": None, "kernels_per_step": None, "gap_us": None, "busy": None, "ffn_share": None,
                "categories": {}, "kernels": []}  # fmt: skip
    by_name = {}
    for e in events:
        calls, us = by_name.get(e.name, (0, 0.0))
        by_name[e.name] = (calls + 1, us + e.time_range.elapsed_us())
    device_us = sum(us for _, us in by_name.values()) / n
    cats = dict.fromkeys(CATEGORIES, 0.0)
    for name, (_, us) in by_name.items():
        cats[category(name)] += us / n
    kernels = [{"name": name[:160], "category": category(name), "calls_per_step": round(c / n, 2),
                "us_per_step": round(us / n, 2), "us_per_call": round(us / c, 2)}
               for name, (c, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[: args.top]]  # fmt: skip
    return {**row, "device_us": round(device_us, 1), "kernels_per_step": round(len(events) / n, 1),
            "gap_us": round(step_us - device_us, 1), "busy": round(device_us / step_us, 3),
            "ffn_share": round(cats["routed_ffn"] / device_us, 3) if cats["routed_ffn"] > 0 else None,
            "categories": {k: round(v, 1) for k, v in cats.items()}, "kernels": kernels}  # fmt: skip


def shape_rows(shape: str, args, on_row) -> None:
    """The three arms per k/N for one shape, each row passed to on_row as it is done."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    dense = build_dense(llama_config(shape), device, dtype)
    routed = routed_from_dense(dense, args.num_clusters)
    n = routed.config.num_experts
    # DecodeArm sizes its cache for prompt + steps (+ 16): the longest run between two resets here
    sizing = argparse.Namespace(prompt=args.prompt, steps=max(args.steps, args.profile_steps) + WARM_STEPS,
                                device=args.device)  # fmt: skip
    for ratio in args.ratios:
        k = max(1, round(ratio * n))
        ideal = build_dense(narrower(dense.config, k / n), device, dtype) if k < n else None
        arms = (("dense", dense, {}), ("ideal", ideal, {}), ("routed", routed, {"top_k": k, "impl": "auto"}))
        for name, model, kw in [a for a in arms if a[1] is not None]:
            row = {"model": shape, "batch": args.batch, "k_over_n": k / n, "compiled": args.compile, "arm": name}
            arm = None
            try:
                arm = DecodeArm(model, args.batch, sizing, compiled=args.compile, **kw)
                row.update(profile_arm(arm, args))
            except Exception as exc:  # recorded in the row, the run goes on
                row["error"] = error_text(exc)
            on_row(row)
            arm = None  # its cache (and graph) freed before the next arm's
            free(device)
        del ideal, arms
    routed.model.set_top_k(n)
    del dense, routed
    free(device)


def print_table(rows: list[dict]):
    print("\n| model | batch | k/N | compiled | arm | ran | step ms | device us | gap us | kernels/step "
          "| routed_ffn us | gemm us |")  # fmt: skip
    print("|---" * 12 + "|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['batch']} | {r['k_over_n']:.3g} | {r['compiled']} | {r['arm']} | error: "
                  f"{r['error'][:60]} | | | | | | |")  # fmt: skip
            continue
        cats = r["categories"]
        print(f"| {r['model']} | {r['batch']} | {r['k_over_n']:.3g} | {r['compiled']} | {r['arm']} | {r['ran']} | "
              f"{r['step_ms']['median']} | {r['device_us']} | {r['gap_us']} | {r['kernels_per_step']} | "
              f"{cats.get('routed_ffn')} | {cats.get('gemm')} |")  # fmt: skip


def plot(doc: dict, path: Path):
    """One horizontal bar per row: its device time per step by category, then the idle time (gap), in us."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if r.get("categories")]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.6), dpi=110)
    labels = [f"{r['model']} k/N {r['k_over_n']:.3g}{' compiled' if r['compiled'] else ''}: {r['arm']}" for r in rows]
    left = [0.0] * len(rows)
    for part in (*CATEGORIES, "gap"):
        widths = [max(0.0, r["gap_us"] if part == "gap" else r["categories"][part]) for r in rows]
        ax.barh(labels, widths, left=left, label=part, color="lightgrey" if part == "gap" else None)
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("us per decode step (median step: bar end)")
    ax.set_title("where a decode step's time goes: kernels by category, then idle", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    from routed_llama.hardware import hardware
    from routed_llama.io import command_line, write_json

    args = parse_args(argv)
    if args.compile:  # every compiled arm (model, k) is one more entry for the same forward code (as decode.py)
        cfg = torch._dynamo.config
        setattr(cfg, "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit", 64)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"hardware": hardware(args.device), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": command_line(argv), "args": vars(args), "rows": []}  # fmt: skip

    def on_row(row):
        doc["rows"].append(row)
        write_json(out / "decode_profile.json", doc)  # after every arm: a run stopped midway keeps what it measured

    for shape in args.shapes:
        shape_rows(shape, args, on_row)
    write_json(out / "decode_profile.json", doc)
    if any(r.get("categories") for r in doc["rows"]):  # no device trace on the CPU: nothing to draw
        plot(doc, out / "decode_profile.png")
    print_table(doc["rows"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
