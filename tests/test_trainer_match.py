"""The fast engine against `transformers.Trainer` itself (the reference engine, finetune/hf_trainer.py), on the CPU in
fp32, when both see the SAME batches.

- One run goes through the real Trainer path (`train.run_one(engine="trainer")`: `training_arguments`,
  `SequentialEvalTrainer`, `DataCollatorWithPadding`, PEFT model from `prepare_group`); a recording subclass logs the
  example indices its LengthGroupedSampler drew, the loss of every optimizer step, the lr each step applied, the
  gradient norm before clipping and the optimizer it built.
- The same run through the real fast path (`train.run_one(engine="fast")`: `fit_fast`, `fast.fit`, `lr_at`, its
  warmup, weight-0 fillers, buckets), with its batch plan replaced by `data.collate` of Trainer's index lists.
- Asserted: the step count per epoch and in all, the warmup length and every step's lr (to rounding), every step's loss
  and gradient norm, the final trainable weights, the evaluation before and after each epoch (loss, accuracy,
  per-example predictions), the optimizer's hyperparameters and its weight-decay groups.

The two engines draw different data orders for one seed by design (Trainer: torch's global RNG through its
LengthGroupedSampler; the fast engine: numpy, `data.train_order`). What should still be the same is the order's
structure: given the same shuffle, the same batches. It is not (xfail below): Trainer sorts within megabatches of
min(n // (4 * batch), 50) batches (38 for RTE at batch 16; data.MEGABATCH is 50) and swaps the longest example to
the front of the epoch.
"""

import math

import numpy as np
import pytest
import torch

from finetune import data, fast, hf_trainer, train
from finetune.config import RunConfig

WORDS = ["red", "blue", "cat", "dog", "sun", "rain", "big", "small"]


