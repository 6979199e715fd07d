"""One LoRA fine-tune of one arm on one GLUE task.

The same function serves both arms: the plain arm loads the stock model, the routed arm a converted checkpoint.
Everything that could differ between arms (head init, LoRA init, data order, batching) is a function of the seed
alone, so that seed s of one arm is paired with seed s of the other.

Two engines train the PEFT model: "fast" (finetune/fast.py: static shapes, one CUDA graph per training step on a
GPU) and "trainer" (finetune/hf_trainer.py: `transformers.Trainer`, the reference and the multi-GPU path:
`torchrun --nproc-per-node 8 -m finetune run --engine trainer ...`; the batch size is per device).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from routed_llama.hardware import hardware_name
from routed_llama.io import write_json

from . import adapters, data, models, tasks
from .config import RunConfig, resolve_precision


def distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Rank 0 of a torchrun/accelerate launch, or a plain process: the only one that writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def engine_of(cfg: RunConfig) -> str:
    if cfg.engine != "auto":
        if cfg.engine == "fast" and distributed():
            raise ValueError("the fast engine runs on one device; use --engine trainer under torchrun/accelerate")
        return cfg.engine
    return "trainer" if distributed() else "fast"


@dataclass
class Setup:
    """Everything a run trains on: the PEFT model, its tokenizer and the encoded splits."""

    model: object
    tokenizer: object
    train_ds: data.ListDataset
    eval_ds: data.ListDataset  # sorted longest first
    eval_order: np.ndarray  # eval_ds item j is evaluation row eval_order[j]
    routed: bool
    fingerprint: str

    @contextlib.contextmanager
    def routing_off(self):
        """k = N for the duration: the routed model computes every cluster (its dense equivalent)."""
        with models.top_k(self.model, self.model.get_base_model().config.num_experts):
            yield


def prepare_group(cfgs: list[RunConfig], task: tasks.Task) -> list[Setup]:
    """Runs of one model and recipe (`check_group`): the base is loaded (fp32, CPU) and the splits encoded once;
    each run gets its own copy of the model, seeded head and LoRA init, wrapped with PEFT, as if prepared alone. The
    copies share the base's weight and buffer tensors (all but the head's, which each run re-initialises): runs
    trained together never change them (PEFT freezes them; a pack trains on run 0's), so K copies of a 135M-parameter
    base would only cost K times its memory and copying time. With precision "bf16-base" the frozen base is then
    stored in bf16 (packing keeps run 0's base as the packed model's and stacks the fp32 trainable tensors; the
    Trainer trains the model as it is)."""
    import copy

    from peft import get_peft_model
    from transformers import set_seed

    cfg0 = cfgs[0]
    train_rows, eval_rows = data.split_rows(cfg0, task)
    tokenizer = models.load_tokenizer(cfg0.model)
    base = models.load_classifier(cfg0.model, task.num_labels, tokenizer, routing_impl=cfg0.routing_impl)
    if base.config.num_labels != task.num_labels:
        raise tasks.TaskError(f"{cfg0.model} has {base.config.num_labels} labels, {task.name} needs {task.num_labels}")
    routed = base.config.model_type == "routed_llama"
    fingerprint = models.base_fingerprint(base)
    train_ds = data.encode(task, train_rows, tokenizer, cfg0.max_length)
    eval_ds, eval_order = data.by_length(data.encode(task, eval_rows, tokenizer, cfg0.max_length))
    head = {id(p) for p in base.score.parameters()}
    shared = {id(t): t for t in [*base.parameters(), *base.buffers()] if id(t) not in head}
    setups = []
    for i, cfg in enumerate(cfgs):
        model = base if i == len(cfgs) - 1 else copy.deepcopy(base, memo=dict(shared))
        models.init_score(model, cfg.seed)
        set_seed(cfg.seed)  # LoRA A matrices are drawn here: same seed, same init in both arms
        model = get_peft_model(model, lora_config(cfg))
        setups.append(Setup(model, tokenizer, train_ds, eval_ds, eval_order, routed, fingerprint))
    if cfg0.precision == "bf16-base":  # once all are wrapped: requires_grad now tells the frozen base from what
        for s in setups:  # trains, and no run's LoRA was created over an already-cast (shared) base layer
            models.cast_frozen(s.model, torch.bfloat16)
    return setups


def lora_config(cfg: RunConfig):
    """PEFT's LoraConfig for the recipe in `cfg` (a sequence classifier: the head is trained in full)."""
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, target_modules=list(cfg.lora_targets),
                      modules_to_save=list(cfg.modules_to_save), bias="none")  # fmt: skip


