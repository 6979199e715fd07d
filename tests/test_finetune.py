"""`compare` and `collect` end to end on the CPU (finetune/compare.py through its Python API): what they write, the
statistics over seeds, resuming after a crash (byte-identical results), an lr grid chosen on train, and the one-line
errors of bad settings.

The models are tiny random Llamas with a character tokenizer and the data a tiny GLUE-format RTE folder, all written
by the builders in test_runner.py: nothing here needs ../shared or the network.
"""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from finetune import stats
from finetune.compare import (
    PROVENANCE_HEADING,
    CollectSettings,
    CompareSettings,
    collect,
    compare,
    parse_arm,
)
from routed_llama.errors import UserError

from test_runner import LAYERS, N_CLUSTERS, TOP_K, tiny_bases, tiny_recipe, write_tiny_glue

ARM = f"name=r,layers={LAYERS},num_clusters={N_CLUSTERS},top_k={TOP_K}"
SEEDS = [0, 1]
EPOCHS = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-compare")
    return {**tiny_bases(root), "glue": write_tiny_glue(root / "glue")}


def _settings(tiny, output: Path, **kw) -> CompareSettings:
    """Baseline and a routed arm "r" converted on the fly (the lr-grid test adds an arm given as a checkpoint)."""
    base = dict(arms=[ARM], output=str(output), seeds=SEEDS, command="cmd")
    return CompareSettings(**{**base, **kw})


def _recipe(tiny):
    return tiny_recipe(tiny["glue"], tiny["dense"], epochs=EPOCHS)


@pytest.fixture(scope="module")
def compared(tiny, tmp_path_factory):
    """(output folder, summary, log lines) of one comparison, 2 seeds, 2 epochs, one worker."""
    out = tmp_path_factory.mktemp("compare") / "rte-tiny"
    lines = []
    summary = compare(_settings(tiny, out), _recipe(tiny), log=lines.append)
    return out, summary, lines


def _deterministic(out: Path, moved_from: Path | None = None) -> tuple[str, str, bytes]:
    """results.json without its provenance block, report.md above its provenance section, curves.png; with
    `moved_from`, the paths into `out` are written as they were in that folder."""
    s = json.loads((out / "results.json").read_text())
    s.pop("provenance")
    text, report = json.dumps(s, indent=1), (out / "report.md").read_text()
    if moved_from is not None:
        text, report = text.replace(str(out), str(moved_from)), report.replace(str(out), str(moved_from))
    return text, report[: report.index(PROVENANCE_HEADING)], (out / "curves.png").read_bytes()


# --- what compare writes --------------------------------------------------------------------------------------------


