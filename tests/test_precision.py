"""Precision "bf16-base": bf16 autocast over a frozen base stored in bf16, the trainable tensors in fp32 (tiny random
Llamas, plain and routed, on the CPU, where autocast runs bf16 too).

- the run's setup: every frozen floating-point parameter is bf16, every trainable one fp32, buffers untouched; the
  same holds in a packed model and after unpacking;
- training: the losses of the first steps are those of precision "bf16" within 1e-2 relative (measured: 2e-4 plain,
  1.4e-3 routed, where a bf16 residual stream can flip a near-tie routing choice); the adapters move;
- runs packed together equal the same runs alone (measured on the plain base: equal losses and predictions, adapters
  within 2e-7 relative; asserted within 1e-3);
- a routed run evaluates with routing off, saves an adapter that reloads over the fp32 base (same fingerprint), and
  the Trainer engine trains it too (bf16 autocast);
- "bf16-bogus" is refused; the CLI passes bf16-base through.
"""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from finetune import cli, fast, models, packed, tasks, train
from finetune.config import RunConfig, resolve_precision
from routed_llama.errors import UserError

from test_runner import tiny_bases, tiny_recipe, write_tiny_glue


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-precision")
    return {**tiny_bases(root), "glue": write_tiny_glue(root / "glue")}


