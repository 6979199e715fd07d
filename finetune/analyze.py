"""What the clusters do: record every routing decision of a routed checkpoint on GLUE inputs and describe it.

    python -m finetune.analyze --checkpoint CKPT [--adapter DIR] --tasks rte sst2 cola \\
        --data-dir /work/shared/data/glue --max-examples 200 --out results/NAME

writes `NAME/routing.json` (every number, versioned by `format_version`), PNG figures and `NAME/summary.md`.
`add_arguments(parser)` and `run(args)` let another command line (`python -m finetune analyze`) offer the same
options. The model runs on the CPU unless `--device` says otherwise.

Three layers, kept apart so that each can be tested on its own:

* **Statistics** (pure numpy, no model): `cluster_load`, `normalised_entropy`, `busiest_share`, `layer_summary`,
  `coselection_counts`, `coselection_lift`, `coselection_correlation`, `example_counts`, `group_counts`,
  `usage_distance`, `permutation_test`, `paired_change_test`, `kept_overlap`. They take plain arrays: the kept
  cluster ids of one layer, an int array (tokens, k), and per-token example ids; per-example group codes (task,
  label) for the tests.
* **Recording** (`RoutingRecorder`, `record_routing`): a forward hook on every module whose class name is
  `RoutedLlamaRouter` (the router returns the kept ids (B*T, k) of one layer), registered on the loaded model and
  removed afterwards. Padding tokens are dropped with the attention mask. The hooks return nothing, so the model's
  outputs are untouched; `config.routing_impl` is set to "mask" while recording (the fused Triton decode path routes
  inside its kernel and never calls the router module) and restored afterwards. The model is loaded with a
  sequence-classification head through `finetune.models.load_classifier` (`trust_remote_code`), as the fine-tuning
  harness loads it: only the routers matter here, and the small `score` head is cheaper than a vocabulary-sized
  `lm_head`. With `--adapter`, the adapter's base is loaded through `finetune.adapters.load_finetuned` and every
  input runs twice: with the adapter (the fine-tuned model) and inside `disable_adapter()` (the converted model).
* **Report** (`analyse`, the plots, `summary_markdown`, the command line).

Definitions (per routed layer; N clusters, k kept per token, M non-padding tokens):

* load_e = (tokens that keep cluster e) / (M * k): the fraction of token-selections; sums to 1, uniform = 1/N.
* token share_e = load_e * k: the fraction of tokens that keep cluster e; uniform = k/N.
* normalised entropy = H(load) / log N, in [log k / log N, 1]: a router that always keeps the same k clusters has
  log k / log N (0.8 for k = 16 of N = 32), not 0; 1 means perfectly even load.
* busiest share = the token share of the most-kept cluster (k/N when the load is even, 1 when every token keeps it).
* co-selection C[i, j] = tokens that keep both i and j (C[i, i] = tokens that keep i); normalised by M; lift =
  C[i, j] / M divided by share_i * share_j (1 = chosen together as often as if independent; the exact-k constraint
  makes "independent" only a reference point); correlation = the phi coefficient of the two keep-indicators over
  tokens (bounded, so rare clusters do not dominate it; the exact-k constraint puts its mean at about -1/(N-1)).
* specialisation: a group's (task's, label's) load over its tokens. The statistic is the mean over pairs of groups
  of the total-variation distance between their load distributions (or Pearson's chi-square of the groups x clusters
  table of selections, `--statistic chi2`), summed over layers. Its p-value is a permutation test that shuffles the
  group of whole examples (tokens of one example are not independent), (1 + #{null >= observed}) / (1 + n).
  The label test shuffles labels only among examples of the same task (strata), so that differences between tasks
  cannot pass for differences between labels; it is also run one task at a time. Per cluster the effect is the
  range of its token share across groups (percentage points), with a permutation p-value and one corrected for all
  clusters of all layers (max-T).
* change (with `--adapter`): the fine-tuned load minus the converted load on the same tokens, the fraction of a
  token's kept clusters that stay the same, and a paired sign-flip permutation test (per example, swap the two
  models) of the total-variation distance between the two loads, summed over layers.

Token scopes: "all" counts every non-padding token; "text" only tokens that overlap the GLUE texts, not the field
names `finetune.tasks.format_example` adds ("Premise:", "Review:", ...), which differ between tasks by construction.
The specialisation tests are reported for both scopes.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


FORMAT_VERSION = 1
ROUTER_CLASS = "RoutedLlamaRouter"
STATISTICS = ("tv", "chi2")
SCOPES = ("all", "text")
OUTPUT_FILES = ("routing.json", "summary.md")


class AnalysisError(ValueError):
    """Bad input to the analysis; the command line prints it as one line and exits non-zero."""


# =================================================================================================================
# Statistics: pure functions on plain arrays
# =================================================================================================================


def check_selections(sel, num_experts: int) -> np.ndarray:
    """`sel` as an int64 array (tokens, k) of distinct cluster ids in [0, num_experts); raises ValueError otherwise."""
    sel = np.asarray(sel)
    if sel.ndim != 2:
        raise ValueError(f"selections must be a (tokens, k) array, got shape {sel.shape}")
    if sel.size and not np.issubdtype(sel.dtype, np.integer):
        raise ValueError(f"selections must hold integer cluster ids, got {sel.dtype}")
    sel = sel.astype(np.int64, copy=False)
    if sel.size and (sel.min() < 0 or sel.max() >= num_experts):
        raise ValueError(f"cluster ids must be in [0, {num_experts}), got {sel.min()}..{sel.max()}")
    if sel.shape[1] > 1 and sel.size and (np.diff(np.sort(sel, axis=1), axis=1) == 0).any():
        raise ValueError("a token selects the same cluster twice")
    return sel


def selection_counts(sel, num_experts: int) -> np.ndarray:
    """(N,) number of tokens that keep each cluster."""
    sel = check_selections(sel, num_experts)
    return np.bincount(sel.reshape(-1), minlength=num_experts).astype(np.int64)


def cluster_load(sel, num_experts: int) -> np.ndarray:
    """(N,) fraction of all token-selections that go to each cluster (sums to 1; uniform = 1/N)."""
    counts = selection_counts(sel, num_experts)
    total = counts.sum()
    if total == 0:
        raise ValueError("no token-selections: cannot compute a load")
    return counts / total


def normalised_entropy(load) -> float:
    """Entropy of a load distribution divided by log N (N = its length); 0 * log 0 = 0. 1.0 for N = 1."""
    p = np.asarray(load, dtype=np.float64)
    if p.ndim != 1 or p.size == 0 or (p < 0).any() or not math.isclose(p.sum(), 1.0, rel_tol=1e-9):
        raise ValueError("a load must be a non-negative vector summing to 1")
    if p.size == 1:
        return 1.0
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(p.size))


def busiest_share(sel, num_experts: int) -> tuple[int, float]:
    """(cluster, share): the most-kept cluster (lowest id on ties) and the fraction of tokens that keep it."""
    sel = check_selections(sel, num_experts)
    if sel.shape[0] == 0:
        raise ValueError("no tokens")
    counts = selection_counts(sel, num_experts)
    e = int(counts.argmax())
    return e, float(counts[e] / sel.shape[0])


def coselection_counts(sel, num_experts: int) -> np.ndarray:
    """(N, N) int: C[i, j] = tokens that keep both i and j; the diagonal C[i, i] = tokens that keep i."""
    sel = check_selections(sel, num_experts)
    onehot = np.zeros((sel.shape[0], num_experts), dtype=np.float64)
    np.put_along_axis(onehot, sel, 1.0, axis=1)
    return np.rint(onehot.T @ onehot).astype(np.int64)  # exact: integer sums far below 2**53


def coselection_lift(counts, n_tokens: int) -> np.ndarray:
    """(N, N) P(i and j) / (P(i) P(j)) from `coselection_counts`; NaN where a cluster is never kept."""
    c = np.asarray(counts, dtype=np.float64) / n_tokens
    share = np.diag(c)
    with np.errstate(divide="ignore", invalid="ignore"):
        return c / np.outer(share, share)


def coselection_correlation(counts, n_tokens: int) -> np.ndarray:
    """(N, N) Pearson (phi) correlation between the keep-indicators of clusters i and j over tokens, from
    `coselection_counts`; NaN where a cluster is kept by every token or by none. Unlike the lift it is bounded and not
    dominated by rare clusters. Keeping exactly k clusters makes the mean off-diagonal value about -1/(N-1)."""
    c = np.asarray(counts, dtype=np.float64) / n_tokens
    share = np.diag(c)
    var = share * (1 - share)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (c - np.outer(share, share)) / np.sqrt(np.outer(var, var))


def example_counts(sel, token_example, n_examples: int, num_experts: int) -> np.ndarray:
    """(n_examples, N): per example, how many of its tokens keep each cluster (one layer)."""
    sel = check_selections(sel, num_experts)
    token_example = np.asarray(token_example, dtype=np.int64)
    if token_example.shape != (sel.shape[0],):
        raise ValueError(f"token_example must have one entry per token ({sel.shape[0]}), got {token_example.shape}")
    flat = (token_example[:, None] * num_experts + sel).reshape(-1)
    return np.bincount(flat, minlength=n_examples * num_experts).reshape(n_examples, num_experts).astype(np.int64)


def group_counts(counts, groups, n_groups: int) -> np.ndarray:
    """(G, L, N) summed selection counts per group from per-example counts (E, L, N) and group codes (E,)."""
    counts = np.asarray(counts, dtype=np.float64)
    groups = np.asarray(groups, dtype=np.int64)
    onehot = np.zeros((n_groups, len(groups)))
    onehot[groups, np.arange(len(groups))] = 1.0
    return (onehot @ counts.reshape(len(groups), -1)).reshape(n_groups, *counts.shape[1:])


def usage_distance(gcounts, statistic: str = "tv") -> np.ndarray:
    """(L,) how differently G >= 2 groups use the clusters, per layer, from their selection counts (G, L, N).

    "tv": mean over pairs of groups of the total-variation distance 0.5 * sum_e |load_a(e) - load_b(e)| (0 for
    identical usage, 1 for disjoint clusters). "chi2": Pearson's chi-square of the G x N table (empty cells skipped).
    """
    g = np.asarray(gcounts, dtype=np.float64)
    if g.ndim == 2:
        g = g[:, None, :]
    if g.shape[0] < 2:
        raise ValueError("need at least two groups")
    totals = g.sum(-1, keepdims=True)  # (G, L, 1)
    if (totals == 0).any():
        raise ValueError("a group has no selections")
    if statistic == "tv":
        loads = g / totals
        pairs = [(a, b) for a in range(len(g)) for b in range(a + 1, len(g))]
        return np.mean([0.5 * np.abs(loads[a] - loads[b]).sum(-1) for a, b in pairs], axis=0)
    if statistic == "chi2":
        expected = totals * g.sum(0, keepdims=True) / totals.sum(0, keepdims=True)  # (G, L, N)
        with np.errstate(divide="ignore", invalid="ignore"):
            cells = np.where(expected > 0, (g - expected) ** 2 / expected, 0.0)
        return cells.sum(axis=(0, 2))
    raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")


@dataclass
class PermutationResult:
    """A permutation test of whether cluster usage differs between groups of examples more than chance."""

    statistic: str
    observed: float  # summed over layers (and strata)
    observed_per_layer: np.ndarray  # (L,)
    p_value: float | None  # None when n_permutations == 0
    n_permutations: int
    null: np.ndarray  # (n_permutations,)
    group_loads: np.ndarray  # (S, G, L, N) load of each group within each stratum (NaN: group absent)
    effect: np.ndarray  # (S, L, N) range across the stratum's groups of the load of each cluster
    p_cluster: np.ndarray | None  # (S, L, N) per-cluster permutation p-value
    p_cluster_adjusted: np.ndarray | None  # (S, L, N) max-T: corrected over all clusters, layers and strata
    tested_strata: list[int] = field(default_factory=list)  # strata with >= 2 groups

    @property
    def null_mean(self) -> float | None:
        return float(self.null.mean()) if len(self.null) else None


def _stratum_stats(counts, groups, strata_idx, n_groups, statistic):
    """(per-layer statistic summed over strata (L,), group loads (S, G, L, N), effects (S, L, N))."""
    _, n_layers, n_experts = counts.shape
    per_layer = np.zeros(n_layers)
    loads = np.full((len(strata_idx), n_groups, n_layers, n_experts), np.nan)
    effects = np.zeros((len(strata_idx), n_layers, n_experts))
    for s, idx in enumerate(strata_idx):
        gc = group_counts(counts[idx], groups[idx], n_groups)  # (G, L, N)
        present = gc.sum(axis=(1, 2)) > 0
        if present.sum() < 2:
            continue
        per_layer += usage_distance(gc[present], statistic)
        lo = gc[present] / gc[present].sum(-1, keepdims=True)
        loads[s, present] = lo
        effects[s] = lo.max(0) - lo.min(0)
    return per_layer, loads, effects


def permutation_test(
    counts, groups, n_permutations: int = 1000, seed: int = 0, statistic: str = "tv", strata=None
) -> PermutationResult:
    """Does cluster usage differ between groups of examples more than a random regrouping of the same examples?

    counts: (E, L, N) or (E, N) per-example selection counts (`example_counts`, stacked over layers); groups: (E,)
    group code of each example (0..G-1); strata: optional (E,) code; groups are then compared, and shuffled, only
    within a stratum, and the statistic is summed over strata. The statistic (`usage_distance`) is summed over
    layers. p = (1 + #{permuted >= observed}) / (1 + n_permutations), so it is never 0; seeded.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim == 2:
        counts = counts[:, None, :]
    groups = np.asarray(groups, dtype=np.int64)
    if counts.ndim != 3 or groups.shape != (counts.shape[0],):
        raise ValueError(f"need counts (E, L, N) and groups (E,), got {counts.shape} and {groups.shape}")
    if n_permutations < 0:
        raise ValueError(f"n_permutations must be >= 0, got {n_permutations}")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if groups.size and groups.min() < 0:
        raise ValueError("group codes must be >= 0")
    n_groups = int(groups.max()) + 1 if groups.size else 0
    strata = np.zeros(len(groups), dtype=np.int64) if strata is None else np.asarray(strata, dtype=np.int64)
    strata_idx = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    tested = [s for s, idx in enumerate(strata_idx) if len(np.unique(groups[idx])) >= 2]
    if not tested:
        raise ValueError("need at least two groups (within at least one stratum) to compare")
    per_layer, loads, effects = _stratum_stats(counts, groups, strata_idx, n_groups, statistic)
    observed = float(per_layer.sum())
    rng = np.random.default_rng(seed)
    null = np.empty(n_permutations)
    null_effects = np.empty((n_permutations, *effects.shape))
    for i in range(n_permutations):
        shuffled = groups.copy()
        for idx in strata_idx:
            shuffled[idx] = rng.permutation(groups[idx])
        pl, _, eff = _stratum_stats(counts, shuffled, strata_idx, n_groups, statistic)
        null[i], null_effects[i] = pl.sum(), eff
    p_value = p_cluster = p_adjusted = None
    if n_permutations:
        tol = 1e-12 * max(1.0, abs(observed))  # a regrouping that reproduces the observed split ties exactly
        p_value = float((1 + (null >= observed - tol).sum()) / (1 + n_permutations))
        p_cluster = (1 + (null_effects >= effects[None] - 1e-12).sum(0)) / (1 + n_permutations)
        null_max = null_effects.reshape(n_permutations, -1).max(1)  # (n,)
        p_adjusted = (1 + (null_max[:, None] >= effects.reshape(1, -1) - 1e-12).sum(0)) / (1 + n_permutations)
        p_adjusted = p_adjusted.reshape(effects.shape)
    return PermutationResult(
        statistic, observed, per_layer, p_value, n_permutations, null, loads, effects, p_cluster, p_adjusted, tested
    )


def paired_change_test(base_counts, new_counts, n_permutations: int = 1000, seed: int = 0) -> dict:
    """Change of load between two models on the same tokens, with a paired sign-flip permutation test.

    base_counts, new_counts: (E, L, N) per-example selection counts of the two models on the same examples. Returns
    the load change (L, N) (new - base), the total-variation distance per layer, its sum over layers and the p-value
    of that sum under random swaps of the two models within each example.
    """
    b = np.asarray(base_counts, dtype=np.float64)
    f = np.asarray(new_counts, dtype=np.float64)
    if b.ndim == 2:
        b, f = b[:, None, :], f[:, None, :]
    if b.shape != f.shape:
        raise ValueError(f"the two models' counts differ in shape: {b.shape} vs {f.shape}")
    totals = b.sum(axis=(0, 2))  # (L,) selections per layer
    if not np.array_equal(totals, f.sum(axis=(0, 2))) or not np.array_equal(b.sum(-1), f.sum(-1)):
        raise ValueError("the two models were not recorded on the same tokens")
    diff = f - b  # (E, L, N)
    delta = diff.sum(0) / totals[:, None]  # (L, N)
    tv_layer = 0.5 * np.abs(delta).sum(-1)
    observed = float(tv_layer.sum())
    rng = np.random.default_rng(seed)
    null = np.empty(n_permutations)
    flat = diff.reshape(len(diff), -1)
    for i in range(n_permutations):
        signs = rng.choice([-1.0, 1.0], size=len(diff))
        d = (signs @ flat).reshape(delta.shape) / totals[:, None]
        null[i] = 0.5 * np.abs(d).sum()
    p = None
    if n_permutations:
        p = float((1 + (null >= observed - 1e-12 * max(1.0, observed)).sum()) / (1 + n_permutations))
    return {
        "delta_load": delta,
        "tv_per_layer": tv_layer,
        "tv": observed,
        "p_value": p,
        "null": null,
        "n_permutations": n_permutations,
    }


def kept_overlap(sel_a, sel_b, num_experts: int) -> float:
    """Mean over tokens of the fraction of token's k kept clusters that two recordings share."""
    a = check_selections(sel_a, num_experts)
    b = check_selections(sel_b, num_experts)
    if a.shape != b.shape:
        raise ValueError(f"recordings differ in shape: {a.shape} vs {b.shape}")
    oa = np.zeros((a.shape[0], num_experts), dtype=bool)
    ob = np.zeros_like(oa)
    np.put_along_axis(oa, a, True, axis=1)
    np.put_along_axis(ob, b, True, axis=1)
    return float((oa & ob).sum(1).mean() / a.shape[1])


def layer_summary(sel, num_experts: int) -> dict:
    """Load, token share, normalised entropy (and its floor log k / log N) and busiest cluster of one layer."""
    sel = check_selections(sel, num_experts)
    k = sel.shape[1]
    load = cluster_load(sel, num_experts)
    e, share = busiest_share(sel, num_experts)
    return {
        "tokens": int(sel.shape[0]),
        "k": int(k),
        "load": load.tolist(),
        "token_share": (load * k).tolist(),
        "normalised_entropy": normalised_entropy(load),
        "entropy_floor": math.log(k) / math.log(num_experts) if num_experts > 1 else 1.0,
        "busiest_cluster": e,
        "busiest_share": share,
        "least_used_cluster": int(load.argmin()),
        "least_used_share": float(load.min() * k),
        "unused_clusters": int((load == 0).sum()),
        "clusters_kept_by_over_90pct": int((load * k > 0.9).sum()),
        "clusters_kept_by_under_10pct": int((load * k < 0.1).sum()),
        "max_load_over_uniform": float(load.max() * num_experts),
    }


# =================================================================================================================
# Recording
# =================================================================================================================

_LAYER_IN_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def find_routers(model) -> dict[int, object]:
    """Layer index -> router module, for every module whose class name is RoutedLlamaRouter."""
    routers = {}
    for name, module in model.named_modules():
        if type(module).__name__ != ROUTER_CLASS:
            continue
        m = _LAYER_IN_NAME.search(name)
        if m is None:
            raise AnalysisError(f"cannot tell the layer of router {name!r}")
        routers[int(m.group(1))] = module
    return dict(sorted(routers.items()))


class RoutingRecorder:
    """Context manager: while active, every router's kept ids for non-padding tokens are appended per layer.

    Call `set_attention_mask(mask)` (B, T) before each forward; the router sees the flattened B*T tokens, and the
    rows where the mask is 0 are dropped. Without a mask every row is kept. Hooks are removed and the models'
    `routing_impl` restored on exit, also after an exception.
    """

    def __init__(self, model):
        self.model = model
        self.routers = find_routers(model)
        if not self.routers:
            raise AnalysisError(f"the model has no {ROUTER_CLASS} module: it is not a routed model")
        self.selections: dict[int, list[np.ndarray]] = {i: [] for i in self.routers}
        self._keep = None
        self._calls: dict[int, int] = {i: 0 for i in self.routers}
        self._handles = []
        self._configs = []

    def __enter__(self):
        seen = set()
        for module in self.model.modules():  # every RoutedLlamaMLP's config (they share one, normally)
            cfg = getattr(module, "config", None)
            if cfg is not None and hasattr(cfg, "routing_impl") and id(cfg) not in seen:
                seen.add(id(cfg))
                self._configs.append((cfg, cfg.routing_impl))
                cfg.routing_impl = "mask"  # the Triton path does not call the router module
        for layer, router in self.routers.items():
            self._handles.append(router.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for cfg, impl in self._configs:
            cfg.routing_impl = impl
        self._configs.clear()
        return False

    def set_attention_mask(self, attention_mask):
        self._keep = None if attention_mask is None else attention_mask.detach().reshape(-1).bool().cpu()
        self._calls = {i: 0 for i in self.routers}

    def check_batch(self):
        """Every routed layer must have routed exactly once since `set_attention_mask`."""
        bad = {i: c for i, c in self._calls.items() if c != 1}
        if bad:
            raise RuntimeError(f"routers were called {bad} times (layer: calls) in one forward; expected once each")

    def _hook(self, layer: int):
        def hook(module, inputs, output):
            ids = output.detach().to("cpu", copy=True)  # (B*T, k)
            if self._keep is not None:
                if ids.shape[0] != self._keep.numel():
                    raise RuntimeError(
                        f"layer {layer}: the router saw {ids.shape[0]} tokens, the attention mask has "
                        f"{self._keep.numel()}"
                    )
                ids = ids[self._keep]
            self.selections[layer].append(ids.numpy().astype(np.int16 if module.num_experts < 32768 else np.int64))
            self._calls[layer] += 1
            return None  # never replace the output

        return hook

    def result(self) -> dict[int, np.ndarray]:
        return {i: (np.concatenate(v) if v else np.zeros((0, 0), dtype=np.int64)) for i, v in self.selections.items()}


@dataclass
class Item:
    """One model input: its text, where the GLUE texts lie in it, and what it is."""

    text: str
    task: str
    label: float | int
    idx: int
    text_spans: list[tuple[int, int]] | None = None


@dataclass
class Recording:
    """Everything recorded on one model: selections per layer over the same token order, and per-token metadata."""

    selections: dict[int, np.ndarray]  # layer -> (M, k)
    token_example: np.ndarray  # (M,) index into the items
    token_is_text: np.ndarray | None  # (M,) True where the token overlaps a GLUE text (None: tokenizer not fast)
    n_truncated: int
    seconds: float


def _text_flags(offsets, spans) -> np.ndarray:
    """(T,) True where a token's character span [s, e) overlaps one of the text spans."""
    out = np.zeros(len(offsets), dtype=bool)
    for t, (s, e) in enumerate(offsets):
        if e > s:
            out[t] = any(s < b and e > a for a, b in spans)
    return out


def record_routing(
    model,
    tokenizer,
    items: list[Item],
    batch_size: int = 16,
    max_length: int = 512,
    device=None,
    progress: bool = False,
) -> Recording:
    """Run every item through `model` (inference mode) and record the routing of its non-padding tokens."""
    import torch

    t0 = time.perf_counter()
    device = device if device is not None else next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: len(items[i].text))  # similar lengths together: less padding
    want_offsets = bool(getattr(tokenizer, "is_fast", False)) and all(it.text_spans is not None for it in items)
    token_example, token_is_text = [], []
    n_truncated = 0
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="record", unit="batch", file=sys.stderr)
    was_training = model.training
    model.eval()
    try:
        with RoutingRecorder(model) as rec, torch.inference_mode():
            for batch in batches:
                texts = [items[i].text for i in batch]
                enc = tokenizer(
                    texts,
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                    return_offsets_mapping=want_offsets,
                )
                full = tokenizer(texts, truncation=False)["input_ids"]
                n_truncated += sum(len(f) > max_length for f in full)
                offsets = enc.pop("offset_mapping", None)
                mask = enc["attention_mask"]
                rec.set_attention_mask(mask)
                model(input_ids=enc["input_ids"].to(device), attention_mask=mask.to(device))
                rec.check_batch()
                for b, i in enumerate(batch):
                    n = int(mask[b].sum())
                    if not bool(mask[b, :n].all()):
                        raise AnalysisError("the tokenizer pads on the left; set padding_side='right'")
                    token_example.append(np.full(n, i, dtype=np.int64))
                    if want_offsets:
                        token_is_text.append(_text_flags(offsets[b, :n].tolist(), items[i].text_spans))
            selections = rec.result()
    finally:
        model.train(was_training)
    return Recording(
        selections={i: s.astype(np.int64) for i, s in selections.items()},
        token_example=np.concatenate(token_example) if token_example else np.zeros(0, dtype=np.int64),
        token_is_text=np.concatenate(token_is_text) if want_offsets and token_is_text else None,
        n_truncated=n_truncated,
        seconds=time.perf_counter() - t0,
    )


