"""Print the quickstart's closing summary from what its steps wrote: the fine-tune's dev metric before and after,
seconds per optimizer step, the routing analysis' headline numbers and the wall time of every step.

usage: quickstart_summary.py OUT_DIR   (reads OUT_DIR/finetune/result.json, OUT_DIR/routing/routing.json and
OUT_DIR/times.tsv, the lines "step<TAB>seconds" the quickstart appends)"""

import json
import math
import sys
from pathlib import Path


def finetune_lines(result: dict) -> list[str]:
    cfg, metric = result["config"], result["primary_metric"]
    steps = math.ceil(result["train_examples"] / cfg["batch_size"]) * cfg["epochs"]
    before, after = result["before"][metric], result["final"][metric]
    lines = [
        f"fine-tune      : {result['task']} dev {metric} {before:.1f} -> {after:.1f} ({after - before:+.1f} points; "
        f"{result['eval_examples']} dev examples, {result['train_examples']} train examples x {cfg['epochs']:g} "
        f"epochs, lr {cfg['lr']:g}, LoRA r={cfg['lora_r']})",
        f"training       : {steps:g} steps of {cfg['batch_size']} in {result['train_seconds']:.1f} s = "
        f"{result['train_seconds'] / steps:.2f} s per step, the per-epoch dev evaluations included ({result['hardware']})",
    ]
    off = result.get("final_routing_off")
    if off:
        lines.append(f"routing off    : the same fine-tuned model with k = N scores {off[metric]:.1f}")
    return lines


def routing_lines(routing: dict) -> list[str]:
    entropy = [layer["normalised_entropy"] for layer in routing["layers"].values()]
    lines = [f"routing        : {routing['n_tokens']} tokens of {', '.join(routing['tasks'])}; normalised entropy per "
             f"layer {min(entropy):.3f}-{max(entropy):.3f} (1 = even load)"]  # fmt: skip
    by_task = routing.get("specialisation", {}).get("text", {}).get("by_task")
    if by_task and by_task.get("p_value") is not None:
        lines.append(f"by task        : clusters kept differ between tasks (text tokens: statistic "
                     f"{by_task['observed']:.2f} vs {by_task['null_mean']:.2f} under shuffles, p = {by_task['p_value']:.3g})")  # fmt: skip
    change = routing.get("change")
    if change:
        same = [v for v in change["kept_overlap"].values() if isinstance(v, (int, float))]
        lines.append(f"after LoRA     : {min(same):.0%}-{max(same):.0%} of each token's kept clusters unchanged; "
                     f"load shift {change['tv_total']:.3f} (sign-flip p = {change['p_value']:.3g})")  # fmt: skip
    before = routing.get("specialisation_converted", {}).get("text", {}).get("by_task")
    if by_task and before and before.get("observed"):
        ratio = by_task["observed"] / before["observed"]
        lines.append(f"sharper?       : task statistic {before['observed']:.2f} before fine-tuning, "
                     f"{by_task['observed']:.2f} after ({ratio:.2f}x; not tested)")  # fmt: skip
    return lines


def main():
    out = Path(sys.argv[1])
    lines = finetune_lines(json.loads((out / "finetune" / "result.json").read_text()))
    routing = out / "routing" / "routing.json"
    if routing.is_file():
        lines += routing_lines(json.loads(routing.read_text()))
    times = [line.split("\t") for line in (out / "times.tsv").read_text().splitlines() if line]
    total = sum(float(s) for _, s in times)
    lines.append("wall time      : " + ", ".join(f"{name} {float(s):.0f} s" for name, s in times) + f"; total {total:.0f} s")
    print("\n".join(["", "== quickstart summary", *lines]))


if __name__ == "__main__":
    main()
