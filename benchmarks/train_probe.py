"""The fast engine on random weights, no data or tokenizer needed: one epoch eager vs one CUDA graph per step, and
K runs packed into one model (finetune/packed.py). Needs a CUDA device.

    python benchmarks/train_probe.py --out results/train-probe

The model is a random SmolLM2-135M-shaped LlamaForSequenceClassification (30 layers, hidden 576, FFN 1536, 9 heads,
3 KV heads) with LoRA r 32 on q_proj/v_proj; the data are 2,490 random examples whose lengths follow a log-normal
around 60 tokens (RTE-like), batch 16, bf16 autocast. Writes probe.json:
- "epoch": per mode (eager, graphs), the seconds of one epoch with its evaluation and the mean training loss;
- "packed": per bucket set and K, milliseconds per training step per run with K runs packed (one graph per step),
  the padded tokens per packed step and the peak GPU memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from routed_llama.hardware import hardware_name
from routed_llama.io import command_line, write_json

from finetune import fast, tasks
from finetune.config import RunConfig

SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=2)  # fmt: skip


def examples(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(60), 0.5, size=n).astype(int), 10, 256)
    return [{"input_ids": rng.integers(3, SHAPE["vocab_size"], size=int(n_)).tolist(), "attention_mask": [1] * int(n_),
             "labels": int(rng.integers(0, 2))} for n_ in lengths]  # fmt: skip


def engine(k: int, buckets: list[int]) -> tuple[fast.FastEngine, list[RunConfig]]:
    """K runs (seeds 0..K-1: own head and LoRA init) of one random base; K > 1 packed into one model."""
    import copy

    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from finetune import packed
    from finetune.train import lora_config

    torch.manual_seed(0)
    base = LlamaForSequenceClassification(LlamaConfig(**SHAPE, num_labels=2))
    cfgs, models = [], []
    for seed in range(k):
        torch.manual_seed(seed)
        cfgs.append(RunConfig(task="rte", lr=5e-4, epochs=1, batch_size=16, seed=seed, buckets=buckets))
        models.append(get_peft_model(copy.deepcopy(base), lora_config(cfgs[-1])))
    model = models[0] if k == 1 else packed.Pack(models).model
    e = fast.FastEngine(model.cuda(), cfgs[0], tasks.get_task("rte"), SHAPE["pad_token_id"], "bf16",
                        torch.device("cuda"), k)  # fmt: skip
    return e, cfgs


def one_epoch(mode: str, train: list[dict], dev: list[dict]) -> dict:
    e, cfgs = engine(1, [64, 128, 256])
    e.graphs = mode == "graphs"
    labels = np.array([it["labels"] for it in dev])
    out = fast.fit(e, cfgs, train, dev, lambda p: tasks.compute_metrics(e.task, p, labels))[0]
    return {"mode": mode, "train_seconds": round(out["train_seconds"], 3), "train_loss": out["train_loss"]}


def packed_steps(k: int, buckets: list[int], train: list[dict], steps: int) -> dict:
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    e, cfgs = engine(k, buckets)
    batches = fast.packed_batches(cfgs, train, e.pad_id, False, pin=True)[0]
    e.prepare_training([batches])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        e.set_lr(1e-4)
        e.train_step(batches[i])
    torch.cuda.synchronize()
    ms = 1e3 * (time.perf_counter() - t0) / steps / k
    rows = sum(b.input_ids.numel() for b in batches[:steps]) / steps
    return {"k": k, "buckets": buckets, "ms_per_step_per_run": round(ms, 3), "tokens_per_packed_step": round(rows, 1),
            "peak_gpu_mem_bytes": torch.cuda.max_memory_allocated()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/train-probe")
    p.add_argument("--k", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("train_probe: error: needs a CUDA device", file=sys.stderr)
        return 2
    train, dev = examples(2490, 0), sorted(examples(277, 1), key=lambda it: -len(it["input_ids"]))
    record = {"hardware": hardware_name(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": command_line(argv, "python benchmarks/train_probe.py"),
              "epoch": [one_epoch(m, train, dev) for m in ("graphs", "eager")],
              "packed": [packed_steps(k, b, train, args.steps) for b in ([64, 128, 256],
                         [32, 48, 64, 96, 128, 192, 256]) for k in args.k]}  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out) / "probe.json", record, indent=1)
    print(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
