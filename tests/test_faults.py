"""A fast subset of the fault table (benchmarks/faults.py runs all of it): bad inputs refused in one line with
nothing written, convert.py killed with SIGKILL in the write phase (fresh and --overwrite, with and without the
atomic swap) leaving OUT_DIR intact and no leftovers after the next start; and io.atomic_output's guarantees."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from routed_llama import io
from routed_llama.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def faults():
    spec = importlib.util.spec_from_file_location("faults", ROOT / "benchmarks" / "faults.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["faults"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("faults", None)


@pytest.fixture(scope="module")
def inputs(faults, tmp_path_factory):
    return faults.build_inputs(tmp_path_factory.mktemp("fault-inputs"))


SUBSET = ["already-routed", "weight-missing", "weights-truncated", "label-count-mismatch",
          "negative-layer-out-of-range", "unknown-flag", "out-dir-is-a-file", "gelu-ffn"]  # fmt: skip


def test_table_has_at_least_30_distinct_bad_inputs_and_20_kill_points(faults):
    assert len(faults.BAD_INPUTS) >= 30 and len(set(map(str, faults.BAD_INPUTS.values()))) == len(faults.BAD_INPUTS)
    assert len(faults.KILL_POINTS) >= 20
    assert {"load", "cluster", "write"} == set(faults.KILL_POINTS.values())


def test_bad_inputs_subset(faults, inputs, tmp_path):
    rows = faults.run_bad_inputs(inputs, tmp_path, names=SUBSET)
    assert [r["case"] for r in rows] == [n for n in faults.BAD_INPUTS if n in SUBSET]
    for r in rows:
        assert r["ok"], r
        assert r["exit_code"] == 2 and r["stderr_lines"] == 1 and not r["wrote_something"]


@pytest.mark.parametrize("point,mode", [("weights-half-written", "fresh"), ("after-swap", "overwrite"),
                                        ("between-renames", "overwrite")])  # fmt: skip
def test_kill_in_write_phase(faults, inputs, tmp_path, point, mode):
    """SIGKILL at `point`: OUT_DIR holds the old checkpoint or the new one complete (or, killed between the two
    renames of a replace without the atomic swap, nothing until the next start puts the old one back); the next
    start leaves no leftovers; running the command again completes it."""
    row = faults.kill_case(inputs, tmp_path, point, mode, point, None)
    assert row["killed"], row
    assert row["ok"], str(row)
    if point == "between-renames":
        assert row["after_kill"] == "absent" and any(".old-" in x for x in row["leftovers_after_kill"])
        assert row["after_next_start"] == "old intact" and row["next_start_exit"] == 2
    if point == "weights-half-written":
        assert row["after_kill"] == "absent" and row["leftovers_after_kill"]


def test_atomic_output_keeps_the_old_copy_when_the_writer_fails(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), io.atomic_output(out, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("new")
        raise RuntimeError("writer failed")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "a.txt").read_text() == "old"
    with pytest.raises(UserError, match="exists and is not empty; pass --overwrite"), io.atomic_output(out) as tmp:
        pass
    for exchange in (True, False):
        io.EXCHANGE = exchange
        try:
            with io.atomic_output(out, overwrite=True) as tmp:
                (tmp / "b.txt").write_text(f"new {exchange}")
        finally:
            io.EXCHANGE = True
        assert [p.name for p in out.iterdir()] == ["b.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_recover_leftovers_keeps_a_live_writers_folder(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        kept = tmp_path / f".out.tmp-{live.pid}-abc"
        kept.mkdir()
        assert io.recover_leftovers(tmp_path / "out") == []
        assert kept.is_dir()
    finally:
        live.kill()
        live.wait()
    assert io.recover_leftovers(tmp_path / "out") == [f"removed {kept.name}"] and not kept.exists()


def test_write_json_is_strict(tmp_path):
    import json

    import numpy as np

    io.write_json(tmp_path / "x.json", {"a": float("nan"), "b": [np.float32(1.5), float("inf")], "c": np.int64(3)})
    text = (tmp_path / "x.json").read_text()
    assert json.loads(text) == {"a": None, "b": [1.5, None], "c": 3} and "NaN" not in text
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"] and os.stat(tmp_path / "x.json").st_mode & 0o044


def test_write_file_replaces_only_when_complete(tmp_path):
    """A writer that fails keeps the old file and leaves no temporary; the temporary carries the suffix (savefig)."""
    target = tmp_path / "fig.png"
    target.write_bytes(b"old")
    seen = []

    def broken(tmp):
        seen.append(tmp)
        tmp.write_bytes(b"half")
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        io.write_file(target, broken)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["fig.png"]
    assert seen[0].suffix == ".png" and seen[0].parent == tmp_path
    io.write_file(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["fig.png"]
