"""The fast engine against the plain path, on the CPU (where it runs the same step eagerly, without CUDA graphs).

- bucketing: every example is trained on exactly once per epoch, never truncated; filler rows weigh 0;
- one step: the bucketed, weight-masked loss equals transformers' own loss on the dynamically padded batch;
- the first steps: the engine's loss trajectory equals a plain loop (dynamic padding, torch AdamW, transformers'
  linear warmup schedule, gradient clipping) over the same batches, within 1e-5 in fp32;
- a whole run: per-example predictions line up with labels in file order.
"""

import math

import numpy as np
import pytest
import torch

from finetune import data, fast, tasks
from finetune.config import RunConfig

from conftest import tiny_llama_config

PAD = 0


def _items(n: int, seed: int, max_len: int = 40, regression: bool = False) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(3, max_len + 1))
        ids = rng.integers(1, 128, size=length).tolist()  # 0 is the pad id
        label = float(rng.uniform(0, 5)) if regression else int(rng.integers(0, 2))
        out.append({"input_ids": ids, "attention_mask": [1] * length, "labels": label})
    return out


def _peft_classifier(num_labels: int = 2, seed: int = 0, lora_seed: int | None = None):
    """A random tiny Llama classifier (weights drawn from `seed`) with LoRA; `lora_seed`: the head and LoRA are
    drawn from it instead (runs of one base)."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(tiny_llama_config(num_labels=num_labels))
    if lora_seed is not None:
        torch.manual_seed(lora_seed)
        torch.nn.init.normal_(model.score.weight, std=0.02)
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      modules_to_save=["score"])  # fmt: skip
    model = get_peft_model(model, lora)
    # LoRA B starts at zero; give it values so that the adapters matter from the first step
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def test_train_order_covers_every_example_once_per_epoch():
    lengths = list(np.random.default_rng(0).integers(1, 100, size=203))
    for epoch in range(3):
        batches = data.train_order(lengths, 16, seed=5, epoch=epoch)
        assert sorted(np.concatenate(batches).tolist()) == list(range(203))
        assert [len(b) for b in batches] == [16] * 12 + [11]
    a = data.train_order(lengths, 16, seed=5, epoch=0)
    assert all((x == y).all() for x, y in zip(a, data.train_order(lengths, 16, seed=5, epoch=0)))
    assert not all((x == y).all() for x, y in zip(a, data.train_order(lengths, 16, seed=6, epoch=0)))


def test_collate_pads_to_bucket_never_truncates_and_weights_fillers_zero():
    items = _items(5, seed=1, max_len=70)
    b = data.collate(items, np.arange(5), 8, [32, 64, 128], PAD, regression=False)
    longest = max(len(it["input_ids"]) for it in items)
    assert b.length == data.bucket_of(longest, [32, 64, 128]) and b.length >= longest
    assert b.weight.tolist() == [1.0] * 5 + [0.0] * 3 and b.n_real == 5
    for j, it in enumerate(items):
        n = len(it["input_ids"])
        assert b.input_ids[j, :n].tolist() == it["input_ids"] and b.attention_mask[j].sum() == n
        assert (b.input_ids[j, n:] == PAD).all() and b.labels[j] == it["labels"]
    assert b.input_ids[5].tolist() == b.input_ids[0].tolist()  # fillers copy a real row (no all-padding row)
    with pytest.raises(ValueError, match="longer than the largest bucket"):
        data.bucket_of(200, [32, 64, 128])


@pytest.mark.parametrize("bad", [[100, 50], [60], [], [64, 64]])
def test_bucket_spec_is_validated(bad):
    with pytest.raises(ValueError, match="buckets"):
        RunConfig(buckets=bad, max_length=32).validate()


def test_fp16_needs_the_trainer_engine():
    with pytest.raises(ValueError, match="loss scaling"):
        RunConfig(precision="fp16").validate()
    RunConfig(precision="fp16", engine="trainer").validate()


def test_largest_bucket_must_hold_max_length():
    with pytest.raises(ValueError, match="max_length"):
        RunConfig(buckets=[64, 128], max_length=256).validate()


@pytest.mark.parametrize("regression", [False, True])
def test_one_step_loss_equals_transformers_loss_on_dynamic_padding(regression):
    model = _peft_classifier(num_labels=1 if regression else 2)
    task = tasks.get_task("stsb" if regression else "rte")
    cfg = RunConfig(task=task.name, batch_size=8, max_length=64, buckets=[64])
    engine = fast.FastEngine(model, cfg, task, PAD, "fp32", torch.device("cpu"))
    items = _items(6, seed=2, regression=regression)
    b = data.collate(items, np.arange(6), 8, cfg.buckets, PAD, regression)  # 2 filler rows, padded to 64
    engine.set_lr(0.0)
    model.train()
    got = engine.train_step(b)
    # transformers' loss: the 6 real rows, padded to their own longest length only
    longest = max(len(it["input_ids"]) for it in items)
    ids = torch.full((6, longest), PAD)
    for j, it in enumerate(items):
        ids[j, : len(it["input_ids"])] = torch.tensor(it["input_ids"])
    labels = torch.tensor([it["labels"] for it in items], dtype=torch.float32 if regression else torch.long)
    model.eval()  # no dropout anywhere; same math as train mode here
    want = model(input_ids=ids, attention_mask=(ids != PAD).long(), labels=labels).loss
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got, want)


def test_first_steps_match_a_plain_loop():
    """Same init, same batches: the engine (buckets, weight-0 fillers, its schedule and optimizer) against a loop
    written the transformers way (dynamic padding, AdamW, get_linear_schedule_with_warmup, clip_grad_norm_)."""
    from transformers import get_linear_schedule_with_warmup

    task = tasks.get_task("rte")
    cfg = RunConfig(task="rte", batch_size=8, max_length=64, buckets=[32, 64], lr=3e-3, warmup_ratio=0.3,
                    max_grad_norm=0.5, epochs=1)  # fmt: skip
    items = _items(45, seed=3, max_len=60)
    batches = fast.epoch_batches(cfg, items, PAD, regression=False)[0]  # 6 batches, the last one 5 real rows
    total, warmup = len(batches), math.ceil(cfg.warmup_ratio * len(batches))

    model_a = _peft_classifier(seed=7)
    engine = fast.FastEngine(model_a, cfg, task, PAD, "fp32", torch.device("cpu"))
    fast_losses = []
    model_a.train()
    for step, b in enumerate(batches):
        engine.set_lr(fast.lr_at(step, total, warmup, cfg.lr))
        fast_losses.append(float(engine.train_step(b)))

    model_b = _peft_classifier(seed=7)
    params = [p for p in model_b.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, warmup, total)
    plain_losses = []
    model_b.train()
    for b in batches:
        n = b.n_real
        longest = int(b.attention_mask[:n].sum(1).max())
        out = model_b(input_ids=b.input_ids[:n, :longest], attention_mask=b.attention_mask[:n, :longest],
                      labels=b.labels[:n])  # fmt: skip
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        plain_losses.append(float(out.loss.detach()))
    assert len(set(np.round(plain_losses, 4))) > 1  # the model learns something: the losses move
    np.testing.assert_allclose(fast_losses, plain_losses, rtol=1e-5, atol=1e-6)


def test_lr_schedule_is_transformers_linear_warmup():
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = get_linear_schedule_with_warmup(opt, 3, 10)
    for step in range(10):
        assert fast.lr_at(step, 10, 3, 2.0) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()


def _tiny_glue(root, n_train=40, n_dev=24):
    """An RTE-format folder (index, sentence1, sentence2, label) with a learnable rule."""
    rng = np.random.default_rng(0)
    words = ["red", "blue", "cat", "dog", "sun", "rain", "big", "small"]
    (root / "RTE").mkdir(parents=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        lines = ["index\tsentence1\tsentence2\tlabel"]
        for i in range(n):
            s = " ".join(rng.choice(words, size=int(rng.integers(2, 9))))
            label = "entailment" if i % 2 else "not_entailment"
            lines.append(f"{i}\t{s}\t{s if i % 2 else 'nothing'}\t{label}")
        (root / "RTE" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def test_run_one_fast_predictions_line_up_with_labels(tiny_tok_dir, tmp_path):
    from finetune import train

    glue = _tiny_glue(tmp_path / "glue")
    cfg = RunConfig(task="rte", model=str(tiny_tok_dir), data_dir=str(glue), epochs=2, lr=1e-3, batch_size=8,
                    eval_batch_size=8, max_length=64, buckets=[16, 32, 64], engine="fast", seed=1)  # fmt: skip
    r = train.run_one(cfg)
    dev = tasks.load_split(tasks.get_task("rte"), "validation", glue)
    assert r["labels"] == [ex.label for ex in dev]  # file order
    assert r["correct"] == [int(p == y) for p, y in zip(r["predictions"], r["labels"])]
    assert r["final"]["accuracy"] == pytest.approx(100 * np.mean(r["correct"]))
    assert [e["epoch"] for e in r["per_epoch"]] == [1, 2] and r["engine"] == "fast"
    again = train.run_one(cfg)  # a function of the seed alone
    assert again["predictions"] == r["predictions"] and again["train_loss"] == r["train_loss"]


def test_runs_trained_together_equal_runs_alone(tiny_tok_dir, tmp_path):
    from dataclasses import replace

    from finetune import train

    glue = _tiny_glue(tmp_path / "glue", n_train=24, n_dev=16)
    cfg = RunConfig(task="rte", model=str(tiny_tok_dir), data_dir=str(glue), epochs=1, lr=1e-3, batch_size=8,
                    eval_batch_size=8, max_length=64, buckets=[32, 64], engine="fast")  # fmt: skip
    cfgs = [replace(cfg, seed=s, output_dir=str(tmp_path / f"s{s}")) for s in (0, 1)]
    together = train.run_group(cfgs)
    alone = [train.run_one(replace(c, output_dir=str(tmp_path / f"alone{c.seed}"))) for c in cfgs]
    for t, a in zip(together, alone):
        assert t["predictions"] == a["predictions"] and t["before"]["accuracy"] == a["before"]["accuracy"]
        np.testing.assert_allclose(t["train_loss"], a["train_loss"], rtol=1e-5)
        assert t["group_size"] == 2 and a["group_size"] == 1
    from safetensors.torch import load_file

    for s in (0, 1):  # each run's own adapter is saved, trained: the same weights as the run made alone
        got = load_file(tmp_path / f"s{s}" / "adapter" / "adapter_model.safetensors")
        want = load_file(tmp_path / f"alone{s}" / "adapter" / "adapter_model.safetensors")
        assert got.keys() == want.keys()
        for k in got:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="must agree on"):
        train.run_group([cfg, replace(cfg, epochs=2)])
    with pytest.raises(ValueError, match="must agree on"):
        train.run_group([cfg, replace(cfg, seed=1, lr=2e-3)])


def test_runs_prepared_together_share_the_frozen_base_not_what_trains(tiny_tok_dir, tmp_path):
    """prepare_group gives each run its own PEFT model whose frozen base tensors are the same tensors as every other
    run's (one base in memory, not K), while heads and LoRA matrices are each run's own, equal to a run prepared
    alone."""
    from dataclasses import replace

    from finetune import train

    glue = _tiny_glue(tmp_path / "glue", n_train=8, n_dev=8)
    cfg = RunConfig(task="rte", model=str(tiny_tok_dir), data_dir=str(glue), max_length=64, buckets=[32, 64])
    setups = train.prepare_group([replace(cfg, seed=s) for s in (0, 1, 2)], tasks.get_task("rte"))
    params = [dict(s.model.named_parameters()) for s in setups]
    assert params[0].keys() == params[1].keys() == params[2].keys()
    for name, p in params[0].items():
        others = [ps[name] for ps in params[1:]]
        if p.requires_grad:  # LoRA and the head: separate tensors; drawn from each seed (LoRA B starts at zero)
            assert all(o.data_ptr() != p.data_ptr() for o in others), name
            assert "lora_B" in name or not any(torch.equal(o, p) for o in others), name
        elif ".score." in name:  # the frozen original of each run's head (PEFT's modules_to_save): its own seed
            assert all(o.data_ptr() != p.data_ptr() for o in others), name
        else:
            assert all(o is p for o in others), name
    alone = train.prepare_group([replace(cfg, seed=2)], tasks.get_task("rte"))[0]
    for name, p in alone.model.named_parameters():
        torch.testing.assert_close(params[2][name], p, rtol=0, atol=0)


@pytest.mark.parametrize("regression", [False, True])
def test_packed_steps_equal_separate_steps(regression):
    """Two runs packed into one model (per-run clipping active, batches of different bucket lengths) follow the
    loss trajectories of the same two runs trained separately, within 1e-5 in fp32; so do their weights."""
    from finetune import packed

    task = tasks.get_task("stsb" if regression else "rte")
    cfg = RunConfig(task=task.name, batch_size=4, max_length=64, buckets=list(range(8, 65, 8)), lr=3e-3, warmup_ratio=0.3,
                    max_grad_norm=0.05, epochs=2)  # fmt: skip
    items = _items(18, seed=5, max_len=60, regression=regression)
    cfgs = [RunConfig(**{**cfg.__dict__, "seed": s}) for s in (0, 1)]
    labels = 1 if regression else 2
    alone_models = [_peft_classifier(labels, lora_seed=10 + s) for s in (0, 1)]
    pack_models = [_peft_classifier(labels, lora_seed=10 + s) for s in (0, 1)]
    plans = [fast.epoch_batches(c, items, PAD, regression) for c in cfgs]
    plans[1] = [e[::-1] for e in plans[1]]  # (with so few examples both seeds sort to the same lengths)
    assert any(a.length != b.length for a, b in zip(sum(plans[0], []), sum(plans[1], [])))  # padding is exercised
    pack = packed.Pack(pack_models)
    engine = fast.FastEngine(pack.model, cfg, task, PAD, "fp32", torch.device("cpu"), k=2)
    engines = [fast.FastEngine(m, c, task, PAD, "fp32", torch.device("cpu")) for m, c in zip(alone_models, cfgs)]
    steps = [[data.concat([a, b], PAD) for a, b in zip(*epochs)] for epochs in zip(*plans)]
    total = sum(len(e) for e in steps)
    got, want = [], []
    for i, b in enumerate(b for epoch in steps for b in epoch):
        lr = fast.lr_at(i, total, 2, cfg.lr)
        engine.set_lr(lr)
        got.append(engine.train_step(b).tolist())
        row = []
        for e, plan in zip(engines, plans):
            e.set_lr(lr)
            row.append(float(e.train_step([b for epoch in plan for b in epoch][i])[0]))
        want.append(row)
    assert len(set(np.round(np.array(want)[:, 0], 4))) > 1
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    preds, losses = engine.predict(items[:7])
    for j, e in enumerate(engines):
        p, l = e.predict(items[:7])
        np.testing.assert_allclose(preds[j], p[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(losses[j], l[0], rtol=1e-4)
    pack.unpack()
    for a, b in zip(alone_models, pack_models):
        for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert na == nb
            torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6)


def test_packing_refuses_what_it_cannot_train():
    from finetune import packed

    models = [_peft_classifier(seed=s) for s in (0, 1)]
    for m in models:
        m.get_base_model().model.norm.weight.requires_grad_(True)
    names = [type(m).__name__ for m in models[0].modules()]
    with pytest.raises(ValueError, match="packing cannot train"):
        packed.Pack(models)
    assert [type(m).__name__ for m in models[0].modules()] == names  # the refused model is left as it was


def test_runner_packs_only_compatible_runs_in_order():
    from dataclasses import replace

    from finetune import runner

    base = RunConfig(task="rte", engine="fast")
    cfgs = [replace(base, seed=0), replace(base, seed=1, task="mrpc"), replace(base, seed=2), replace(base, seed=3),
            replace(base, seed=4, arm="routed", model="ckpt"), replace(base, seed=5, engine="trainer"),
            replace(base, seed=6, lr=1e-3), replace(base, seed=7, arm="renamed")]  # fmt: skip
    assert runner.pack(cfgs, list(range(8)), group=3) == [[0, 2, 3], [1], [4], [5], [6], [7]]
    assert runner.pack(cfgs, list(range(8)), group=2) == [[0, 2], [1], [3, 7], [4], [5], [6]]
    assert runner.pack(cfgs, [0, 2], group=1) == [[0], [2]]


def test_compiled_layers_follow_the_eager_steps_and_share_graphs(monkeypatch):
    """`compile`: a packed model of 2 runs whose decoder layers run under torch.compile (inductor, C++ on the CPU)
    follows the eager engine's losses and predictions; the 2 layers share their class's compiled forward (graphs are
    not per layer: dynamo compiles layer 0, whose input needs no gradient, and the rest, per bucket), and `close`
    gives the layers their own forward back."""
    from torch._dynamo.utils import counters

    from finetune import packed
    from routed_llama.hardware import compile_problem

    if compile_problem("cpu"):
        pytest.skip(compile_problem("cpu"))
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(fast, "_COMPILED_FORWARD", {})
    task = tasks.get_task("rte")
    cfg = RunConfig(task="rte", batch_size=4, max_length=32, buckets=[16, 32], lr=3e-3, epochs=1)
    items = _items(16, seed=2, max_len=30)
    cfgs = [RunConfig(**{**cfg.__dict__, "seed": s}) for s in (0, 1)]
    steps = [data.concat(list(b), PAD) for b in zip(*[fast.epoch_batches(c, items, PAD, False)[0] for c in cfgs])]
    assert len({b.length for b in steps}) == 2  # both buckets are used
    results = []
    for compiled in (False, True):
        pack = packed.Pack([_peft_classifier(lora_seed=20 + s) for s in (0, 1)])
        engine = fast.FastEngine(pack.model, RunConfig(**{**cfg.__dict__, "compile": compiled}), task, PAD, "fp32",
                                 torch.device("cpu"), k=2)  # fmt: skip
        losses = []
        for i, b in enumerate(steps):
            engine.set_lr(fast.lr_at(i, len(steps), 1, cfg.lr))
            losses.append(engine.train_step(b).tolist())
        preds, eval_loss = engine.predict(items[:6])
        layers = fast.decoder_layers(pack.model)
        if compiled:
            assert all("forward" in layer.__dict__ for layer in layers) and len(fast._COMPILED_FORWARD) == 1
        engine.close()
        assert all("forward" not in layer.__dict__ for layer in layers)
        results.append((np.array(losses), preds, eval_loss))
    (eager_loss, eager_preds, eager_eval), (comp_loss, comp_preds, comp_eval) = results
    assert len(set(np.round(eager_loss[:, 0], 4))) > 1
    np.testing.assert_allclose(comp_loss, eager_loss, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(comp_preds, eager_preds)
    np.testing.assert_allclose(comp_eval, eager_eval, rtol=1e-4)
    # 2 buckets x (layer 0, later layers) for training, 2 buckets for scoring (no gradients): not x the 2 layers
    assert counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])


def test_compile_without_a_compiler_backend_is_a_one_line_error(monkeypatch, capsys):
    from finetune import cli
    from routed_llama import hardware

    monkeypatch.setattr(hardware, "compile_problem", lambda device=None: "no compiler backend: test")
    assert cli.main(["run", "--compile", "--engine", "fast"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no compiler backend" in err
    assert cli.main(["run", "--compile", "--engine", "trainer"]) == 2


def test_train_speed_benchmark_rows(tiny_tok_dir, tmp_path):
    """benchmarks/train_speed.py on the CPU: solo, packed and other-arm rows with their fields; bad input exit 2."""
    import importlib.util
    import json

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("train_speed", ROOT / "benchmarks" / "train_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    glue = _tiny_glue(tmp_path / "glue", n_train=16, n_dev=8)
    out = tmp_path / "speed"
    argv = ["--arm", f"plain={tiny_tok_dir}", "--arm", f"other={tiny_tok_dir}", "--data-dir", str(glue),
            "--epochs", "1", "--jobs", "1", "2", "--jobs-arms", "2", "--trainer-epochs", "0", "--output", str(out)]
    assert bench.main(argv) == 0
    doc = json.loads((out / "train_speed.json").read_text())
    got = [(r["arm"], r["mode"], r["jobs"]) for r in doc["rows"]]
    assert got == [("plain", "fast", 1), ("other", "fast", 1), ("plain", "fast", 2), ("other", "fast", 2)]
    for r in doc["rows"]:
        assert r["run_seconds"] >= r["train_seconds"] > 0 and r["compile"] is False
        phases = r["phase_seconds"]
        assert set(phases) == {"prepare", "pack_and_move", "before_eval", "plan", "capture", "train",
                               "routing_off_eval_and_unpack"}  # fmt: skip
        assert phases["train"] == r["train_seconds"] and sum(phases.values()) <= r["run_seconds"] * 1.01
        assert r["runs_per_gpu_hour"] == pytest.approx(3600 * r["jobs"] / r["run_seconds"], rel=1e-2)  # both rounded
    assert (out / "runs_per_gpu_hour.png").stat().st_size > 0
    assert bench.main(["--arm", "plain", "--data-dir", str(glue)]) == 2


def test_pin_all_keeps_every_batch_and_pins_one_tensor_per_field_and_length(monkeypatch):
    """pin_all: the same batches in the same order, backed by one pinned tensor per (field, length)."""
    pinned = []

    def fake_pin(t):  # no CUDA here: record the call, return a copy as pin_memory does
        pinned.append(tuple(t.shape))
        return t.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    cfg = RunConfig(task="rte", batch_size=4, max_length=64, buckets=[16, 32, 64], epochs=1)
    items = _items(30, seed=4, max_len=60)
    plan = fast.epoch_batches(cfg, items, PAD, regression=False)[0]
    got = data.pin_all(plan)
    assert len(got) == len(plan) and len({b.length for b in plan}) == 3
    assert len(pinned) == 4 * 3  # 4 fields x 3 lengths, not 4 x len(plan)
    for a, b in zip(plan, got):
        assert a.n_real == b.n_real
        for f in ("input_ids", "attention_mask", "labels", "weight"):
            torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=0, atol=0)
    # a pack's plan, pinned, keeps its epochs and their batches in order
    cfgs = [RunConfig(**{**cfg.__dict__, "seed": s, "epochs": 2}) for s in (0, 1)]
    plain, pinned_plan = (fast.packed_batches(cfgs, items, PAD, False, pin=p) for p in (False, True))
    assert [len(e) for e in pinned_plan] == [len(e) for e in plain]
    for a, b in zip(sum(plain, []), sum(pinned_plan, [])):
        torch.testing.assert_close(a.input_ids, b.input_ids, rtol=0, atol=0)


def test_compile_drift_benchmark_on_a_tiny_routed_model(tiny_tok_routed_dir, tmp_path):
    """benchmarks/compile_drift.py on the CPU: rows with routing on and off for a routed checkpoint, tie shares per
    routed layer, JSON and PNG; bad input exit 2."""
    import importlib.util
    import json

    from conftest import ROOT
    from routed_llama.hardware import compile_problem

    if compile_problem("cpu"):
        pytest.skip(compile_problem("cpu"))
    spec = importlib.util.spec_from_file_location("compile_drift", ROOT / "benchmarks" / "compile_drift.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    glue = _tiny_glue(tmp_path / "glue", n_train=4, n_dev=6)
    out = tmp_path / "drift"
    argv = ["--model", str(tiny_tok_routed_dir), "--data-dir", str(glue), "--examples", "6", "--batch", "4",
            "--max-length", "32", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    doc = json.loads((out / "compile_drift.json").read_text())
    assert [(r["routing"], r["change"]) for r in doc["rows"]] == [("on", "perturb"), ("off", "perturb"),
                                                                   ("on", "compile"), ("off", "compile")]
    for r in doc["rows"]:
        assert 0 <= r["mean_abs_diff"] <= r["max_abs_diff"] < 1 and 0 <= r["argmax_agreement"] <= 1
    (ties,) = doc["ties"].values()
    assert ties and all(0 <= v <= 1 for v in ties.values())
    assert (out / "compile_drift.png").stat().st_size > 0
    assert bench.main([*argv[:-2], "--examples", "0", "--out", str(out)]) == 2


def test_gpu_pools_sums_the_allocator_segments_by_pool(monkeypatch):
    """gpu_pools: None without CUDA; with it, segments of the default pool (0, 0) and of graph pools summed apart
    (a fake allocator snapshot, in both of the shapes torch versions return)."""
    assert fast.gpu_pools() is None or torch.cuda.is_available()
    segments = [
        {"segment_pool_id": (0, 0), "total_size": 100, "allocated_size": 60},
        {"segment_pool_id": (1, 2), "total_size": 50, "allocated_size": 50},
        {"segment_pool_id": (1, 3), "total_size": 30, "allocated_size": 10},
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for snap in (segments, {"segments": segments, "device_traces": []}):
        monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda snap=snap: snap)
        assert fast.gpu_pools() == {"default": {"reserved": 100, "allocated": 60, "segments": 1},
                                    "graphs": {"reserved": 80, "allocated": 60, "segments": 2}}  # fmt: skip


def test_compile_problem_follows_inductors_own_compiler_search(monkeypatch):
    """On the CPU the check asks inductor's own compiler search: where inductor refuses (e.g. $CXX names no compiler),
    so does the check, even with g++ on PATH."""
    from torch._inductor import cpp_builder

    from routed_llama.hardware import compile_problem

    def refuse():
        raise RuntimeError("no such compiler")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", refuse)
    problem = compile_problem("cpu")
    assert problem and "C++ compiler" in problem and "RuntimeError" in problem
