"""The fast engine: a LoRA fine-tune whose every training step is one CUDA graph replay.

Why not `transformers.Trainer`: on an H200 a 5-epoch RTE run of the 135M stand-in spent ~164 ms per step of 16
short sequences, almost all of it launching ~thousands of small kernels from Python (eager: ~22 s/epoch with Trainer
or a plain loop alike). `torch.compile` fixes the launches but costs ~6 minutes of compilation per model and shape.
A CUDA graph of the *whole* step (forward, loss, backward, gradient clipping, fused AdamW, zeroing the gradients)
removes the launches without compiling anything: capturing takes a second per shape. It needs static shapes, so
batches are padded to a few bucket lengths (`RunConfig.buckets`), each captured once per run.

The math is Trainer's: mean loss over the real examples of a batch (weight-0 filler rows pad the last batch),
clip to `max_grad_norm`, AdamW (betas 0.9/0.999, eps 1e-8), linear warmup over ceil(warmup_ratio * steps) then
linear decay (the first step has lr 0), bf16 autocast over fp32 weights ("bf16-base": over a frozen base stored in
bf16, the trainable weights fp32). On the CPU the same step runs eagerly.

With `compile` (RunConfig.compile) every decoder layer runs under `torch.compile` inside the captured step: a packed
step's device time went to elementwise kernels (norms, rotary, SwiGLU, casts: results/train-profile), which the
compiler fuses. The layers of one class share one compiled forward (their weights are graph inputs), so a model
compiles a few graphs per bucket, not one per layer, and later packs of the same worker process reuse them.

One engine trains K runs at once: K = 1 trains the PEFT model as it is; K > 1 trains a `packed.Pack` (K adapters
over one base, one forward of the K runs' batches stacked; see finetune/packed.py). Every batch the engine sees has
K * B rows, run j's rows at [j*B, (j+1)*B); losses, gradient norms and clipping are per run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import data, tasks
from .config import BF16_AUTOCAST, RunConfig

# layer class -> its forward under torch.compile, shared by every layer of that class in this process
_COMPILED_FORWARD: dict[type, Callable] = {}
# graphs a compiled forward may hold (dynamo's default of 8 is too few for buckets x {train, eval} x layer variants)
COMPILE_RECOMPILE_LIMIT = 64


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers of a (PEFT-wrapped or packed) sequence classifier."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(base.model.layers)


def compile_layers(model) -> list[torch.nn.Module]:
    """Run every decoder layer of `model` under torch.compile: each layer's `forward` becomes its class's compiled
    forward (one per class, shared: see the module docstring). Returns the layers, for `uncompile_layers`."""
    import types

    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), COMPILE_RECOMPILE_LIMIT))
    layers = decoder_layers(model)
    for layer in layers:
        cls = type(layer)
        if cls not in _COMPILED_FORWARD:
            _COMPILED_FORWARD[cls] = torch.compile(cls.forward)
        layer.forward = types.MethodType(_COMPILED_FORWARD[cls], layer)  # an instance attribute: nn.Module calls it
    return layers


def uncompile_layers(layers: list[torch.nn.Module]):
    """Give the layers back their class's own forward."""
    for layer in layers:
        layer.__dict__.pop("forward", None)


def gpu_pools() -> dict | None:
    """Where the CUDA caching allocator holds memory now, by pool: the captured graphs' private pools against the
    default pool (bytes reserved and allocated, segments), or None without CUDA. Taken while a pack's graphs are
    alive, it says which one holds a routed arm's extra memory."""
    if not torch.cuda.is_available():
        return None
    snap = torch.cuda.memory_snapshot()
    segments = snap["segments"] if isinstance(snap, dict) else snap
    out = {name: {"reserved": 0, "allocated": 0, "segments": 0} for name in ("default", "graphs")}
    for seg in segments:
        name = "default" if tuple(seg.get("segment_pool_id", (0, 0))) == (0, 0) else "graphs"
        out[name]["reserved"] += int(seg["total_size"])
        out[name]["allocated"] += int(seg["allocated_size"])
        out[name]["segments"] += 1
    return out


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """transformers' `get_linear_schedule_with_warmup` at optimizer step `step` (0-based)."""
    if step < warmup:
        return peak * step / max(1, warmup)
    return peak * max(0.0, (total - step) / max(1, total - warmup))


