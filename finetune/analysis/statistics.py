"""Statistics of routing decisions: pure functions on plain numpy arrays, no model.

Inputs are the kept cluster ids of one layer, an int array (tokens, k); per-token example ids; per-example selection
counts (E, L, N) stacked over layers; per-example group codes (task, label). Definitions are in the package docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as _scipy_stats

STATISTICS = ("tv", "chi2")
TIE_TOLERANCE = 1e-12  # a regrouping that reproduces the observed split ties with it up to rounding


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
    return float(_scipy_stats.entropy(p) / math.log(p.size))


def busiest_share(sel, num_experts: int) -> tuple[int, float]:
    """(cluster, share): the most-kept cluster (lowest id on ties) and the fraction of tokens that keep it."""
    sel = check_selections(sel, num_experts)
    if sel.shape[0] == 0:
        raise ValueError("no tokens")
    counts = selection_counts(sel, num_experts)
    e = int(counts.argmax())
    return e, float(counts[e] / sel.shape[0])


BATCHES = (1, 2, 4, 8)  # the batch sizes of `batch_union`


def batch_union(token_share, batch: int) -> float:
    """Expected fraction of the N clusters that at least one of `batch` tokens keeps, for tokens drawn independently
    from the recorded ones (as concurrent requests are): sum over clusters of 1 - (1 - share)^batch, over N. With
    equal clusters (as balanced conversions make them) this is the fraction of the FFN's weights the decode kernels
    read for a batch of that many requests, which read the union of the batch's kept clusters."""
    share = np.clip(np.asarray(token_share, dtype=np.float64), 0.0, 1.0)
    return float((1.0 - (1.0 - share) ** batch).mean())


def layer_summary(sel, num_experts: int) -> dict:
    """Load, token share, normalised entropy (and its floor log k / log N), busiest cluster, and the fraction of
    clusters a batch of B independent tokens keeps between them (`batch_union`; under uniform routing: 1 - (1 -
    k/N)^B) of one layer."""
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
        "batch_union": {str(b): batch_union(load * k, b) for b in BATCHES},
        "batch_union_uniform": {str(b): 1.0 - (1.0 - k / num_experts) ** b for b in BATCHES},
    }


def _keep_indicators(sel: np.ndarray, num_experts: int, dtype=np.float64) -> np.ndarray:
    """(tokens, N): 1 where the token keeps the cluster."""
    onehot = np.zeros((sel.shape[0], num_experts), dtype=dtype)
    np.put_along_axis(onehot, sel, 1, axis=1)
    return onehot


def coselection_counts(sel, num_experts: int) -> np.ndarray:
    """(N, N) int: C[i, j] = tokens that keep both i and j; the diagonal C[i, i] = tokens that keep i."""
    onehot = _keep_indicators(check_selections(sel, num_experts), num_experts)
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


def kept_overlap(sel_a, sel_b, num_experts: int) -> float:
    """Mean over tokens of the fraction of a token's k kept clusters that two recordings share."""
    a = check_selections(sel_a, num_experts)
    b = check_selections(sel_b, num_experts)
    if a.shape != b.shape:
        raise ValueError(f"recordings differ in shape: {a.shape} vs {b.shape}")
    oa = _keep_indicators(a, num_experts, bool)
    ob = _keep_indicators(b, num_experts, bool)
    return float((oa & ob).sum(1).mean() / a.shape[1])


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
    identical usage, 1 for disjoint clusters). "chi2": Pearson's chi-square of the G x N table (empty cells skipped;
    `scipy.stats.chi2_contingency` refuses a table with an empty column, which a rarely kept cluster produces).
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


def permutation_p(null, observed, tolerance: float = TIE_TOLERANCE):
    """(1 + #{null >= observed - tolerance}) / (1 + n), counted over the first axis of `null` (n permutations), so
    never 0. Scalars for a 1-D `null`, else arrays of the broadcast shape."""
    null = np.asarray(null)
    return (1 + (null >= observed - tolerance).sum(0)) / (1 + len(null))


def _scalar_p(null, observed: float) -> float:
    return float(permutation_p(null, observed, TIE_TOLERANCE * max(1.0, abs(observed))))


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