def test_compare_writes_results_report_and_curves(compared, tiny):
    out, summary, lines = compared
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "compare.json", "curves.png", "report.md",
                                                     "results.json", "runs"]  # fmt: skip
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = json.loads((out / "results.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    assert s == json.loads(json.dumps(summary))
    assert (s["task"], s["metric"], s["model"], s["experiment"]) == ("rte", "accuracy", tiny["dense"], "rte-tiny")
    assert list(s["arms"]) == ["baseline", "r"]
    assert s["statistics"]["unit"] == "seed"
    assert s["settings"]["epochs"] == EPOCHS and "output_dir" not in s["settings"]
    p = s["provenance"]
    assert p["command"] == "cmd" and p["jobs"] == 1 and p["wall_seconds"] > 0
    assert set(p["timing"]) == set(s["arms"]) and set(p["time_ratio"]) == {"r"}
    assert all(len(t["train_seconds"]) == 2 and min(t["train_seconds"]) > 0 for t in p["timing"].values())

    report = (out / "report.md").read_text()
    head, tail = report.split(PROVENANCE_HEADING)
    for arm in s["arms"]:
        assert f"| {arm} | 0.003 | " in head, arm
    assert "paired t" in head and "sign-flip" in head and "McNemar per seed" in head and "pooled" in head
    assert "![metric vs epoch](curves.png)" in head
    assert "cmd" in tail and "train s" in tail and "train s" not in head  # wall-clock numbers only below the heading
    assert sum(" seed " in line for line in lines) == 4 and sum("converting" in line for line in lines) == 1


def test_compare_arms(compared, tiny):
    out, s, _ = compared
    for name, arm in s["arms"].items():
        assert arm["seeds"] == SEEDS and len(arm["final"]) == 2
        assert [len(pe) for pe in arm["per_epoch"]] == [EPOCHS, EPOCHS]  # one entry per epoch, per seed
        assert [pe[-1] for pe in arm["per_epoch"]] == arm["final"]  # the headline is the last epoch, not the best
        assert arm["final_mean"] == pytest.approx(np.mean(arm["final"]))
        assert len(arm["labels"]) == 16 and all(len(p) == 16 for p in arm["predictions"])
        for preds, correct, final in zip(arm["predictions"], arm["correct"], arm["final"]):
            assert correct == [int(p == y) for p, y in zip(preds, arm["labels"])]
            assert final == pytest.approx(100 * np.mean(correct), abs=1e-3)
        assert arm["config"]["lr"] == 3e-3
        for seed in SEEDS:  # every run left its result.json and adapter under runs/<arm>-seed<s>
            run = out / "runs" / f"{name}-seed{seed}"
            r = json.loads((run / "result.json").read_text())
            assert (r["arm"], r["seed"], r["routed"]) == (name, seed, name != "baseline")
            assert r["final"]["accuracy"] == arm["final"][SEEDS.index(seed)]
            assert (run / "adapter").is_dir()
    base, routed = s["arms"]["baseline"], s["arms"]["r"]
    assert base["config"] == {"name": "baseline", "model": tiny["dense"], "lr": 3e-3}
    assert base["final_routing_off"] is None and len(routed["final_routing_off"]) == 2
    ckpt = out / "checkpoints" / "r"
    assert routed["config"]["model"] == str(ckpt) and routed["config"]["checkpoint"] is None
    assert (routed["config"]["layers"], routed["config"]["num_clusters"], routed["config"]["top_k"]) == (LAYERS, N_CLUSTERS, TOP_K)
    conv = json.loads((ckpt / "conversion.json").read_text())
    assert conv["routed_layers"] == [1, 2] and (conv["num_experts"], conv["num_experts_per_tok"]) == (N_CLUSTERS, TOP_K)


def test_comparisons_are_over_seeds(compared):
    _, s, _ = compared
    base = s["arms"]["baseline"]
    assert [c["treatment"] for c in s["comparisons"]] == ["r"]
    for c in s["comparisons"]:
        arm = s["arms"][c["treatment"]]
        assert arm["correct"] != base["correct"], "the arms agree on every example: these checks would be weak"
        delta = [t - b for t, b in zip(arm["final"], base["final"])]
        assert c["per_seed_delta"] == pytest.approx(delta) and c["delta_mean"] == pytest.approx(np.mean(delta))
        _, ci = stats.paired_ci(arm["final"], base["final"])
        assert c["ci95"] == pytest.approx(list(ci))
        assert c["paired_t"] == stats.paired_t(arm["final"], base["final"])
        assert c["sign_flip"] == stats.sign_flip(arm["final"], base["final"])
        assert c["sign_flip"]["min_p"] == 0.5  # two seeds: a sign-flip test cannot go below 2/4
        assert [m["seed"] for m in c["mcnemar_per_seed"]] == SEEDS
        for m, t_corr, b_corr in zip(c["mcnemar_per_seed"], arm["correct"], base["correct"]):
            assert {k: m[k] for k in ("b", "c", "p")} == stats.mcnemar(t_corr, b_corr)  # per seed, never pooled
        assert "mcnemar_p" not in c


# --- resume ---------------------------------------------------------------------------------------------------------


def test_resume_after_a_crash_gives_the_same_results(compared, tiny, tmp_path):
    """Killed after some runs: one run finished, one killed while writing its result, the rest never started, no
    report yet. --resume (here with two workers) keeps the finished run and ends with the uninterrupted results."""
    src, _, _ = compared
    out = tmp_path / "rte-tiny"
    shutil.copytree(src, out)
    for f in ("results.json", "report.md", "curves.png"):
        (out / f).unlink()
    kept = out / "runs" / "baseline-seed0"
    kept_bytes = (kept / "result.json").read_bytes()
    half = out / "runs" / "r-seed0" / "result.json"
    half.write_text(half.read_text()[:200])
    for d in ("baseline-seed1", "r-seed1"):
        shutil.rmtree(out / "runs" / d)
    lines = []
    compare(_settings(tiny, out, resume=True, jobs=2), _recipe(tiny), log=lines.append)
    assert (kept / "result.json").read_bytes() == kept_bytes
    assert sum("kept from an earlier run" in line for line in lines) == 1
    assert any("reusing the routed checkpoint" in line for line in lines)  # converted once, not again
    want, got = _deterministic(src), _deterministic(out, moved_from=src)
    assert got[0] == want[0]  # results.json without provenance
    assert got[1] == want[1]  # report.md above the provenance section: byte for byte
    assert got[2] == want[2]  # curves.png: byte for byte
    assert json.loads((out / "results.json").read_text())["provenance"]["jobs"] == 2


def test_resume_needs_the_same_comparison(compared, tiny, tmp_path):
    src, _, _ = compared
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    with pytest.raises(UserError, match="other settings"):
        compare(_settings(tiny, out, resume=True, seeds=[0, 1, 2]), _recipe(tiny))
    with pytest.raises(UserError, match="other settings"):
        compare(_settings(tiny, out, resume=True), replace(_recipe(tiny), lr=1e-3))
    # a plan recorded before a RunConfig field existed (here `compile`) is the same plan as today's default
    plan = json.loads((out / "compare.json").read_text())
    del plan["recipe"]["compile"]
    (out / "compare.json").write_text(json.dumps(plan))
    with pytest.raises(UserError, match="other settings"):
        compare(_settings(tiny, out, resume=True), replace(_recipe(tiny), compile=True))
    for f in out.glob("runs/*/result.json"):  # as if made here: the converted arm's checkpoint is under `out`
        f.write_text(f.read_text().replace(str(src), str(out)))
    compare(_settings(tiny, out, resume=True), _recipe(tiny))  # every run kept: nothing trains
    (out / "compare.json").unlink()
    with pytest.raises(UserError, match="not a comparison that can be resumed"):
        compare(_settings(tiny, out, resume=True), _recipe(tiny))


def test_command_line_resume_of_a_finished_comparison(compared, tiny, tmp_path, capsys):
    """`python -m finetune compare ... --resume` over a finished comparison: every run is kept (nothing trains) and
    the outputs are rewritten with the same deterministic part; the recorded command is the one given."""
    from finetune import cli

    src, _, _ = compared
    out = tmp_path / "rte-tiny"
    shutil.copytree(src, out)
    for f in out.glob("runs/*/result.json"):  # as if made here: the converted arm's checkpoint is under `out`
        f.write_text(f.read_text().replace(str(src), str(out)))
    r = _recipe(tiny)
    argv = ["compare", "--arm", ARM, "--seeds", *map(str, SEEDS), "--output", str(out), "--resume",
            "--model", r.model, "--data-dir", r.data_dir, "--lr", str(r.lr), "--epochs", str(r.epochs),
            "--batch-size", str(r.batch_size), "--eval-batch-size", str(r.eval_batch_size), "--max-length",
            str(r.max_length), "--lora-r", str(r.lora_r), "--lora-alpha", str(r.lora_alpha), "--precision", r.precision]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("kept from an earlier run") == 4 and PROVENANCE_HEADING in printed
    assert _deterministic(out, moved_from=src) == _deterministic(src)
    assert json.loads((out / "results.json").read_text())["provenance"]["command"].endswith("--precision fp32")


def test_a_non_empty_output_needs_a_flag(compared, tiny):
    out, _, _ = compared
    before = (out / "results.json").read_bytes()
    with pytest.raises(UserError, match="exists and is not empty; pass --overwrite to replace it or --resume"):
        compare(_settings(tiny, out), _recipe(tiny))
    assert (out / "results.json").read_bytes() == before


# --- lr grid --------------------------------------------------------------------------------------------------------


def test_lr_grid_is_chosen_on_a_slice_of_train(tiny, tmp_path):
    """One seed, the plain arm and an arm given as a checkpoint, two lrs, one epoch, two workers."""
    out = tmp_path / "grid"
    s = compare(_settings(tiny, out, arms=[f"name=c,checkpoint={tiny['routed']}"], seeds=[0], lrs=[1e-5, 3e-3], jobs=2),
                replace(_recipe(tiny), epochs=1), log=lambda _: None)  # fmt: skip
    # an arm given as a checkpoint records the checkpoint's layout (not the Arm defaults N=32, k=16, all layers)
    given = s["arms"]["c"]["config"]
    assert given["checkpoint"] == given["model"] == tiny["routed"]
    assert (given["layers"], given["num_clusters"], given["top_k"]) == ("1,2", N_CLUSTERS, TOP_K)
    assert set(s["lr_selection"]) == {"baseline", "c"}
    for arm, sel in s["lr_selection"].items():
        assert set(sel) == {"1e-05", "0.003"}
        assert s["arms"][arm]["config"]["lr"] == float(max(sel, key=sel.get))
        for lr in ("1e-05", "0.003"):
            r = json.loads((out / "lr-selection" / f"{arm}-lr{float(lr):g}" / "result.json").read_text())
            assert r["eval_examples"] == 3 and r["train_examples"] == 29  # 10% of the 32 train rows held out; no dev
            assert r["final"]["accuracy"] == sel[lr]
    assert "lr selection on a held-out slice of train" in (out / "report.md").read_text()
    # one seed: the spread and the tests are undefined, null with the reason (strict JSON, no NaN)
    c = json.loads((out / "results.json").read_text(), parse_constant=pytest.fail)["comparisons"][0]
    assert c["ci95"] == [None, None] and c["ci95_reason"] == "fewer than two seeds"
    assert c["paired_t"]["p"] is None and c["paired_t"]["reason"] == "fewer than two seeds"
    assert s["arms"]["c"]["final_std"] is None and s["arms"]["c"]["final_std_reason"] == "one seed"


# --- collect --------------------------------------------------------------------------------------------------------


def test_collect_rebuilds_the_compare_summary(compared, tmp_path):
    out, _, _ = compared
    dest = tmp_path / "collected"
    b = collect(CollectSettings(results=[str(out / "runs")], output=str(dest), name=out.name, jobs=1))
    a = json.loads((out / "results.json").read_text())
    b = json.loads((dest / "results.json").read_text())
    assert b["provenance"]["command"] == "" and b["provenance"]["wall_seconds"] is None
    assert b["provenance"]["timing"] == a["provenance"]["timing"]
    # the same numbers; only the converted arm's record differs: collect knows it by its checkpoint folder
    for s in (a, b):
        s.pop("provenance")
    ra, rb = a["arms"]["r"].pop("config"), b["arms"]["r"].pop("config")
    assert a == b  # (dicts: the order of the arms aside)
    assert rb == {**ra, "checkpoint": ra["model"], "layers": "1,2"}


def test_collect_conversion_records_for_checkpoints_not_at_hand(compared, tmp_path):
    out, _, _ = compared
    runs = tmp_path / "runs"
    shutil.copytree(out / "runs", runs)
    for f in runs.glob("r-seed*/result.json"):  # the checkpoint folder is elsewhere now
        f.write_text(f.read_text().replace(str(out / "checkpoints" / "r"), "/gone/r"))
    record = tmp_path / "conversion-r.json"
    shutil.copy(out / "checkpoints" / "r" / "conversion.json", record)
    s = collect(CollectSettings(results=[str(runs)], output=str(tmp_path / "a")))
    assert s["arms"]["r"]["config"]["num_clusters"] is None  # unknown rather than the Arm defaults
    s = collect(CollectSettings(results=[str(runs)], output=str(tmp_path / "b"), conversions=[f"r={record}"]))
    assert (s["arms"]["r"]["config"]["layers"], s["arms"]["r"]["config"]["num_clusters"]) == ("1,2", N_CLUSTERS)
    with pytest.raises(UserError, match="names arms with no runs"):
        collect(CollectSettings(results=[str(runs)], output=str(tmp_path / "c"), conversions=[f"x={record}"]))


def test_collect_refuses_what_is_not_a_comparison(compared, tmp_path):
    out, _, _ = compared
    runs = out / "runs"

    def fails(match, **kw):
        with pytest.raises(UserError, match=match):
            collect(CollectSettings(**{"output": str(tmp_path / "x"), **kw}))
        assert not (tmp_path / "x").exists()  # nothing written

    only = [str(runs / d / "result.json") for d in ("baseline-seed0", "r-seed0", "r-seed1")]
    fails("same seeds", results=only)
    fails("'baseline'", results=[str(runs / "r-seed0")])
    fails("is not a run's result.json", results=[str(runs / "baseline-seed0" / "adapter" / "adapter_config.json")])
    fails("no such file", results=[str(tmp_path / "nothing")])
    with pytest.raises(UserError, match="exists and is not empty"):
        collect(CollectSettings(results=[str(runs)], output=str(out)))


# --- settings -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    ({"arms": []}, "at least one routed arm"),
    ({"arms": ["name=a,num_experts=8"]}, r"unknown --arm keys \['num_experts'\] \(N is num_clusters\)"),
    ({"arms": ["layers=1-2"]}, "needs a name"),
    ({"arms": ["name=a,top_k=9,num_clusters=8"]}, "1 <= top_k <= num_clusters"),
    ({"arms": ["name=a,top_k=two"]}, "top_k must be an integer"),
    ({"arms": ["name=baseline"]}, "other than 'baseline'"),
    ({"arms": ["name=a", "name=a"]}, "arm names repeat"),
    ({"arms": ["name=a,layers"]}, "key=value pairs"),
    ({"seeds": []}, "at least one seed"),
    ({"seeds": [0, 0]}, "seeds repeat"),
    ({"lrs": [1e-3, 0.0]}, "must be > 0"),
    ({"lr_holdout": 1.0}, "lr_holdout"),
    ({"jobs": 0}, "jobs must be an integer >= 1"),
    ({"overwrite": True, "resume": True}, "exclude each other"),
])  # fmt: skip
def test_bad_settings_are_one_line_user_errors(kw, match):
    with pytest.raises(UserError, match=match) as exc:
        CompareSettings(**{"arms": ["name=a"], "output": "out", **kw})
    assert "\n" not in str(exc.value)


