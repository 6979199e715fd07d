"""Every number of the report (`describe`) and the routing.json record around them (`routing_record`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .record import Item, Recording
from .statistics import (
    PermutationResult,
    coselection_correlation,
    coselection_counts,
    coselection_lift,
    kept_overlap,
    layer_summary,
    paired_change_test,
    permutation_test,
)

FORMAT_VERSION = 1
DEFINITIONS = {
    "load": "fraction of token-selections per cluster (sums to 1 per layer)",
    "token_share": "fraction of tokens that keep the cluster = load * k",
    "normalised_entropy": "entropy(load) / log N; floor log k / log N",
    "busiest_share": "token share of the most-kept cluster",
    "batch_union": "per batch size B: expected fraction of clusters kept by at least one of B tokens drawn "
    "independently from the recorded ones = mean over clusters of 1 - (1 - token share)^B (with equal clusters: the "
    "fraction of FFN weights the decode kernels read for B concurrent requests); batch_union_uniform: 1 - (1 - k/N)^B",
    "coselection.normalised": "fraction of tokens that keep both clusters (diagonal: keep the cluster)",
    "coselection.lift": "P(i and j) / (P(i) P(j))",
    "coselection.correlation": "phi coefficient of the keep-indicators of i and j over tokens",
    "specialisation": "statistic summed over layers; permutation test shuffles whole examples between groups "
    "(labels: within a task); range_pp = max - min token share across groups, percentage "
    "points; p_adjusted: max-T over all clusters of all layers",
    "change": "fine-tuned minus converted (adapter disabled) on the same tokens; paired sign-flip test",
    "specialisation_converted": "the specialisation tests on the converted model's routing of the same tokens (with "
    "an adapter): read beside `specialisation` to see whether fine-tuning sharpens it",
}


@dataclass(frozen=True)
class TestOptions:
    """How the permutation tests run and how much of them the report lists."""

    __test__ = False  # not a pytest class

    n_permutations: int = 1000
    seed: int = 0
    statistic: str = "tv"
    top: int = 10  # rows of the top-cluster tables

    def test(self, counts, groups, strata=None) -> PermutationResult:
        return permutation_test(
            counts, groups, n_permutations=self.n_permutations, seed=self.seed, statistic=self.statistic, strata=strata
        )


# ---------------------------------------------------------------------------------------------------------------
# Co-selection
# ---------------------------------------------------------------------------------------------------------------


def coselection_summary(sel: np.ndarray, num_experts: int) -> dict:
    """Counts, normalised counts, lift, correlation and the most-together / most-apart pairs of one layer."""
    c = coselection_counts(sel, num_experts)
    m = sel.shape[0]
    lift = coselection_lift(c, m)
    corr = coselection_correlation(c, m)
    off = ~np.eye(num_experts, dtype=bool)
    pairs = [(a, b) for a in range(num_experts) for b in range(a + 1, num_experts) if np.isfinite(corr[a, b])]
    by_corr = sorted(pairs, key=lambda p: corr[p])

    def pair(p):
        return {"pair": list(p), "correlation": float(corr[p]), "lift": float(lift[p]), "share": float(c[p] / m)}

    finite = np.isfinite(corr[off]).any()
    return {
        "tokens": m,
        "counts": c.tolist(),
        "normalised": (c / m).tolist(),
        "lift": lift.tolist(),
        "correlation": corr.tolist(),
        "mean_correlation_off_diagonal": float(np.nanmean(corr[off])),
        "max_abs_correlation_off_diagonal": float(np.nanmax(np.abs(corr[off]))) if finite else None,
        "mean_abs_log2_lift_off_diagonal": float(np.nanmean(np.abs(np.log2(lift[off & (lift > 0)])))),
        "pairs_never_together": int((c[np.triu_indices(num_experts, 1)] == 0).sum()),
        "most_together": [pair(p) for p in by_corr[::-1][:5]],  # by correlation
        "most_apart": [pair(p) for p in by_corr[:5]],
    }


# ---------------------------------------------------------------------------------------------------------------
# Specialisation by task and by label
# ---------------------------------------------------------------------------------------------------------------


def _top_clusters(res: PermutationResult, layers, group_names, strata_names, k: int, top: int) -> list[dict]:
    """The `top` (stratum, layer, cluster) cells with the largest range of token share across groups."""
    rows = []
    for f in np.argsort(-res.effect, axis=None, kind="stable"):
        s, li, e = np.unravel_index(f, res.effect.shape)
        if s not in res.tested_strata:
            continue
        shares = res.group_loads[s, :, li, e] * k  # (G,)
        present = shares[np.isfinite(shares)]
        row = {
            "layer": int(layers[li]),
            "cluster": int(e),
            "range_pp": float(res.effect[s, li, e] * k * 100),
            "token_share": {g: float(v) for g, v in zip(group_names, shares) if np.isfinite(v)},
            "max_group": group_names[int(np.nanargmax(shares))],
            "min_group": group_names[int(np.nanargmin(shares))],
            "ratio_max_min": float(present.max() / present.min()) if present.min() > 0 else None,
        }
        if strata_names is not None:
            row["within"] = strata_names[s]
        if res.p_cluster is not None:
            row["p"] = float(res.p_cluster[s, li, e])
            row["p_adjusted"] = float(res.p_cluster_adjusted[s, li, e])
        rows.append(row)
        if len(rows) >= top:
            break
    return rows


def _test_record(res: PermutationResult, layers, group_names, strata_names, k: int, top: int) -> dict:
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


@dataclass(frozen=True)
class _Groups:
    """The examples' tasks and labels as codes; only classification tasks have label codes (else 0, kept False)."""

    task_names: list[str]
    tasks: np.ndarray  # (E,) task code
    cls_tasks: list[str]
    keep: np.ndarray  # (E,) True for examples of classification tasks
    label_values: list[int]  # sorted label values over the classification tasks
    labels: np.ndarray  # (E,) index into label_values

    @classmethod
    def of(cls, items: list[Item]) -> _Groups:
        from ..tasks import get_task

        task_names = list(dict.fromkeys(it.task for it in items))
        cls_tasks = [t for t in task_names if not get_task(t).is_regression]
        keep = np.array([it.task in cls_tasks for it in items])
        values = sorted({int(it.label) for it in items if it.task in cls_tasks})
        labels = np.array([values.index(int(it.label)) if k_ else 0 for it, k_ in zip(items, keep)])
        tasks = np.array([task_names.index(it.task) for it in items])
        return cls(task_names, tasks, cls_tasks, keep, values, labels)