# what runs trained together (one packed model: one base, one recipe, one lr) may differ in
GROUP_FIELDS_FREE = ("seed", "arm", "output_dir")


def check_group(cfgs: list[RunConfig]):
    """Runs trained together share the model, task, data, recipe and lr; only these may differ: seed, arm (a
    name), output_dir."""
    first = dataclasses.asdict(cfgs[0])
    for c in cfgs[1:]:
        other = dataclasses.asdict(c)
        diff = [k for k in first if k not in GROUP_FIELDS_FREE and first[k] != other[k]]
        if diff:
            raise ValueError(f"runs trained together must agree on {diff}")


def fit_fast(setups: list[Setup], cfgs: list[RunConfig], task: tasks.Task, precision: str) -> list[dict]:
    """Train the runs together with the fast engine (several: packed into one model, finetune/packed.py): before,
    per epoch and routing-off metrics, predictions in evaluation order. Each run's PEFT model ends trained."""
    from . import fast, packed

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    items, eval_items = setups[0].train_ds.items, setups[0].eval_ds.items
    labels = np.array([it["labels"] for it in eval_items])  # evaluation (length) order

    def score(preds: np.ndarray) -> dict:
        return tasks.compute_metrics(task, preds, labels)

    t0 = time.perf_counter()
    pack = packed.Pack([s.model for s in setups]) if len(setups) > 1 else None
    model = setups[0].model if pack is None else pack.model
    model.to(device)
    engine = fast.FastEngine(model, cfgs[0], task, setups[0].tokenizer.pad_token_id, precision, device, len(setups))
    t_before = time.perf_counter()
    preds, losses = engine.predict(eval_items)  # (K, n), (K,)
    befores = [{**score(p), "loss": float(l)} for p, l in zip(preds, losses)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_fit = time.perf_counter()
    outcomes = fast.fit(engine, cfgs, items, eval_items, score)
    pools = fast.gpu_pools()  # with the pack's graphs alive
    t_off = time.perf_counter()
    offs = [None] * len(setups)
    if setups[0].routed and cfgs[0].eval_routing_off:
        with setups[0].routing_off():  # the packed model is run 0's base, with packed modules swapped in
            preds, losses = engine.predict(eval_items, kind="eval-routing-off")
        offs = [{**score(p), "loss": float(l)} for p, l in zip(preds, losses)]
    engine.close()
    if pack is not None:
        pack.unpack()
    phases = {"pack_and_move": t_before - t0, "before_eval": t_fit - t_before, "routing_off_eval_and_unpack":
              time.perf_counter() - t_off}  # fmt: skip
    for o, before, off in zip(outcomes, befores, offs):
        o["before"], o["routing_off"] = before, off
        o["phase_seconds"] = {**phases, **o["phase_seconds"]}
        o["gpu_pools"] = pools
    return outcomes


def run_one(cfg: RunConfig | dict) -> dict:
    """Fine-tune one arm with one seed; return everything the comparison needs (see the module docstring)."""
    return run_group([cfg])[0]


def run_group(cfgs: list[RunConfig | dict]) -> list[dict]:
    """Fine-tune several runs of one arm and task (its seeds) together on one device with the fast engine (packed
    into one model: finetune/packed.py), or one run with the Trainer engine. Each result is the run's own."""
    from .hf_trainer import fit_trainer

    cfgs = [RunConfig(**c) if isinstance(c, dict) else c for c in cfgs]
    for c in cfgs:
        c.validate()
    check_group(cfgs)
    task = tasks.get_task(cfgs[0].task)
    engine = engine_of(cfgs[0])
    if engine == "trainer" and len(cfgs) > 1:
        raise ValueError("the Trainer engine trains one run at a time")
    t_start = time.perf_counter()
    setups = prepare_group(cfgs, task)
    prepare_seconds = time.perf_counter() - t_start
    precision = resolve_precision(cfgs[0].precision)
    if engine == "fast":
        outcomes = fit_fast(setups, cfgs, task, precision)
    else:
        outcomes = [fit_trainer(setups[0], cfgs[0], task, precision)]
    seconds = time.perf_counter() - t_start
    for o in outcomes:
        o["phase_seconds"] = {"prepare": prepare_seconds, **o.get("phase_seconds", {})}
    results = []
    for c, s, o in zip(cfgs, setups, outcomes):
        results.append(assemble(c, task, s, o, engine, precision, seconds))
        if c.output_dir is not None and is_main_process():
            save(c, task, s, results[-1])
    return results


def assemble(cfg: RunConfig, task: tasks.Task, s: Setup, o: dict, engine: str, precision: str, run_seconds: float) -> dict:
    """The run's record: metrics before/per epoch/final, per-example predictions in file order, cost, provenance."""
    predictions = np.asarray(o["predictions"]).copy()
    labels = np.array([it["labels"] for it in s.eval_ds.items])
    predictions[s.eval_order], labels[s.eval_order] = predictions.copy(), labels.copy()  # back to file order
    final = {k: v for k, v in o["per_epoch"][-1].items() if k != "epoch"}
    train_tokens = sum(len(it["input_ids"]) for it in s.train_ds.items) * cfg.epochs
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {
        "arm": cfg.arm, "seed": cfg.seed, "lr": cfg.lr, "task": task.name, "model": cfg.model, "routed": s.routed,
        "primary_metric": task.primary, "before": o["before"], "per_epoch": o["per_epoch"], "final": final,
        "final_routing_off": o["routing_off"],
        "predictions": predictions.tolist(), "labels": labels.tolist(),
        "correct": None if task.is_regression else (predictions == labels).astype(int).tolist(),
        "train_examples": len(s.train_ds), "eval_examples": len(s.eval_ds),
        "train_seconds": round(o["train_seconds"], 3), "run_seconds": round(run_seconds, 3),
        "train_tokens": int(train_tokens), "train_tokens_per_s": round(train_tokens / o["train_seconds"], 1),
        "peak_gpu_mem_bytes": peak, "precision": precision, "engine": engine,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "device": os.environ.get("CUDA_VISIBLE_DEVICES") or None,  # the GPU a runner worker was placed on
        "train_loss": o.get("train_loss"), "shapes": o.get("shapes"), "group_size": o.get("group_size", 1),
        # where the run's (its pack's) time went: load and copy the model, pack it, score before training, build the
        # batch plan, capture (and compile) the steps, train with evaluations, score routing off (fast engine)
        "phase_seconds": {k: round(v, 3) for k, v in o.get("phase_seconds", {}).items()},
        "gpu_pools": o.get("gpu_pools"),  # fast engine on CUDA: allocator memory by pool after training
        "hardware": hardware_name(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "base_fingerprint": s.fingerprint, "config": dataclasses.asdict(cfg),
    }  # fmt: skip


def save(cfg: RunConfig, task: tasks.Task, s: Setup, result: dict):
    out = Path(cfg.output_dir)
    info = {"base": cfg.model, "base_fingerprint": s.fingerprint, "task": task.name, "num_labels": task.num_labels,
            "arm": cfg.arm, "seed": cfg.seed, "max_length": cfg.max_length, "final": result["final"]}  # fmt: skip
    adapters.save_adapter(s.model, out / "adapter", info)
    write_json(out / "result.json", result, indent=1)