class FastEngine:
    """Trains and evaluates K PEFT sequence classifiers of one recipe with static shapes (see the module docstring)."""

    def __init__(self, model, cfg: RunConfig, task: tasks.Task, pad_id: int, precision: str, device: torch.device,
                 k: int = 1):  # fmt: skip
        if precision == "fp16":
            raise ValueError(
                "the fast engine trains in bf16, bf16-base or fp32; use --engine trainer for fp16 (loss scaling)"
            )
        self.model, self.cfg, self.task, self.pad_id, self.device, self.k = model, cfg, task, pad_id, device, k
        self.amp = precision in BF16_AUTOCAST
        self.graphs = device.type == "cuda"
        self.params = [p for p in model.parameters() if p.requires_grad]
        if k > 1 and any(p.shape[:1] != (k,) for p in self.params):
            raise ValueError(f"a packed model of {k} runs stacks every trainable tensor on a leading dimension of {k}")
        for p in self.params:  # static gradient buffers: every captured step accumulates into the same tensors
            p.grad = torch.zeros_like(p)
        self.grads = [p.grad for p in self.params]
        # as Trainer: no weight decay on biases and norms (a packed tensor has one more dimension)
        decay = [p for p in self.params if p.ndim - (k > 1) >= 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                  {"params": [p for p in self.params if p.ndim - (k > 1) < 2], "weight_decay": 0.0}]  # fmt: skip
        if self.graphs:  # a tensor lr is updated in place between replays; fused + capturable run inside a graph
            self.lr = torch.zeros((), device=device)
            self.opt = torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.999), eps=1e-8, fused=True, capturable=True)
        else:
            self.lr = None
            self.opt = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), eps=1e-8)
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.captured: dict[tuple[str, int], tuple] = {}  # (kind, length) -> (graph, static inputs, static output)
        self.compiled = compile_layers(model) if cfg.compile else []  # compiled on first use, before any capture

    def close(self):
        """Give the model back as it came (its layers' own forwards)."""
        uncompile_layers(self.compiled)
        self.compiled = []

    # --- one step, the same code eager or captured -------------------------------------------------------------

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def _logits(self, b: dict) -> torch.Tensor:
        with self._autocast():
            # no KV cache: a training or scoring forward never reads one back
            logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                use_cache=False).logits  # (K*B, C)
        return logits.float()

    def _losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-example loss, (K*B,): cross-entropy, or squared error for regression (as transformers' heads)."""
        if self.task.is_regression:
            return (logits.squeeze(-1) - labels).square()
        return F.cross_entropy(logits, labels, reduction="none")

    def _clip(self):
        """Trainer's clip_grad_norm_, run by run: run j's gradient norm is over its slices [j] alone."""
        max_norm = self.cfg.max_grad_norm
        if not max_norm or max_norm <= 0:
            return
        if self.k == 1:
            torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
            return
        sq = torch.stack([g.reshape(self.k, -1).float().square().sum(1) for g in self.grads]).sum(0)  # (K,)
        coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)  # (K,), as clip_grad_norm_
        for g in self.grads:
            g.mul_(coef.view(-1, *[1] * (g.ndim - 1)).to(g.dtype))

    def _train_step(self, b: dict) -> torch.Tensor:
        w = b["weight"].view(self.k, -1)  # (K, B)
        losses = self._losses(self._logits(b), b["labels"]).view(self.k, -1)  # (K, B)
        loss = (losses * w).sum(1) / w.sum(1).clamp(min=1.0)  # (K,): each run's mean over its real examples
        loss.sum().backward()  # run j's parameters see run j's loss alone
        self._clip()
        self.opt.step()
        torch._foreach_zero_(self.grads)
        return loss.detach()

    @torch.no_grad()
    def _eval_step(self, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._logits(b)  # (K*B, C)
        preds = logits.squeeze(-1) if self.task.is_regression else logits.argmax(-1)  # (K*B,)
        return preds.view(self.k, -1), self._losses(logits, b["labels"]).view(self.k, -1)  # (K, B) each

    # --- capture and replay -----------------------------------------------------------------------------------

    def _tensors(self, batch: data.Batch) -> dict:
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels,
                "weight": batch.weight}  # fmt: skip

    def _capture(self, batch: data.Batch, fn: Callable):
        """Capture `fn` on static copies of `batch` (after two warm-up calls on a side stream, as CUDA graphs need)."""
        import modeling_routed_llama  # one home for capturing; the project's modeling file works for any model

        static = {k: v.to(self.device) for k, v in self._tensors(batch).items()}
        graph, out = modeling_routed_llama.capture_cuda_graph(lambda: fn(static), pool=self.pool)
        return graph, static, out

    def _run(self, kind: str, batch: data.Batch, fn: Callable):
        if not self.graphs:
            return fn({k: v.to(self.device) for k, v in self._tensors(batch).items()})
        key = (kind, batch.length)
        if key not in self.captured:
            if kind == "train":
                raise RuntimeError(f"no captured training step for length {batch.length}: prepare_training first")
            self.captured[key] = self._capture(batch, fn)
        graph, static, out = self.captured[key]
        for k, v in self._tensors(batch).items():
            static[k].copy_(v, non_blocking=True)
        graph.replay()
        return out

    @torch.no_grad()
    def _reset_optimizer(self):
        """Undo what warming up and capturing did to the optimizer: its steps ran with zero gradients and lr 0, so
        the weights did not move, but the step counters did."""
        for state in self.opt.state.values():
            for v in state.values():
                if torch.is_tensor(v):
                    v.zero_()
        torch._foreach_zero_(self.grads)

    def prepare_training(self, epochs_batches: list[list[data.Batch]]):
        """Capture one training step per bucket length that the run will use, before the first real step, with
        weight-0 copies of a real batch (no gradient, no update), then reset the optimizer."""
        self.model.train()
        if not self.graphs:
            return
        firsts = {}
        for batches in epochs_batches:
            for b in batches:
                firsts.setdefault(b.length, b)
        self.lr.fill_(0.0)
        for length, b in sorted(firsts.items()):
            silent = data.Batch(b.input_ids, b.attention_mask, b.labels, torch.zeros_like(b.weight), 0)
            self.captured[("train", length)] = self._capture(silent, self._train_step)
        torch.cuda.synchronize()
        self._reset_optimizer()

    # --- the public loop --------------------------------------------------------------------------------------

    def set_lr(self, value: float):
        if self.lr is not None:
            self.lr.fill_(value)
        else:
            for g in self.opt.param_groups:
                g["lr"] = value

    def train_step(self, batch: data.Batch) -> torch.Tensor:
        """One optimizer step of every run on a packed batch (K * B rows; the model is in train mode); returns the
        runs' losses on the device, (K,), without a sync."""
        return self._run("train", batch, self._train_step)

    def predict(self, items: list[dict], kind: str = "eval") -> tuple[np.ndarray, np.ndarray]:
        """Per run: predictions over `items` in their order, (K, n), and mean loss, (K,); batches of
        eval_batch_size, each seen by all K runs. Graphs are kept per `kind`: a model changed in a way a graph
        cannot see (e.g. k set to N) needs a kind of its own."""
        self.model.eval()
        preds, losses = [], []
        size = self.cfg.eval_batch_size
        for idx in data.eval_order(len(items), size):
            b = data.collate(items, idx, size, self.cfg.buckets, self.pad_id, self.task.is_regression)
            p, l = self._run(kind, data.concat([b] * self.k, self.pad_id), self._eval_step)  # (K, B) each
            preds.append(p[:, : b.n_real].clone())
            losses.append(l[:, : b.n_real].clone())
        p = torch.cat(preds, dim=1).float().cpu().numpy()  # (K, n)
        loss = torch.cat(losses, dim=1).mean(1).cpu().numpy()  # (K,)
        self.model.train()
        return (p if self.task.is_regression else p.astype(int)), loss


