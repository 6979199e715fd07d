"""How far the fast engine's `--compile` moves a classifier's outputs from eager, with routing on and off.

    python benchmarks/compile_drift.py --model STANDIN --model ROUTED_CKPT --data-dir GLUE --task rte \
        --out results/compile-drift

Why: a compiled step fuses elementwise kernels, so it rounds differently from eager. A routed layer keeps the top k
of N cluster scores; where the k-th and (k+1)-th scores (nearly) tie, a rounding difference in the layer's input
flips which cluster is kept, so routed models may drift further from eager than plain ones under the same change.

For each model: the sequence classifier as the harness loads it (head drawn from --seed, no adapter), the first
--examples dev examples in batches of --batch, bf16 autocast as in training; logits eager, then with every decoder
layer compiled as the engine compiles them (`finetune.fast.compile_layers`); for a routed model also with routing off
(k = N). As a control for the model's own sensitivity, eager against eager with the first layer's input perturbed
by relative Gaussian noise of --perturb (bf16's unit roundoff is 2^-9 = 0.002). Rows {model, routing, change
("compile" or "perturb"), max_abs_diff, mean_abs_diff, argmax_agreement}; per routed layer, the share of tokens
whose k-th and (k+1)-th scores are exactly equal under autocast (`ties`). Writes compile_drift.json and
compile_drift.png (mean |logit difference| per model and routing) to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from routed_llama.hardware import hardware_name
from routed_llama.io import command_line, write_json

from finetune import data, fast, models, tasks


def logits(model, batches, device) -> torch.Tensor:
    out = []
    with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        for b in batches:
            lg = model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device), use_cache=False)
            out.append(lg.logits.float()[: b.n_real].cpu())
    return torch.cat(out)  # (examples, labels)


def diff_row(name: str, routing: str | None, change: str, eager: torch.Tensor, other: torch.Tensor) -> dict:
    d = (eager - other).abs()
    agree = (eager.argmax(-1) == other.argmax(-1)).float().mean().item()
    return {"model": name, "routing": routing, "change": change, "max_abs_diff": round(d.max().item(), 5),
            "mean_abs_diff": round(d.mean().item(), 6), "argmax_agreement": round(agree, 4)}  # fmt: skip


def perturbed(model, batches, device, eps: float, seed: int) -> torch.Tensor:
    """Eager logits with the first decoder layer's input times (1 + eps * N(0, 1)), elementwise (seeded)."""
    g = torch.Generator().manual_seed(seed)

    def hook(mod, args):
        x = args[0]
        noise = torch.randn(x.shape, generator=g).to(x.device, x.dtype)
        return (x * (1 + eps * noise), *args[1:])

    handle = model.model.layers[0].register_forward_pre_hook(hook)
    try:
        return logits(model, batches, device)
    finally:
        handle.remove()


@contextlib.contextmanager
def router_inputs(model):
    """Collect what each routed layer's FFN gets while the block runs: {layer: [(tokens, H), ...]}."""
    inputs, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "router"):
            hooks.append(layer.mlp.register_forward_pre_hook(
                lambda mod, args, i=i: inputs.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1]))))  # fmt: skip
    try:
        yield inputs
    finally:
        for h in hooks:
            h.remove()


def tie_shares(model, inputs: dict, device) -> dict:
    """Per routed layer: share of (real and padding) tokens whose k-th and (k+1)-th autocast scores are equal."""
    out = {}
    for i, xs in sorted(inputs.items()):
        router = model.model.layers[i].mlp.router
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            s = router.scores(torch.cat(xs)).float()  # (tokens, N)
        top = s.topk(router.top_k + 1, dim=-1).values  # (tokens, k + 1)
        out[str(i)] = round((top[:, -2] == top[:, -1]).float().mean().item(), 5)
    return out


def measure(ref: str, args, device) -> tuple[list[dict], dict | None]:
    task = tasks.get_task(args.task)
    tokenizer = models.load_tokenizer(ref)
    model = models.load_classifier(ref, task.num_labels, tokenizer)
    models.init_score(model, args.seed)
    model.to(device).eval()
    rows = tasks.load_split(task, "validation", args.data_dir)[: args.examples]
    items = data.encode(task, rows, tokenizer, args.max_length).items
    batches = [data.collate(items, np.arange(i, min(i + args.batch, len(items))), args.batch, [args.max_length],
                            tokenizer.pad_token_id, task.is_regression) for i in range(0, len(items), args.batch)]  # fmt: skip
    routed = model.config.model_type == "routed_llama"
    settings = [("on", None), ("off", model.config.num_experts)] if routed else [(None, None)]
    eager, out, ties = {}, [], None
    for name, k in settings:
        with models.top_k(model, k), router_inputs(model) as inputs:
            eager[name] = logits(model, batches, device)
        if name == "on":  # the routed layers' inputs of this eager pass, at the model's own k
            ties = tie_shares(model, inputs, device)
        with models.top_k(model, k):
            out.append(diff_row(ref, name, "perturb", eager[name], perturbed(model, batches, device, args.perturb, 0)))
        print(out[-1], flush=True)
    layers = fast.compile_layers(model)
    for name, k in settings:
        with models.top_k(model, k):
            out.append(diff_row(ref, name, "compile", eager[name], logits(model, batches, device)))
        print(out[-1], flush=True)
    fast.uncompile_layers(layers)
    return out, ties


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="a base or routed checkpoint (repeatable)")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--task", default="rte")
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="the head's seed")
    p.add_argument("--perturb", type=float, default=1e-3, help="relative noise of the control row")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.examples < 1 or args.batch < 1:
        print("compile_drift: error: --examples and --batch must be >= 1", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    rows, ties = [], {}
    for ref in args.model:
        r, t = measure(ref, args, device)
        rows += r
        if t is not None:
            ties[ref] = t
    record = {"hardware": hardware_name(args.device), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": command_line(argv, "python benchmarks/compile_drift.py"), "task": args.task,
              "examples": args.examples, "perturb": args.perturb, "rows": rows, "ties": ties}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compile_drift.json", record, indent=1)
    plot(rows, out / "compile_drift.png")
    return 0


def plot(rows: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [Path(r["model"]).name + ("" if r["routing"] is None else f", routing {r['routing']}") + f": {r['change']}"
              for r in rows]  # fmt: skip
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(rows)))
    ax.barh(labels, [r["mean_abs_diff"] for r in rows])
    ax.set_xlabel("mean |logit difference| from eager (bf16 autocast)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
