"""The sweep: plan validation (one line, exit 2, before any run), resuming, the statistics by hand, the report and
figures from synthetic runs, and a real tiny sweep end to end.

Everything here is self-contained: the tests write a tiny GLUE folder (RTE, MRPC, CoLA, STS-B) and a tiny random
Llama with a word-level tokenizer; no shared data and no network. Most tests replace the runner by a fake that
writes synthetic result.json files with known effects, so that they test the sweep, not the training.
"""

import functools
import json
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune import runner, sweep, sweep_stats, tasks

WORDS = "the a cat dog sat ran on under mat log big small red blue saw ate fish bird tree house".split()
PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------------
# fixtures: data, model, plans, a fake runner
# ---------------------------------------------------------------------------------------------------------------


def _write_glue(root: Path, n_train: int = 40, n_dev: int = 24) -> Path:
    """A tiny GLUE folder in the standard layout (headers and columns as in the real files)."""
    rng = random.Random(0)

    def sent():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))

    for split, n in (("train", n_train), ("dev", n_dev)):
        files = {
            "RTE": "index\tsentence1\tsentence2\tlabel\n" + "".join(
                f"{i}\t{sent()}\t{sent()}\t{rng.choice(['entailment', 'not_entailment'])}\n" for i in range(n)),
            "MRPC": "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n" + "".join(
                f"{rng.randint(0, 1)}\t{i}\t{i}\t{sent()}\t{sent()}\n" for i in range(n)),
            "CoLA": "".join(f"src\t{rng.randint(0, 1)}\t\t{sent()}\n" for i in range(n)),
            "STS-B": "index\tsentence1\tsentence2\tscore\n" + "".join(
                f"{i}\t{sent()}\t{sent()}\t{rng.uniform(0, 5):.2f}\n" for i in range(n)),
        }  # fmt: skip
        for folder, text in files.items():
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / f"{split}.tsv").write_text(text)
    return root


def _write_model(path: Path) -> Path:
    """A tiny random Llama (3 layers, intermediate 64) with a word-level tokenizer over WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    names = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", *WORDS, "Premise:", "Hypothesis:", "Sentence", "1:", "2:", "Sentence:"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(names)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]",
                                   eos_token="[EOS]")  # fmt: skip
    config = LlamaConfig(vocab_size=len(names), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-world")
    return {"glue": _write_glue(root / "glue"), "model": _write_model(root / "model"), "root": root}


def make_plan(world, **over) -> dict:
    """A small plan over the tiny model: 3 routed configs, 4 tasks, 10 seeds per round (as the real plan)."""
    plan = json.loads((Path(__file__).resolve().parents[1] / "results/sweep/plan.json").read_text())
    plan.update(
        name="tiny",
        model=str(world["model"]),
        data_dir=str(world["glue"]),
        configs=[
            {"name": "ref", "layers": "1-2", "num_clusters": 4, "top_k": 2},
            {"name": "rand", "layers": "1-2", "num_clusters": 4, "top_k": 2, "method": "random"},
            {"name": "all", "layers": "all", "num_clusters": 4, "top_k": 3},
        ],
        reference="ref",
    )
    plan["recipe"] = {**plan["recipe"], "epochs": 1.0, "max_length": 64, "buckets": [64], "max_train_samples": None,
                      "engine": "auto", "batch_size": 8}  # fmt: skip
    plan["analysis"] = {**plan["analysis"], "bootstrap_resamples": 2000, "permutation_resamples": 2000}
    for k, v in over.items():
        plan[k] = v
    return plan


def write_plan(tmp_path: Path, plan: dict) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan, indent=1))
    return path


class FakeRunner:
    """Stands in for run_many: writes a synthetic result.json per run. Score = task/seed base (+10 at lr 1e-3) +
    the arm's effect + arm noise; plain and routed share the base of a seed, so Δ = effect + noise."""

    def __init__(self, effects=None, noise=0.5):
        self.effects, self.noise, self.calls = effects or {}, noise, []

    def __call__(self, configs, run_dirs, jobs, resume, log=print, group=1):
        out = []
        for cfg, d in zip(configs, run_dirs):
            self.calls.append((cfg.task, cfg.arm, cfg.seed, cfg.lr, cfg.holdout_fraction is not None))
            out.append(self.result(cfg))
            d.mkdir(parents=True, exist_ok=True)
            (d / "result.json").write_text(json.dumps(out[-1]))
        return out

    def result(self, cfg) -> dict:
        m = tasks.get_task(cfg.task).primary
        base = 60 + np.random.default_rng([cfg.seed, zlib.crc32(cfg.task.encode())]).normal(0, 2)
        base += 10 * (cfg.lr == 1e-3)
        noise = np.random.default_rng([cfg.seed, zlib.crc32((cfg.task + cfg.arm).encode())]).normal(0, self.noise)
        score = base + (0.0 if cfg.arm == "plain" else self.effects.get(cfg.arm, 0.0) + noise)
        off = None if cfg.arm == "plain" else {m: score - 1.0}
        return {"task": cfg.task, "arm": cfg.arm, "seed": cfg.seed, "lr": cfg.lr, "model": cfg.model,
                "config": runner.config_record(cfg), "primary_metric": m, "before": {m: 50.0}, "per_epoch": [],
                "final": {m: float(score)}, "final_routing_off": off, "predictions": [], "hardware": "fake",
                "date": "2026-11-29 00:00 UTC"}  # fmt: skip