def epoch_batches(cfg: RunConfig, items: list[dict], pad_id: int, regression: bool) -> list[list[data.Batch]]:
    """Every training batch of one run, epoch by epoch (a fractional last epoch is cut short)."""
    lengths = [len(it["input_ids"]) for it in items]
    per_epoch = math.ceil(len(items) / cfg.batch_size)
    total = math.ceil(cfg.epochs * per_epoch)
    out = []
    for epoch in range(math.ceil(cfg.epochs)):
        order = data.train_order(lengths, cfg.batch_size, cfg.seed, epoch)[: total - epoch * per_epoch]
        out.append([data.collate(items, idx, cfg.batch_size, cfg.buckets, pad_id, regression) for idx in order])
    return out


def packed_batches(cfgs: list[RunConfig], items: list[dict], pad_id: int, regression: bool,
                   pin: bool = False) -> list[list[data.Batch]]:  # fmt: skip
    """Every training step's packed batch, epoch by epoch: step i stacks batch i of each run (its own seeded order),
    padded to the longest among them. `pin`: page-locked CPU tensors, so that copying them into a graph's inputs
    does not block the host."""
    plans = [epoch_batches(c, items, pad_id, regression) for c in cfgs]
    out = [[data.concat([p[epoch][i] for p in plans], pad_id) for i in range(len(plans[0][epoch]))]
           for epoch in range(len(plans[0]))]  # fmt: skip
    if pin:  # pinned all at once, then dealt back into epochs
        pinned = iter(data.pin_all([b for steps in out for b in steps]))
        out = [[next(pinned) for _ in steps] for steps in out]
    return out


