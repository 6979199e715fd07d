"""The reference engine: `transformers.Trainer` + PEFT, unchanged from the committed runs. It is also the multi-GPU
path: under `torchrun` / `accelerate launch` it trains data-parallel (the batch size is per device)."""

from __future__ import annotations

import math
import tempfile
import time

import numpy as np
import torch

from . import tasks
from .config import BF16_AUTOCAST


def _sequential_eval_trainer():
    from torch.utils.data import SequentialSampler
    from transformers import Trainer

    class SequentialEvalTrainer(Trainer):
        """Evaluates in dataset order: with `train_sampling_strategy="group_by_length"` transformers 5 also
        shuffles evaluation batches, which would misalign the per-example predictions we record. Under torchrun
        accelerate shards the sequential batches and `gather_for_metrics` restores their order."""

        def _get_eval_sampler(self, eval_dataset):
            return SequentialSampler(eval_dataset)

    return SequentialEvalTrainer


def strip_metrics(metrics: dict) -> dict:
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


def training_arguments(cfg, scratch: str, precision: str):
    from transformers import TrainingArguments

    return TrainingArguments(
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
        bf16=precision in BF16_AUTOCAST,  # bf16-base: the base was stored in bf16 when the run was prepared
        fp16=precision == "fp16",
        train_sampling_strategy="group_by_length",
        logging_nan_inf_filter=False,  # it syncs with the device every step
        disable_tqdm=True,
        dataloader_num_workers=cfg.num_workers,
        use_cpu=not torch.cuda.is_available(),
        label_names=["labels"],
        # the classification loss is a batch mean: multiplying it by the world size (meant for token-summed LM
        # losses) would double the eval loss and the clipped gradients under torchrun
        average_tokens_across_devices=False,
        # every trainable tensor (LoRA, head) takes part in every forward; the default (True for PEFT models) costs
        # an extra traversal of the autograd graph per step, which DDP warned about on 2 H200s (2026-11-29)
        ddp_find_unused_parameters=False,
    )


def fit_trainer(s, cfg, task: tasks.Task, precision: str) -> dict:
    """Train `s.model` with Trainer; the outcome has the fast engine's keys (predictions in evaluation order)."""
    from transformers import DataCollatorWithPadding, PrinterCallback, TrainerCallback

    stash, per_epoch = {}, []

    def metrics_fn(pred):
        preds = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        stash["predictions"] = np.asarray(preds).reshape(-1)
        return tasks.compute_metrics(task, stash["predictions"], pred.label_ids.reshape(-1))

    def argmax_on_device(logits, _labels):  # ship (B,) ids, not (B, L) logits, to the host
        logits = logits[0] if isinstance(logits, tuple) else logits
        return logits.squeeze(-1) if task.is_regression else logits.argmax(-1)

    class EpochMetrics(TrainerCallback):
        recording = True  # off once training ends, so the routing-off evaluation is not taken for an epoch

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if self.recording and state.epoch is not None and state.global_step > 0:
                per_epoch.append({"epoch": round(state.epoch, 4), **strip_metrics(metrics)})

    with tempfile.TemporaryDirectory() as scratch:
        trainer = _sequential_eval_trainer()(
            model=s.model,
            args=training_arguments(cfg, scratch, precision),
            train_dataset=s.train_ds,
            eval_dataset=s.eval_ds,
            data_collator=DataCollatorWithPadding(s.tokenizer, pad_to_multiple_of=8),
            compute_metrics=metrics_fn,
            preprocess_logits_for_metrics=argmax_on_device,
            callbacks=[epoch_metrics := EpochMetrics()],
        )
        trainer.remove_callback(PrinterCallback)  # the harness prints one line per run instead
        before = strip_metrics(trainer.evaluate())
        # evaluating first marks the model as prepared (for evaluation), and train() would then skip wrapping it in
        # DistributedDataParallel: every rank would train alone on its shard
        if getattr(trainer.model, "_is_accelerate_prepared", False):
            del trainer.model._is_accelerate_prepared
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        trainer.train()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        train_seconds = time.perf_counter() - t0
        epoch_metrics.recording = False
        if not per_epoch:
            raise RuntimeError("no evaluation ran during training")
        outcome = {"before": before, "per_epoch": per_epoch, "predictions": stash["predictions"],
                   "train_seconds": train_seconds, "routing_off": None}  # fmt: skip
        if s.routed and cfg.eval_routing_off:
            with s.routing_off():
                outcome["routing_off"] = strip_metrics(trainer.evaluate())
    return outcome