# =================================================================================================================
# Inputs and models
# =================================================================================================================


def text_spans(task, example) -> list[tuple[int, int]] | None:
    """Character spans of the GLUE texts in `format_example(task, example)`, or None if its layout is not the one
    expected ("Name: text" lines joined by newlines)."""
    from .tasks import format_example

    spans, pos, parts = [], 0, []
    for name, text in zip(task.field_names, example.texts):
        prefix = f"{name}: "
        spans.append((pos + len(prefix), pos + len(prefix) + len(text)))
        parts.append(prefix + text)
        pos += len(prefix) + len(text) + 1
    return spans if "\n".join(parts) == format_example(task, example) else None


def load_items(task_names: list[str], data_dir, split: str, max_examples: int, seed: int) -> list[Item]:
    """The inputs, `max_examples` per task (seeded subset), as formatted by `finetune.tasks.format_example`."""
    from .tasks import format_example, get_task, load_split

    items = []
    for name in task_names:
        task = get_task(name)
        rows = load_split(task, split, data_dir, max_samples=max_examples, seed=seed)
        for ex in rows:
            items.append(Item(format_example(task, ex), task.name, ex.label, ex.idx, text_spans(task, ex)))
    return items


def check_checkpoint(ref: str) -> dict:
    """The config of a routed checkpoint folder; `AnalysisError` for anything else (read only config.json)."""
    from .models import is_routed_checkpoint

    path = Path(ref).expanduser()
    if not path.is_dir():
        if path.exists():
            raise AnalysisError(f"{ref} is a file, not a routed checkpoint folder")
        hint = " (convert it first: python convert.py stand-in OUT)" if ref == "stand-in" else ""
        raise AnalysisError(f"no routed checkpoint folder {ref}{hint}")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise AnalysisError(f"{ref} has no config.json: not a model checkpoint")
    if not is_routed_checkpoint(str(path)):
        try:
            kind = json.loads(cfg_path.read_text()).get("model_type")
        except json.JSONDecodeError:
            raise AnalysisError(f"{cfg_path} is not valid JSON") from None
        raise AnalysisError(
            f"{ref} is a {kind!r} checkpoint, not a routed one (model_type 'routed_llama'); convert it first with "
            f"convert.py"
        )
    cfg = json.loads(cfg_path.read_text())
    if not (path / "modeling_routed_llama.py").is_file():
        raise AnalysisError(f"{ref} lacks modeling_routed_llama.py (the remote code of a routed checkpoint)")
    return cfg