def _label_test_per_task(counts, g: _Groups, present: list[int], options: TestOptions) -> dict:
    """The label test within one task at a time: which task carries the label effect."""
    from ..tasks import get_task

    per_task = {}
    for s in present:
        sub = g.keep & (g.tasks == s)
        name = g.task_names[s]
        try:
            r1 = options.test(counts[sub], g.labels[sub])
        except ValueError as exc:
            per_task[name] = {"skipped": str(exc)}
            continue
        names = get_task(name).label_names
        per_task[name] = {
            "examples_per_label": {names[v]: int((g.labels[sub] == j).sum()) for j, v in enumerate(g.label_values)},
            "observed": r1.observed,
            "null_mean": r1.null_mean,
            "p_value": r1.p_value,
        }
    return per_task


def _label_test(counts, g: _Groups, layers, k: int, options: TestOptions) -> dict:
    """Labels compared and shuffled only within a task (strata), so task differences cannot pass for label ones."""
    from ..tasks import get_task

    names = [f"label {v}" for v in g.label_values]
    try:
        res = options.test(counts[g.keep], g.labels[g.keep], strata=g.tasks[g.keep])
    except ValueError as exc:  # e.g. every sampled example of each task has the same label
        return {"skipped": str(exc)}
    present = sorted(set(g.tasks[g.keep].tolist()))
    rec = _test_record(res, layers, names, [g.task_names[s] for s in present], k, options.top)
    for row in rec["top_clusters"]:  # "label 1" -> the task's own name for it ("not_entailment")
        label_of = dict(zip(names, (get_task(row["within"]).label_names[v] for v in g.label_values)))
        row["token_share"] = {label_of[n]: v for n, v in row["token_share"].items()}
        row["max_group"], row["min_group"] = label_of[row["max_group"]], label_of[row["min_group"]]
    rec["label_names"] = {t: list(get_task(t).label_names) for t in g.cls_tasks}
    rec["label_values"] = g.label_values
    rec["tasks"] = [g.task_names[s] for s in present]
    rec["per_task"] = _label_test_per_task(counts, g, present, options)
    rec["_result"] = res
    return rec


def specialisation(counts, items: list[Item], layers, k: int, options: TestOptions) -> dict:
    """The task test (if >= 2 tasks) and the label test (within tasks; classification tasks only)."""
    g = _Groups.of(items)
    out = {}
    if len(g.task_names) >= 2:
        res = options.test(counts, g.tasks)
        out["by_task"] = _test_record(res, layers, g.task_names, None, k, options.top)
        out["by_task"]["_result"] = res
    if g.cls_tasks and g.keep.any():
        out["by_label"] = _label_test(counts, g, layers, k, options)
    skipped = [t for t in g.task_names if t not in g.cls_tasks]
    if skipped:
        out["label_test_skips_regression_tasks"] = skipped
    return out


# ---------------------------------------------------------------------------------------------------------------
# Change after fine-tuning
# ---------------------------------------------------------------------------------------------------------------