@dataclass(frozen=True)
class _Design:
    """The checked inputs of a permutation test: counts (E, L, N), group codes (E,), example indices per stratum."""

    counts: np.ndarray
    groups: np.ndarray
    strata_idx: list[np.ndarray]
    n_groups: int
    statistic: str


def _design(counts, groups, strata, n_permutations: int, statistic: str) -> _Design:
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
    return _Design(counts, groups, strata_idx, n_groups, statistic)


def _stratum_stats(d: _Design, groups: np.ndarray):
    """(per-layer statistic summed over strata (L,), group loads (S, G, L, N), effects (S, L, N)) for `groups`."""
    _, n_layers, n_experts = d.counts.shape
    per_layer = np.zeros(n_layers)
    loads = np.full((len(d.strata_idx), d.n_groups, n_layers, n_experts), np.nan)
    effects = np.zeros((len(d.strata_idx), n_layers, n_experts))
    for s, idx in enumerate(d.strata_idx):
        gc = group_counts(d.counts[idx], groups[idx], d.n_groups)  # (G, L, N)
        present = gc.sum(axis=(1, 2)) > 0
        if present.sum() < 2:
            continue
        per_layer += usage_distance(gc[present], d.statistic)
        lo = gc[present] / gc[present].sum(-1, keepdims=True)
        loads[s, present] = lo
        effects[s] = lo.max(0) - lo.min(0)
    return per_layer, loads, effects


def permutation_test(
    counts, groups, *, n_permutations: int = 1000, seed: int = 0, statistic: str = "tv", strata=None
) -> PermutationResult:
    """Does cluster usage differ between groups of examples more than a random regrouping of the same examples?

    counts: (E, L, N) or (E, N) per-example selection counts (`example_counts`, stacked over layers); groups: (E,)
    group code of each example (0..G-1); strata: optional (E,) code; groups are then compared, and shuffled, only
    within a stratum, and the statistic is summed over strata. The statistic (`usage_distance`) is summed over
    layers. p = (1 + #{permuted >= observed}) / (1 + n_permutations), so it is never 0; seeded. Per cluster, the
    effect (range of load across groups) gets its own p-value and a max-T one corrected over every cluster.
    """
    d = _design(counts, groups, strata, n_permutations, statistic)
    tested = [s for s, idx in enumerate(d.strata_idx) if len(np.unique(d.groups[idx])) >= 2]
    if not tested:
        raise ValueError("need at least two groups (within at least one stratum) to compare")
    per_layer, loads, effects = _stratum_stats(d, d.groups)
    observed = float(per_layer.sum())
    rng = np.random.default_rng(seed)
    null = np.empty(n_permutations)
    null_effects = np.empty((n_permutations, *effects.shape))
    for i in range(n_permutations):
        shuffled = d.groups.copy()
        for idx in d.strata_idx:
            shuffled[idx] = rng.permutation(d.groups[idx])
        pl, _, eff = _stratum_stats(d, shuffled)
        null[i], null_effects[i] = pl.sum(), eff
    p_value = p_cluster = p_adjusted = None
    if n_permutations:
        p_value = _scalar_p(null, observed)
        p_cluster = permutation_p(null_effects, effects[None])
        null_max = null_effects.reshape(n_permutations, -1).max(1)  # (n,)
        p_adjusted = permutation_p(null_max[:, None], effects.reshape(-1)).reshape(effects.shape)
    return PermutationResult(
        statistic, observed, per_layer, p_value, n_permutations, null, loads, effects, p_cluster, p_adjusted, tested
    )


def paired_change_test(base_counts, new_counts, *, n_permutations: int = 1000, seed: int = 0) -> dict:
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
        signs = rng.choice([-1.0, 1.0], size=len(diff))  # swapping the two models of an example flips its diff
        d = (signs @ flat).reshape(delta.shape) / totals[:, None]
        null[i] = 0.5 * np.abs(d).sum()
    return {
        "delta_load": delta,
        "tv_per_layer": tv_layer,
        "tv": observed,
        "p_value": _scalar_p(null, observed) if n_permutations else None,
        "null": null,
        "n_permutations": n_permutations,
    }
