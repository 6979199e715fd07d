"""One LoRA fine-tune of one arm on one GLUE task, with transformers `Trainer` and PEFT.

The same function serves both arms: the plain arm loads the stock model, the routed arm a converted checkpoint.
Everything that could differ between arms (head init, LoRA init, data order, batching) is a function of the seed
alone, so that seed s of one arm is paired with seed s of the other.

Because it is a plain `Trainer`, a run goes multi-GPU with no code change: `accelerate launch -m finetune run ...`
or `torchrun --nproc-per-node 8 -m finetune run ...` (data parallel; the batch size is per device).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import tempfile
import time

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from . import adapters, models, tasks
from .config import RunConfig


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def encode(task: tasks.Task, rows: list[tasks.Example], tokenizer, max_length: int) -> ListDataset:
    texts = [tasks.format_example(task, r) for r in rows]
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    items = []
    for i, r in enumerate(rows):
        label = float(r.label) if task.is_regression else int(r.label)
        items.append({"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": label})
    return ListDataset(items)


def by_length(ds: ListDataset) -> tuple[ListDataset, np.ndarray]:
    """(the items sorted longest first, order) so that evaluation batches carry little padding; item j of the
    sorted set is row order[j] of the original."""
    order = np.argsort([-len(it["input_ids"]) for it in ds.items], kind="stable")
    return ListDataset([ds.items[i] for i in order]), order


def _sequential_eval_trainer():
    from torch.utils.data import SequentialSampler
    from transformers import Trainer

    class SequentialEvalTrainer(Trainer):
        """Evaluates in dataset order: with `train_sampling_strategy="group_by_length"` transformers 5 also
        shuffles evaluation batches, which would misalign the per-example predictions we record."""

        def _get_eval_sampler(self, eval_dataset):
            if eval_dataset is not None and self.args.world_size <= 1:
                return SequentialSampler(eval_dataset)
            return super()._get_eval_sampler(eval_dataset)

    return SequentialEvalTrainer


def split_rows(cfg: RunConfig, task: tasks.Task):
    """(train rows, evaluation rows): dev for real runs, a seeded held-out slice of train for lr selection."""
    train = tasks.load_split(task, "train", cfg.data_dir, cfg.max_train_samples, seed=0)  # same subset for every seed
    if cfg.holdout_fraction is None:
        dev = tasks.load_split(task, "validation", cfg.data_dir, cfg.max_eval_samples, seed=0)
        return train, dev
    order = np.random.default_rng(12345).permutation(len(train))  # fixed: every arm and lr sees the same slice
    n_hold = max(1, int(round(cfg.holdout_fraction * len(train))))
    hold = set(order[:n_hold].tolist())
    return [r for i, r in enumerate(train) if i not in hold], [r for i, r in enumerate(train) if i in hold]


def _precision(cfg: RunConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def _predictions(task: tasks.Task, preds) -> np.ndarray:
    """Predicted classes (or scores) from what `argmax_on_device` left: one value per example."""
    preds = preds[0] if isinstance(preds, tuple) else preds
    return np.asarray(preds).reshape(-1)


def run_one(cfg: RunConfig | dict) -> dict:
    """Fine-tune one arm with one seed; return everything the comparison needs (see the module docstring)."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import DataCollatorWithPadding, PrinterCallback, TrainerCallback, TrainingArguments, set_seed

    if isinstance(cfg, dict):
        cfg = RunConfig(**cfg)
    cfg.validate()
    task = tasks.get_task(cfg.task)
    t_start = time.perf_counter()
    train_rows, eval_rows = split_rows(cfg, task)

    tokenizer = models.load_tokenizer(cfg.model)
    model = models.load_classifier(cfg.model, task.num_labels, tokenizer, routing_impl=cfg.routing_impl)
    if model.config.num_labels != task.num_labels:
        raise tasks.TaskError(f"{cfg.model} has {model.config.num_labels} labels, {task.name} needs {task.num_labels}")
    routed = model.config.model_type == "routed_llama"
    fingerprint = models.base_fingerprint(model)
    models.init_score(model, cfg.seed)
    set_seed(cfg.seed)  # LoRA A matrices are drawn here: same seed, same init in both arms
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        modules_to_save=list(cfg.modules_to_save),
        bias="none",
    )
    model = get_peft_model(model, lora)

    train_ds = encode(task, train_rows, tokenizer, cfg.max_length)
    eval_ds, eval_order = by_length(encode(task, eval_rows, tokenizer, cfg.max_length))
    labels = np.array([it["labels"] for it in eval_ds.items])  # in evaluation (length) order
    stash = {}

    def metrics_fn(pred):
        preds = _predictions(task, pred.predictions)
        stash["predictions"] = preds
        return tasks.compute_metrics(task, preds, pred.label_ids.reshape(-1))

    def argmax_on_device(logits, _labels):  # ship (B,) ids, not (B, L) logits, to the host
        logits = logits[0] if isinstance(logits, tuple) else logits
        return logits.squeeze(-1) if task.is_regression else logits.argmax(-1)

    precision = _precision(cfg)
    per_epoch: list[dict] = []
    _SequentialEvalTrainer = _sequential_eval_trainer()

    class EpochMetrics(TrainerCallback):
        recording = True  # off once training ends, so the routing-off evaluation is not taken for an epoch

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if self.recording and state.epoch is not None and state.global_step > 0:
                per_epoch.append({"epoch": round(state.epoch, 4), **_strip(metrics)})

    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=cfg.eval_batch_size,
            learning_rate=cfg.lr,
            num_train_epochs=cfg.epochs,
            warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
            lr_scheduler_type="linear",
            weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm,
            eval_strategy="epoch",
            save_strategy="no",
            logging_strategy="epoch",
            report_to="none",
            seed=cfg.seed,
            data_seed=cfg.seed,
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            train_sampling_strategy="group_by_length",
            logging_nan_inf_filter=False,  # it syncs with the device every step
            disable_tqdm=True,
            dataloader_num_workers=cfg.num_workers,
            use_cpu=not torch.cuda.is_available(),
            label_names=["labels"],
        )
        trainer = _SequentialEvalTrainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8),
            compute_metrics=metrics_fn,
            preprocess_logits_for_metrics=argmax_on_device,
            callbacks=[epoch_metrics := EpochMetrics()],
        )
        trainer.remove_callback(PrinterCallback)  # the harness prints one line per run instead
        before = _strip(trainer.evaluate())
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        trainer.train()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        train_seconds = time.perf_counter() - t0
        epoch_metrics.recording = False
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        if not per_epoch:
            raise RuntimeError("no evaluation ran during training")
        final = {k: v for k, v in per_epoch[-1].items() if k != "epoch"}
        predictions = stash["predictions"]
        predictions[eval_order], labels[eval_order] = predictions.copy(), labels.copy()  # back to file order
        routing_off = None
        if routed and cfg.eval_routing_off:
            base = model.get_base_model()
            k = base.config.num_experts_per_tok
            base.model.set_top_k(base.config.num_experts)
            routing_off = _strip(trainer.evaluate())
            base.model.set_top_k(k)

    train_tokens = sum(len(it["input_ids"]) for it in train_ds.items) * cfg.epochs
    result = {
        "arm": cfg.arm,
        "seed": cfg.seed,
        "lr": cfg.lr,
        "task": task.name,
        "model": cfg.model,
        "routed": routed,
        "primary_metric": task.primary,
        "before": before,
        "per_epoch": per_epoch,
        "final": final,
        "final_routing_off": routing_off,
        "predictions": predictions.tolist(),
        "labels": labels.tolist(),
        "correct": None if task.is_regression else (predictions == labels).astype(int).tolist(),
        "train_examples": len(train_ds),
        "eval_examples": len(eval_ds),
        "train_seconds": round(train_seconds, 3),
        "run_seconds": round(time.perf_counter() - t_start, 3),
        "train_tokens": int(train_tokens),
        "train_tokens_per_s": round(train_tokens / train_seconds, 1),
        "peak_gpu_mem_bytes": peak,
        "precision": precision,
        "hardware": hardware(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "base_fingerprint": fingerprint,
        "config": dataclasses.asdict(cfg),
    }
    if cfg.output_dir is not None:
        out = Path(cfg.output_dir)
        adapters.save_adapter(
            model,
            out / "adapter",
            {
                "base": cfg.model,
                "base_fingerprint": fingerprint,
                "task": task.name,
                "num_labels": task.num_labels,
                "arm": cfg.arm,
                "seed": cfg.seed,
                "max_length": cfg.max_length,
                "final": final,
            },
        )
        (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _strip(metrics: dict) -> dict:
    """Trainer's eval dict without the `eval_` prefix and without the timing fields."""
    skip = ("runtime", "samples_per_second", "steps_per_second", "epoch", "loss", "model_preparation_time")
    out = {}
    for k, v in (metrics or {}).items():
        name = k[5:] if k.startswith("eval_") else k
        if name not in skip and isinstance(v, (int, float)) and math.isfinite(v):
            out[name] = v
    if "eval_loss" in (metrics or {}):
        out["loss"] = metrics["eval_loss"]
    return out


@torch.no_grad()
def evaluate_adapter(adapter_dir: str, data_dir: str | None = None, max_eval_samples: int | None = None,
                     top_k: int | None = None, batch_size: int = 32, device: str | None = None,
                     precision: str = "auto") -> dict:  # fmt: skip
    """Score a saved adapter on its task's dev set, batching and casting as the Trainer's evaluation does
    (sequential batches padded to a multiple of 8; bf16 autocast where training used it)."""
    from transformers import DataCollatorWithPadding

    model, tokenizer, info = adapters.load_finetuned(adapter_dir, top_k=top_k)
    task = tasks.get_task(info["task"])
    rows = tasks.load_split(task, "validation", data_dir, max_eval_samples, seed=0)
    ds, order = by_length(encode(task, rows, tokenizer, info.get("max_length", 256)))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
    amp = precision if precision != "auto" else ("bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32")
    preds = []
    for start in range(0, len(ds), batch_size):
        batch = collate([{k: v for k, v in it.items() if k != "labels"} for it in ds.items[start : start + batch_size]])
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=amp == "bf16"):
            logits = model(**batch).logits  # (B, L)
        preds.append(logits.squeeze(-1).float().cpu().numpy() if task.is_regression else logits.argmax(-1).cpu().numpy())
    predictions, labels = np.empty(len(ds)), np.empty(len(ds))
    predictions[order] = np.concatenate(preds)
    labels[order] = [it["labels"] for it in ds.items]
    if not task.is_regression:
        predictions, labels = predictions.astype(int), labels.astype(int)
    return {"task": task.name, "metrics": tasks.compute_metrics(task, predictions, labels),
            "predictions": predictions.tolist(), "info": info}  # fmt: skip