def change_summary(base: Recording, rec: Recording, n_examples: int, options: TestOptions) -> dict:
    """Fine-tuned (`rec`) minus converted (`base`) on the same tokens, with a paired sign-flip test."""
    layers, n, k = rec.layout.layers, rec.layout.num_experts, rec.layout.top_k
    bc = base.stacked_counts(n_examples, n)
    ch = paired_change_test(bc, rec.stacked_counts(n_examples, n), n_permutations=options.n_permutations,
                            seed=options.seed)  # fmt: skip
    delta = ch["delta_load"]
    cells = sorted(((li, e) for li in range(len(layers)) for e in range(n)), key=lambda c: delta[c])

    def fmt(c):
        return {
            "layer": layers[c[0]],
            "cluster": c[1],
            "delta_load": float(delta[c]),
            "delta_token_share_pp": float(delta[c] * k * 100),
            "base_token_share": float(bc[:, c[0], c[1]].sum() / bc[:, c[0]].sum() * k),
        }

    return {
        "base_layers": {str(i): layer_summary(base.selections[i], n) for i in layers},
        "delta_load": delta.tolist(),
        "tv_per_layer": dict(zip(map(str, layers), ch["tv_per_layer"].tolist())),
        "tv_total": ch["tv"],
        "p_value": ch["p_value"],
        "n_permutations": options.n_permutations,
        "kept_overlap": {str(i): kept_overlap(base.selections[i], rec.selections[i], n) for i in layers},
        "gained": [fmt(c) for c in cells[::-1][: options.top] if delta[c] > 0],
        "lost": [fmt(c) for c in cells[: options.top] if delta[c] < 0],
    }


def describe(rec: Recording, items: list[Item], coselection_layers: list[int], options: TestOptions,
             base: Recording | None = None) -> dict:  # fmt: skip
    """Every number of the report from one recording (and, with `base`, the change from the converted model).

    Keys starting with "_" hold objects for the figures (`PermutationResult`s); `routing_record` drops them."""
    layers, n, k = rec.layout.layers, rec.layout.num_experts, rec.layout.top_k
    out = {
        "layers": {str(i): layer_summary(rec.selections[i], n) for i in layers},
        "coselection": {str(i): coselection_summary(rec.selections[i], n) for i in coselection_layers},
    }
    scopes = {"all": None}
    if rec.token_is_text is not None:
        scopes["text"] = rec.token_is_text

    def spec_of(r: Recording) -> dict:
        spec = {}
        for scope, mask in scopes.items():
            spec[scope] = specialisation(r.stacked_counts(len(items), n, mask), items, layers, k, options)
            spec[scope]["tokens"] = int(r.token_example.size if mask is None else mask.sum())
        return spec

    out["specialisation"] = spec_of(rec)
    if base is not None:
        out["change"] = change_summary(base, rec, len(items), options)
        # the same tests on the converted model's routing of the same tokens: does fine-tuning sharpen it?
        out["specialisation_converted"] = spec_of(base)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The routing.json record
# ---------------------------------------------------------------------------------------------------------------


def rounded(x, nd: int = 6):
    """`x` with floats rounded to `nd` decimals (non-finite ones to None), numpy values as Python ones."""
    if isinstance(x, dict):
        return {k: rounded(v, nd) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [rounded(v, nd) for v in x]
    if isinstance(x, np.ndarray):
        return rounded(x.tolist(), nd)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(x) else round(float(x), nd)
    if isinstance(x, np.integer):
        return int(x)
    return x


def public(x):
    """`x` without the dict keys that start with "_" (objects kept for the figures), at every depth."""
    if isinstance(x, dict):
        return {k: public(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, list):
        return [public(v) for v in x]
    return x


def tokens_per_task(rec: Recording, items: list[Item]) -> dict:
    """Task -> examples and non-padding tokens, in the order the tasks were given."""
    ex_task = np.array([it.task for it in items])
    tok_per_ex = np.bincount(rec.token_example, minlength=len(items))
    out = {}
    for t in dict.fromkeys(ex_task.tolist()):
        sel = ex_task == t
        out[t] = {"examples": int(sel.sum()), "tokens": int(tok_per_ex[sel].sum())}
    return out


def checkpoint_record(path: str, config: dict, rec: Recording, fingerprint: str) -> dict:
    """What was analyzed: the checkpoint, its conversion settings and the N, k and layers the recording saw."""
    return {
        "path": str(path),
        "resolved": str(Path(path).resolve()),
        "base_model": config.get("base_model_name_or_path"),
        "num_experts": rec.layout.num_experts,
        "top_k": rec.layout.top_k,
        "top_k_in_checkpoint": config.get("num_experts_per_tok"),
        "routed_layers": rec.layout.layers,
        "router": config.get("router"),
        "partition_method": config.get("partition_method"),
        "partition_seed": config.get("partition_seed"),
        "fingerprint": fingerprint,
        "loaded_as": "sequence classification (score head unused; only the routers matter)",
    }
