"""The converter end to end: what it writes, reproducibility, loading in a fresh process, and refusing bad input."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import ROOT, STANDIN_K, STANDIN_N, TINY_K, tiny_llama_config
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaForSequenceClassification

import convert
import modeling_routed_llama as mrl
from convert import ConvertSettings
from routed_llama.errors import UserError


def convert_tiny(src, out, *extra, capsys=None):
    """convert.main in-process; returns (exit code, stdout lines, stderr lines) when capsys is given."""
    rc = convert.main([str(src), str(out), "--no-progress", *extra])
    if capsys is None:
        return rc
    cap = capsys.readouterr()
    return rc, cap.out.strip().splitlines(), cap.err.strip().splitlines()


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def match_rows(converted, original):
    """perm with converted[j] == original[perm[j]] bit for bit, by exact row matching; (I, H) each."""
    eq = (converted[:, None, :] == original[None, :, :]).all(-1)  # (I, I)
    assert (eq.sum(1) == 1).all(), "every converted row is exactly one original row"
    return eq.float().argmax(1)


def test_main_writes_a_complete_checkpoint(tiny_dense_dir, tmp_path, capsys):
    """convert.main exits 0 with a one-line summary, and OUT_DIR holds the weights (the dense weights permuted), the
    config, both .py files, generation config, the model card and conversion.json; no tokenizer (the source has
    none)."""
    out = tmp_path / "routed"
    rc, stdout, _ = convert_tiny(tiny_dense_dir, out, "--num-clusters", "4", "--top-k", "2", "--layers", "1-2",
                                 "--seed", "3", capsys=capsys)  # fmt: skip
    assert rc == 0
    assert len(stdout) == 1 and stdout[0].startswith(f"wrote {out}: N=4 k=2 layers=1, 2")
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "configuration_routed_llama.py",
            "modeling_routed_llama.py", "README.md", "conversion.json"} <= names  # fmt: skip
    assert not names & {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"}
    assert not [p for p in tmp_path.iterdir() if p.name != "routed"]  # no temporary folder left beside it
    for name in ("configuration_routed_llama.py", "modeling_routed_llama.py"):  # the shipped code is the repo's
        assert (out / name).read_bytes() == (ROOT / name).read_bytes()

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["routed_layers"] == [1, 2] and cfg["num_experts"] == 4 and cfg["num_experts_per_tok"] == 2
    assert cfg["expert_offsets"][0] is None and cfg["expert_offsets"][1] == [0, 38, 76, 113, 150]
    assert cfg["partition_method"] == "kmeans" and cfg["partition_seed"] == 3
    assert cfg["base_model_name_or_path"] == str(tiny_dense_dir)

    card = (out / "README.md").read_text()
    for text in (
        f"| base model | {tiny_dense_dir} |",
        "N = 4",
        "k = 2",
        "| routed layers | 1, 2 |",
        "| partition | kmeans, seed 3 |",
    ):
        assert text in card, text

    conv = json.loads((out / "conversion.json").read_text())
    assert conv["num_experts"] == 4 and conv["num_experts_per_tok"] == 2 and conv["routed_layers"] == [1, 2]
    assert conv["method"] == "kmeans" and conv["seed"] == 3 and conv["base_model"] == str(tiny_dense_dir)
    assert set(conv["layers"]) == {"1", "2"}
    for rec in conv["layers"].values():
        assert set(rec) >= {"intra_cosine", "intra_cosine_random", "cluster_sizes", "seconds"}
        assert -1 <= rec["intra_cosine_random"] < rec["intra_cosine"] <= 1
        assert rec["cluster_sizes"] == [38, 38, 37, 37] and rec["seconds"] >= 0

    # the weights: layer 0 untouched; layers 1-2 the dense rows/columns under one permutation per layer
    dense = load_file(tiny_dense_dir / "model.safetensors")
    routed = load_file(out / "model.safetensors")
    assert not any(k.startswith("model.layers.0.mlp.router") for k in routed)
    for name, t in dense.items():
        if not any(name.startswith(f"model.layers.{i}.mlp.") for i in (1, 2)):
            assert torch.equal(routed[name], t), name
    for i in (1, 2):
        p = f"model.layers.{i}.mlp."
        perm = match_rows(routed[p + "gate_proj.weight"], dense[p + "gate_proj.weight"])
        assert not torch.equal(perm, torch.arange(150))
        assert torch.equal(routed[p + "up_proj.weight"], dense[p + "up_proj.weight"][perm])
        assert torch.equal(routed[p + "down_proj.weight"], dense[p + "down_proj.weight"][:, perm])
        assert routed[p + "router.expert_offsets"].tolist() == [0, 38, 76, 113, 150]
        centroids = mrl.cluster_means(routed[p + "gate_proj.weight"], [0, 38, 76, 113, 150])
        torch.testing.assert_close(routed[p + "router.centroids"], centroids, rtol=0, atol=0)


def test_same_seed_is_bit_identical_other_seed_differs(tiny_dense_dir, tmp_path):
    """Two conversions with the same seed write byte-identical safetensors; another seed permutes differently."""
    args = ("--num-clusters", "5", "--top-k", "2")
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert convert_tiny(tiny_dense_dir, tmp_path / name, *args, "--seed", seed) == 0
    assert sha256(tmp_path / "a" / "model.safetensors") == sha256(tmp_path / "b" / "model.safetensors")
    a, c = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "c" / "model.safetensors")
    assert a.keys() == c.keys()
    differ = [k for k in a if not torch.equal(a[k], c[k])]
    assert any(".mlp.gate_proj." in k for k in differ)
    assert all(".mlp." in k for k in differ)  # only the FFNs and routers depend on the seed


def test_sequence_classification_head_converts(tiny_dense_dir, tmp_path, capsys):
    """--head sequence-classification from a causal-LM checkpoint converts (a score head seeded by --seed), says so
    in one stderr line, and saves that architecture."""
    out = tmp_path / "cls"
    rc, _, err = convert_tiny(tiny_dense_dir, out, "--num-clusters", "5", "--top-k", "2", "--head",
                              "sequence-classification", "--num-labels", "3", capsys=capsys)  # fmt: skip
    assert rc == 0
    assert err == ["note: new 3-label score head initialised from --seed 0 (the source has none)"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["RoutedLlamaForSequenceClassification"] and len(cfg["id2label"]) == 3
    weights = load_file(out / "model.safetensors")
    assert weights["score.weight"].shape == (3, 64) and "lm_head.weight" not in weights


FRESH_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockRepository(importlib.abc.MetaPathFinder):  # the checkpoint must not need this repository's modules
        NAMES = {"modeling_routed_llama", "configuration_routed_llama", "convert", "routed_llama", "finetune"}

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.NAMES:
                raise ImportError(f"{name} is blocked: the checkpoint's code must not import the repository")

    sys.meta_path.insert(0, BlockRepository())
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    causal_dir, cls_dir = sys.argv[1], sys.argv[2]
    causal = AutoModelForCausalLM.from_pretrained(causal_dir, trust_remote_code=True).eval()
    cls = AutoModelForSequenceClassification.from_pretrained(cls_dir, trust_remote_code=True).eval()
    ids = torch.tensor([[5, 17, 99, 42, 8, 23], [61, 3, 12, 77, 90, 31]])  # (B, T)
    with torch.no_grad():
        tokens = causal.generate(ids, do_sample=False, max_new_tokens=6, min_new_tokens=6)
        logits = cls(input_ids=ids).logits  # (B, num_labels)
    print("RESULT " + json.dumps({
        "causal": type(causal).__module__ + "." + type(causal).__name__,
        "cls": type(cls).__module__ + "." + type(cls).__name__,
        "k": [m.router.top_k for m in causal.model.routed_mlps().values()],
        "tokens": tokens.tolist(),
        "logits": logits.tolist(),
    }))
    """
)


