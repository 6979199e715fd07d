"""finetune/runner.py: worker placement over GPUs (fake device lists), resume after a simulated crash, and the same
results whether runs go through one worker or several (tiny random Llamas on the CPU, a tiny GLUE-format folder).

The builders at the top (`char_tokenizer`, `write_tiny_glue`, `tiny_bases`) are imported by test_finetune and
test_distributed too: nothing here needs ../shared or the network.
"""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune import runner
from finetune.config import RunConfig

# --- tiny models and data (shared with test_finetune, test_distributed) ---------------------------------------------

N_CLUSTERS, TOP_K, LAYERS = 5, 2, "1-2"  # the routed tiny base: layers 1-2, 150 neurons in 5 clusters, keep 2

WORDS = ("the cat dog sat ran on a mat big small red blue house tree bird sang fish swam boy girl read wrote book "
         "letter sun rose moon set river flowed child slept").split()  # fmt: skip


def char_tokenizer():
    """A character-level tokenizer (printable ASCII): small enough for a 128-token random Llama."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, "\n": 3}
    for i in range(32, 127):
        vocab[chr(i)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_tiny_glue(root: Path, n_train: int = 32, n_dev: int = 16, seed: int = 0) -> Path:
    """An RTE folder in the GLUE layout: hypothesis = a piece of the premise (entailment) or other words; lengths
    vary so that batches are padded."""
    import random

    rng = random.Random(seed)
    d = root / "RTE"
    d.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = ["index\tsentence1\tsentence2\tlabel"]
        for i in range(n):
            premise = _sentence(rng, rng.randint(3, 9))
            entail = rng.random() < 0.5
            hyp = " ".join(premise.split()[: rng.randint(1, 3)]) if entail else _sentence(rng, rng.randint(1, 3))
            rows.append(f"{i}\t{premise}\t{hyp}\t{'entailment' if entail else 'not_entailment'}")
        (d / name).write_text("\n".join(rows) + "\n")
    return root


def tiny_bases(root: Path) -> dict[str, str]:
    """{"dense": folder, "routed": folder}: a tiny random Llama with `char_tokenizer`, and its routed conversion
    (layers LAYERS, N_CLUSTERS clusters, TOP_K kept)."""
    from transformers import LlamaForCausalLM

    import convert
    from conftest import tiny_llama_config

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(root / "dense")
    char_tokenizer().save_pretrained(root / "dense")
    settings = convert.ConvertSettings(str(root / "dense"), str(root / "routed"), num_clusters=N_CLUSTERS, top_k=TOP_K,
                                       layers=LAYERS, progress=False)  # fmt: skip
    convert.convert(settings, log=lambda _: None)
    return {"dense": str(root / "dense"), "routed": str(root / "routed")}


def tiny_recipe(glue: Path, model: str, **kw) -> RunConfig:
    """A run small enough for a shared 2-core CPU (a few seconds): 32 train rows, 16 dev rows, 2 epochs."""
    base = dict(task="rte", model=model, data_dir=str(glue), lr=3e-3, epochs=2, batch_size=8, eval_batch_size=8,
                max_length=64, lora_r=4, lora_alpha=8, precision="fp32")  # fmt: skip
    return RunConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-runner")
    return {**tiny_bases(root), "glue": write_tiny_glue(root / "glue")}


# --- placement --------------------------------------------------------------------------------------------------------


def test_visible_devices_reads_cuda_visible_devices():
    assert runner.visible_devices({"CUDA_VISIBLE_DEVICES": "0,1"}) == ["0", "1"]
    assert runner.visible_devices({"CUDA_VISIBLE_DEVICES": " 3, 5 "}) == ["3", "5"]
    assert runner.visible_devices({"CUDA_VISIBLE_DEVICES": "GPU-ab12,GPU-cd34"}) == ["GPU-ab12", "GPU-cd34"]
    assert runner.visible_devices({"CUDA_VISIBLE_DEVICES": ""}) == []  # GPUs hidden: the CPU
    assert runner.visible_devices({"CUDA_VISIBLE_DEVICES": "2,-1,3"}) == ["2"]  # CUDA stops at an invalid entry
    assert runner.visible_devices({}, count=3) == ["0", "1", "2"]
    assert runner.visible_devices({}, count=0) == []


def test_place_workers_round_robin():
    assert runner.place_workers(4, ["0", "1"]) == ["0", "1", "0", "1"]
    assert runner.place_workers(3, ["4", "6"]) == ["4", "6", "4"]  # more workers than GPUs: several per GPU
    assert runner.place_workers(2, ["0", "1", "2", "3"]) == ["0", "1"]  # fewer: the first GPUs
    assert runner.place_workers(1, ["7"]) == ["7"]
    assert runner.place_workers(3, []) == [None, None, None]  # no GPU: every worker on the CPU
    # every GPU gets ceil or floor of jobs / GPUs workers
    placed = runner.place_workers(10, ["0", "1", "2"])
    assert sorted(placed.count(d) for d in "012") == [3, 3, 4]


@pytest.mark.parametrize("jobs", [0, -1, 1.5, "2", True])
def test_bad_jobs_is_a_user_error(jobs):
    with pytest.raises(runner.UserError, match="jobs must be an integer >= 1"):
        runner.place_workers(jobs, ["0"])
    with pytest.raises(runner.UserError, match="jobs must be an integer >= 1"):
        runner.run_many([], [], jobs, resume=False)


def test_cpu_threads():
    assert runner.cpu_threads(1, cores=16) == 16
    assert runner.cpu_threads(4, cores=16) == 4
    assert runner.cpu_threads(3, cores=2) == 1  # never 0


def test_workers_see_only_their_device(monkeypatch):
    """The worker's environment is set before it starts (so before torch reads CUDA_VISIBLE_DEVICES)."""
    seen = []

    class FakeProcess:
        def __init__(self, target, args, daemon):
            pass

        def start(self):
            import os

            seen.append(os.environ.get("CUDA_VISIBLE_DEVICES"))

    class FakeContext:
        Process = FakeProcess

        @staticmethod
        def Queue():
            return None

    import multiprocessing

    monkeypatch.setattr(multiprocessing, "get_context", lambda method: FakeContext)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    runner._start_workers(runner.place_workers(3, ["0", "1"]), threads=1)
    assert seen == ["0", "1", "0"]
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"  # the parent's own setting is restored


