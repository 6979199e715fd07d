"""What a LoRA training step keeps for its backward pass: plain vs routed, counted exactly (no GPU needed).

    python benchmarks/saved_activations.py --out results/saved-activations

A random SmolLM2-135M-shaped Llama classifier (30 layers, hidden 576, FFN 1536, 9 heads, 3 KV heads), LoRA r 32 on
q_proj/v_proj with the `score` head trained (the recipe of the fast engine), one forward of 16 x 64 tokens under
bf16 autocast on the CPU, in train mode. Every tensor that autograd saves for the backward pass is counted once (by
storage, shape and dtype) through `torch.autograd.graph.saved_tensors_hooks`: this is the memory a step holds between
its forward and its backward, the same on any device. It is not the peak: transient tensors of the forward and the
backward and the allocator's caching are not in it. Arms: plain, routed last 8 of 30 layers, routed all 30 (N 32,
k 16, k-means, centroid router). Also the peak: the most bytes live at once during one training step (forward,
cross-entropy, backward) above what was live before it, from the allocation and free events of `torch.profiler`
with `profile_memory` (CPU allocator; eager, so without CUDA graphs or a caching allocator's reserve). Writes
saved_activations.json.
"""

from __future__ import annotations

import argparse
import collections
import copy
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from routed_llama.hardware import hardware_name
from routed_llama.io import command_line, write_json

from train_probe import SHAPE  # the SmolLM2-135M shape; benchmarks/ is this script's folder

from finetune.config import RunConfig
from finetune.train import lora_config


def peft_classifier(model):
    from peft import get_peft_model

    return get_peft_model(model, lora_config(RunConfig()))  # the harness's default recipe: r 32, q/v, head


def saved_bytes(model, ids: torch.Tensor) -> tuple[int, dict]:
    """(bytes autograd saves for one forward, the largest entries by (shape, dtype)). Every saved tensor is held until
    the count ends: a branch of the graph that dies early (the router's scores -> top-k) would otherwise free memory
    that a later tensor reuses, and the same address would be counted once for two tensors (run-to-run differences
    of up to 0.4% before). So this also counts such short-lived saves, a small upper bound."""
    seen, held, by_kind = set(), [], collections.Counter()

    def pack(t: torch.Tensor):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        held.append(t)
        if t.numel() and key not in seen:
            seen.add(key)
            by_kind[f"{tuple(t.shape)} {t.dtype}".replace("torch.", "")] += t.numel() * t.element_size()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return sum(by_kind.values()), dict(by_kind.most_common(8))


def peak_bytes(model, ids: torch.Tensor) -> int:
    """Most bytes live at once during one training step, counted from the step's own allocations and frees."""
    from torch.profiler import ProfilerActivity, profile

    model.train()
    labels = torch.zeros(ids.shape[0], dtype=torch.long)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
    # "[memory]" events carry +bytes per allocation and -bytes per free, in time order
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def main(argv: list[str] | None = None) -> int:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from routed_llama.surgery import RoutingSpec, route_dense_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=64)
    args = p.parse_args(argv)
    if args.batch < 1 or args.length < 1:
        print("saved_activations: error: --batch and --length must be >= 1", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    dense = LlamaForSequenceClassification(LlamaConfig(**SHAPE, num_labels=2))
    ids = torch.randint(3, SHAPE["vocab_size"], (args.batch, args.length))
    arms = {"plain": lambda: copy.deepcopy(dense)}  # PEFT wraps in place: the routed arms need `dense` untouched
    for name, layers in (("routed-last8", tuple(range(22, 30))), ("routed-all30", tuple(range(30)))):
        spec = RoutingSpec(layers=layers, num_clusters=32, top_k=16, head="sequence-classification")
        arms[name] = lambda spec=spec: route_dense_model(dense, spec, progress=False)[0]
    rows = []
    for name, build in arms.items():
        model = peft_classifier(build())  # the forward of saved_bytes frees its graph: the same model serves both
        total, top = saved_bytes(model, ids)
        peak = peak_bytes(model, ids)
        rows.append({"arm": name, "saved_bytes": total, "largest": top, "peak_step_bytes": peak})
        print(name, total, peak, flush=True)
    for r in rows:
        r["vs_plain"] = round(r["saved_bytes"] / rows[0]["saved_bytes"], 4)
        r["peak_vs_plain"] = round(r["peak_step_bytes"] / rows[0]["peak_step_bytes"], 4)
    record = {"hardware": hardware_name(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": command_line(argv, "python benchmarks/saved_activations.py"),
              "batch": args.batch, "length": args.length, "rows": rows}  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out) / "saved_activations.json", record, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
