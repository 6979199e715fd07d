"""Statistics of a sweep: routed vs plain LoRA, paired by seed. The unit is a seed (one fine-tuning run), never a
pooled dev example.

Per (config, task): the paired differences d_s = routed_s - plain_s (same seed: same head init, LoRA init and data
order), a Student-t 95% CI and the paired t-test p (`scipy.stats.ttest_rel`).
Per config, pooled over tasks: each d_s divided by the plain arm's across-seed SD on that task (so that tasks with
different metrics and noise levels weigh alike), then
- the mean standardised Δ with a stratified percentile bootstrap CI (`scipy.stats.bootstrap`, seeds resampled
  within each task; the SDs are held fixed);
- a sign-flip permutation p over the (task, seed) units (`scipy.stats.permutation_test`);
- P(routed > plain) on a random (task, seed): wins / units with a Clopper-Pearson CI (`scipy.stats.binomtest`);
  ties count as not a win and are reported.
Holm's step-down correction is applied across the configs of one round.

Every statistic that cannot be computed is None, with the reason under the record's "undefined" key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def paired_cell(routed: Mapping[int, float], plain: Mapping[int, float], confidence: float = 0.95) -> dict:
    """Δ = routed - plain on the seeds both arms have: mean, per-seed values, t CI and paired t p."""
    from scipy.stats import ttest_rel

    seeds = sorted(set(routed) & set(plain))
    r = np.array([routed[s] for s in seeds], dtype=float)
    p = np.array([plain[s] for s in seeds], dtype=float)
    d = r - p
    out = {"seeds": seeds, "n": len(seeds), "per_seed_delta": d.tolist(), "routed_mean": None, "plain_mean": None,
           "delta_mean": None, "delta_sd": None, "ci95": None, "p": None, "undefined": {}}  # fmt: skip
    if not seeds:
        out["undefined"] = {k: "no seed run in both arms" for k in ("delta_mean", "ci95", "p")}
        return out
    out.update(routed_mean=float(r.mean()), plain_mean=float(p.mean()), delta_mean=float(d.mean()))
    if len(d) < 2:
        out["undefined"].update(ci95="fewer than 2 seeds", p="fewer than 2 seeds", delta_sd="fewer than 2 seeds")
        return out
    out["delta_sd"] = float(d.std(ddof=1))
    if out["delta_sd"] == 0.0:
        reason = "every seed has the same Δ (zero variance): the t interval and test are undefined"
        out["undefined"].update(ci95=reason, p=reason)
        return out
    test = ttest_rel(r, p)
    ci = test.confidence_interval(confidence)
    out["ci95"] = [_finite(ci.low), _finite(ci.high)]
    out["p"] = _finite(test.pvalue)
    return out


def plain_sd(plain: Mapping[int, float]) -> float | None:
    """Across-seed sample SD (ddof 1) of the plain arm; None for fewer than 2 seeds."""
    v = np.array(list(plain.values()), dtype=float)
    return float(v.std(ddof=1)) if len(v) > 1 else None


def holm(pvalues: Mapping[str, float | None], family: int | None = None) -> dict[str, float | None]:
    """Holm's step-down adjusted p-values over the names with a p (None stays None). `family`: the number of
    hypotheses planned, when some have no p yet (they count as p = 1, which keeps the correction as strict as it
    will be once every p is in)."""
    named = sorted(((p, n) for n, p in pvalues.items() if p is not None), key=lambda t: t[0])
    m = max(len(named), family or 0)
    adjusted, running = {}, 0.0
    for i, (p, name) in enumerate(named):
        running = max(running, min(1.0, (m - i) * p))
        adjusted[name] = running
    return {n: adjusted.get(n) for n in pvalues}


def win_rate(deltas: np.ndarray, confidence: float = 0.95) -> dict:
    """P(routed > plain) on a random unit: wins / n, with an exact (Clopper-Pearson) CI."""
    from scipy.stats import binomtest

    n, wins, ties = len(deltas), int((deltas > 0).sum()), int((deltas == 0).sum())
    if n == 0:
        return {"p_win": None, "ci95": None, "wins": 0, "ties": 0, "losses": 0, "n": 0}
    ci = binomtest(wins, n).proportion_ci(confidence, method="exact")
    # rounded: the bounds come from a root search whose last bits differ between scipy versions (1e-14 seen between
    # the GPU machine's and this one's), and the committed results must recompute exactly anywhere
    return {"p_win": wins / n, "ci95": [round(float(ci.low), 12), round(float(ci.high), 12)], "wins": wins,
            "ties": ties, "losses": n - wins - ties, "n": n}  # fmt: skip


def pooled(deltas: Mapping[str, Sequence[float]], sds: Mapping[str, float | None], confidence: float = 0.95,
           n_resamples: int = 10000, rng_seed: int = 0, n_permutations: int = 10000) -> dict:  # fmt: skip
    """Pool per-task paired Δs in standardised units (Δ / plain SD of that task); see the module docstring."""
    from scipy.stats import bootstrap, permutation_test

    undefined, z = {}, {}
    for task, d in deltas.items():
        sd = sds.get(task)
        if sd is None or sd == 0.0:
            why = "undefined" if sd is None else "0"
            undefined[f"task {task}"] = f"left out: the plain arm's across-seed SD is {why}"
            continue
        z[task] = np.asarray(d, dtype=float) / sd
    out = {"tasks": list(z), "n_units": int(sum(len(v) for v in z.values())), "delta_z": None, "ci95": None,
           "p_permutation": None, "win": win_rate(np.concatenate(list(z.values())) if z else np.array([]), confidence),
           "undefined": undefined}  # fmt: skip
    if not z:
        undefined["delta_z"] = "no task with a defined plain SD"
        return out
    units = np.concatenate(list(z.values()))
    out["delta_z"] = float(units.mean())
    samples = tuple(z.values())
    if min(len(s) for s in samples) < 2 or np.all(units == units[0]):
        undefined["ci95"] = undefined["p_permutation"] = "fewer than 2 seeds in a task, or every unit has the same Δ"
        return out
    rng = np.random.default_rng(rng_seed)

    def mean_of_all(*s, axis=-1):  # the mean over every unit; each task's seeds are resampled within the task
        return np.concatenate(s, axis=axis).mean(axis=axis)

    boot = bootstrap(samples, mean_of_all, n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                     vectorized=True, rng=rng)  # fmt: skip
    out["ci95"] = [_finite(boot.confidence_interval.low), _finite(boot.confidence_interval.high)]
    perm = permutation_test((units,), lambda x, axis=-1: x.mean(axis=axis), permutation_type="samples",
                            vectorized=True, n_resamples=n_permutations, rng=rng)  # fmt: skip
    out["p_permutation"] = _finite(perm.pvalue)
    return out


def routing_off_cell(off: Mapping[int, float], on: Mapping[int, float], plain: Mapping[int, float],
                     confidence: float = 0.95) -> dict:  # fmt: skip
    """"Train routed, deploy dense": the routed adapter scored with k = N, against plain and against routing on."""
    vals = np.array([off[s] for s in sorted(off)], dtype=float)
    return {
        "mean": float(vals.mean()) if len(vals) else None,
        "sd": float(vals.std(ddof=1)) if len(vals) > 1 else None,
        "vs_plain": paired_cell(off, plain, confidence),
        "vs_routing_on": paired_cell(off, on, confidence),
    }


def choose_lr(scores: Mapping[float, Sequence[float]]) -> float:
    """The lr with the highest mean score; ties go to the smaller lr."""
    return min(scores, key=lambda lr: (-float(np.mean(scores[lr])), lr))


def analyze_round(plain: Mapping[str, Mapping[int, float]], routed: Mapping[str, Mapping[str, Mapping[int, float]]],
                  routing_off: Mapping[str, Mapping[str, Mapping[int, float]]], analysis: Mapping,
                  family: int | None = None) -> dict:  # fmt: skip
    """Cells, pooled results and Holm across configs for one round.

    plain: task -> seed -> score; routed / routing_off: config -> task -> seed -> score. Only complete cells are
    passed in (every seed of the round), so every statistic here rests on the full set of seeds. `family`: the
    number of configs the round plans (for Holm).
    """
    conf = float(analysis.get("confidence", 0.95))
    sds = {t: plain_sd(v) for t, v in plain.items()}
    configs = {}
    for name, by_task in routed.items():
        cells = {t: paired_cell(s, plain[t], conf) for t, s in by_task.items() if t in plain}
        off = {t: routing_off_cell(o, by_task[t], plain[t], conf) for t, o in routing_off.get(name, {}).items()
               if t in plain and o}  # fmt: skip
        pool = pooled({t: c["per_seed_delta"] for t, c in cells.items()}, sds, conf,
                      int(analysis.get("bootstrap_resamples", 10000)), int(analysis.get("rng_seed", 0)),
                      int(analysis.get("permutation_resamples", 10000)))  # fmt: skip
        configs[name] = {"cells": cells, "pooled": pool, "routing_off": off}
    adjusted = holm({n: c["pooled"]["p_permutation"] for n, c in configs.items()}, family)
    for name, c in configs.items():
        c["pooled"]["p_holm"] = adjusted[name]
    return {"plain_sd": sds, "plain_mean": {t: float(np.mean(list(v.values()))) for t, v in plain.items()},
            "configs": configs}  # fmt: skip


def select_best(round_stats: dict, names: Sequence[str], tasks: Sequence[str]) -> tuple[str | None, dict]:
    """Of the configs `names` (plan order), the one with the highest mean standardised Δ on `tasks` (ties: the
    first), and the values it was chosen from. None when some config lacks a complete cell on those tasks."""
    sds = {t: round_stats["plain_sd"].get(t) for t in tasks}
    if any(not sds[t] for t in tasks):  # None or 0: standardised units are undefined on that task
        return None, {}
    scores = {}
    for name in names:
        c = round_stats["configs"].get(name)
        if c is None or any(t not in c["cells"] for t in tasks):
            return None, {}
        z = [np.asarray(c["cells"][t]["per_seed_delta"]) / sds[t] for t in tasks]
        scores[name] = float(np.mean(np.concatenate(z)))
    if not scores or any(v is None for v in scores.values()):
        return None, scores
    best = max(scores, key=lambda n: scores[n])  # max keeps the first of equal values: plan order
    return best, scores