def _glue(root, n_train: int, n_dev: int):
    """An RTE-format folder with a learnable rule, sentences of 1-29 words (some exceed max_length: truncated) and a
    few dev labels flipped (so that not every prediction is right)."""
    rng = np.random.default_rng(0)
    (root / "RTE").mkdir(parents=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        lines = ["index\tsentence1\tsentence2\tlabel"]
        for i in range(n):
            s = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 30))))
            entail = bool(i % 2) != (split == "dev" and i % 5 == 0)
            lines.append(f"{i}\t{s}\t{s if i % 2 else 'nothing'}\t{'entailment' if entail else 'not_entailment'}")
        (root / "RTE" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def _recording_trainer(rec: dict):
    """`hf_trainer`'s SequentialEvalTrainer, recording what each optimizer step did (see the module docstring)."""
    from torch.utils.data import Sampler
    from transformers import TrainerCallback

    class RecordingSampler(Sampler):
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def __iter__(self):  # the inner sampler draws its whole order at once too: same RNG use
            order = list(self.inner)
            rec["epochs"].append(order)
            return iter(order)

    class AppliedLr(TrainerCallback):
        def on_optimizer_step(self, args, state, control, optimizer=None, **kw):  # before the scheduler steps
            rec["lr"].append([g["lr"] for g in optimizer.param_groups])

    class Recording(hf_trainer._sequential_eval_trainer()):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.add_callback(AppliedLr())

        def _get_train_sampler(self, train_dataset=None):
            sampler = super()._get_train_sampler(train_dataset)
            rec["sampler"] = type(sampler).__name__
            return RecordingSampler(sampler)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                rec["loss"].append(float((out[0] if return_outputs else out).detach()))
                rec["inputs"].append({k: v.detach().clone() for k, v in inputs.items()})
            return out

        def _clip_grad_norm(self, model):
            norm = super()._clip_grad_norm(model)
            rec["grad_norm"].append(float(norm))
            return norm

        def create_scheduler(self, num_training_steps, optimizer=None):
            rec["total"], rec["warmup"] = num_training_steps, self.args.get_warmup_steps(num_training_steps)
            return super().create_scheduler(num_training_steps, optimizer)

    return Recording


def test_fast_engine_on_trainers_batches_computes_what_trainer_computes(tiny_tok_dir, tmp_path, monkeypatch):
    glue = _glue(tmp_path / "glue", n_train=60, n_dev=24)
    # 60 examples of batch 8: 8 steps per epoch, the last of 4 rows; 3.5 epochs: 28 steps, the 4th epoch cut short;
    # warmup 0.1 * 28 = 2.8 steps (rounded up by both); clipping active; weight decay on
    kw = {"task": "rte", "model": str(tiny_tok_dir), "data_dir": str(glue), "epochs": 3.5, "lr": 5e-3,
          "batch_size": 8, "eval_batch_size": 8, "max_length": 40, "buckets": [16, 32, 40], "seed": 3,
          "warmup_ratio": 0.1, "weight_decay": 0.01, "max_grad_norm": 0.5, "precision": "fp32"}  # fmt: skip
    setups = {}
    prepare = train.prepare_group

    def keep_setups(cfgs, task):
        setups[cfgs[0].engine] = prepare(cfgs, task)[0]
        return [setups[cfgs[0].engine]]

    monkeypatch.setattr(train, "prepare_group", keep_setups)

    # --- Trainer ------------------------------------------------------------------------------------------------
    rec = {"epochs": [], "loss": [], "lr": [], "grad_norm": [], "inputs": []}
    recording = _recording_trainer(rec)
    monkeypatch.setattr(hf_trainer, "_sequential_eval_trainer", lambda: recording)
    res_t = train.run_one(RunConfig(**kw, engine="trainer"))
    s_t = setups["trainer"]
    items, n, bs = s_t.train_ds.items, len(s_t.train_ds), kw["batch_size"]
    assert any(len(it["input_ids"]) == kw["max_length"] for it in items)  # truncation is exercised

    per_epoch = math.ceil(n / bs)
    total = math.ceil(kw["epochs"] * per_epoch)
    assert rec["sampler"] == "LengthGroupedSampler" and len(rec["epochs"]) == math.ceil(kw["epochs"])
    for order in rec["epochs"]:
        assert sorted(order) == list(range(n))  # every example once per epoch, nothing dropped
    steps = len(rec["loss"])
    assert steps == total == rec["total"] == len(rec["lr"]) == len(rec["grad_norm"])
    assert rec["warmup"] == math.ceil(kw["warmup_ratio"] * total) == 3
    # Trainer's batches: its sampler's order in chunks of bs (a short last batch kept), cut at `total` steps
    plan, left = [], total
    for order in rec["epochs"]:
        batches = [np.array(order[i : i + bs]) for i in range(0, n, bs)][:left]
        plan.append(batches)
        left -= len(batches)
    flat = [b for batches in plan for b in batches]
    assert len(flat) == steps
    for idx, inputs in zip(flat, rec["inputs"]):  # what compute_loss saw is those examples, in that order
        assert inputs["labels"].dtype == torch.long
        assert inputs["labels"].tolist() == [items[i]["labels"] for i in idx]
        assert inputs["attention_mask"].sum(1).tolist() == [len(items[i]["input_ids"]) for i in idx]
        for row, i in zip(inputs["input_ids"].tolist(), idx):
            assert row[: len(items[i]["input_ids"])] == items[i]["input_ids"]
    # the fast engine's own plan has Trainer's shape: steps per epoch, the short last batch, the cut last epoch
    own = fast.epoch_batches(RunConfig(**kw, engine="fast"), items, s_t.tokenizer.pad_token_id, False)
    assert [len(b) for b in own] == [len(b) for b in plan] == [8, 8, 8, 4]
    assert [[b.n_real for b in e] for e in own] == [[len(b) for b in e] for e in plan]
    assert all(len(set(lrs)) == 1 for lrs in rec["lr"])  # one lr for every parameter group

    # --- the fast engine on Trainer's batches ---------------------------------------------------------------------
    got = {"lr": [], "loss": [], "grad_norm": []}

    def trainers_plan(cfgs, train_items, pad_id, regression, pin=False):
        return [[data.collate(train_items, idx, bs, cfgs[0].buckets, pad_id, regression) for idx in batches]
                for batches in plan]  # fmt: skip

    set_lr, train_step, clip = fast.FastEngine.set_lr, fast.FastEngine.train_step, fast.FastEngine._clip

    def recording_set_lr(self, value):
        got["lr"].append(value)
        got["engine"] = self
        set_lr(self, value)

    def recording_train_step(self, batch):
        loss = train_step(self, batch)
        got["loss"].append(float(loss[0]))
        return loss

    def recording_clip(self):
        got["grad_norm"].append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in self.grads]))))
        clip(self)

    monkeypatch.setattr(fast, "packed_batches", trainers_plan)
    monkeypatch.setattr(fast.FastEngine, "set_lr", recording_set_lr)
    monkeypatch.setattr(fast.FastEngine, "train_step", recording_train_step)
    monkeypatch.setattr(fast.FastEngine, "_clip", recording_clip)
    res_f = train.run_one(RunConfig(**kw, engine="fast"))
    s_f = setups["fast"]

    # the lr of every step: the same schedule (warmup ceil(0.1 * 28) = 3, lr 0 at step 0, linear decay)
    np.testing.assert_allclose(got["lr"], [lrs[0] for lrs in rec["lr"]], rtol=1e-12, atol=0)  # to the last ulp
    assert got["lr"][0] == 0.0 and got["lr"][rec["warmup"]] == kw["lr"]
    # the loss and the gradient norm of every step, the final trainable weights
    assert len(set(np.round(rec["loss"], 3))) > 10 and max(rec["grad_norm"]) > kw["max_grad_norm"]
    np.testing.assert_allclose(got["loss"], rec["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["grad_norm"], rec["grad_norm"], rtol=1e-5, atol=1e-6)
    w_t = {k: p.detach() for k, p in s_t.model.named_parameters() if p.requires_grad}
    w_f = {k: p.detach() for k, p in s_f.model.named_parameters() if p.requires_grad}
    assert w_t.keys() == w_f.keys() and len(w_t) == 13  # LoRA A, B on q, v of 3 layers; the score head
    for k, w in w_t.items():
        torch.testing.assert_close(w_f[k], w, rtol=1e-5, atol=1e-6, msg=k)
    # the evaluations: before training, after every epoch (the last one cut short), per-example predictions
    for a, b in zip([res_t["before"], *res_t["per_epoch"]], [res_f["before"], *res_f["per_epoch"]], strict=True):
        assert a.keys() == b.keys() and a["accuracy"] == b["accuracy"], (a, b)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert [e["epoch"] for e in res_f["per_epoch"]] == [e["epoch"] for e in res_t["per_epoch"]] == [1, 2, 3, 3.5]
    assert res_f["predictions"] == res_t["predictions"] and res_f["labels"] == res_t["labels"]
    assert 0 < res_t["final"]["accuracy"] < 100  # the flipped dev labels: some predictions right, some wrong

    # the optimizer: AdamW of Trainer's hyperparameters, weight decay on the same tensors
    from transformers import Trainer  # its optimizer is gone with it: its grouping, from its own rule

    decay_t = set(Trainer.get_decay_parameter_names(None, s_t.model)) & set(w_t)
    engine = got["engine"]
    names_f = {id(p): k for k, p in s_f.model.named_parameters()}
    decay_f = {names_f[id(p)] for g in engine.opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decay_f == decay_t == set(w_t)  # every trainable tensor is a 2-D weight: all decayed in both
    args = hf_trainer.training_arguments(RunConfig(**kw), str(tmp_path / "args"), "fp32")
    d = engine.opt.defaults
    assert (d["betas"], d["eps"]) == ((args.adam_beta1, args.adam_beta2), args.adam_epsilon) == ((0.9, 0.999), 1e-8)
    assert {g["weight_decay"] for g in engine.opt.param_groups if g["params"]} == {args.weight_decay}
    assert not d["amsgrad"] and args.optim.value.startswith("adamw_torch")
    assert args.max_grad_norm == kw["max_grad_norm"] and args.get_warmup_steps(total) == rec["warmup"]


# --- the data order's structure ---------------------------------------------------------------------------------


def _perm(n: int, seed: int = 0) -> np.ndarray:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()


def _same_shuffle_orders(monkeypatch, lengths: list[int], batch_size: int, seed: int = 0):
    """(Trainer's LengthGroupedSampler order, `data.train_order`'s) for one epoch when both draw the same shuffle:
    numpy's permutation is replaced by torch's of the same seed."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    perm = _perm(len(lengths), seed)

    class SameShuffle:
        def __init__(self, *_):
            pass

        def permutation(self, n):
            assert n == len(perm)
            return perm.copy()

    trainer = get_length_grouped_indices(lengths, batch_size, generator=torch.Generator().manual_seed(seed))
    with monkeypatch.context() as m:
        m.setattr(np.random, "default_rng", SameShuffle)
        ours = np.concatenate(data.train_order(lengths, batch_size, seed, 0)).tolist()
    return trainer, ours


def _lengths(n: int, longest_at: int) -> list[int]:
    """Random lengths, with the longest example (256) at position `longest_at` of the seed-0 shuffle."""
    lengths = np.random.default_rng(1).integers(5, 250, size=n)
    lengths[_perm(n)[longest_at]] = 256
    return lengths.tolist()


MEGABATCH_SIZE = pytest.mark.xfail(strict=True, reason=(
    "megabatch size: transformers' get_length_grouped_indices (trainer_pt_utils.py:498) sorts within "
    "min(n // (4 * batch), 50) batches = 38 for RTE (2490 examples, batch 16: 608 examples, 5 windows per epoch); "
    "finetune/data.py MEGABATCH = 50 (800 examples, 4 windows). Measured on RTE lengths (stand-in tokenizer, "
    "16 seeds): mean within-batch length range 6.8 tokens (Trainer) vs 5.5 (fast)"
))  # fmt: skip
LONGEST_FIRST = pytest.mark.xfail(strict=True, reason=(
    "longest-first swap: transformers' get_length_grouped_indices (trainer_pt_utils.py:511-514) swaps the epoch's "
    "longest example into position 0 of the first megabatch (and that megabatch's longest into the other's first "
    "place); finetune/data.py train_order does not"
))  # fmt: skip


@pytest.mark.parametrize("n, longest_at, trainer_megabatch", [
    # n >= 200 * batch (Trainer's megabatch is then 50 batches, as data.MEGABATCH) and the longest example in the
    # first megabatch (Trainer's swap is then a no-op): the two orders are the same, ties included
    pytest.param(3300, 7, data.MEGABATCH, id="megabatches-of-50"),
    pytest.param(2490, 7, 38, id="rte-size", marks=MEGABATCH_SIZE),
    pytest.param(3300, 3299, data.MEGABATCH, id="longest-late", marks=LONGEST_FIRST),
])  # fmt: skip
def test_same_shuffle_same_batches(monkeypatch, n, longest_at, trainer_megabatch):
    bs = 16
    assert min(n // (bs * 4), 50) == trainer_megabatch  # the case is what its name says
    trainer, ours = _same_shuffle_orders(monkeypatch, _lengths(n, longest_at), bs)
    assert trainer == ours