def routed_layers_of(cfg: dict) -> list[int]:
    layers = cfg.get("routed_layers")
    return list(range(cfg["num_hidden_layers"])) if layers is None else sorted(int(i) for i in layers)


def load_model(checkpoint: str | None, adapter: str | None, top_k: int | None):
    """(model, tokenizer, adapter info or None): the routed classifier, or the adapter on its base, eval, CPU."""
    from . import adapters, models

    if adapter is not None:
        return adapters.load_finetuned(adapter, base=checkpoint, top_k=top_k)
    tok = models.load_tokenizer(checkpoint)
    return models.load_classifier(checkpoint, num_labels=2, tokenizer=tok, top_k=top_k).eval(), tok, None


# =================================================================================================================
# Analysis
# =================================================================================================================


def stacked_counts(rec: Recording, layers: list[int], n_examples: int, num_experts: int, token_mask=None):
    """(E, L, N) per-example selection counts over the chosen layers, optionally over a subset of tokens."""
    te = rec.token_example if token_mask is None else rec.token_example[token_mask]
    out = []
    for layer in layers:
        sel = rec.selections[layer] if token_mask is None else rec.selections[layer][token_mask]
        out.append(example_counts(sel, te, n_examples, num_experts))
    return np.stack(out, axis=1)


def _round(x, nd=6):
    if isinstance(x, dict):
        return {k: _round(v, nd) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v, nd) for v in x]
    if isinstance(x, np.ndarray):
        return _round(x.tolist(), nd)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(x) else round(float(x), nd)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _top_clusters(res: PermutationResult, layers, group_names, strata_names, k, top: int) -> list[dict]:
    """The `top` (stratum, layer, cluster) cells with the largest range of token share across groups."""
    rows = []
    flat = np.argsort(-res.effect, axis=None, kind="stable")
    for f in flat:
        s, li, e = np.unravel_index(f, res.effect.shape)
        if s not in res.tested_strata:
            continue
        shares = res.group_loads[s, :, li, e] * k  # (G,)
        row = {
            "layer": int(layers[li]),
            "cluster": int(e),
            "range_pp": float(res.effect[s, li, e] * k * 100),
            "token_share": {g: float(v) for g, v in zip(group_names, shares) if np.isfinite(v)},
        }
        present = shares[np.isfinite(shares)]
        row["max_group"] = group_names[int(np.nanargmax(shares))]
        row["min_group"] = group_names[int(np.nanargmin(shares))]
        row["ratio_max_min"] = float(present.max() / present.min()) if present.min() > 0 else None
        if strata_names is not None:
            row["within"] = strata_names[s]
        if res.p_cluster is not None:
            row["p"] = float(res.p_cluster[s, li, e])
            row["p_adjusted"] = float(res.p_cluster_adjusted[s, li, e])
        rows.append(row)
        if len(rows) >= top:
            break
    return rows


