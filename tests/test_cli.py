"""finetune/cli.py: every subcommand's flags come from its settings dataclass(es); bad input is one line and exit 2
before any model loads; only the project's own error type (`UserError`) is turned into that line.

No model is loaded here: the functions that would load one are replaced by ones that fail the test.
"""

import dataclasses
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import finetune.compare
import finetune.train
from finetune import cli, models
from finetune.adapters import MergeSettings
from finetune.analysis import AnalyzeSettings
from finetune.compare import CollectSettings, CompareSettings
from finetune.config import RunConfig
from finetune.evaluate import EvaluateSettings
from routed_llama.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["run", "compare", "collect", "evaluate", "merge", "analyze", "sweep"]


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model, or starting a run or a comparison, fails the test."""

    def fail(*args, **kwargs):
        pytest.fail("a model was loaded (or a run started) for bad input")

    for target, name in [(models, "load_classifier"), (models, "load_tokenizer"), (finetune.train, "run_one"),
                         (finetune.compare, "compare"), (finetune.compare, "collect")]:  # fmt: skip
        monkeypatch.setattr(target, name, fail)


@pytest.fixture
def plan_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{}")
    return path


# --- parsing: one settings instance per dataclass, defaults from the dataclass --------------------------------------


def test_run(no_model):
    (cfg, arm) = cli.parse_args(["run"]).settings
    assert cfg == RunConfig() and arm == cli.RoutedArm()  # no flag: the dataclass defaults, nothing else
    argv = ["run", "--model", "stand-in", "--task", "sst2", "--lr", "5e-4", "--seed", "3", "--output-dir", "runs/p",
            "--batch-size", "8", "--buckets", "64", "256", "--no-eval-routing-off", "--lora-targets", "q_proj",
            "k_proj", "--routed", "out/routed"]  # fmt: skip
    (cfg, arm) = cli.parse_args(argv).settings
    assert cfg == RunConfig(model="stand-in", task="sst2", lr=5e-4, seed=3, output_dir="runs/p", batch_size=8,
                            buckets=[64, 256], eval_routing_off=False, lora_targets=["q_proj", "k_proj"])  # fmt: skip
    assert arm.routed == "out/routed"
    # a value that begins with '-' but is no flag is a value (argparse alone would take it for an option)
    parsed = cli.parse_args(["run", "--data-dir", "-8--1"])
    assert parsed.settings[0].data_dir == "-8--1" and parsed.command_line == "python -m finetune run --data-dir -8--1"


def test_compare(no_model):
    argv = ["compare", "--model", "stand-in", "--task", "rte", "--seeds", "0", "1", "2", "3", "4", "--lr", "5e-4",
            "--arm", "name=routed-last8,layers=22-29", "--arm", "name=routed-all,layers=all", "--jobs", "4",
            "--output", "results/my-rte"]  # fmt: skip
    parsed = cli.parse_args(argv)
    settings, recipe = parsed.settings
    assert isinstance(settings, CompareSettings) and [a.name for a in settings.arm_list] == ["routed-last8", "routed-all"]
    assert settings.seeds == [0, 1, 2, 3, 4] and settings.jobs == 4 and settings.output == "results/my-rte"
    assert recipe.to_config() == RunConfig(model="stand-in", task="rte", lr=5e-4)
    assert parsed.command_line == "python -m finetune " + shlex.join(argv)
    # the recipe is RunConfig less what a comparison sets per run: same names, types and defaults
    per_run = set(cli.PER_RUN)
    assert [f.name for f in dataclasses.fields(cli.Recipe)] == [f.name for f in dataclasses.fields(RunConfig)
                                                                 if f.name not in per_run]  # fmt: skip
    assert cli.Recipe().to_config() == RunConfig()
    for flag in ("--output-dir", "--holdout-fraction"):
        with pytest.raises(UserError, match="unrecognized arguments"):
            cli.parse_args([*argv, flag, "1"])


def test_collect_evaluate_merge(no_model):
    (c,) = cli.parse_args(["collect", "results/my-rte/runs", "more/result.json", "--output", "results/my-rte"]).settings
    assert c == CollectSettings(results=["results/my-rte/runs", "more/result.json"], output="results/my-rte")
    (e,) = cli.parse_args(["evaluate", "runs/routed/adapter", "--top-k", "32"]).settings
    assert e == EvaluateSettings("runs/routed/adapter", top_k=32)
    (m,) = cli.parse_args(["merge", "runs/routed/adapter", "merged/"]).settings
    assert m == MergeSettings("runs/routed/adapter", "merged/", overwrite=False)
    assert cli.parse_args(["merge", "a", "b", "--overwrite"]).settings[0].overwrite is True


def test_analyze_and_sweep(no_model, plan_file):
    argv = ["analyze", "--checkpoint", "out/routed", "--tasks", "rte", "sst2", "cola", "--out", "results/routing"]
    (a,) = cli.parse_args(argv).settings
    assert a == AnalyzeSettings(out="results/routing", checkpoint="out/routed", tasks=["rte", "sst2", "cola"])
    (s,) = cli.parse_args(["sweep", "--plan", str(plan_file), "--output", "results/sweep", "--jobs", "8"]).settings
    assert (s.plan, s.output, s.jobs) == (str(plan_file), "results/sweep", 8)


def test_parsing_writes_nothing(no_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in (["run", "--output-dir", "runs/x"], ["compare", "--arm", "name=r,layers=all", "--output", "out/c"],
                 ["collect", "runs", "--output", "out/k"], ["merge", "a", "out/m"],
                 ["analyze", "--checkpoint", "c", "--out", "out/a"]):  # fmt: skip
        cli.parse_args(argv)
    assert list(tmp_path.iterdir()) == []


def test_help_lists_every_subcommand_and_every_default(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS)
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--batch-size BATCH_SIZE default: 16" in out and "--batch_size" not in out  # one spelling per flag
    assert "--no-eval-routing-off" in out


# --- bad input: one line, exit 2, no model loaded -------------------------------------------------------------------

COMPARE = ["compare", "--arm", "name=r,layers=all", "--output", "out"]
BAD = {
    "unknown task (run)": (["run", "--task", "mnli"], "unknown task 'mnli'"),
    "unknown task (compare)": ([*COMPARE, "--task", "mnli"], "unknown task 'mnli'"),
    "unknown task (analyze)": (["analyze", "--out", "o", "--tasks", "rte", "mnli"], "unknown task 'mnli'"),
    "jobs 0 (compare)": ([*COMPARE, "--jobs", "0"], "jobs"),
    "jobs 0 (collect)": (["collect", "runs", "--output", "o", "--jobs", "0"], "jobs"),
    "buckets not ascending": (["run", "--buckets", "100", "50"], "buckets must be ascending"),
    "bucket not a multiple of 8": (["run", "--buckets", "60", "256"], "multiples of 8"),
    "buckets shorter than max_length": (["run", "--buckets", "64", "--max-length", "128"], "largest bucket (64)"),
    "unknown engine": (["run", "--engine", "foo"], "engine must be auto, fast or trainer, got 'foo'"),
    "not a number": (["run", "--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    "negative lr": (["run", "--lr", "-1"], "lr must be > 0"),
    "unknown flag": (["run", "--fast"], "unrecognized arguments: --fast"),
    "compile with trainer": (["run", "--compile", "--engine", "trainer"], "Trainer engine does not take it"),
    "underscore spelling": (["run", "--batch_size", "8"], "unrecognized arguments: --batch_size"),
    "old arm key": ([*COMPARE[:2], "name=r,num_experts=8", *COMPARE[3:]], "unknown --arm keys ['num_experts']"),
    "arm named baseline": ([*COMPARE[:2], "name=baseline", *COMPARE[3:]], "baseline"),
    "no routed arm": (["compare", "--output", "out"], "required"),
    "no adapter": (["evaluate"], "required: adapter"),
    "evaluate batch 0": (["evaluate", "a", "--batch-size", "0"], "batch_size must be >= 1"),
    "evaluate precision": (["evaluate", "a", "--precision", "fp8"], "precision must be one of"),
    "merge without out_dir": (["merge", "a"], "required: out_dir"),
    "no subcommand": ([], "required"),
    "unknown subcommand": (["train"], "invalid choice: 'train'"),
}


@pytest.mark.parametrize("argv,needle", list(BAD.values()), ids=list(BAD))
def test_bad_input_is_one_line_and_exit_2(no_model, capsys, argv, needle):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    prog = f"finetune {argv[0]}" if argv and argv[0] in SUBCOMMANDS else "finetune"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert needle in lines[0], lines[0]
    with pytest.raises(UserError):
        cli.parse_args(argv)


def test_sweep_jobs_0(no_model, plan_file, capsys):
    assert cli.main(["sweep", "--plan", str(plan_file), "--output", "o", "--jobs", "0"]) == 2
    assert capsys.readouterr().err.startswith("finetune sweep: error: ")


# --- only the project's own errors become one line ------------------------------------------------------------------


def test_a_user_error_from_the_work_is_one_line(monkeypatch, capsys):
    class OddInput(UserError):
        pass

    def refuse(cfg):
        raise OddInput("the data folder holds no rows\n(second line dropped)")

    monkeypatch.setattr(finetune.train, "run_one", refuse)
    assert cli.main(["run"]) == 2
    assert capsys.readouterr().err == "finetune run: error: the data folder holds no rows\n"


@pytest.mark.parametrize("exc", [ValueError("a bug"), KeyError("missing"), RuntimeError("CUDA error"),
                                 FileNotFoundError("lost file")])  # fmt: skip
def test_a_library_bug_keeps_its_traceback(monkeypatch, exc):
    def crash(cfg):
        raise exc

    monkeypatch.setattr(finetune.train, "run_one", crash)
    with pytest.raises(type(exc)):
        cli.main(["run"])


def test_compare_records_the_command_given(monkeypatch, capsys):
    seen = {}

    def fake_compare(settings, recipe, log=print):
        seen.update(settings=settings, recipe=recipe)
        return {}

    monkeypatch.setattr(finetune.compare, "compare", fake_compare)
    monkeypatch.setattr(finetune.compare, "report", lambda summary: "REPORT")
    argv = [*COMPARE, "--lr", "5e-4", "--seeds", "0", "1"]
    assert cli.main(argv) == 0
    assert seen["settings"].command == "python -m finetune " + shlex.join(argv)
    assert seen["recipe"] == RunConfig(lr=5e-4) and capsys.readouterr().out == "REPORT\n"
    assert cli.main([*argv, "--command", "as recorded"]) == 0
    assert seen["settings"].command == "as recorded"


def test_routed_sets_model_and_arm(monkeypatch, tmp_path, capsys):
    seen = []
    result = {"arm": None, "primary_metric": "accuracy", "final": {"accuracy": 50.0}, "train_seconds": 1.0}

    def fake_run(cfg):
        seen.append(cfg)
        return {**result, "arm": cfg.arm}

    monkeypatch.setattr(finetune.train, "run_one", fake_run)
    (tmp_path / "config.json").write_text('{"model_type": "routed_llama"}')
    assert cli.main(["run", "--routed", str(tmp_path)]) == 0
    assert cli.main(["run", "--routed", str(tmp_path), "--arm", "last8"]) == 0
    assert [(c.model, c.arm) for c in seen] == [(str(tmp_path), "routed"), (str(tmp_path), "last8")]
    assert capsys.readouterr().out.splitlines()[-1] == "last8: accuracy 50.00 after 5 epochs (1.0 s)"


def test_python_dash_m_finetune():
    done = subprocess.run([sys.executable, "-m", "finetune", "run", "--task", "mnli"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "finetune run: error: unknown task 'mnli'; known tasks: rte, mrpc, cola, sst2, stsb, wnli, qnli"]
