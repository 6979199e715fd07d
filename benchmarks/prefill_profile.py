"""Where one whole-model prefill spends its time: the host (Python, dispatch, launches) against the device (kernels).

    python benchmarks/prefill_profile.py --out results/prefill-profile --shapes llama7b tinyllama   # GPU, ~1-2 minutes
    python benchmarks/prefill_profile.py --device cpu --shapes tiny --tokens 16 --out /tmp/p          # smoke

Per model shape (random weights, every layer routed into --num-clusters equal clusters, k/N = --ratio), three arms run
the prefill of benchmarks/decode.py's prefill rows (one forward of --tokens tokens, batch 1, eager, no cache, logits of
the last position): "dense" (the Llama), "mask" (the routed model, routing_impl "mask") and "auto" (routing_impl
"auto": the prefill path on a capable GPU). `ran` is what the routed layers ran, recorded from their `pick_impl`.
Per arm, in OUT/prefill_profile.json and a printed table:
- wall_ms: median time of a forward, synchronised before and after; host_ms: median time until the forward call
  returns, i.e. until the host has enqueued all its work. host_ms close to wall_ms means the device waited for the
  host (host-bound); a host sync inside the forward (`syncs_per_forward`) also ends up in host_ms.
- from one torch.profiler trace of --profile-forwards forwards: device_ms (sum of the kernels' times per forward),
  device_busy = device_ms / wall_ms, kernels_per_forward, aten_ops_per_forward (top-level ATen calls), syncs, the
  host (CPU) time spent inside the FFN modules per forward (ffn_host_ms) and the device time of the kernels they
  launched (ffn_device_ms), the top ops by self CPU time and the top kernels by device time. The profiler adds
  host time of its own: compare host times with host_ms (measured without it).
Also "ffn_host": microseconds per eager call of one FFN module on tiny tensors (H 64, I 256, 32 tokens), where the
device work is negligible so the time per call is the host's: LlamaMLP, the routed mask path and "auto" (the prefill
path; CUDA only: on the CPU there is no Triton launch to time).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import modeling_routed_llama as mrl
from decode import SHAPES, Ran, add_device_args, build_dense, free, llama_config, routed_from_dense, sync

LABELS = ("forward", "ffn")  # record_function ranges of this script, not ops
SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for prefill_profile.json (created)")
    p.add_argument("--shapes", nargs="+", default=["llama7b", "tinyllama"], choices=sorted(SHAPES))
    p.add_argument("--tokens", type=int, default=512, help="prefill tokens (batch 1)")
    p.add_argument("--ratio", type=float, default=0.5, help="k/N of the routed arms")
    p.add_argument("--num-clusters", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3, help="untimed forwards per arm first")
    p.add_argument("--forwards", type=int, default=10, help="timed forwards per arm (medians)")
    p.add_argument("--profile-forwards", type=int, default=3, help="forwards in each arm's profiler trace")
    p.add_argument("--ffn-calls", type=int, default=200, help="calls per FFN module in the ffn_host timing")
    p.add_argument("--top", type=int, default=15, help="ops and kernels listed per arm")
    add_device_args(p)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Timing and profiling one arm
# ---------------------------------------------------------------------------------------------------------------


class FfnRanges:
    """Wraps every decoder layer's FFN forward in a record_function("ffn") range while active."""

    def __init__(self, model):
        self.mlps = [layer.mlp for layer in model.model.layers]

    def __enter__(self):
        for mlp in self.mlps:

            def forward(*a, _orig=mlp.forward, **kw):
                with torch.profiler.record_function("ffn"):
                    return _orig(*a, **kw)

            mlp.forward = forward  # an instance attribute over the method, removed on exit
        return self

    def __exit__(self, *exc):
        for mlp in self.mlps:
            del mlp.forward


def times(model, ids, args) -> tuple[float, float]:
    """(median host ms, median wall ms) per forward."""
    host, wall = [], []
    for _ in range(args.forwards):
        sync(args.device)
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        t1 = time.perf_counter()
        sync(args.device)
        t2 = time.perf_counter()
        host.append((t1 - t0) * 1e3)
        wall.append((t2 - t0) * 1e3)
    return statistics.median(host), statistics.median(wall)


def kernel_us(event) -> float:
    """Device microseconds of the kernels the profiler attributed to this CPU event and its children."""
    own = sum(k.duration for k in getattr(event, "kernels", []))
    return own + sum(kernel_us(c) for c in event.cpu_children)


def profiled(model, ids, args) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = torch.device(args.device).type == "cuda"
    n = args.profile_forwards
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with FfnRanges(model), profile(activities=activities) as prof:
        for _ in range(n):
            with record_function("forward"):
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
        sync(args.device)
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and e.name not in LABELS]
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    top_level_aten = [e for e in cpu if e.name.startswith("aten::")
                      and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]  # fmt: skip
    ffn = [e for e in cpu if e.name == "ffn"]
    by_kernel = {}
    for e in kernels:
        count, us = by_kernel.get(e.name, (0, 0.0))
        by_kernel[e.name] = (count + 1, us + e.time_range.elapsed_us())
    ops = [a for a in prof.key_averages() if a.key not in LABELS and a.self_cpu_time_total > 0]
    ops.sort(key=lambda a: -a.self_cpu_time_total)
    device_us = sum(us for _, us in by_kernel.values())
    return {
        "device_ms": round(device_us / n / 1e3, 3) if cuda else None,
        "kernels_per_forward": round(len(kernels) / n, 1) if cuda else None,
        "aten_ops_per_forward": round(len(top_level_aten) / n, 1),
        "syncs_per_forward": round(sum(e.name in SYNC_NAMES for e in cpu) / n, 1),
        "ffn_host_ms": round(sum(e.cpu_time_total for e in ffn) / n / 1e3, 3),
        "ffn_device_ms": round(sum(kernel_us(e) for e in ffn) / n / 1e3, 3) if cuda else None,
        "top_ops": [{"name": a.key, "calls_per_forward": round(a.count / n, 1),
                     "self_cpu_us_per_forward": round(a.self_cpu_time_total / n, 1)} for a in ops[: args.top]],
        "top_kernels": [{"name": name[:120], "calls_per_forward": round(c / n, 1), "us_per_forward": round(us / n, 1)}
                        for name, (c, us) in sorted(by_kernel.items(), key=lambda kv: -kv[1][1])[: args.top]],
    }  # fmt: skip