def specialisation(counts, items, layers, k, n_permutations, seed, statistic, top) -> dict:
    """The task test (if >= 2 tasks) and the label test (within tasks; classification tasks only)."""
    from .tasks import get_task

    out = {}
    task_names = list(dict.fromkeys(it.task for it in items))
    if len(task_names) >= 2:
        codes = np.array([task_names.index(it.task) for it in items])
        res = permutation_test(counts, codes, n_permutations, seed, statistic)
        out["by_task"] = _test_record(res, layers, task_names, None, k, top)
        out["by_task"]["_result"] = res
    cls_tasks = [t for t in task_names if not get_task(t).is_regression]
    keep = np.array([it.task in cls_tasks for it in items])
    if cls_tasks and keep.any():
        label_names = sorted({int(it.label) for it in items if it.task in cls_tasks})
        labels = np.array([label_names.index(int(it.label)) if k_ else 0 for it, k_ in zip(items, keep)])
        strata = np.array([task_names.index(it.task) for it in items])
        names = [f"label {v}" for v in label_names]
        try:
            res = permutation_test(counts[keep], labels[keep], n_permutations, seed, statistic, strata[keep])
        except ValueError as exc:  # e.g. every sampled example of each task has the same label
            out["by_label"] = {"skipped": str(exc)}
        else:
            present = sorted(set(strata[keep].tolist()))
            rec = _test_record(res, layers, names, [task_names[s] for s in present], k, top)
            for row in rec["top_clusters"]:  # "label 1" -> the task's own name for it ("not_entailment")
                label_of = dict(zip(names, (get_task(row["within"]).label_names[v] for v in label_names)))
                row["token_share"] = {label_of[g]: v for g, v in row["token_share"].items()}
                row["max_group"], row["min_group"] = label_of[row["max_group"]], label_of[row["min_group"]]
            rec["label_names"] = {t: list(get_task(t).label_names) for t in cls_tasks}
            rec["label_values"] = label_names
            rec["tasks"] = [task_names[s] for s in present]
            per_task = {}
            for s_ in present:  # the same test within one task at a time: which task carries the label effect
                sub = keep & (strata == s_)
                name = task_names[s_]
                try:
                    r1 = permutation_test(counts[sub], labels[sub], n_permutations, seed, statistic)
                except ValueError as exc:
                    per_task[name] = {"skipped": str(exc)}
                    continue
                per_task[name] = {
                    "examples_per_label": {
                        get_task(name).label_names[v]: int((labels[sub] == j).sum()) for j, v in enumerate(label_names)
                    },
                    "observed": r1.observed,
                    "null_mean": r1.null_mean,
                    "p_value": r1.p_value,
                }
            rec["per_task"] = per_task
            rec["_result"] = res
            out["by_label"] = rec
    skipped = [t for t in task_names if get_task(t).is_regression]
    if skipped:
        out["label_test_skips_regression_tasks"] = skipped
    return out