def test_bf16_base_is_a_precision_and_a_bogus_one_is_refused(capsys):
    RunConfig(precision="bf16-base").validate()
    assert resolve_precision("bf16-base") == resolve_precision("bf16-base", "cpu") == "bf16-base"
    with pytest.raises(UserError, match="precision must be auto, bf16, bf16-base, fp16 or fp32, got 'bf16-bogus'"):
        RunConfig(precision="bf16-bogus").validate()
    (cfg, _) = cli.parse_args(["run", "--precision", "bf16-base"]).settings
    assert cfg.precision == "bf16-base"
    (_, recipe) = cli.parse_args(["compare", "--arm", "name=r,layers=all", "--output", "o", "--precision",
                                  "bf16-base"]).settings  # fmt: skip
    assert recipe.to_config().precision == "bf16-base"
    assert cli.main(["run", "--precision", "bf16-bogus"]) == 2
    assert "bf16-bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    assert "bf16-base (bf16 autocast over a frozen base stored in bf16" in " ".join(capsys.readouterr().out.split())


def _dtypes(model) -> tuple[set, set, set]:
    """The dtypes of the frozen parameters, of the trainable ones, and of the floating-point buffers."""
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    return frozen, trainable, {b.dtype for b in model.buffers() if b.is_floating_point()}


@pytest.mark.parametrize("arm", ["dense", "routed"])
def test_setup_and_pack_store_the_frozen_base_in_bf16(tiny, arm):
    task = tasks.get_task("rte")
    cfgs = [tiny_recipe(tiny["glue"], tiny[arm], precision="bf16-base", seed=s) for s in (0, 1)]
    setups = train.prepare_group(cfgs, task)
    assert setups[0].routed == (arm == "routed")
    for s in setups:
        assert _dtypes(s.model) == ({torch.bfloat16}, {torch.float32}, {torch.float32})
        assert models.cast_frozen(s.model, torch.bfloat16) == 0  # nothing left to cast
    if arm == "routed":  # the router's centroids are buffers: not cast
        assert any(name.endswith("router.centroids") for name, _ in setups[0].model.named_buffers())
    pack = packed.Pack([s.model for s in setups])
    assert _dtypes(pack.model) == ({torch.bfloat16}, {torch.float32}, {torch.float32})
    assert all(p.shape[0] == 2 for p in pack.model.parameters() if p.requires_grad)  # the stacked fp32 tensors
    pack.unpack()
    assert all(_dtypes(s.model)[:2] == ({torch.bfloat16}, {torch.float32}) for s in setups)
    (plain,) = train.prepare_group([replace(cfgs[0], precision="bf16")], task)  # bf16: the base stays fp32
    assert _dtypes(plain.model) == ({torch.float32}, {torch.float32}, {torch.float32})
    frozen = sum(p.numel() for p in plain.model.parameters() if not p.requires_grad)
    assert models.cast_frozen(plain.model, torch.bfloat16) == 2 * frozen  # 4 bytes -> 2 per frozen weight


def _first_steps(cfg: RunConfig, n: int = 4) -> tuple[list[float], float]:
    """(losses of the first `n` fast-engine steps of the run, largest change of a trainable weight)."""
    task = tasks.get_task(cfg.task)
    (s,) = train.prepare_group([cfg], task)
    engine = fast.FastEngine(s.model, cfg, task, s.tokenizer.pad_token_id, cfg.precision, torch.device("cpu"))
    batches = fast.epoch_batches(cfg, s.train_ds.items, engine.pad_id, task.is_regression)[0][:n]
    engine.prepare_training([batches])
    before = [p.detach().clone() for p in engine.params]
    losses = []
    for i, b in enumerate(batches):
        engine.set_lr(fast.lr_at(i, len(batches), 1, cfg.lr))
        losses.append(float(engine.train_step(b)[0]))
    moved = max(float((p.detach() - q).abs().max()) for p, q in zip(engine.params, before))
    return losses, moved


@pytest.mark.parametrize("arm", ["dense", "routed"])
def test_bf16_base_trains_like_bf16(tiny, arm):
    """Same math as bf16 up to the rounding of the base weights: the routed base keeps routing (k < N) in bf16."""
    cfg = tiny_recipe(tiny["glue"], tiny[arm], precision="bf16-base", epochs=1)
    got, moved = _first_steps(cfg)
    want, _ = _first_steps(replace(cfg, precision="bf16"))
    assert len(got) == 4 and all(math.isfinite(x) for x in got) and moved > 1e-4
    np.testing.assert_allclose(got, want, rtol=1e-2)


def test_packed_bf16_base_runs_equal_runs_alone(tiny, tmp_path):
    from safetensors.torch import load_file

    cfg = tiny_recipe(tiny["glue"], tiny["dense"], precision="bf16-base", engine="fast")
    cfgs = [replace(cfg, seed=s, output_dir=str(tmp_path / f"s{s}")) for s in (0, 1)]
    together = train.run_group(cfgs)
    alone = [train.run_one(replace(c, output_dir=str(tmp_path / f"alone{c.seed}"))) for c in cfgs]
    for t, a in zip(together, alone):
        assert t["precision"] == a["precision"] == "bf16-base" and t["group_size"] == 2
        assert t["predictions"] == a["predictions"]
        np.testing.assert_allclose(t["train_loss"], a["train_loss"], rtol=1e-3)
    for s in (0, 1):  # the adapters written back by unpack are fp32, and the runs' own
        got = load_file(tmp_path / f"s{s}" / "adapter" / "adapter_model.safetensors")
        want = load_file(tmp_path / f"alone{s}" / "adapter" / "adapter_model.safetensors")
        assert got.keys() == want.keys() and {v.dtype for v in got.values()} == {torch.float32}
        for k in got:
            torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("engine", ["fast", "trainer"])
def test_routed_bf16_base_run_scores_routing_off_and_its_adapter_reloads(tiny, tmp_path, engine):
    from finetune.evaluate import EvaluateSettings, evaluate_adapter
    from finetune.hf_trainer import training_arguments

    cfg = tiny_recipe(tiny["glue"], tiny["routed"], precision="bf16-base", engine=engine, epochs=1,
                      output_dir=str(tmp_path / "run"))  # fmt: skip
    assert training_arguments(cfg, str(tmp_path / "scratch"), "bf16-base").bf16
    r = train.run_one(cfg)
    assert r["precision"] == "bf16-base" and r["engine"] == engine and r["routed"]
    assert math.isfinite(r["final"]["loss"]) and math.isfinite(r["final_routing_off"]["loss"])
    # the fingerprint was taken of the fp32 base: the adapter reloads over the checkpoint as it is stored
    e = evaluate_adapter(EvaluateSettings(adapter=str(tmp_path / "run" / "adapter"), data_dir=str(tiny["glue"])))
    assert len(e["predictions"]) == len(r["predictions"])