def fit(engine: FastEngine, cfgs: list[RunConfig], train_items: list[dict], eval_items: list[dict],
        evaluate: Callable) -> list[dict]:  # fmt: skip
    """Train the engine's K runs (`cfgs`, differing only in seed) together; score the evaluation set after each
    epoch with `evaluate(predictions)`. Returns per run: per_epoch metrics, last predictions, train seconds (the
    pack's wall time, evaluations included, as Trainer's), mean training loss per epoch, captured shapes."""
    if len(cfgs) != engine.k:
        raise ValueError(f"the engine trains {engine.k} runs, got {len(cfgs)} configs")
    pin = engine.device.type == "cuda"
    sync = torch.cuda.synchronize if pin else (lambda: None)
    t_plan = time.perf_counter()
    plan = packed_batches(cfgs, train_items, engine.pad_id, engine.task.is_regression, pin)
    t_capture = time.perf_counter()
    engine.prepare_training(plan)  # captures (and with `compile`, compiles) one step per bucket
    sync()
    t0 = time.perf_counter()
    phases = {"plan": t_capture - t_plan, "capture": t0 - t_capture}
    outs = [{"per_epoch": [], "train_loss": [], "predictions": None} for _ in cfgs]
    total = sum(len(b) for b in plan)
    warmup = math.ceil(engine.cfg.warmup_ratio * total)
    step = 0
    for epoch, batches in enumerate(plan):
        sums = torch.zeros(engine.k, device=engine.device)  # (K,)
        for b in batches:
            engine.set_lr(lr_at(step, total, warmup, engine.cfg.lr))
            sums += engine.train_step(b)
            step += 1
        preds, eval_loss = engine.predict(eval_items)  # (K, n), (K,)
        mean_loss = (sums / max(1, len(batches))).tolist()
        for j, o in enumerate(outs):
            done = min(cfgs[j].epochs, epoch + 1)
            o["per_epoch"].append({"epoch": round(done, 4), **evaluate(preds[j]), "loss": float(eval_loss[j])})
            o["predictions"] = preds[j]
            o["train_loss"].append(mean_loss[j])
    sync()
    seconds = time.perf_counter() - t0
    shapes = sorted(k[1] for k in engine.captured if k[0] == "train")
    for o in outs:
        o.update(train_seconds=seconds, steps=total, group_size=engine.k, shapes=shapes,
                 phase_seconds={**phases, "train": seconds})  # fmt: skip
    return outs