@pytest.fixture
def fake(monkeypatch):
    runner = FakeRunner()
    monkeypatch.setattr(sweep, "_run_many", lambda: runner)
    return runner


def _argv(plan_path, out, *extra):
    return ["--plan", str(plan_path), "--output", str(out), "--checkpoint-dir", str(Path(out).parent / "ckpts"), *extra]


def _strict_json(path: Path):
    def no_constant(c):
        raise AssertionError(f"non-strict JSON constant {c}")

    return json.loads(path.read_text(), parse_constant=no_constant)


# ---------------------------------------------------------------------------------------------------------------
# plan validation: one line, exit 2, before any run
# ---------------------------------------------------------------------------------------------------------------


def _bad_plans(world):
    p = make_plan(world)
    cases = {}
    cases["unknown task"] = (make_plan(world, tasks={**p["tasks"], "qqq": "accuracy"}), "unknown task 'qqq'")
    k_gt_n = [*p["configs"][:2], {"name": "big", "layers": "1-2", "num_clusters": 4, "top_k": 5}]
    cases["k > N"] = (make_plan(world, configs=k_gt_n), "top_k <= num_clusters")
    layer = [*p["configs"][:2], {"name": "far", "layers": "1-5", "num_clusters": 4, "top_k": 2}]
    cases["layer out of range"] = (make_plan(world, configs=layer), "out of range")
    cases["duplicate seeds"] = (make_plan(world, round1={**p["round1"], "seeds": [0, 1, 1]}), "seeds repeat")
    cases["confirmation seeds not fresh"] = (make_plan(world, confirmation={**p["confirmation"], "seeds": [9, 10]}),
                                             "must be fresh")  # fmt: skip
    cases["wrong metric"] = (make_plan(world, tasks={**p["tasks"], "mrpc": "accuracy"}), "metric is f1")
    cases["N > intermediate"] = (make_plan(world, configs=[{"name": "ref", "layers": "1-2", "num_clusters": 128,
                                                            "top_k": 2}]), "intermediate_size")  # fmt: skip
    cases["N as a string"] = (make_plan(world, configs=[{"name": "ref", "layers": "1-2", "num_clusters": "4",
                                                         "top_k": 2}]), "num_clusters must be of type int")  # fmt: skip
    return cases


@pytest.mark.parametrize("case", ["unknown task", "k > N", "layer out of range", "duplicate seeds",
                                  "confirmation seeds not fresh", "wrong metric", "N > intermediate",
                                  "N as a string"])  # fmt: skip
