"""The fault table (issue 12): bad inputs to convert.py, and convert.py killed with SIGKILL at many points.

1. Bad inputs: every case is one command line run through `convert.main` with file descriptors 1 and 2 captured;
   a case passes with exit status 2, exactly one stderr line, nothing on stdout and nothing written.
2. Kills: `python benchmarks/faults.py child POINT -- ARGS` runs convert.py in a child process that sends itself
   SIGKILL at POINT (a function entry or exit in the load, cluster or write phase), fresh (no OUT_DIR) or with
   --overwrite (OUT_DIR holds an older checkpoint); a few more children are killed by the parent at timed moments.
   After each kill: the state of OUT_DIR (must be absent or the new checkpoint complete, fresh; the old checkpoint
   intact or the new one complete, --overwrite; a replace killed between its two renames, where the atomic swap is
   switched off, leaves OUT_DIR absent until the next start); then a start without --overwrite (must find OUT_DIR
   intact and leave no leftovers) and the killed command again (must finish with the new checkpoint complete).
3. `python -m finetune compare` on a tiny model killed at several moments and continued with --resume; results.json
   (without its provenance block) and report.md (above "How it ran") must equal an uninterrupted comparison's.

    python benchmarks/faults.py --out results/faults
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the Hub: a Hub-id-shaped name fails without retries
ROOT = Path(__file__).resolve().parents[1]
N, K = 5, 2  # the tiny checkpoints: 150 neurons in 5 clusters, keep 2
REMOTE_CODE_FILES = ("configuration_routed_llama.py", "modeling_routed_llama.py")


@dataclass
class FaultSettings:
    out: str = field(default="results/faults", metadata={"help": "folder for faults.json"})
    work: str | None = field(default=None, metadata={"help": "scratch folder (default: a temporary one)"})
    timed_kills: int = field(default=3, metadata={"help": "kills at timed moments per mode"})
    compare_kills: int = field(default=5, metadata={"help": "kill points of `finetune compare` (0: skip)"})
    only: str | None = field(default=None, metadata={"help": "comma-separated parts: bad,kills,compare"})


# --- inputs ---------------------------------------------------------------------------------------------------------


def tiny_config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=128, hidden_size=64, intermediate_size=150, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0)
    return LlamaConfig(**{**base, **kw})


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *[f"w{i}" for i in range(100)]])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")  # fmt: skip


def _edit_weights(folder: Path, edit):
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def _truncate(folder: Path, keep):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: keep(len(data))])


def _set_config(folder: Path, **values):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(values)
    (folder / "config.json").write_text(json.dumps(cfg))


def damaged_copies(dense: Path, root: Path) -> dict[str, Path]:
    """Copies of the tiny dense checkpoint, each damaged in one way."""
    import torch

    faults = {
        "weight-missing": lambda f: _edit_weights(f, lambda w: w.pop("model.layers.1.mlp.up_proj.weight")),
        "weight-unexpected": lambda f: _edit_weights(f, lambda w: w.update({"model.extra.weight": torch.zeros(3)})),
        "weight-shape": lambda f: _edit_weights(f, lambda w: w.update(
            {"model.layers.1.mlp.up_proj.weight": torch.zeros(10, 64)})),  # fmt: skip
        "weights-truncated": lambda f: _truncate(f, lambda n: n // 2),
        "weights-header-cut": lambda f: _truncate(f, lambda n: 20),
        "weights-empty-file": lambda f: _truncate(f, lambda n: 0),
        "weights-absent": lambda f: (f / "model.safetensors").unlink(),
        "config-not-json": lambda f: (f / "config.json").write_text("{not json"),
        "config-no-model-type": lambda f: (f / "config.json").write_text("{}"),
        "config-gelu-ffn": lambda f: _set_config(f, hidden_act="gelu"),
    }
    out = {}
    for name, damage in faults.items():
        out[name] = root / name
        shutil.copytree(dense, out[name])
        damage(out[name])
    return out


def build_inputs(root: Path) -> dict[str, Path]:
    """The tiny checkpoints every case uses (random weights, seeded)."""
    import torch
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM,
                              LlamaForSequenceClassification)  # fmt: skip

    from convert import ConvertSettings, convert

    torch.manual_seed(0)
    p = {"dense": root / "dense", "cls3": root / "cls3", "gpt2": root / "gpt2", "bert": root / "bert"}
    LlamaForCausalLM(tiny_config()).save_pretrained(p["dense"])
    word_tokenizer().save_pretrained(p["dense"])
    LlamaForSequenceClassification(tiny_config(num_labels=3)).save_pretrained(p["cls3"])
    gpt2 = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)
    GPT2LMHeadModel(gpt2).save_pretrained(p["gpt2"])
    BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                         vocab_size=64)).save_pretrained(p["bert"])  # fmt: skip
    p["gguf"] = root / "x.gguf"
    p["gguf"].write_bytes(os.urandom(4096))
    p["text-file"] = root / "notes.txt"
    p["text-file"].write_text("not a model\n")
    p["no-config"] = root / "no-config"
    p["no-config"].mkdir()
    (p["no-config"] / "model.safetensors").write_bytes(b"")
    p["file-out"] = root / "out-is-a-file"
    p["file-out"].write_text("x")
    p["full-out"] = root / "full-out"
    p["full-out"].mkdir()
    (p["full-out"] / "keep.txt").write_text("precious")
    p.update(damaged_copies(p["dense"], root))
    for name, seed in (("old", 1), ("new", 0)):  # the checkpoint an --overwrite replaces, and what it writes
        settings = ConvertSettings(str(p["dense"]), str(root / f"ref-{name}"), num_clusters=N, top_k=K, seed=seed,
                                   progress=False)  # fmt: skip
        p[name] = convert(settings, log=lambda _: None)
    return p


# --- 1. bad inputs --------------------------------------------------------------------------------------------------

NK = ["--num-clusters", str(N), "--top-k", str(K)]
BAD_INPUTS = {  # name: (MODEL key or literal, OUT key or None (a fresh folder), extra flags)
    "gpt2-model": ("gpt2", None, NK),
    "bert-model": ("bert", None, NK),
    "corrupt-gguf": ("gguf", None, NK),
    "missing-path": ("@no-such-model", None, NK),
    "hub-id-malformed": ("@not a hub id!", None, NK),
    "file-not-gguf": ("text-file", None, NK),
    "folder-without-config": ("no-config", None, NK),
    "config-not-json": ("config-not-json", None, NK),
    "config-no-model-type": ("config-no-model-type", None, NK),
    "gelu-ffn": ("config-gelu-ffn", None, NK),
    "already-routed": ("new", None, NK),
    "weight-missing": ("weight-missing", None, NK),
    "weight-unexpected": ("weight-unexpected", None, NK),
    "weight-shape-mismatch": ("weight-shape", None, NK),
    "weights-truncated": ("weights-truncated", None, NK),
    "weights-header-cut": ("weights-header-cut", None, NK),
    "weights-empty-file": ("weights-empty-file", None, NK),
    "weights-absent": ("weights-absent", None, NK),
    "label-count-mismatch": ("cls3", None, [*NK, "--head", "sequence-classification", "--num-labels", "2"]),
    "classifier-as-causal-lm": ("cls3", None, NK),
    "gguf-file-not-in-folder": ("dense", None, [*NK, "--gguf-file", "absent.gguf"]),
    "k-above-n": ("dense", None, ["--num-clusters", "4", "--top-k", "5"]),
    "k-zero": ("dense", None, ["--num-clusters", "4", "--top-k", "0"]),
    "n-zero": ("dense", None, ["--num-clusters", "0", "--top-k", "1"]),
    "n-above-intermediate": ("dense", None, ["--num-clusters", "151", "--top-k", "2"]),
    "k-not-an-integer": ("dense", None, ["--top-k", "two"]),
    "layer-out-of-range": ("dense", None, [*NK, "--layers", "1,3"]),
    "layer-range-out-of-range": ("dense", None, [*NK, "--layers", "0-5"]),
    "layer-range-empty": ("dense", None, [*NK, "--layers", "2-1"]),
    "layers-syntax": ("dense", None, [*NK, "--layers", "1-"]),
    "negative-layer-out-of-range": ("dense", None, [*NK, "--layers", "-4--1"]),
    "method-unknown": ("dense", None, [*NK, "--method", "spectral"]),
    "router-unknown": ("dense", None, [*NK, "--router", "mean"]),
    "head-unknown": ("dense", None, [*NK, "--head", "token-classification"]),
    "dtype-unknown": ("dense", None, [*NK, "--dtype", "int8"]),
    "n-init-zero": ("dense", None, [*NK, "--n-init", "0"]),
    "num-labels-zero": ("dense", None, [*NK, "--head", "sequence-classification", "--num-labels", "0"]),
    "unknown-flag": ("dense", None, [*NK, "--num-experts", "4"]),
    "out-dir-not-empty": ("dense", "full-out", NK),
    "out-dir-is-a-file": ("dense", "file-out", [*NK, "--overwrite"]),
    "out-parent-missing": ("dense", "@no-such-parent/routed", NK),
}


@contextlib.contextmanager
def captured_fds():
    """Capture everything written to file descriptors 1 and 2 (also by loggers holding the original streams)."""
    saved = [os.dup(1), os.dup(2)]
    files = [tempfile.TemporaryFile(mode="w+b"), tempfile.TemporaryFile(mode="w+b")]
    result = {}
    sys.stdout.flush()
    sys.stderr.flush()
    streams = [open(f.fileno(), "w", buffering=1, closefd=False) for f in files]  # sys.stdout may not be fd 1
    try:
        os.dup2(files[0].fileno(), 1)
        os.dup2(files[1].fileno(), 2)
        with contextlib.redirect_stdout(streams[0]), contextlib.redirect_stderr(streams[1]):
            yield result
    finally:
        for stream in streams:
            stream.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        for key, f in zip(("stdout", "stderr"), files):
            f.seek(0)
            result[key] = f.read().decode(errors="replace")
            f.close()


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def run_bad_inputs(p: dict, root: Path, names=None) -> list[dict]:
    import convert

    rows = []
    for i, (name, (model, out_key, extra)) in enumerate(BAD_INPUTS.items()):
        if names is not None and name not in names:
            continue
        model_arg = model[1:] if model.startswith("@") else str(p[model])
        case_root = root / f"bad-{i:02d}"
        case_root.mkdir()
        out = case_root / "routed" if out_key is None else p.get(out_key) or case_root / out_key.lstrip("@")
        before = listing(p["dense"].parent)
        with captured_fds() as cap:
            rc = convert.main([model_arg, str(out), "--no-progress", *extra])
        err, std = cap["stderr"].strip().splitlines(), cap["stdout"].strip()
        written = listing(case_root) != [] or listing(p["dense"].parent) != before
        rows.append({"case": name, "argv": [model.lstrip("@"), (out_key or "OUT_DIR").lstrip("@"), *extra],
                     "exit_code": rc, "stderr_lines": len(err), "stdout_lines": len(std.splitlines()),
                     "message": err[0] if err else "", "wrote_something": written,
                     "ok": rc == 2 and len(err) == 1 and not std and not written and "Traceback" not in cap["stderr"]})
        print(f"bad input {name:30s} exit {rc} lines {len(err)} {'ok' if rows[-1]['ok'] else 'FAIL'}", flush=True)
    return rows


# --- 2. kills -------------------------------------------------------------------------------------------------------


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _wrap(owner, name: str, before=None, after=None):
    """Replace owner.name by a wrapper that calls `before(*args)` / `after(result, *args)` around it."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if before is not None:
            before(*args, **kwargs)
        result = original(*args, **kwargs)
        if after is not None:
            after(result, *args, **kwargs)
        return result

    setattr(owner, name, wrapper)