def _test_record(res: PermutationResult, layers, group_names, strata_names, k, top) -> dict:
    return {
        "groups": group_names,
        "statistic": res.statistic,
        "observed": res.observed,
        "observed_per_layer": dict(zip(map(str, layers), res.observed_per_layer.tolist())),
        "null_mean": res.null_mean,
        "null_p95": float(np.quantile(res.null, 0.95)) if len(res.null) else None,
        "p_value": res.p_value,
        "n_permutations": res.n_permutations,
        "top_clusters": _top_clusters(res, layers, group_names, strata_names, k, top),
    }


def analyse(
    rec: Recording,
    items: list[Item],
    num_experts: int,
    top_k: int,
    coselection_layers: list[int],
    n_permutations: int,
    seed: int,
    statistic: str,
    top: int = 10,
    base: Recording | None = None,
) -> dict:
    """Every number of the report from one recording (and, with `base`, the change from the converted model)."""
    layers = sorted(rec.selections)
    n_ex = len(items)
    out = {
        "layers": {str(i): layer_summary(rec.selections[i], num_experts) for i in layers},
    }
    cos = {}
    for i in coselection_layers:
        c = coselection_counts(rec.selections[i], num_experts)
        m = rec.selections[i].shape[0]
        lift = coselection_lift(c, m)
        corr = coselection_correlation(c, m)
        off = ~np.eye(num_experts, dtype=bool)
        pairs = [(a, b) for a in range(num_experts) for b in range(a + 1, num_experts) if np.isfinite(corr[a, b])]
        by_corr = sorted(pairs, key=lambda p: corr[p])

        def pair(p, corr=corr, lift=lift, c=c, m=m):
            return {"pair": list(p), "correlation": float(corr[p]), "lift": float(lift[p]), "share": float(c[p] / m)}

        cos[str(i)] = {
            "tokens": m,
            "counts": c.tolist(),
            "normalised": (c / m).tolist(),
            "lift": lift.tolist(),
            "correlation": corr.tolist(),
            "mean_correlation_off_diagonal": float(np.nanmean(corr[off])),
            "max_abs_correlation_off_diagonal": float(np.nanmax(np.abs(corr[off])))
            if np.isfinite(corr[off]).any()
            else None,
            "mean_abs_log2_lift_off_diagonal": float(np.nanmean(np.abs(np.log2(lift[off & (lift > 0)])))),
            "pairs_never_together": int((c[np.triu_indices(num_experts, 1)] == 0).sum()),
            "most_together": [pair(p) for p in by_corr[::-1][:5]],  # by correlation
            "most_apart": [pair(p) for p in by_corr[:5]],
        }
    out["coselection"] = cos
    scopes = {"all": None}
    if rec.token_is_text is not None:
        scopes["text"] = rec.token_is_text
    spec = {}
    for scope, mask in scopes.items():
        counts = stacked_counts(rec, layers, n_ex, num_experts, mask)
        spec[scope] = specialisation(counts, items, layers, top_k, n_permutations, seed, statistic, top)
        spec[scope]["tokens"] = int(rec.token_example.size if mask is None else mask.sum())
    out["specialisation"] = spec
    if base is not None:
        bc = stacked_counts(base, layers, n_ex, num_experts)
        fc = stacked_counts(rec, layers, n_ex, num_experts)
        ch = paired_change_test(bc, fc, n_permutations, seed)
        delta = ch["delta_load"]
        cells = [(li, e) for li in range(len(layers)) for e in range(num_experts)]
        cells.sort(key=lambda c: delta[c])

        def fmt(c):
            return {
                "layer": layers[c[0]],
                "cluster": c[1],
                "delta_load": float(delta[c]),
                "delta_token_share_pp": float(delta[c] * top_k * 100),
                "base_token_share": float(bc[:, c[0], c[1]].sum() / bc[:, c[0]].sum() * top_k),
            }

        out["change"] = {
            "base_layers": {str(i): layer_summary(base.selections[i], num_experts) for i in layers},
            "delta_load": delta.tolist(),
            "tv_per_layer": dict(zip(map(str, layers), ch["tv_per_layer"].tolist())),
            "tv_total": ch["tv"],
            "p_value": ch["p_value"],
            "n_permutations": n_permutations,
            "kept_overlap": {str(i): kept_overlap(base.selections[i], rec.selections[i], num_experts) for i in layers},
            "gained": [fmt(c) for c in cells[::-1][:top] if delta[c] > 0],
            "lost": [fmt(c) for c in cells[:top] if delta[c] < 0],
        }
    return out


# =================================================================================================================
# Figures
# =================================================================================================================


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _heat(ax, data, layers, title, cbar_label, center=None, cmap="viridis", vmax=None, fig=None):
    from matplotlib.colors import TwoSlopeNorm

    data = np.asarray(data, dtype=np.float64)
    if center is not None:
        span = vmax if vmax is not None else max(np.nanmax(np.abs(data - center)), 1e-12)
        norm = TwoSlopeNorm(vcenter=center, vmin=center - span, vmax=center + span)
        im = ax.imshow(data, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    else:
        im = ax.imshow(data, aspect="auto", cmap=cmap, interpolation="nearest", vmax=vmax)
    ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
    n = data.shape[1]
    step = 1 if n <= 32 else max(1, n // 16)
    ax.set_xticks(range(0, n, step), [str(e) for e in range(0, n, step)], fontsize=7)
    ax.set_xlabel("cluster id (ids are per layer)")
    ax.set_title(title, fontsize=10)
    (fig or ax.figure).colorbar(im, ax=ax, label=cbar_label, fraction=0.046, pad=0.02)
    return im


def plot_load(result: dict, n: int, k: int, path: Path, title_extra: str = ""):
    plt = _plt()
    layers = [int(i) for i in result["layers"]]
    load = np.array([result["layers"][str(i)]["load"] for i in layers]) * 100
    fig, ax = plt.subplots(figsize=(max(8, n * 0.3), 1.2 + 0.45 * len(layers)))
    _heat(
        ax,
        load,
        layers,
        f"Load per cluster{title_extra} (uniform = {100 / n:.2f}%; red = busier)",
        "share of token-selections (%)",
        center=100 / n,
        cmap="RdBu_r",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_layer_stats(result: dict, n: int, k: int, path: Path):
    plt = _plt()
    layers = [int(i) for i in result["layers"]]
    ent = [result["layers"][str(i)]["normalised_entropy"] for i in layers]
    busy = [result["layers"][str(i)]["busiest_share"] for i in layers]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    ax = axes[0]
    ax.plot(layers, ent, "o-", label="observed")
    ax.axhline(1.0, color="grey", ls=":", label="even load (1)")
    ax.axhline(
        math.log(k) / math.log(n), color="red", ls="--", label=f"floor log k/log N = {math.log(k) / math.log(n):.2f}"
    )
    ax.set_xlabel("routed layer")
    ax.set_ylabel("entropy of load / log N")
    ax.set_title("Normalised routing entropy per layer", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.plot(layers, busy, "o-", color="C1", label="observed")
    ax.axhline(k / n, color="grey", ls=":", label=f"even load (k/N = {k / n:.2f})")
    ax.axhline(1.0, color="red", ls="--", label="every token (1)")
    ax.set_xlabel("routed layer")
    ax.set_ylabel("fraction of tokens")
    ax.set_title("Share of tokens that keep the busiest cluster", fontsize=10)
    ax.legend(fontsize=7)
    for a in axes:
        a.set_xticks(layers)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_coselection(cos: dict, layer: int, n: int, path: Path):
    plt = _plt()
    c = np.array(cos["normalised"]) * 100
    corr = np.array(cos["correlation"], dtype=np.float64)  # None (never / always kept) -> NaN
    np.fill_diagonal(corr, np.nan)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6))
    im = axes[0].imshow(c, cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=axes[0], label="% of tokens that keep both (diagonal: keep i)", fraction=0.046, pad=0.02)
    axes[0].set_title(f"Layer {layer}: co-selection, % of {cos['tokens']} tokens", fontsize=10)
    span = np.nanmax(np.abs(corr)) if np.isfinite(corr).any() else 1.0
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="lightgrey")  # undefined: a cluster kept by every token
    im = axes[1].imshow(corr, cmap=cmap, vmin=-span, vmax=span, interpolation="nearest")
    fig.colorbar(im, ax=axes[1], label="correlation (phi) of the keep-indicators", fraction=0.046, pad=0.02)
    axes[1].set_title(
        f"Layer {layer}: kept together (red) / apart (blue); mean off-diagonal "
        f"{cos['mean_correlation_off_diagonal']:+.3f}\n(grey: the diagonal, or a cluster kept by every token)",
        fontsize=10,
    )
    step = 1 if n <= 32 else max(1, n // 16)
    for ax in axes:
        ax.set_xticks(range(0, n, step), [str(e) for e in range(0, n, step)], fontsize=6)
        ax.set_yticks(range(0, n, step), [str(e) for e in range(0, n, step)], fontsize=6)
        ax.set_xlabel("cluster j")
        ax.set_ylabel("cluster i")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_task_specialisation(res: PermutationResult, layers, task_names, k, path: Path, scope: str):
    plt = _plt()
    loads = res.group_loads[0]  # (G, L, N)
    pooled_share = None
    dev = []
    # deviation of each task's token share from the mean over tasks (unweighted), percentage points
    pooled_share = np.nanmean(loads, axis=0) * k
    for g in range(len(task_names)):
        dev.append((loads[g] * k - pooled_share) * 100)
    span = max(np.nanmax(np.abs(d)) for d in dev)
    n = loads.shape[-1]
    fig, axes = plt.subplots(
        len(task_names), 1, figsize=(max(8, n * 0.3), 0.9 + (0.4 * len(layers) + 0.8) * len(task_names))
    )
    axes = np.atleast_1d(axes)
    for ax, name, d in zip(axes, task_names, dev):
        _heat(
            ax,
            d,
            layers,
            f"{name}: token share minus the mean over tasks",
            "percentage points",
            center=0.0,
            cmap="PuOr_r",
            vmax=span,
        )
    _finish_permutation_figure(fig, plt, res, f"Cluster usage by task ({scope} tokens)", path)


def plot_label_specialisation(
    res: PermutationResult, layers, label_values, strata_names, label_names, k, path: Path, scope: str
):
    plt = _plt()
    panels = []
    for s, name in enumerate(strata_names):
        loads = res.group_loads[s]  # (G, L, N)
        present = [g for g in range(loads.shape[0]) if np.isfinite(loads[g]).all()]
        names = label_names.get(name, [])

        def label(g, names=names):
            v = label_values[g]
            return names[v] if v < len(names) else f"label {v}"

        if len(present) == 2:
            a, b = present
            panels.append(
                (f"{name}: token share of {label(b)} minus {label(a)} examples", (loads[b] - loads[a]) * k * 100)
            )
        elif len(present) > 2:
            panels.append((f"{name}: range of token share across labels", res.effect[s] * k * 100))
    if not panels:
        return False
    span = max(np.nanmax(np.abs(p[1])) for p in panels)
    n = res.effect.shape[-1]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, n * 0.3), 0.9 + (0.4 * len(layers) + 0.8) * len(panels)))
    axes = np.atleast_1d(axes)
    for ax, (title, d) in zip(axes, panels):
        _heat(ax, d, layers, title, "percentage points", center=0.0, cmap="PuOr_r", vmax=span)
    _finish_permutation_figure(fig, plt, res, f"Cluster usage by label within each task ({scope} tokens)", path)
    return True