# --- results on disk ------------------------------------------------------------------------------------------------


def _fake_result(cfg: RunConfig) -> dict:
    from dataclasses import asdict

    return {"arm": cfg.arm, "seed": cfg.seed, "lr": cfg.lr, "task": cfg.task, "model": cfg.model,
            "config": asdict(cfg), "final": {"accuracy": 50.0}, "per_epoch": [{"accuracy": 50.0}],
            "before": {"accuracy": 40.0}, "predictions": [0, 1]}  # fmt: skip


def test_read_result_strict_and_complete(tmp_path):
    cfg = RunConfig(output_dir=str(tmp_path))
    assert runner.read_result(tmp_path, cfg) is None  # nothing there
    r = _fake_result(cfg)
    (tmp_path / "result.json").write_text(json.dumps(r)[:-20])  # truncated by a kill
    assert runner.read_result(tmp_path, cfg) is None
    (tmp_path / "result.json").write_text(json.dumps({**r, "final": {"accuracy": float("nan")}}))  # not strict
    assert runner.read_result(tmp_path, cfg) is None
    (tmp_path / "result.json").write_text(json.dumps({k: v for k, v in r.items() if k != "predictions"}))
    assert runner.read_result(tmp_path, cfg) is None
    (tmp_path / "result.json").write_text(json.dumps(r))
    assert runner.read_result(tmp_path, cfg) == r
    # the folder may have moved: output_dir is not compared; any other setting is
    assert runner.read_result(tmp_path, replace(cfg, output_dir="elsewhere")) == r
    with pytest.raises(runner.UserError, match=r"other settings \(lr differ\)"):
        runner.read_result(tmp_path, replace(cfg, lr=1e-3))
    # a result recorded before a field existed (here `compile`) ran as its default: it matches the default only
    old = {**r, "config": {k: v for k, v in r["config"].items() if k != "compile"}}
    (tmp_path / "result.json").write_text(json.dumps(old))
    assert runner.read_result(tmp_path, cfg) == old
    with pytest.raises(runner.UserError, match=r"other settings \(compile differ\)"):
        runner.read_result(tmp_path, replace(cfg, compile=True))