@pytest.fixture
def clean_env(tmp_path):
    """Environment of a fresh shell: no PYTHONPATH, offline, its own remote-code module cache."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf-modules"))
    return env


def test_converted_folder_loads_in_a_fresh_process(tiny_converted_dir, tiny_dense_dir, tmp_path, clean_env):
    """A converted folder loads with trust_remote_code in a fresh Python process where the repository's modules are
    blocked (even when pip-installed), as AutoModelForCausalLM (and generates) and as
    AutoModelForSequenceClassification; the results equal the repository's classes in this process."""
    empty = tmp_path / "empty"
    empty.mkdir()
    cls_dir = tmp_path / "cls"
    assert convert_tiny(tiny_dense_dir, cls_dir, "--num-clusters", "5", "--top-k", "2",
                        "--head", "sequence-classification") == 0  # fmt: skip
    script = tmp_path / "fresh.py"
    script.write_text(FRESH_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tiny_converted_dir), str(cls_dir)], cwd=empty,
                          env=clean_env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT ") :])
    assert res["causal"].startswith("transformers_modules.") and res["causal"].endswith(".RoutedLlamaForCausalLM")
    assert res["cls"].startswith("transformers_modules.") and res["cls"].endswith(
        ".RoutedLlamaForSequenceClassification"
    )
    assert res["k"] == [TINY_K] * 3

    causal = mrl.RoutedLlamaForCausalLM.from_pretrained(tiny_converted_dir).eval()
    cls = mrl.RoutedLlamaForSequenceClassification.from_pretrained(cls_dir).eval()
    ids = torch.tensor([[5, 17, 99, 42, 8, 23], [61, 3, 12, 77, 90, 31]])
    with torch.no_grad():
        tokens = causal.generate(ids, do_sample=False, max_new_tokens=6, min_new_tokens=6)
        logits = cls(input_ids=ids).logits
    assert res["tokens"] == tokens.tolist() and len(res["tokens"][0]) == 12
    np.testing.assert_allclose(np.array(res["logits"]), logits.numpy(), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_standin_conversion_beats_random_in_every_layer(standin_converted, standin_gguf):
    """The converted stand-in: k-means clusters are tighter than random ones in every one of the 30 layers, cluster
    sizes are 1536 / 32 = 48, and the GGUF's tokenizer was written and tokenizes as the GGUF's does."""
    conv = json.loads((standin_converted / "conversion.json").read_text())
    assert conv["num_experts"] == STANDIN_N and conv["num_experts_per_tok"] == STANDIN_K
    assert sorted(map(int, conv["layers"])) == list(range(30))
    for i, rec in conv["layers"].items():
        assert rec["intra_cosine"] > rec["intra_cosine_random"], i
        assert rec["cluster_sizes"] == [48] * 32
    assert conv["mean_intra_cosine"] > conv["mean_intra_cosine_random"]

    assert (standin_converted / "tokenizer.json").is_file() and (standin_converted / "tokenizer_config.json").is_file()
    card = (standin_converted / "README.md").read_text()
    assert "SmolLM2-135M-Instruct" in card and "N = 32" in card and "k = 16" in card
    text = "Routed FFNs keep 16 of 32 clusters."
    ours = AutoTokenizer.from_pretrained(standin_converted, trust_remote_code=True)
    stock = AutoTokenizer.from_pretrained(standin_gguf.parent, gguf_file=standin_gguf.name)
    assert ours(text)["input_ids"] == stock(text)["input_ids"]
    assert ours.eos_token == stock.eos_token


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, no traceback, a non-zero exit, and nothing written
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_sources(tmp_path_factory, tiny_dense_dir):
    """Inputs the converter must refuse: tiny GPT-2 and BERT checkpoints, a corrupt GGUF, a missing path."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("bad-sources")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)).save_pretrained(
        root / "gpt2"
    )
    BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                         vocab_size=64)).save_pretrained(root / "bert")  # fmt: skip
    (root / "x.gguf").write_bytes(os.urandom(4096))
    sources = {"gpt2": root / "gpt2", "bert": root / "bert", "gguf": root / "x.gguf", "missing": root / "no-such-model",
               "llama": tiny_dense_dir}  # fmt: skip
    for name, make in WEIGHT_FAULTS.items():
        sources[name] = root / name
        shutil.copytree(tiny_dense_dir, sources[name])
        make(sources[name])
    LlamaForSequenceClassification(tiny_llama_config(num_labels=3)).save_pretrained(root / "cls3")
    sources["cls3"] = root / "cls3"
    return sources


def _edit_weights(folder, edit):
    path = folder / "model.safetensors"
    weights = load_file(path)
    edit(weights)
    save_file(weights, path, metadata={"format": "pt"})


def _truncate(folder, keep):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: keep(len(data))])


WEIGHT_FAULTS = {  # a copy of the tiny dense checkpoint, damaged in one way
    "weight-missing": lambda f: _edit_weights(f, lambda w: w.pop("model.layers.1.mlp.up_proj.weight")),
    "weight-unexpected": lambda f: _edit_weights(f, lambda w: w.update({"model.extra.weight": torch.zeros(3)})),
    "weight-shape": lambda f: _edit_weights(f, lambda w: w.update({"model.layers.1.mlp.up_proj.weight":
                                                                   torch.zeros(10, 64)})),  # fmt: skip
    "weights-truncated": lambda f: _truncate(f, lambda n: n // 2),
    "weights-header-cut": lambda f: _truncate(f, lambda n: 20),
    "weights-absent": lambda f: (f / "model.safetensors").unlink(),
    "config-not-json": lambda f: (f / "config.json").write_text("{not json"),
}


BAD_CASES = {  # source, extra arguments, a piece of the expected message
    "gpt2-model": ("gpt2", [], "is a 'gpt2' model; only Llama"),
    "bert-model": ("bert", [], "is a 'bert' model; only Llama"),
    "k-above-n": ("llama", ["--num-clusters", "4", "--top-k", "5"], "--top-k must be in [1, --num-clusters=4], got 5"),
    "k-below-1": ("llama", ["--num-clusters", "4", "--top-k", "0"], "--top-k must be in [1, --num-clusters=4], got 0"),
    "n-above-intermediate": (
        "llama",
        ["--num-clusters", "151", "--top-k", "2"],
        "exceeds the FFN's intermediate_size 150",
    ),
    "n-below-1": ("llama", ["--num-clusters", "0", "--top-k", "1"], "--num-clusters must be >= 1"),
    "layer-out-of-range": ("llama", ["--layers", "1,3"], "layer indices [3] out of range: the model has 3 layers"),
    "layer-range-out-of-range": ("llama", ["--layers", "0-5"], "layer indices [3, 4, 5] out of range"),
    "missing-path": ("missing", [], "no such file or folder"),
    "corrupt-gguf": ("gguf", [], "cannot read the model config of"),
    "weight-missing": ("weight-missing", [], "is missing weights: model.layers.1.mlp.up_proj.weight"),
    "weight-unexpected": ("weight-unexpected", [], "has unexpected weights: model.extra.weight"),
    "weight-shape": ("weight-shape", [], "weight model.layers.1.mlp.up_proj.weight has shape [10, 64]"),
    "weights-truncated": ("weights-truncated", [], "cannot load the weights of"),
    "weights-header-cut": ("weights-header-cut", [], "cannot load the weights of"),
    "weights-absent": ("weights-absent", [], "cannot load the weights of"),
    "config-not-json": ("config-not-json", [], "cannot read the model config of"),
    "label-count": ("cls3", ["--head", "sequence-classification"], "a classification head with 3 labels"),
    "classifier-as-causal-lm": ("cls3", [], "is a sequence-classification checkpoint (no lm_head)"),
    "layers-syntax": ("llama", ["--layers", "1-"], "--layers must be 'all', 'A-B' or 'A,B,C'"),
    "method-choice": ("llama", ["--method", "spectral"], "argument --method: invalid choice"),
}


def assert_refused(rc, err_lines, parent, before):
    assert rc == 2
    assert len(err_lines) == 1, err_lines
    assert err_lines[0].startswith("convert.py: error: ") and "Traceback" not in err_lines[0]
    assert sorted(p.name for p in parent.iterdir()) == before  # nothing written, no temporary folder left


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_refused_cleanly(case, bad_sources, tmp_path, capsys):
    """Each bad input: non-zero exit, exactly one line on stderr naming the problem, no traceback, OUT_DIR absent."""
    source, extra, message = BAD_CASES[case]
    parent = tmp_path / "outputs"
    parent.mkdir()
    rc, _, err = convert_tiny(bad_sources[source], parent / "routed", "--num-clusters", "4", "--top-k", "2", *extra,
                              capsys=capsys)  # fmt: skip
    assert_refused(rc, err, parent, [])
    assert message in err[0]


def test_existing_out_dir_needs_overwrite(tiny_dense_dir, tmp_path, capsys):
    """A non-empty OUT_DIR is refused (and left unchanged) without --overwrite, and replaced with it."""
    out = tmp_path / "routed"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, _, err = convert_tiny(tiny_dense_dir, out, "--num-clusters", "5", "--top-k", "2", capsys=capsys)
    assert_refused(rc, err, tmp_path, before)
    assert "exists and is not empty; pass --overwrite" in err[0]
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"

    rc, _, _ = convert_tiny(tiny_dense_dir, out, "--num-clusters", "5", "--top-k", "2", "--overwrite", capsys=capsys)
    assert rc == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routed"]  # no temporary or old folder left beside it


def test_cli_subprocess_prints_one_line_and_no_traceback(bad_sources, tmp_path, clean_env):
    """The real command line (`python convert.py ...`) on a corrupt GGUF: exit 2, one stderr line, no traceback."""
    parent = tmp_path / "outputs"
    parent.mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "convert.py"), str(bad_sources["gguf"]), str(parent / "routed")],
                          cwd=tmp_path, env=clean_env, capture_output=True, text=True, timeout=300)  # fmt: skip
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert_refused(proc.returncode, err, parent, [])
    assert "cannot read the model config of" in err[0] and proc.stdout == ""


# ---------------------------------------------------------------------------------------------------------------
# Issue 12: flags as written in the README, already-routed inputs, undefined statistics, interrupted earlier runs
# ---------------------------------------------------------------------------------------------------------------


def test_negative_layer_range_parses_as_written(tiny_dense_dir, tmp_path, capsys):
    """`--layers -2--1` (a value starting with '-') parses without '=' and routes the last two layers."""
    assert convert.parse_args(["m", "o", "--layers", "-8--1"]).layers == "-8--1"
    assert convert.parse_args(["m", "o", "--layers", "-3"]).layers == "-3"
    rc, stdout, _ = convert_tiny(tiny_dense_dir, tmp_path / "r", "--num-clusters", "5", "--top-k", "2",
                                 "--layers", "-2--1", capsys=capsys)  # fmt: skip
    assert rc == 0 and "layers=1, 2 " in stdout[0]


def test_settings_built_in_python_are_checked_by_field():
    """A wrong type or choice passed to ConvertSettings in Python raises UserError naming the flag."""
    with pytest.raises(UserError, match="--top-k must be of type int, got '3'"):
        ConvertSettings("m", "o", top_k="3")
    with pytest.raises(UserError, match=r"--method must be one of \['kmeans', 'random'\]"):
        ConvertSettings("m", "o", method="spectral")
    assert ConvertSettings("m", "o").num_clusters == 32 and ConvertSettings("m", "o").top_k == 16


def test_routed_input_is_refused_before_any_code_loads(tiny_converted_dir, tmp_path, capsys, monkeypatch):
    """An already-routed folder is recognised from config.json's model_type: no trust prompt, no remote code."""
    def no_prompt(*_):
        raise AssertionError("asked the user")

    monkeypatch.setattr("builtins.input", no_prompt)
    before = {m for m in sys.modules if m.startswith("transformers_modules")}
    rc, _, err = convert_tiny(tiny_converted_dir, tmp_path / "again", capsys=capsys)
    assert_refused(rc, err, tmp_path, [])
    assert "is already a routed checkpoint (model_type 'routed_llama')" in err[0]
    assert {m for m in sys.modules if m.startswith("transformers_modules")} == before


def test_one_neuron_per_cluster_writes_strict_json(tiny_dense_dir, tmp_path, capsys):
    """N = intermediate_size: the intra-cluster cosine is undefined; conversion.json holds null with the reason
    (strict JSON, no NaN) and the card and summary say 'undefined'."""
    out = tmp_path / "r"
    rc, stdout, _ = convert_tiny(tiny_dense_dir, out, "--num-clusters", "150", "--top-k", "150", "--layers", "0",
                                 "--method", "random", capsys=capsys)  # fmt: skip
    assert rc == 0 and "undefined" in stdout[0]

    def no_constant(name):
        raise ValueError(f"not strict JSON: {name}")

    conv = json.loads((out / "conversion.json").read_text(), parse_constant=no_constant)
    assert conv["mean_intra_cosine"] is None and conv["layers"]["0"]["intra_cosine"] is None
    assert "single neuron" in conv["layers"]["0"]["note"]
    assert "undefined (every cluster holds a single neuron)" in (out / "README.md").read_text()


def dead_pid():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_interrupted_replace_is_restored_at_next_start(tiny_dense_dir, tmp_path, capsys):
    """A kill between the two renames of --overwrite leaves OUT_DIR missing and the old copy in `.OUT.old-PID`:
    the next run puts it back (and then refuses to replace it without --overwrite); a dead writer's temporary
    folder is removed."""
    pid = dead_pid()
    old, tmp = tmp_path / f".routed.old-{pid}", tmp_path / f".routed.tmp-{pid}-x1"
    old.mkdir()
    (old / "keep.txt").write_text("precious")
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"half")
    rc, _, err = convert_tiny(tiny_dense_dir, tmp_path / "routed", "--num-clusters", "5", "--top-k", "2",
                              capsys=capsys)  # fmt: skip
    assert rc == 2 and err[-1].endswith("exists and is not empty; pass --overwrite to replace it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routed"]
    assert (tmp_path / "routed" / "keep.txt").read_text() == "precious"


def test_stale_leftovers_beside_a_complete_checkpoint_are_removed(tiny_dense_dir, tmp_path, capsys):
    """A kill after the second rename leaves the new OUT_DIR complete and the old copy beside it: the next run
    removes the old copy (and a dead writer's temporary folder) and keeps OUT_DIR; a live writer's is kept."""
    out = tmp_path / "routed"
    assert convert_tiny(tiny_dense_dir, out, "--num-clusters", "5", "--top-k", "2") == 0
    pid = dead_pid()
    (tmp_path / f".routed.old-{pid}").mkdir()
    (tmp_path / f".routed.tmp-{pid}-x2").mkdir()
    live = tmp_path / f".routed.tmp-{os.getppid()}-x3"  # pytest's parent process is alive
    live.mkdir()
    rc, _, _ = convert_tiny(tiny_dense_dir, out, "--num-clusters", "5", "--top-k", "2", capsys=capsys)
    assert rc == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["routed", live.name])
    assert (out / "model.safetensors").is_file()