def _nth(n: int):
    """A `before` hook that kills on the n-th call."""
    calls = [0]

    def hook(*_, **__):
        calls[0] += 1
        if calls[0] == n:
            _die()

    return hook


def _half_weights_then_die(_result, _self, folder, *a, **k):
    path = Path(folder) / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _die()


def _rmtree_partly_then_die(tag: str):
    original = shutil.rmtree

    def rmtree(path, *a, **k):
        if tag in Path(path).name:
            victims = sorted(Path(path).iterdir())
            for f in victims[: max(1, len(victims) // 2)]:
                f.unlink() if f.is_file() else original(f)
            _die()
        return original(path, *a, **k)

    shutil.rmtree = rmtree


def _rename_then_die(match):
    original = Path.rename

    def rename(self, target):
        result = original(self, target)
        if match(Path(target)):
            _die()
        return result

    Path.rename = rename


def install_kill_point(point: str, out: Path) -> None:
    """Arrange for this process to SIGKILL itself at `point` (see KILL_POINTS)."""
    import transformers

    import convert
    from routed_llama import checkpoint, io, partition, source

    die_after = {"after": lambda *_, **__: _die()}
    die_before = {"before": lambda *_, **__: _die()}
    table = {
        "config-read": lambda: _wrap(convert, "load_base_config", **die_after),
        "weights-read": lambda: _wrap(source, "check_loading_info", **die_before),
        "dense-loaded": lambda: _wrap(convert, "load_dense", **die_after),
        "cluster-layer-0": lambda: _wrap(partition, "kmeans_partition", before=_nth(1)),
        "cluster-layer-1": lambda: _wrap(partition, "kmeans_partition", before=_nth(2)),
        "cluster-layer-2": lambda: _wrap(partition, "kmeans_partition", before=_nth(3)),
        "surgery-done": lambda: _wrap(convert, "route_dense_model", **die_after),
        "temp-folder-made": lambda: _wrap(checkpoint, "save_into", **die_before),
        "weights-written": lambda: _wrap(transformers.PreTrainedModel, "save_pretrained", **die_after),
        "weights-half-written": lambda: _wrap(transformers.PreTrainedModel, "save_pretrained",
                                              after=_half_weights_then_die),
        "tokenizer-written": lambda: _wrap(transformers.PreTrainedTokenizerBase, "save_pretrained", **die_after),
        "card-written": lambda: _wrap(checkpoint, "write_text", **die_after),
        "json-temp-written": lambda: _wrap(os, "replace", before=lambda src, dst: Path(dst).name == "conversion.json"
                                           and _die()),
        "json-written": lambda: _wrap(checkpoint, "write_json", **die_after),
        "permissions-set": lambda: _wrap(io, "publish_permissions", **die_after),
        "before-move": lambda: _wrap(io, "move_into_place", **die_before),
        "after-swap": lambda: _rmtree_partly_then_die(".tmp-"),
        "between-renames": lambda: _rename_then_die(lambda t: ".old-" in t.name),
        "after-renames": lambda: _rename_then_die(lambda t: t.name == out.name),
        "old-copy-half-deleted": lambda: _rmtree_partly_then_die(".old-"),
    }
    table[point]()
    if point in TWO_RENAMES:
        io.EXCHANGE = False


KILL_POINTS = {  # point: phase
    "config-read": "load", "weights-read": "load", "dense-loaded": "load",
    "cluster-layer-0": "cluster", "cluster-layer-1": "cluster", "cluster-layer-2": "cluster", "surgery-done": "cluster",
    "temp-folder-made": "write", "weights-written": "write", "weights-half-written": "write",
    "tokenizer-written": "write", "card-written": "write", "json-temp-written": "write", "json-written": "write",
    "permissions-set": "write", "before-move": "write", "after-swap": "write",
    "between-renames": "write", "after-renames": "write", "old-copy-half-deleted": "write",
}  # fmt: skip
TWO_RENAMES = ("between-renames", "after-renames", "old-copy-half-deleted")  # replace without the atomic swap
OVERWRITE_ONLY = ("after-swap", *TWO_RENAMES)  # a fresh write has no old copy to swap, rename or delete


def child(argv: list[str]) -> int:
    """`child POINT -- convert args`: convert.py that kills itself at POINT."""
    point, args = argv[0], argv[argv.index("--") + 1 :]
    install_kill_point(point, Path(args[1]))
    import convert

    return convert.main(args)


def digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def same_checkpoint(folder: Path, reference: Path) -> bool:
    """Every file of `reference` and no other, byte-identical except conversion.json's timings and the two
    remote-code files (copied from the repository at write time, which may have changed since the reference)."""
    if not folder.is_dir() or digests(folder).keys() != digests(reference).keys():
        return False
    a, b = digests(folder), digests(reference)
    if any(a[k] != b[k] for k in a if k != "conversion.json" and k not in REMOTE_CODE_FILES):
        return False
    try:
        mine, ref = (json.loads((f / "conversion.json").read_text()) for f in (folder, reference))
    except json.JSONDecodeError:
        return False

    def untimed(c):
        return {k: v for k, v in c.items() if not k.endswith("seconds") and k != "layers"}

    return untimed(mine) == untimed(ref) and mine["layers"].keys() == ref["layers"].keys()


def out_state(out: Path, p: dict) -> str:
    if not out.exists():
        return "absent"
    if same_checkpoint(out, p["new"]):
        return "new complete"
    if same_checkpoint(out, p["old"]):
        return "old intact"
    mine, new = digests(out), digests(p["new"])
    return "PARTIAL: " + ", ".join(sorted(k for k in set(mine) | set(new) if mine.get(k) != new.get(k)))


def leftovers(out: Path) -> list[str]:
    return sorted(x.name for x in out.parent.iterdir() if x.name.startswith(f".{out.name}."))


def child_env() -> dict:
    """The environment of a child: offline exactly when this process is (a tokenizer records `local_files_only` in
    tokenizer_config.json, so the child's checkpoint equals the references only with the same setting)."""
    from huggingface_hub import constants

    return {**os.environ, "HF_HUB_OFFLINE": "1" if constants.HF_HUB_OFFLINE else "0"}


def kill_case(p: dict, root: Path, name: str, mode: str, point: str | None, delay: float | None) -> dict:
    """One kill: the child is killed at `point` (or after `delay` seconds), then two later starts are checked."""
    import convert

    case = root / f"kill-{name}-{mode}"
    case.mkdir()
    out = case / "routed"
    if mode == "overwrite":
        shutil.copytree(p["old"], out)
    args = [str(p["dense"]), str(out), *NK, "--no-progress"] + (["--overwrite"] if mode == "overwrite" else [])
    cmd = [sys.executable, str(Path(__file__).resolve()), "child", point or "none", "--", *args]
    if point is None:  # a timed kill: the parent sends SIGKILL
        cmd = [sys.executable, str(ROOT / "convert.py"), *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env())
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
    rc = proc.wait()
    row = {"point": name, "phase": KILL_POINTS.get(name, "timed"), "mode": mode, "killed": rc == -signal.SIGKILL,
           "child_exit": rc, "child_seconds": round(time.perf_counter() - t0, 2),
           "after_kill": out_state(out, p), "leftovers_after_kill": leftovers(out)}  # fmt: skip
    with captured_fds():  # a start without --overwrite: repairs, then refuses (OUT_DIR exists) or converts (fresh)
        row["next_start_exit"] = convert.main([str(p["dense"]), str(out), *NK, "--no-progress"])
    row["after_next_start"], row["leftovers_after_next_start"] = out_state(out, p), leftovers(out)
    if mode == "overwrite":
        with captured_fds():
            row["rerun_exit"] = convert.main(args)
        row["after_rerun"], row["leftovers_after_rerun"] = out_state(out, p), leftovers(out)
    allowed = {"fresh": {"absent", "new complete"}, "overwrite": {"old intact", "new complete"}}[mode]
    window = mode == "overwrite" and name in TWO_RENAMES and row["after_kill"] == "absent"
    row["ok"] = bool(
        (row["after_kill"] in allowed or window)
        and row["after_next_start"] in allowed and not row["leftovers_after_next_start"]
        and (mode == "fresh" and row["after_next_start"] == "new complete"
             or mode == "overwrite" and row["after_rerun"] == "new complete" and not row["leftovers_after_rerun"])
    )  # fmt: skip
    print(f"kill {name:22s} {mode:9s} killed={row['killed']!s:5s} after kill: {row['after_kill']:12s} "
          f"leftovers {len(row['leftovers_after_kill'])}; next start: {row['after_next_start']} "
          f"{'ok' if row['ok'] else 'FAIL'}", flush=True)
    return row


def run_kills(p: dict, root: Path, timed: int) -> list[dict]:
    rows = []
    for point in KILL_POINTS:
        for mode in ("fresh", "overwrite"):
            if mode == "fresh" and point in OVERWRITE_ONLY:
                continue
            rows.append(kill_case(p, root, point, mode, point, None))
    t0 = time.perf_counter()  # the length of an uninterrupted run sets the timed kills' moments
    subprocess.run([sys.executable, str(ROOT / "convert.py"), str(p["dense"]), str(root / "timing"), *NK,
                    "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)  # fmt: skip
    full = time.perf_counter() - t0
    for i in range(timed):
        delay = full * (0.4 + 0.55 * i / max(timed - 1, 1))
        for mode in ("fresh", "overwrite"):
            rows.append(kill_case(p, root, f"timed-{delay:.1f}s", mode, None, delay))
    return rows


# --- 3. compare killed and resumed ----------------------------------------------------------------------------------


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2}
    for i in range(32, 127):
        vocab[chr(i)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def tiny_glue(root: Path, n_train: int = 32, n_dev: int = 16) -> Path:
    """An RTE folder in the GLUE layout with short random sentences."""
    import random

    rng = random.Random(0)
    words = "the cat dog sat ran on a mat big red house tree bird sang fish boy girl read book sun moon".split()
    (root / "RTE").mkdir(parents=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = ["index\tsentence1\tsentence2\tlabel"]
        for i in range(n):
            premise = " ".join(rng.choice(words) for _ in range(rng.randint(3, 8)))
            entail = rng.random() < 0.5
            hyp = " ".join(premise.split()[:2]) if entail else " ".join(rng.choice(words) for _ in range(2))
            rows.append(f"{i}\t{premise}\t{hyp}\t{'entailment' if entail else 'not_entailment'}")
        (root / "RTE" / name).write_text("\n".join(rows) + "\n")
    return root


def compare_outputs(out: Path) -> tuple[str, str] | None:
    """(results.json without provenance, report.md above "How it ran"): what must not depend on interruptions."""
    from finetune.compare import PROVENANCE_HEADING

    if not (out / "results.json").is_file() or not (out / "report.md").is_file():
        return None
    results = json.loads((out / "results.json").read_text())
    results.pop("provenance", None)
    report = (out / "report.md").read_text().split(PROVENANCE_HEADING)[0]
    return json.dumps(results, sort_keys=True), report


def first_difference(reference: tuple[str, str], got: tuple[str, str] | None) -> str | None:
    """The first line where results.json (provenance left out) or report.md (above "How it ran") differ."""
    if got is None:
        return "no results.json or report.md"

    def lines(name: str, text: str) -> list[str]:
        return json.dumps(json.loads(text), indent=1).splitlines() if name == "results.json" else text.splitlines()

    for name, a, b in (("results.json", reference[0], got[0]), ("report.md", reference[1], got[1])):
        for x, y in zip([*lines(name, a), ""], [*lines(name, b), ""]):
            if x != y:
                return f"{name}: {x.strip()!r} != {y.strip()!r}"
    return None


def run_compare(args: list[str], delay: float | None) -> tuple[int, float]:
    """`python -m finetune compare ARGS` in its own process group; SIGKILL to the whole group after `delay` s."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "compare", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, cwd=ROOT)  # fmt: skip
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait(), time.perf_counter() - t0


def run_compare_kills(root: Path, kills: int) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    dense = root / "cmp-dense"
    LlamaForCausalLM(tiny_config(vocab_size=104, pad_token_id=0, eos_token_id=2)).save_pretrained(dense)
    char_tokenizer().save_pretrained(dense)
    glue = tiny_glue(root / "cmp-glue")
    out = root / "cmp-out"
    args = ["--arms", "name=routed,layers=1-2,num_clusters=5,top_k=2", "--output", str(out), "--name", "faults",
            "--seeds", "0", "1", "--model", str(dense), "--task", "rte", "--data-dir", str(glue), "--epochs", "2",
            "--batch-size", "8", "--eval-batch-size", "8", "--max-length", "64", "--lora-r", "4", "--lora-alpha", "8",
            "--lr", "3e-3", "--precision", "fp32", "--jobs", "1", "--command", "faults"]  # fmt: skip
    rc, full = run_compare(args, None)
    reference = compare_outputs(out)
    if rc != 0 or reference is None:
        return {"done": False, "reason": f"the uninterrupted comparison failed (exit {rc})"}
    rows = []
    for i in range(kills):
        shutil.rmtree(out)
        delay = full * (0.1 + 0.5 * i / max(kills - 1, 1))  # the later moments can miss on a less busy machine
        rc_kill, _ = run_compare(args, delay)
        rc_resume, _ = run_compare([*args, "--resume"], None)
        got = compare_outputs(out)
        row = {"kill_after_seconds": round(delay, 1), "killed": rc_kill == -signal.SIGKILL, "resume_exit": rc_resume,
               "results_json_identical": got is not None and got[0] == reference[0],
               "report_identical": got is not None and got[1] == reference[1],
               "first_difference": first_difference(reference, got)}  # fmt: skip
        row["ok"] = row["resume_exit"] == 0 and row["results_json_identical"] and row["report_identical"]
        rows.append(row)
        print(f"compare killed after {delay:5.1f} s (killed={row['killed']}): resume exit {rc_resume}, "
              f"identical {row['results_json_identical'] and row['report_identical']}", flush=True)
    return {"done": True, "uninterrupted_seconds": round(full, 1), "command": "python -m finetune compare " +
            " ".join(a if not a.startswith(str(root)) else "<" + Path(a).name + ">" for a in args),
            "rows": rows, "passed": sum(r["ok"] for r in rows), "count": len(rows)}  # fmt: skip


# --- the table ------------------------------------------------------------------------------------------------------


PARTS = {"bad": "bad_inputs", "kills": "convert_kills", "compare": "compare_kills"}


def summarise(rows: list[dict]) -> dict:
    return {"count": len(rows), "passed": sum(bool(r["ok"]) for r in rows), "rows": rows}


def run(s: FaultSettings) -> int:
    from routed_llama.errors import UserError
    from routed_llama.hardware import hardware_name
    from routed_llama.io import command_line, write_json

    parts = set((s.only or ",".join(PARTS)).split(","))
    if parts - set(PARTS):
        raise UserError(f"--only takes {','.join(PARTS)}; got {s.only!r}")
    doc = {"format_version": 1, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "hardware": hardware_name("cpu"), "command": command_line(prog="python benchmarks/faults.py")}  # fmt: skip
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=s.work) as tmp:
        root = Path(tmp)
        p = build_inputs(root / "inputs")
        if "bad" in parts:
            doc["bad_inputs"] = summarise(run_bad_inputs(p, root))
        if "kills" in parts:
            doc["convert_kills"] = summarise(run_kills(p, root, s.timed_kills))
        if "compare" in parts and s.compare_kills > 0:
            doc["compare_kills"] = run_compare_kills(root, s.compare_kills)
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    Path(s.out).mkdir(parents=True, exist_ok=True)
    earlier = Path(s.out) / "faults.json"
    if s.only and earlier.is_file():  # a partial run replaces its parts of an earlier table and keeps the others
        kept = {k: v for k, v in json.loads(earlier.read_text()).items() if k in PARTS.values() and k not in doc}
        doc["parts_from_earlier_run"] = {k: json.loads(earlier.read_text())["date"] for k in kept}
        doc.update(kept)
    write_json(Path(s.out) / "faults.json", doc, indent=1)
    for key in ("bad_inputs", "convert_kills", "compare_kills"):
        if key in doc and "count" in doc[key]:
            print(f"{key}: {doc[key]['passed']}/{doc[key]['count']} as required")
    failed = [k for k in ("bad_inputs", "convert_kills", "compare_kills") if k in doc and
              doc[k].get("passed") != doc[k].get("count")]  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        sys.exit(child(sys.argv[2:]))
    from routed_llama.cli import run_cli

    sys.exit(run_cli(run, FaultSettings, prog="faults.py", description=__doc__))