def test_existing_run_folders_without_resume_are_refused(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "result.json").write_text("{}")
    with pytest.raises(runner.UserError, match="exists and is not empty"):
        runner.run_many([RunConfig()], [d], jobs=1, resume=False)
    assert (d / "result.json").read_text() == "{}"  # untouched


# --- real runs ------------------------------------------------------------------------------------------------------


def _configs(tiny) -> list[RunConfig]:
    plain = tiny_recipe(tiny["glue"], tiny["dense"])
    routed = replace(plain, model=tiny["routed"], arm="routed")
    return [replace(plain, seed=0), replace(routed, seed=0), replace(plain, seed=1)]


def _deterministic(r: dict) -> dict:
    """A run's result without what depends on when and how fast it ran."""
    skip = ("train_seconds", "run_seconds", "phase_seconds", "train_tokens_per_s", "date", "config",
            "peak_gpu_mem_bytes", "gpu_pools")  # fmt: skip
    return {k: v for k, v in r.items() if k not in skip}


@pytest.fixture(scope="module")
def one_worker(tiny, tmp_path_factory):
    """The three runs of `_configs` through one worker: (run folders, results, log lines)."""
    root = tmp_path_factory.mktemp("one-worker")
    dirs = [root / f"run{i}" for i in range(3)]
    lines = []
    results = runner.run_many(_configs(tiny), dirs, jobs=1, resume=False, log=lines.append, threads=1)
    return dirs, results, lines


def test_run_many_writes_and_returns_each_run(one_worker, tiny):
    dirs, results, lines = one_worker
    assert [(r["arm"], r["seed"]) for r in results] == [("baseline", 0), ("routed", 0), ("baseline", 1)]
    for d, r in zip(dirs, results):
        on_disk = json.loads((d / "result.json").read_text())
        assert r == on_disk  # what is returned is what was written (read back)
        assert r["config"]["output_dir"] == str(d)
        assert (d / "adapter").is_dir()
    assert len(lines) == 3 and all("accuracy" in line for line in lines)
    assert results[0]["predictions"] != results[1]["predictions"] or results[0]["final"] != results[1]["final"]


def test_several_workers_give_the_same_results(one_worker, tiny, tmp_path):
    _, want, _ = one_worker
    dirs = [tmp_path / f"run{i}" for i in range(3)]
    got = runner.run_many(_configs(tiny), dirs, jobs=2, resume=False, log=lambda _: None, threads=1)
    assert [_deterministic(r) for r in got] == [_deterministic(r) for r in want]


def test_packed_routed_runs_equal_runs_alone(tiny, tmp_path):
    """Seeds of the routed arm packed into one model (`--group 2`): the same predictions, routing-off scores and
    adapters as each seed trained alone, within fp32 rounding (the packed model shares the routed base)."""
    from safetensors.torch import load_file

    routed = replace(tiny_recipe(tiny["glue"], tiny["routed"]), arm="routed", engine="fast")
    cfgs = [replace(routed, seed=s) for s in (0, 1)]
    packed = runner.run_many(cfgs, [tmp_path / f"p{s}" for s in (0, 1)], jobs=1, resume=False, log=lambda _: None,
                             threads=1, group=2)  # fmt: skip
    alone = runner.run_many(cfgs, [tmp_path / f"a{s}" for s in (0, 1)], jobs=1, resume=False, log=lambda _: None,
                            threads=1, group=1)  # fmt: skip
    for s, p, a in zip((0, 1), packed, alone):
        assert p["group_size"] == 2 and a["group_size"] == 1 and p["routed"]
        assert p["predictions"] == a["predictions"]
        assert p["final_routing_off"]["accuracy"] == a["final_routing_off"]["accuracy"]
        np.testing.assert_allclose(p["train_loss"], a["train_loss"], rtol=1e-5)
        got = load_file(tmp_path / f"p{s}" / "adapter" / "adapter_model.safetensors")
        want = load_file(tmp_path / f"a{s}" / "adapter" / "adapter_model.safetensors")
        assert got.keys() == want.keys()
        for k in got:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)
    assert packed[0]["predictions"] != packed[1]["predictions"] or packed[0]["train_loss"] != packed[1]["train_loss"]