def _finish_permutation_figure(fig, plt, res: PermutationResult, title: str, path: Path):
    """Title a specialisation figure with its permutation test, then save and close it."""
    null = res.null_mean if res.null_mean is None else round(res.null_mean, 3)
    fig.suptitle(
        f"{title}: {res.statistic} = {res.observed:.3f} (null mean {null}), permutation p = {_pfmt(res.p_value)}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_change(change: dict, layers, k, n, path: Path):
    plt = _plt()
    d = np.array(change["delta_load"]) * k * 100
    fig, ax = plt.subplots(figsize=(max(8, n * 0.3), 1.4 + 0.45 * len(layers)))
    p = _pfmt(change["p_value"])
    _heat(
        ax,
        d,
        layers,
        f"Fine-tuned minus converted: change of token share (green = gained); total TV "
        f"{change['tv_total']:.4f}, paired permutation p = {p}",
        "percentage points",
        center=0.0,
        cmap="PiYG",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# =================================================================================================================
# Report
# =================================================================================================================


def hardware(device: str = "cpu") -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "device": device,
        "gpu": torch.cuda.get_device_name(torch.device(device)) if str(device).startswith("cuda") else None,
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def _num(x, nd=4):
    return "n/a" if x is None else f"{x:.{nd}f}"


def _pfmt(p):
    return "n/a" if p is None else (f"{p:.3g}" if p < 0.01 else f"{p:.3f}")


def summary_markdown(report: dict, figures: dict[str, str]) -> str:
    r = report
    n, k = r["checkpoint"]["num_experts"], r["checkpoint"]["top_k"]
    hw = r["hardware"]
    lines = [f"# Routing analysis: {Path(r['checkpoint']['path']).name}" + (" + adapter" if r["adapter"] else ""), ""]
    lines += [
        "| | |",
        "|---|---|",
        f"| checkpoint | `{r['checkpoint']['path']}` (base {r['checkpoint'].get('base_model')}) |",
        f"| adapter | {('`' + r['adapter']['path'] + '`') if r['adapter'] else 'none'} |",
        f"| N clusters, k kept | {n}, {k} |",
        f"| routed layers | {', '.join(map(str, r['checkpoint']['routed_layers']))} |",
        f"| tasks ({r['split']}) | "
        + ", ".join(f"{t} ({v['examples']} ex., {v['tokens']} tokens)" for t, v in r["tasks"].items())
        + " |",
        f"| examples / tokens | {r['n_examples']} / {r['n_tokens']} (non-padding; {r['n_truncated']} truncated at "
        f"{r['max_length']}) |",
        f"| permutations, seed | {r['n_permutations']}, {r['seed']} |",
        f"| date | {r['date']} |",
        f"| hardware | {hw['cpu']}, {hw['cpu_cores']} cores, {hw['device']}; torch {hw['torch']}, "
        f"{hw['torch_threads']} threads |",
        f"| time | {r['seconds']['total']:.0f} s (recording {r['seconds']['record']:.0f} s) |",
        "",
        "Command:",
        "",
        "```",
        r["command"],
        "```",
        "",
        "## Load and entropy",
        "",
        f"Load = fraction of token-selections per cluster (uniform {100 / n:.2f}%); token share = fraction of tokens "
        f"that keep the cluster (uniform k/N = {k / n:.2f}). Normalised entropy = H(load)/log N; with k = {k} of "
        f"N = {n} it cannot go below log k/log N = {math.log(k) / math.log(n):.3f}.",
        "",
        "| layer | normalised entropy | busiest cluster | its token share | least-used cluster | its token share "
        "| unused | clusters kept by > 90% / < 10% of tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, s in r["layers"].items():
        lines.append(
            f"| {i} | {s['normalised_entropy']:.4f} | {s['busiest_cluster']} | {s['busiest_share']:.3f} | "
            f"{s['least_used_cluster']} | {s['least_used_share']:.3g} | {s['unused_clusters']} | "
            f"{s['clusters_kept_by_over_90pct']} / {s['clusters_kept_by_under_10pct']} |"
        )
    lines += [
        "",
        f"![load per cluster]({figures['load']})",
        "",
        f"![entropy and busiest share]({figures['layer_stats']})",
        "",
    ]
    lines += [
        "## Co-selection",
        "",
        "Left: fraction of tokens that keep both clusters. Right: correlation (phi) of the two clusters' "
        f"keep-indicators over tokens; keeping exactly k makes its mean about -1/(N-1) = {-1 / (n - 1):.3f}. "
        "Pairs below: correlation (lift = P(i,j) / (P(i) P(j)) in brackets).",
        "",
    ]
    for i, c in r["coselection"].items():
        tog = ", ".join(
            f"{p['pair'][0]}&{p['pair'][1]} {p['correlation']:+.2f} ({p['lift']:.2f})" for p in c["most_together"][:3]
        )
        apart = ", ".join(
            f"{p['pair'][0]}&{p['pair'][1]} {p['correlation']:+.2f} ({p['lift']:.2f})" for p in c["most_apart"][:3]
        )
        lines += [
            f"Layer {i}: mean off-diagonal correlation {c['mean_correlation_off_diagonal']:+.3f}, largest "
            f"|correlation| {c['max_abs_correlation_off_diagonal']:.2f}; most together {tog}; most apart {apart}; "
            f"{c['pairs_never_together']} pairs never kept together.",
            "",
            f"![co-selection layer {i}]({figures['coselection_' + i]})",
            "",
        ]
    lines += [
        "## Specialisation",
        "",
        f"Statistic: {r['statistic']} (mean pairwise total variation between the groups' load distributions, "
        "summed over layers, for tv); p-value from shuffling whole examples between groups (labels only within a "
        'task). Scope "text" counts only tokens of the GLUE texts, not the field names that differ between '
        "tasks.",
        "",
        "| test | scope | tokens | observed | null mean | null 95% | p |",
        "|---|---|---|---|---|---|---|",
    ]
    for scope, spec in r["specialisation"].items():
        for test in ("by_task", "by_label"):
            t = spec.get(test)
            if not t or "skipped" in t:
                continue
            lines.append(
                f"| {test.replace('_', ' ')} | {scope} | {spec['tokens']} | {t['observed']:.4f} | "
                f"{_num(t['null_mean'])} | {_num(t['null_p95'])} | {_pfmt(t['p_value'])} |"
            )
    for scope, spec in r["specialisation"].items():
        per = (spec.get("by_label") or {}).get("per_task")
        if per:
            lines += [
                "",
                f"Label test one task at a time ({scope} tokens): "
                + "; ".join(
                    f"{t} {v['observed']:.4f} vs null {_num(v['null_mean'])}, p = {_pfmt(v['p_value'])}"
                    if "skipped" not in v
                    else f"{t} skipped ({v['skipped']})"
                    for t, v in per.items()
                )
                + ".",
            ]
    if r["n_permutations"]:
        lines += [
            "",
            f"The smallest possible p-value with {r['n_permutations']} permutations is "
            f"1/{r['n_permutations'] + 1} = {1 / (r['n_permutations'] + 1):.3g}.",
        ]
    for test, title in (("by_task", "tasks"), ("by_label", "labels (within a task)")):
        t = r["specialisation"]["all"].get(test)
        if not t or "skipped" in t:
            continue
        lines += [
            "",
            f"Top specialised clusters, {title} (all tokens): range of token share across groups, "
            "permutation p (unadjusted / max-T adjusted over every cluster of every layer).",
            "",
            "| layer | cluster | " + ("task | " if test == "by_label" else "") + "highest | lowest | range (pp) | "
            "token share per group | p | p adj. |",
            "|---|---|" + ("---|" if test == "by_label" else "") + "---|---|---|---|---|---|",
        ]
        for row in t["top_clusters"]:
            shares = ", ".join(f"{g} {v:.3f}" for g, v in row["token_share"].items())
            lines.append(
                f"| {row['layer']} | {row['cluster']} | "
                + (f"{row['within']} | " if test == "by_label" else "")
                + f"{row['max_group']} | {row['min_group']} | {row['range_pp']:.1f} | {shares} | "
                f"{_pfmt(row.get('p'))} | {_pfmt(row.get('p_adjusted'))} |"
            )
        for scope in r["specialisation"]:
            key = ("task_" if test == "by_task" else "label_") + scope
            if key in figures:
                lines += ["", f"![specialisation by {title}, {scope} tokens]({figures[key]})"]
    if "label_test_skips_regression_tasks" in r["specialisation"]["all"]:
        lines += [
            "",
            f"No label test for regression tasks: {r['specialisation']['all']['label_test_skips_regression_tasks']}.",
        ]
    lines.append("")
    ch = r.get("change")
    if ch:
        lines += [
            "## Change from the converted model to the fine-tuned one",
            "",
            f"Same tokens through both. Total variation between the two loads, summed over layers: "
            f"{ch['tv_total']:.4f} (paired sign-flip permutation p = {_pfmt(ch['p_value'])}). Mean fraction of a "
            "token's kept clusters that stay the same: "
            + ", ".join(f"layer {i} {v:.3f}" for i, v in ch["kept_overlap"].items())
            + ".",
            "",
            "| | layer | cluster | token share before | change (pp) |",
            "|---|---|---|---|---|",
        ]
        for kind in ("gained", "lost"):
            for row in ch[kind][:5]:
                lines.append(
                    f"| {kind} | {row['layer']} | {row['cluster']} | {row['base_token_share']:.3f} | "
                    f"{row['delta_token_share_pp']:+.2f} |"
                )
        lines += ["", f"![load change]({figures['change']})", ""]
    return "\n".join(lines) + "\n"


def _strip_private(x):
    if isinstance(x, dict):
        return {k: _strip_private(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, list):
        return [_strip_private(v) for v in x]
    return x


# =================================================================================================================
# Command line
# =================================================================================================================


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = parser
    p.add_argument(
        "--checkpoint",
        default=None,
        help="routed checkpoint folder (from convert.py); default with --adapter: the adapter's base",
    )
    p.add_argument("--adapter", default=None, help="LoRA adapter folder from the fine-tuning harness (optional)")
    p.add_argument("--tasks", nargs="+", default=["rte", "sst2", "cola"], help="GLUE tasks (default: rte sst2 cola)")
    p.add_argument("--data-dir", default=None, help="local GLUE folder (default: the Hub, through `datasets`)")
    p.add_argument("--split", choices=["validation", "train"], default="validation", help="default: validation (dev)")
    p.add_argument("--max-examples", type=int, default=200, help="examples per task, a seeded subset (default 200)")
    p.add_argument("--out", required=True, help="output folder (routing.json, PNGs, summary.md)")
    p.add_argument("--n-permutations", type=int, default=1000, help="permutations per test (default 1000; 0: no p)")
    p.add_argument("--statistic", choices=STATISTICS, default="tv", help="specialisation statistic (default tv)")
    p.add_argument(
        "--coselection-layers",
        type=int,
        nargs="+",
        default=None,
        help="layers for co-selection heatmaps (default: the first and last routed layer)",
    )
    p.add_argument("--top-k", type=int, default=None, help="analyse at this k instead of the checkpoint's")
    p.add_argument("--device", default="cpu", help="torch device to run the model on (default cpu)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512, help="tokens per input (longer ones are truncated)")
    p.add_argument("--seed", type=int, default=0, help="seed of the example subset and of the permutations")
    p.add_argument("--top", type=int, default=10, help="rows of the top-cluster tables (default 10)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing routing.json in --out")
    p.add_argument("--save-selections", action="store_true", help="also write selections.npz (every token's ids)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def validate(args) -> tuple[dict, dict | None, list[Item]]:
    """Every cheap check, before any model is loaded: (checkpoint config, adapter info, inputs)."""
    from .adapters import AdapterError, read_info
    from .tasks import TaskError, get_task

    if args.max_examples is not None and args.max_examples < 1:
        raise AnalysisError(f"--max-examples must be >= 1, got {args.max_examples}")
    for name, v, lo in (
        ("--n-permutations", args.n_permutations, 0),
        ("--batch-size", args.batch_size, 1),
        ("--max-length", args.max_length, 1),
        ("--top", args.top, 1),
    ):
        if v < lo:
            raise AnalysisError(f"{name} must be >= {lo}, got {v}")
    if not args.tasks:
        raise AnalysisError("--tasks selects no task")
    try:
        names = [get_task(t).name for t in args.tasks]
    except TaskError as exc:
        raise AnalysisError(str(exc)) from None
    if len(set(names)) != len(names):
        raise AnalysisError(f"--tasks lists a task twice: {args.tasks}")
    info = None
    checkpoint = args.checkpoint
    if args.adapter is not None:
        try:
            info = read_info(args.adapter)
        except AdapterError as exc:
            raise AnalysisError(str(exc)) from None
        if checkpoint is None:
            checkpoint = info.get("base")
            if checkpoint is None:
                raise AnalysisError(f"{args.adapter}: its {'routed_llama_adapter.json'} names no base")
    if checkpoint is None:
        raise AnalysisError("pass --checkpoint (a routed checkpoint folder) or --adapter")
    cfg = check_checkpoint(checkpoint)
    args.checkpoint = checkpoint
    n = cfg["num_experts"]
    k = args.top_k if args.top_k is not None else (info or {}).get("top_k") or cfg.get("num_experts_per_tok") or n
    if not 1 <= k <= n:
        raise AnalysisError(f"--top-k must be in [1, num_experts={n}], got {k}")
    if k == n:
        raise AnalysisError(f"k = N = {n}: every token keeps every cluster, there is no routing to analyse")
    args.top_k_resolved = k
    routed = routed_layers_of(cfg)
    if args.coselection_layers is not None:
        bad = [i for i in args.coselection_layers if i not in routed]
        if bad:
            raise AnalysisError(f"--coselection-layers {bad} are not routed layers; routed: {routed}")
    try:
        import torch

        dev = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise AnalysisError(f"--device {args.device!r} is not a torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AnalysisError("--device cuda: no CUDA device is available")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise AnalysisError(f"no GLUE folder {args.data_dir}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise AnalysisError(f"--out {out} is a file")
    if (out / "routing.json").exists() and not args.overwrite:
        raise AnalysisError(f"{out / 'routing.json'} exists; pass --overwrite to replace it")
    try:
        items = load_items(names, args.data_dir, args.split, args.max_examples, args.seed)
    except TaskError as exc:
        raise AnalysisError(str(exc)) from None
    if not items:
        raise AnalysisError("the selection holds no example")
    return cfg, info, items


def command_line(args) -> str:
    argv = getattr(args, "argv", None)
    if argv is not None:  # from main()
        return shlex.join(["python", "-m", "finetune.analyze", *argv])
    argv0 = Path(sys.argv[0])  # from another command line, e.g. `python -m finetune analyze ...`
    if argv0.name == "__main__.py":
        prog = ["python", "-m", argv0.parent.name]
    elif argv0.name == "analyze.py":
        prog = ["python", "-m", "finetune.analyze"]
    else:
        prog = [argv0.name]
    return shlex.join([*prog, *sys.argv[1:]])


def run(args) -> int:
    """Record which clusters every token keeps in every routed layer (GLUE inputs) and write routing.json, PNGs and
    summary.md: load, entropy, co-selection, specialisation by task and label, change after fine-tuning.

    `args` come from a parser built with `add_arguments`; returns 0. Bad input raises `AnalysisError` (a ValueError)
    before any model is loaded.
    """
    t_start = time.perf_counter()
    date = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    cfg, info, items = validate(args)
    progress = not args.no_progress
    from .adapters import AdapterError
    from .models import ModelError, base_fingerprint

    t0 = time.perf_counter()
    try:
        model, tokenizer, _ = load_model(args.checkpoint, args.adapter, args.top_k_resolved)
    except (AdapterError, ModelError) as exc:
        raise AnalysisError(str(exc)) from None
    except (OSError, ValueError, RuntimeError) as exc:  # unreadable weights, a wrong remote code, ...: one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AnalysisError(f"cannot load {args.adapter or args.checkpoint}: {reason}") from None
    model.to(args.device)
    load_seconds = time.perf_counter() - t0
    routers = find_routers(model)
    if not routers:
        raise AnalysisError(f"{args.checkpoint} loaded without any {ROUTER_CLASS}: nothing to analyse")
    layers = sorted(routers)
    n = next(iter(routers.values())).num_experts
    k = next(iter(routers.values())).top_k
    cos_layers = args.coselection_layers or sorted({layers[0], layers[-1]})
    base_rec = None
    if args.adapter is not None:
        with model.disable_adapter():
            base_rec = record_routing(model, tokenizer, items, args.batch_size, args.max_length, progress=progress)
    rec = record_routing(model, tokenizer, items, args.batch_size, args.max_length, progress=progress)
    if rec.token_example.size == 0:
        raise AnalysisError("the inputs hold no non-padding token")
    t1 = time.perf_counter()
    result = analyse(rec, items, n, k, cos_layers, args.n_permutations, args.seed, args.statistic, args.top, base_rec)
    stats_seconds = time.perf_counter() - t1

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"load": "load.png", "layer_stats": "layer_stats.png"}
    plot_load(result, n, k, out / figures["load"], " (fine-tuned)" if args.adapter else "")
    plot_layer_stats(result, n, k, out / figures["layer_stats"])
    for i in cos_layers:
        figures[f"coselection_{i}"] = f"coselection_layer{i}.png"
        plot_coselection(result["coselection"][str(i)], i, n, out / figures[f"coselection_{i}"])
    for scope, spec in result["specialisation"].items():
        if "by_task" in spec:
            figures[f"task_{scope}"] = f"specialisation_task_{scope}.png"
            plot_task_specialisation(
                spec["by_task"]["_result"], layers, spec["by_task"]["groups"], k, out / figures[f"task_{scope}"], scope
            )
        lab = spec.get("by_label")
        if lab and "_result" in lab:
            name = f"specialisation_label_{scope}.png"
            if plot_label_specialisation(
                lab["_result"], layers, lab["label_values"], lab["tasks"], lab["label_names"], k, out / name, scope
            ):
                figures[f"label_{scope}"] = name
    if "change" in result:
        figures["change"] = "load_change.png"
        plot_change(result["change"], layers, k, n, out / figures["change"])
    if args.save_selections:
        np.savez_compressed(
            out / "selections.npz",
            token_example=rec.token_example,
            **{f"layer_{i}": s.astype(np.int16) for i, s in rec.selections.items()},
        )

    per_task = {}
    ex_task = np.array([it.task for it in items])
    tok_per_ex = np.bincount(rec.token_example, minlength=len(items))
    for t in dict.fromkeys(ex_task.tolist()):
        sel = ex_task == t
        per_task[t] = {"examples": int(sel.sum()), "tokens": int(tok_per_ex[sel].sum())}
    report = {
        "format_version": FORMAT_VERSION,
        "tool": "finetune.analyze",
        "date": date,
        "command": command_line(args),
        "hardware": hardware(args.device),
        "checkpoint": {
            "path": str(args.checkpoint),
            "resolved": str(Path(args.checkpoint).resolve()),
            "base_model": cfg.get("base_model_name_or_path"),
            "num_experts": n,
            "top_k": k,
            "top_k_in_checkpoint": cfg.get("num_experts_per_tok"),
            "routed_layers": layers,
            "router": cfg.get("router"),
            "partition_method": cfg.get("partition_method"),
            "partition_seed": cfg.get("partition_seed"),
            "fingerprint": info["base_fingerprint"] if info else base_fingerprint(model),
            "loaded_as": "sequence classification (score head unused; only the routers matter)",
        },
        "adapter": None if args.adapter is None else {"path": str(args.adapter), "info": info},
        "tasks": per_task,
        "split": args.split,
        "data_dir": args.data_dir,
        "max_examples_per_task": args.max_examples,
        "n_examples": len(items),
        "n_tokens": int(rec.token_example.size),
        "n_text_tokens": None if rec.token_is_text is None else int(rec.token_is_text.sum()),
        "n_truncated": rec.n_truncated,
        "max_length": args.max_length,
        "seed": args.seed,
        "n_permutations": args.n_permutations,
        "statistic": args.statistic,
        "definitions": {
            "load": "fraction of token-selections per cluster (sums to 1 per layer)",
            "token_share": "fraction of tokens that keep the cluster = load * k",
            "normalised_entropy": "entropy(load) / log N; floor log k / log N",
            "busiest_share": "token share of the most-kept cluster",
            "coselection.normalised": "fraction of tokens that keep both clusters (diagonal: keep the cluster)",
            "coselection.lift": "P(i and j) / (P(i) P(j))",
            "coselection.correlation": "phi coefficient of the keep-indicators of i and j over tokens",
            "specialisation": "statistic summed over layers; permutation test shuffles whole examples between groups "
            "(labels: within a task); range_pp = max - min token share across groups, percentage "
            "points; p_adjusted: max-T over all clusters of all layers",
            "change": "fine-tuned minus converted (adapter disabled) on the same tokens; paired sign-flip test",
        },
        **_strip_private(result),
        "figures": figures,
        "seconds": {
            "load": round(load_seconds, 2),
            "record": round(rec.seconds + (base_rec.seconds if base_rec else 0), 2),
            "statistics": round(stats_seconds, 2),
            "total": round(time.perf_counter() - t_start, 2),
        },
    }
    report = _round(report)
    (out / "routing.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "summary.md").write_text(summary_markdown(report, figures))
    task_p = report["specialisation"]["all"].get("by_task", {}).get("p_value")
    ent = ", ".join(f"{report['layers'][str(i)]['normalised_entropy']:.3f}" for i in layers)
    print(
        f"wrote {out}: {len(items)} examples, {report['n_tokens']} tokens, {len(layers)} routed layers "
        f"(N={n}, k={k}); normalised entropy {ent}; task p = {_pfmt(task_p)}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m finetune.analyze",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return add_arguments(p)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return run(args)
    except AnalysisError as exc:
        print(f"analyze: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    root = str(Path(__file__).resolve().parents[1])  # convert.py lives at the repository root
    if root not in sys.path:
        sys.path.insert(0, root)
    sys.exit(main())
