"""Scoring a saved adapter on its task's dev set: `python -m finetune evaluate ADAPTER`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from . import adapters, data, tasks
from .config import resolve_precision

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class EvaluateSettings:
    """Settings of `finetune evaluate`; checked when made."""

    adapter: str = field(metadata={"positional": True, "help": "an adapter folder (a run's OUTPUT_DIR/adapter)"})
    data_dir: str | None = field(default=None, metadata={"help": "local GLUE folder (RTE/dev.tsv, ...); default: the Hub"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "score a seeded subset of dev"})
    top_k: int | None = field(default=None, metadata={"help": "override k of a routed base (k = N: routing off)"})
    batch_size: int = 32
    device: str | None = field(default=None, metadata={"help": "torch device; default: cuda if there is one, else cpu"})
    precision: str = field(default="auto", metadata={"help": "auto: bf16 autocast on a GPU that has it, else fp32"})

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_eval_samples is not None and self.max_eval_samples < 1:
            raise ValueError(f"max_eval_samples must be >= 1, got {self.max_eval_samples}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


def _autocast_dtype(precision: str, device: str) -> torch.dtype | None:
    """bf16 where asked for (or, with "auto", on a GPU that has it); None: plain fp32."""
    return torch.bfloat16 if resolve_precision(precision, device) == "bf16" else None


@torch.no_grad()
def evaluate_adapter(settings: EvaluateSettings) -> dict:
    """{task, metrics, predictions (file order), info}: the adapter over its base, scored on dev with sequential
    batches padded to a multiple of 8, as the Trainer's evaluation batches them (bf16 autocast where asked)."""
    from transformers import DataCollatorWithPadding

    s = settings
    info = adapters.read_info(s.adapter)
    task = tasks.get_task(info.get("task", ""))
    rows = tasks.load_split(task, "validation", s.data_dir, s.max_eval_samples, seed=0)  # bad data: before the model
    model, tokenizer, info = adapters.load_finetuned(s.adapter, top_k=s.top_k)
    ds, order = data.by_length(data.encode(task, rows, tokenizer, info.get("max_length", 256)))
    device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
    amp = _autocast_dtype(s.precision, device)
    preds = []
    for start in range(0, len(ds), s.batch_size):
        batch = collate([{k: v for k, v in it.items() if k != "labels"} for it in ds.items[start : start + s.batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device_type=device.split(":")[0], dtype=amp or torch.bfloat16, enabled=amp is not None):
            logits = model(**batch).logits  # (B, num_labels)
        preds.append(logits.squeeze(-1).float().cpu().numpy() if task.is_regression else logits.argmax(-1).cpu().numpy())
    predictions, labels = np.empty(len(ds)), np.empty(len(ds))
    predictions[order] = np.concatenate(preds)  # back to file order
    labels[order] = [it["labels"] for it in ds.items]
    if not task.is_regression:
        predictions, labels = predictions.astype(int), labels.astype(int)
    return {"task": task.name, "metrics": tasks.compute_metrics(task, predictions, labels),
            "predictions": predictions.tolist(), "info": info}  # fmt: skip