def test_arm_spec():
    arm = parse_arm("name=last8, layers=22-29, num-clusters=64, top_k=48, method=random, partition_seed=3")
    assert (arm.name, arm.layers, arm.num_clusters, arm.top_k, arm.method, arm.partition_seed) == (
        "last8", "22-29", 64, 48, "random", 3)
    assert parse_arm("name=x,checkpoint=/some/dir").checkpoint == "/some/dir"


@pytest.mark.parametrize("arm, match", [
    ("name=a,layers=1-7", "arm a: "),  # the tiny base has 3 layers
    ("name=a,num_clusters=151,top_k=2", "num_clusters 151 exceeds the FFN's intermediate_size 150"),
    ("name=a,method=spectral", "arm a: "),
])  # fmt: skip
def test_arms_that_do_not_fit_the_base_are_refused_before_anything_is_written(tiny, tmp_path, arm, match):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=match):
        compare(_settings(tiny, out, arms=[arm]), _recipe(tiny))
    assert not out.exists()


def test_missing_data_is_refused_before_any_run(tiny, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="no RTE/ folder"):
        compare(_settings(tiny, out), replace(_recipe(tiny), data_dir=str(tmp_path)))
    assert not out.exists()


def test_report_header_names_compiled_runs(compared):
    """The report's recipe line says when the runs were compiled (--compile) and is unchanged when they were not."""
    from finetune import compare as compare_module

    _, summary, _ = compared
    plain = compare_module._header_lines(summary)
    assert not any("compiled" in line for line in plain)
    compiled = compare_module._header_lines({**summary, "settings": {**summary["settings"], "compile": True}})
    assert [line for line in compiled if line not in plain] == [
        next(line for line in plain if line.startswith("- recipe:")) + ", decoder layers compiled (--compile)"]