@torch.no_grad()
def arm(model, ids, args) -> dict:
    with Ran(model) as ran:  # what the routed layers pick (nothing for the dense model)
        for _ in range(args.warmup):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    host_ms, wall_ms = times(model, ids, args)
    row = {"ran": "+".join(sorted(ran.seen)) or "dense", "host_ms": round(host_ms, 3), "wall_ms": round(wall_ms, 3)}
    row.update(profiled(model, ids, args))
    row["device_busy"] = round(row["device_ms"] / wall_ms, 3) if row["device_ms"] is not None else None
    return row


def model_profile(shape: str, args) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    dense = build_dense(llama_config(shape), device, dtype)
    routed = routed_from_dense(dense, args.num_clusters)
    n = routed.config.num_experts
    k = max(1, round(args.ratio * n))
    routed.model.set_top_k(k)
    ids = torch.randint(0, dense.config.vocab_size, (1, args.tokens), device=device)
    arms = {"dense": arm(dense, ids, args)}
    for impl in ("mask", "auto"):
        routed.config.routing_impl = impl
        arms[impl] = arm(routed, ids, args)
    result = {"model": shape, "tokens": args.tokens, "k_over_n": k / n, "num_clusters": n, "arms": arms}
    del dense, routed
    free(device)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Host time per FFN call on tiny tensors
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def ffn_host(args) -> list[dict]:
    from transformers.models.llama.modeling_llama import LlamaMLP

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfg = mrl.RoutedLlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=32, num_experts=8, num_experts_per_tok=4)  # fmt: skip
    with torch.device(device):
        dense = LlamaMLP(cfg).to(dtype).eval()
        routed = mrl.RoutedLlamaMLP(cfg, 0).to(dtype).eval()
    routed.load_state_dict(dense.state_dict(), strict=False)
    routed.refresh_router()
    x = torch.randn(1, 32, 64, device=device, dtype=dtype)  # (B, T, H): 32 tokens, above TRITON_MAX_TOKENS
    rows = []
    for impl, module in (("dense", dense), ("mask", routed), ("prefill", routed)):
        routed.config.routing_impl = "auto" if impl == "prefill" else impl
        ran = routed.pick_impl(x.reshape(-1, 64)) if module is routed else "dense"
        if impl == "prefill" and ran != "prefill":
            rows.append({"impl": impl, "ran": ran, "us_per_call": None,
                         "skipped": "needs CUDA on a capable device (the Triton launch)"})  # fmt: skip
            continue
        for _ in range(5):  # warm-up: compiles the Triton kernel, fills caches
            module(x)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.ffn_calls):
            module(x)
        sync(device)
        us = (time.perf_counter() - t0) / args.ffn_calls * 1e6
        rows.append({"impl": impl, "ran": ran, "us_per_call": round(us, 1)})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------


def print_tables(doc: dict):
    cols = ("ran", "wall_ms", "host_ms", "device_ms", "device_busy", "kernels_per_forward", "aten_ops_per_forward",
            "syncs_per_forward", "ffn_host_ms", "ffn_device_ms")  # fmt: skip
    for m in doc["models"]:
        name = doc["hardware"]["name"]
        print(f"\n{m['model']}, {m['tokens']} tokens, k/N {m['k_over_n']:.3g}, {doc['dtype']}, {name}")
        print("| arm | " + " | ".join(cols) + " |")
        print("|---" * (len(cols) + 1) + "|")
        for name, a in m["arms"].items():
            print(f"| {name} | " + " | ".join(str(a.get(c)) for c in cols) + " |")
        for name, a in m["arms"].items():
            print(f"\n{m['model']} {name}: top ops by self CPU us per forward")
            for op in a["top_ops"][:10]:
                print(f"  {op['self_cpu_us_per_forward']:>10} us  {op['calls_per_forward']:>7} x  {op['name']}")
            for kern in a["top_kernels"][:10]:
                print(f"  {kern['us_per_forward']:>10} us  {kern['calls_per_forward']:>7} x  [kernel] {kern['name']}")
    print("\nFFN module alone, tiny tensors (host time per call):")
    for r in doc["ffn_host"]:
        skipped = f" ({r['skipped']})" if r.get("skipped") else ""
        print(f"  {r['impl']:8s} ran {r['ran']:8s} {r['us_per_call']} us{skipped}")


def main(argv=None) -> int:
    from routed_llama.hardware import hardware
    from routed_llama.io import command_line, write_json

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "hardware": hardware(args.device),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line(argv),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "prefill_tiles": mrl.PREFILL_TILES,
        "auto_prefill": mrl.AUTO_PREFILL,
        "models": [],
        "ffn_host": ffn_host(args),
    }
    write_json(out / "prefill_profile.json", doc)
    for shape in args.shapes:
        doc["models"].append(model_profile(shape, args))
        write_json(out / "prefill_profile.json", doc)  # a run stopped midway keeps the finished models
    print_tables(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
