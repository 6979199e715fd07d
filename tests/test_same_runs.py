"""scripts/same_runs.py: reruns compared exactly with their originals (metrics and per-example predictions)."""

import importlib.util
import json
from pathlib import Path

spec = importlib.util.spec_from_file_location("same_runs", Path(__file__).resolve().parents[1] / "scripts/same_runs.py")
same_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(same_runs)


def _run(root: Path, rel: str, acc: float, preds: list[int]):
    d = root / "runs" / rel
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"primary_metric": "accuracy", "final": {"accuracy": acc},
                                               "final_routing_off": None, "predictions": preds, "group_size": 10}))


def test_identical_differing_and_missing_runs(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(a, "rte/x/seed0", 60.0, [0, 1])
    _run(a, "rte/x/seed1", 61.0, [1, 1])
    _run(b, "rte/x/seed0", 60.0, [0, 1])
    assert same_runs.main([str(a), str(b)]) == 0
    _run(b, "rte/x/seed1", 61.0, [1, 0])  # same metric, one prediction differs: not the same run
    _run(b, "rte/y/seed0", 50.0, [0, 0])  # no original
    assert same_runs.main([str(a), str(b), "--out", str(tmp_path / "o.json")]) == 1
    out = json.loads((tmp_path / "o.json").read_text())
    assert (out["compared"], out["identical"]) == (3, 1)
    why = {r["run"]: r.get("why") for r in out["runs"]}
    assert why == {"runs/rte/x/seed0": None, "runs/rte/x/seed1": "predictions differ", "runs/rte/y/seed0": "no original"}
    assert "1 of 3 reruns identical" in capsys.readouterr().out


def test_folder_without_runs_is_exit_2(tmp_path, capsys):
    assert same_runs.main([str(tmp_path), str(tmp_path)]) == 2
    assert "has no runs/ folder" in capsys.readouterr().err