def test_bad_plan_is_one_line_exit_2_before_any_run(world, tmp_path, fake, capsys, case):
    plan, message = _bad_plans(world)[case]
    out = tmp_path / "out"
    assert sweep.main(_argv(write_plan(tmp_path, plan), out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("python -m finetune sweep: error:"), err
    assert message in err
    assert fake.calls == [] and not out.exists()


def test_output_holding_another_plan_is_refused(world, tmp_path, fake, capsys):
    out = tmp_path / "out"
    assert sweep.main(_argv(write_plan(tmp_path, make_plan(world)), out, "--only-stage", "lr")) == 0
    n = len(fake.calls)
    other = tmp_path / "other"
    other.mkdir()
    path = write_plan(other, make_plan(world, name="another"))
    assert sweep.main(_argv(path, out, "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another plan" in err
    assert len(fake.calls) == n


def test_bad_settings_are_one_line(world, tmp_path, fake, capsys):
    path = write_plan(tmp_path, make_plan(world))
    for extra, message in ((["--jobs", "0"], "--jobs"), (["--group", "0"], "--group"),
                           (["--only-stage", "round2"], "--only-stage")):  # fmt: skip
        assert sweep.main(_argv(path, tmp_path / "out", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err
    assert sweep.main(["--plan", str(tmp_path / "nope.json"), "--output", str(tmp_path / "o")]) == 2
    assert "no plan file" in capsys.readouterr().err


def test_round1_alone_needs_the_lr_stage(world, tmp_path, fake, capsys):
    assert sweep.main(_argv(write_plan(tmp_path, make_plan(world)), tmp_path / "out", "--only-stage", "round1")) == 2
    assert "lr stage is not finished" in capsys.readouterr().err
    assert fake.calls == []


def test_only_task_runs_those_tasks_and_the_confirmation_can_follow(world, tmp_path, fake, capsys):
    """The selection tasks' round 1 first, then the confirmation, then the rest of round 1: the same runs."""
    plan = make_plan(world)
    path, out = write_plan(tmp_path, plan), tmp_path / "out"
    assert sweep.main(_argv(path, out, "--only-task", "sts-b")) == 2
    assert "--only-task takes tasks of the plan" in capsys.readouterr().err and fake.calls == []
    assert sweep.main(_argv(path, out, "--only-stage", "lr")) == 0
    n_lr = len(fake.calls)
    select = plan["confirmation"]["select_on"]
    assert sweep.main(_argv(path, out, "--resume", "--only-stage", "round1", "--only-task", *select)) == 0
    assert {c[0] for c in fake.calls[n_lr:]} == set(select)
    n_sel = len(fake.calls)
    assert n_sel - n_lr == len(select) * (1 + len(plan["configs"])) * 10
    assert sweep.main(_argv(path, out, "--resume", "--only-stage", "confirmation")) == 0
    conf = fake.calls[n_sel:]
    assert {c[0] for c in conf} == set(plan["confirmation"]["tasks"]) and {c[2] for c in conf} == set(range(10, 20))
    assert sweep.main(_argv(path, out, "--resume")) == 0
    rest = fake.calls[n_sel + len(conf) :]
    assert {c[0] for c in rest} == set(plan["tasks"]) - set(select) and {c[2] for c in rest} == set(range(10))
    assert _strict_json(out / "results.json")["headline"] is not None


# ---------------------------------------------------------------------------------------------------------------
# stages, ordering, resume
# ---------------------------------------------------------------------------------------------------------------


def test_stages_in_order_lr_on_holdout_and_cells_whole(world, tmp_path, fake):
    plan = make_plan(world, model="tiny-base")  # a name; --model says where the base is on this machine
    out = tmp_path / "out"
    assert sweep.main(_argv(write_plan(tmp_path, plan), out, "--model", str(world["model"]))) == 0
    res = _strict_json(out / "results.json")
    assert res["model"] == "tiny-base" and res["model_loaded_from"] == str(world["model"])
    n_tasks, n_cfg = len(plan["tasks"]), len(plan["configs"])
    n_lr = n_tasks * 3 * 3
    lr_calls, rest = fake.calls[:n_lr], fake.calls[n_lr:]
    assert all(c[4] for c in lr_calls) and not any(c[4] for c in rest)  # holdout only in the lr stage
    r1 = rest[: n_tasks * (1 + n_cfg) * 10]
    assert all(c[3] == 1e-3 for c in rest)  # the fake's best lr, chosen on the holdout, used by every arm
    # whole cells in priority order: plain and the reference on every task first, each cell's 10 seeds together
    cells = [(c[0], c[1]) for c in r1[::10]]
    assert all(len({(c[0], c[1]) for c in r1[i : i + 10]}) == 1 for i in range(0, len(r1), 10))
    assert cells[: 2 * n_tasks] == [(t, a) for t in plan["tasks"] for a in ("plain", "ref")]
    assert cells[2 * n_tasks : 2 * n_tasks + 4] == [("rte", "rand"), ("rte", "all"), ("mrpc", "rand"), ("mrpc", "all")]
    conf = rest[len(r1) :]
    assert {c[0] for c in conf} == {"cola", "stsb"} and {c[2] for c in conf} == set(range(10, 20))


def test_resume_skips_finished_runs_and_redoes_interrupted_ones(world, tmp_path, fake, capsys):
    path, out = write_plan(tmp_path, make_plan(world)), tmp_path / "out"
    assert sweep.main(_argv(path, out, "--only-stage", "lr")) == 0
    n_lr = len(fake.calls)
    assert sweep.main(_argv(path, out)) == 2  # runs are there: continuing needs --resume
    assert "--resume" in capsys.readouterr().err
    assert sweep.main(_argv(path, out, "--resume")) == 0
    assert not any(c[4] for c in fake.calls[n_lr:])  # no lr run again
    first = _strict_json(out / "results.json")
    # a crash: three runs lost their result.json (folders left behind), one was cut off while writing it
    lost = sorted((out / "runs").glob("*/*/seed*/result.json"))[:4]
    for f in lost[:3]:
        f.unlink()
    lost[3].write_text('{"task": "rt')
    before = len(fake.calls)
    assert sweep.main(_argv(path, out, "--resume")) == 0
    redone = fake.calls[before:]
    want = sorted((f.parts[-4], f.parts[-3], int(f.parts[-2][4:])) for f in lost)  # runs/<task>/<arm>/seed<s>
    assert sorted((c[0], c[1], c[2]) for c in redone) == want
    again = _strict_json(out / "results.json")
    for key in ("lr_selection", "round1", "confirmation", "headline", "not_run"):
        assert again[key] == first[key], key


def test_budget_stops_before_new_runs_and_reports_not_run(world, tmp_path, fake):
    out = tmp_path / "out"
    assert sweep.main(_argv(write_plan(tmp_path, make_plan(world)), out, "--budget-s", "1e-9")) == 0
    assert fake.calls == []
    res = _strict_json(out / "results.json")
    assert res["headline"]["kind"] == "pending" and res["finished_runs"] == 0
    assert "No headline yet" in (out / "report.md").read_text()
    assert len(res["not_run"]) == 4 * 3 + 4 * 4 + 2 * 2  # lr cells, round-1 cells, confirmation cells


def test_budget_leaves_whole_cells(world, tmp_path, monkeypatch):
    """A budget that runs out mid-sweep: every cell started is finished with all its seeds, the rest is listed as
    not run, and a later --resume finishes the plan."""
    import time

    slow = FakeRunner()

    def runner_(configs, run_dirs, jobs, resume, log=print, group=1):
        time.sleep(0.02 * len(configs))
        return slow(configs, run_dirs, jobs, resume, log, group)

    monkeypatch.setattr(sweep, "_run_many", lambda: runner_)
    path, out = write_plan(tmp_path, make_plan(world)), tmp_path / "out"
    assert sweep.main(_argv(path, out, "--budget-s", "1.5")) == 0
    res = _strict_json(out / "results.json")
    per_cell = {}  # (task, arm, lr, lr stage, confirmation) -> runs made
    for task, arm, seed, lr, holdout in slow.calls:
        key = (task, arm, lr, holdout, seed >= 10)
        per_cell[key] = per_cell.get(key, 0) + 1
    assert 0 < len(slow.calls) < 236
    assert all(n == (3 if key[3] else 10) for key, n in per_cell.items())
    assert res["not_run"] and all(m["finished_seeds"] == 0 for m in res["not_run"])  # no cell half done
    assert sweep.main(_argv(path, out, "--resume")) == 0
    assert _strict_json(out / "results.json")["not_run"] == []


def test_a_run_of_another_plan_in_the_folder_is_refused(world, tmp_path, fake, capsys):
    path, out = write_plan(tmp_path, make_plan(world)), tmp_path / "out"
    assert sweep.main(_argv(path, out, "--only-stage", "lr")) == 0
    f = next((out / "runs" / "lr").rglob("result.json"))
    r = json.loads(f.read_text())
    f.write_text(json.dumps({**r, "seed": r["seed"] + 100}))
    assert sweep.main(_argv(path, out, "--resume")) == 2
    assert "not this plan's" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# statistics by hand
# ---------------------------------------------------------------------------------------------------------------


def test_paired_cell_by_hand():
    from scipy.stats import t

    routed = {0: 71.0, 1: 70.0, 2: 74.0, 3: 69.0}
    plain = {0: 70.0, 1: 70.5, 2: 71.0, 3: 68.0}
    d = np.array([1.0, -0.5, 3.0, 1.0])
    c = sweep_stats.paired_cell(routed, plain)
    half = t.ppf(0.975, 3) * d.std(ddof=1) / 2
    assert c["delta_mean"] == pytest.approx(1.125) and c["per_seed_delta"] == d.tolist()
    assert c["ci95"] == pytest.approx([1.125 - half, 1.125 + half])
    tstat = d.mean() / (d.std(ddof=1) / 2)
    assert c["p"] == pytest.approx(2 * t.sf(abs(tstat), 3))
    same = sweep_stats.paired_cell({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})  # Δ = 1 on every seed: no variance
    assert same["delta_mean"] == 1.0 and same["ci95"] is None and same["p"] is None
    assert "zero variance" in same["undefined"]["p"]
    one = sweep_stats.paired_cell({0: 2.0}, {0: 1.0})
    assert one["ci95"] is None and one["undefined"]["ci95"] == "fewer than 2 seeds"


def test_holm_by_hand():
    adj = sweep_stats.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None})
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1 = 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06
    assert adj["a"] == pytest.approx(0.03) and adj["c"] == pytest.approx(0.06) and adj["b"] == pytest.approx(0.06)
    assert adj["d"] is None
    assert sweep_stats.holm({"a": 0.5, "b": 0.9})["b"] == 1.0
    # 10 planned configs, 2 run so far: the missing 8 count as p = 1, so the correction is already the final one
    part = sweep_stats.holm({"a": 0.001, "b": 0.004}, family=10)
    assert part["a"] == pytest.approx(0.01) and part["b"] == pytest.approx(0.036)


def test_pooled_by_hand():
    deltas = {"rte": [2.0, 4.0, 0.0], "mrpc": [1.0, -1.0, 3.0]}
    sds = {"rte": 2.0, "mrpc": 1.0}
    p = sweep_stats.pooled(deltas, sds, n_resamples=2000)
    z = np.array([1.0, 2.0, 0.0, 1.0, -1.0, 3.0])
    assert p["delta_z"] == pytest.approx(z.mean()) and p["n_units"] == 6
    lo, hi = p["ci95"]
    assert lo < z.mean() < hi and lo >= -1.0 and hi <= 3.0
    # sign flips of 6 units: 64 arrangements, fewer than the resamples, so the p is exact
    flips = np.array([[1 if (i >> j) & 1 else -1 for j in range(6)] for i in range(64)]) * z
    exact = np.mean(np.abs(flips.mean(1)) >= abs(z.mean()) - 1e-12)
    assert p["p_permutation"] == pytest.approx(exact)
    w = p["win"]
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (4, 1, 1, 6) and w["p_win"] == pytest.approx(4 / 6)
    from scipy.stats import beta

    assert w["ci95"] == pytest.approx([beta.ppf(0.025, 4, 3), beta.ppf(0.975, 5, 2)])


def test_pooled_bootstrap_resamples_within_tasks():
    """A task whose Δs are all equal keeps its value in every resample: the CI of (all 1) + (all 3) is the point 2."""
    p = sweep_stats.pooled({"a": [1.0, 1.0, 1.0], "b": [3.0, 3.0, 3.0]}, {"a": 1.0, "b": 1.0}, n_resamples=500)
    assert p["delta_z"] == pytest.approx(2.0) and p["ci95"] == pytest.approx([2.0, 2.0])


def test_pooled_undefined_is_null_with_reason():
    p = sweep_stats.pooled({"rte": [1.0, 2.0]}, {"rte": 0.0})
    assert p["delta_z"] is None and p["ci95"] is None and "SD is 0" in p["undefined"]["task rte"]


def test_choose_lr_and_select_best():
    assert sweep_stats.choose_lr({2e-4: [60, 62], 5e-4: [70, 70], 1e-3: [69, 71]}) == 5e-4  # tie: the smaller
    def cells(rte, mrpc):
        return {"cells": {"rte": {"per_seed_delta": rte}, "mrpc": {"per_seed_delta": mrpc}}}

    stats = {"plain_sd": {"rte": 2.0, "mrpc": 1.0}, "configs": {"a": cells([2.0, 2.0], [0.0, 0.0]),
                                                                "b": cells([0.0, 0.0], [1.5, 1.5])}}  # fmt: skip
    best, scores = sweep_stats.select_best(stats, ["a", "b"], ["rte", "mrpc"])
    assert best == "b" and scores == pytest.approx({"a": 0.5, "b": 0.75})
    assert sweep_stats.select_best(stats, ["a", "b", "c"], ["rte", "mrpc"])[0] is None  # c not run: no choice yet


# ---------------------------------------------------------------------------------------------------------------
# report and figures from synthetic runs
# ---------------------------------------------------------------------------------------------------------------


def _synthetic_sweep(world, tmp_path, monkeypatch, effects, noise=0.5):
    runner = FakeRunner(effects, noise)
    monkeypatch.setattr(sweep, "_run_many", lambda: runner)
    out = tmp_path / "out"
    assert sweep.main(_argv(write_plan(tmp_path, make_plan(world)), out)) == 0
    return out, _strict_json(out / "results.json"), (out / "report.md").read_text()


def test_report_headline_beats_when_confirmed(world, tmp_path, monkeypatch):
    out, res, md = _synthetic_sweep(world, tmp_path, monkeypatch, {"ref": 0.0, "rand": 3.0, "all": -2.0})
    assert res["confirmation"]["config"] == "rand"
    assert res["headline"]["kind"] == "beats" and res["headline"]["sentence"].startswith("Config rand beats plain LoRA")
    assert res["headline"]["sentence"] in md and "confirmed on held-out tasks (CoLA + STS-B" in md
    cell = res["round1"]["configs"]["rand"]["cells"]["rte"]
    assert cell["n"] == 10 and cell["delta_mean"] == pytest.approx(3.0, abs=0.6)
    assert res["round1"]["configs"]["all"]["pooled"]["delta_z"] < 0
    assert all(res["round1"]["configs"][c]["pooled"]["p_holm"] >= res["round1"]["configs"][c]["pooled"]["p_permutation"]
               for c in ("ref", "rand", "all"))  # fmt: skip
    off = res["round1"]["configs"]["rand"]["routing_off"]["rte"]
    assert off["vs_routing_on"]["delta_mean"] == pytest.approx(-1.0)
    for name in ("heatmap.png", "forest.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert res["not_run"] == []


def test_report_headline_no_gain_gives_the_bound(world, tmp_path, monkeypatch):
    _, res, md = _synthetic_sweep(world, tmp_path, monkeypatch, {"ref": 0.0, "rand": 0.0, "all": 0.0}, noise=1.0)
    assert res["headline"]["kind"] == "no_gain"
    best = res["confirmation"]["config"]
    hi = res["confirmation"]["configs"][best]["pooled"]["ci95"][1]
    s = res["headline"]["sentence"]
    assert s.startswith("No config beats plain LoRA")
    assert (f"below {hi:.2f} plain-SD units" in s) if hi > 0 else (f"at least {-hi:.2f}" in s)
    for t in ("cola", "stsb"):
        upper = res["confirmation"]["configs"][best]["cells"][t]["ci95"][1]
        assert f"{tasks.get_task(t).folder}: below {upper:+.2f}" in s
    assert "Holm" in md and "not run" not in md.split("## What was run")[1].split("## lr selection")[0]


def test_partial_cell_is_reported_as_not_run(world, tmp_path, monkeypatch):
    out, res, _ = _synthetic_sweep(world, tmp_path, monkeypatch, {"rand": 1.0})
    (out / "runs" / "cola" / "all" / "seed3" / "result.json").unlink()
    assert sweep.main(_argv(out / "plan.json", out, "--only-stage", "report")) == 0
    res = _strict_json(out / "results.json")
    assert "cola" not in res["round1"]["configs"]["all"]["cells"]
    partial = {"stage": "round1", "arm": "all", "task": "cola", "lr": 1e-3, "finished_seeds": 9, "planned_seeds": 10}
    assert partial in res["not_run"]
    assert res["round1"]["configs"]["all"]["pooled"]["tasks"] == ["rte", "mrpc", "stsb"]
    assert "all on CoLA: 9/10 seeds" in (out / "report.md").read_text()


# ---------------------------------------------------------------------------------------------------------------
# end to end: a real tiny sweep
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_tiny_sweep_end_to_end(world, tmp_path, one_thread, monkeypatch):
    """2 tasks, 2 configs, 2 seeds per stage, 1 epoch: 8 lr runs, 12 round-1 runs, 4 confirmation runs, through the
    real runner (its worker on one intra-op thread: the CPU is shared)."""
    monkeypatch.setattr(sweep, "_run_many", lambda: functools.partial(runner.run_many, threads=1))
    plan = make_plan(
        world,
        tasks={"rte": "accuracy", "stsb": "pearson"},
        configs=[{"name": "ref", "layers": "1-2", "num_clusters": 4, "top_k": 2},
                 {"name": "all", "layers": "all", "num_clusters": 4, "top_k": 3}],  # fmt: skip
        lr_selection={**make_plan(world)["lr_selection"], "grid": [1e-3, 5e-3], "seeds": [0, 1]},
        round1={"seeds": [0, 1]},
        confirmation={"select_on": ["stsb"], "tasks": ["rte"], "seeds": [2, 3]},
    )
    out = tmp_path / "out"
    assert sweep.main(_argv(write_plan(tmp_path, plan), out)) == 0
    res = _strict_json(out / "results.json")
    assert res["finished_runs"] == 24 and res["not_run"] == []
    assert set(res["lr_selection"]["chosen"]) == {"rte", "stsb"}
    lr_run = _strict_json(next((out / "runs" / "lr" / "rte").rglob("result.json")))
    assert lr_run["eval_examples"] == 4  # a 10% slice of the 40 train rows, not the 24 dev rows
    r1 = _strict_json(out / "runs" / "stsb" / "ref" / "seed0" / "result.json")
    assert r1["eval_examples"] == 24 and r1["final_routing_off"] is not None
    assert r1["lr"] == res["lr_selection"]["chosen"]["stsb"]
    assert res["confirmation"]["config"] in ("ref", "all") and res["headline"]["kind"] != "pending"
    assert (out / "plan.json").read_text() == (tmp_path / "plan.json").read_text()
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["all", "ref"]  # each config converted once
    for name in ("heatmap.png", "forest.png"):
        assert (out / name).read_bytes()[:8] == PNG