def test_resume_after_a_crash(one_worker, tiny, tmp_path):
    """Run 0 finished, run 1 was killed mid-write (its folder holds a truncated result and half an adapter), run 2
    never started: resume keeps run 0 byte for byte and redoes the others, with the results of an uninterrupted run."""
    src, want, _ = one_worker
    dirs = [tmp_path / f"run{i}" for i in range(3)]
    shutil.copytree(src[0], dirs[0])
    kept_bytes = (dirs[0] / "result.json").read_bytes()
    (dirs[1] / "adapter").mkdir(parents=True)
    (dirs[1] / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    (dirs[1] / "result.json").write_text((src[1] / "result.json").read_text()[:100])
    lines = []
    got = runner.run_many(_configs(tiny), dirs, jobs=1, resume=True, log=lines.append, threads=1)
    assert (dirs[0] / "result.json").read_bytes() == kept_bytes
    assert got[0] == want[0]
    assert [_deterministic(r) for r in got] == [_deterministic(r) for r in want]
    assert sum("kept from an earlier run" in line for line in lines) == 1
    assert (dirs[1] / "adapter" / "adapter_model.safetensors").stat().st_size > 10  # redone, not the leftover
    # everything is there now: a second resume runs nothing and returns the same
    again = runner.run_many(_configs(tiny), dirs, jobs=1, resume=True, log=lines.append, threads=1)
    assert again == got


def test_a_failing_run_raises_in_the_parent(tiny, tmp_path):
    bad = replace(tiny_recipe(tiny["glue"], str(tmp_path / "no-such-model")))
    with pytest.raises(Exception, match="no-such-model"):
        runner.run_many([bad], [tmp_path / "run"], jobs=1, resume=False, log=lambda _: None, threads=1)


KILLED_PARENT = r'''
import json, multiprocessing as mp, os, signal, sys
from dataclasses import replace
from pathlib import Path
sys.path[:0] = [sys.argv[1]]
from finetune import runner
from finetune.config import RunConfig

cfgs = [RunConfig(**c) for c in json.loads(Path(sys.argv[2]).read_text())]
dirs = [Path(d) for d in json.loads(Path(sys.argv[3]).read_text())]

def log(line):  # after the first run: say which workers run, then die at once (kill -9 of itself: the other
    # runs are still in flight, whatever the machine's speed)
    Path(sys.argv[4]).write_text(json.dumps([p.pid for p in mp.active_children()]))
    os.kill(os.getpid(), signal.SIGKILL)

if __name__ == "__main__":  # the spawned workers import this file too
    runner.run_many(cfgs, dirs, jobs=2, resume=False, log=log, threads=1)
'''


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie nobody reaped has ended too


def test_kill_9_of_the_parent_ends_its_workers_and_resume_finishes(one_worker, tiny, tmp_path):
    """kill -9 of the process that runs run_many, after its first finished run: its workers end with it (no orphan
    keeps writing), and a resume keeps the finished run and ends with the results of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from dataclasses import asdict

    _, want, _ = one_worker
    dirs = [tmp_path / f"run{i}" for i in range(3)]
    (tmp_path / "cfgs.json").write_text(json.dumps([asdict(c) for c in _configs(tiny)]))
    (tmp_path / "dirs.json").write_text(json.dumps([str(d) for d in dirs]))
    (tmp_path / "parent.py").write_text(KILLED_PARENT)
    pids = tmp_path / "pids.json"
    root = str(Path(__file__).resolve().parents[1])
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py"), root, str(tmp_path / "cfgs.json"),
                               str(tmp_path / "dirs.json"), str(pids)], env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
    try:
        assert parent.wait(timeout=300) == -signal.SIGKILL, "the parent did not kill itself after its first run"
        workers = json.loads(pids.read_text())
        assert len(workers) == 2
        deadline = time.monotonic() + 30
        while not all(map(_gone, workers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(map(_gone, workers)), "a worker outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
    done = [d for d in dirs if runner.read_result(d) is not None]
    assert 1 <= len(done) < 3
    got = runner.run_many(_configs(tiny), dirs, jobs=1, resume=True, log=lambda _: None, threads=1)
    assert [_deterministic(r) for r in got] == [_deterministic(r) for r in want]
