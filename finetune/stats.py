"""Statistics for comparing two fine-tuning arms over seeds: pure functions on plain numbers, built on scipy.stats.

The unit of replication is the seed: seed s of one arm is paired with seed s of the other (same head init, LoRA init
and data order). Tests therefore run over the per-seed differences (a paired t test and an exact sign-flip
permutation test). Per-example McNemar tests are reported per seed only: pooling the same dev examples over seeds
would count each example several times as if it were independent, and overstate significance.

A statistic that is undefined for the data (one seed, all differences equal) is None, with the reason beside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof = 1; None for a single value, where it is undefined)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None


def _differences(treatment: Sequence[float], baseline: Sequence[float]) -> np.ndarray:
    t, b = np.asarray(treatment, dtype=float), np.asarray(baseline, dtype=float)
    if t.ndim != 1 or t.shape != b.shape:
        raise ValueError(f"treatment and baseline need the same number of seeds, got {t.shape} and {b.shape}")
    return t - b


def paired_ci(treatment: Sequence[float], baseline: Sequence[float], confidence: float = 0.95):
    """(mean difference, (lo, hi)): Student-t interval of the per-seed differences treatment - baseline
    (`scipy.stats.ttest_rel`). The interval is on the paired differences, which removes the seed-to-seed variance
    both arms share. (None, None) bounds for fewer than two seeds; a zero-width interval when every difference is
    the same."""
    d = _differences(treatment, baseline)
    mean = float(d.mean())
    if len(d) < 2:
        return mean, (None, None)
    if np.all(d == d[0]):  # no spread: scipy would give NaN bounds
        return mean, (mean, mean)
    from scipy.stats import ttest_rel

    ci = ttest_rel(treatment, baseline).confidence_interval(confidence)
    return mean, (float(ci.low), float(ci.high))


def paired_t(treatment: Sequence[float], baseline: Sequence[float]) -> dict:
    """Two-sided paired t test over seeds (`scipy.stats.ttest_rel`): {"t", "df", "p", "reason"}.

    t and p are None (with the reason) for fewer than two seeds or when every per-seed difference is the same."""
    d = _differences(treatment, baseline)
    out = {"test": "paired t over seeds (scipy.stats.ttest_rel, two-sided)", "n_seeds": len(d)}
    if len(d) < 2:
        return {**out, "t": None, "df": None, "p": None, "reason": "fewer than two seeds"}
    if np.all(d == d[0]):
        return {**out, "t": None, "df": len(d) - 1, "p": None, "reason": "every seed has the same difference"}
    from scipy.stats import ttest_rel

    r = ttest_rel(treatment, baseline)
    return {**out, "t": float(r.statistic), "df": int(r.df), "p": float(r.pvalue), "reason": None}


def sign_flip(treatment: Sequence[float], baseline: Sequence[float]) -> dict:
    """Exact two-sided sign-flip permutation test of the mean per-seed difference (`scipy.stats.permutation_test`
    with paired samples: each seed's two arms are swapped or not, all 2^n ways).

    With n seeds the smallest attainable p is 2 / 2^n (0.0625 for 5 seeds), reported as `min_p`. p is None (with
    the reason) for fewer than two seeds or when every difference is 0."""
    d = _differences(treatment, baseline)
    n = len(d)
    out = {"test": "sign-flip permutation over seeds (scipy.stats.permutation_test, exact, two-sided)", "n_seeds": n,
           "min_p": None if n < 2 else 2.0 / 2**n}  # fmt: skip
    if n < 2:
        return {**out, "p": None, "reason": "fewer than two seeds"}
    if np.all(d == 0):
        return {**out, "p": None, "reason": "every per-seed difference is 0"}
    from scipy.stats import permutation_test

    def mean_diff(x, y, axis=-1):
        return np.mean(x - y, axis=axis)

    r = permutation_test((np.asarray(treatment, float), np.asarray(baseline, float)), mean_diff, vectorized=True,
                         permutation_type="samples", n_resamples=2**n, alternative="two-sided")  # fmt: skip
    return {**out, "p": float(min(1.0, r.pvalue)), "reason": None}


def mcnemar(correct_treatment: Sequence[int], correct_baseline: Sequence[int]) -> dict:
    """Exact (binomial, `scipy.stats.binomtest`) McNemar test on the paired per-example correctness of ONE seed.

    b = examples the baseline gets right and the treatment wrong, c = the reverse. Under the null that both arms
    err alike, the discordant pairs split 50/50: p = two-sided binomial probability of a split at least as uneven.
    p = 1 when no pair is discordant (no evidence either way)."""
    from scipy.stats import binomtest

    t = np.asarray(correct_treatment, dtype=bool)
    b_ = np.asarray(correct_baseline, dtype=bool)
    if t.shape != b_.shape:
        raise ValueError("McNemar needs the same examples in both arms")
    b = int((b_ & ~t).sum())
    c = int((~b_ & t).sum())
    p = 1.0 if b + c == 0 else float(binomtest(c, b + c, 0.5, alternative="two-sided").pvalue)
    return {"b": b, "c": c, "p": p}


def mcnemar_per_seed(correct_treatment: Sequence[Sequence[int]], correct_baseline: Sequence[Sequence[int]]) -> list:
    """`mcnemar` for each seed separately (row s of each argument is seed s), never pooled over seeds."""
    if len(correct_treatment) != len(correct_baseline):
        raise ValueError("McNemar per seed needs the same seeds in both arms")
    return [mcnemar(t, b) for t, b in zip(correct_treatment, correct_baseline)]


def epochs_to_reach(per_epoch_mean: Sequence[float], target: float) -> int | None:
    """First epoch (1-based) whose mean metric is >= target; None if no epoch reaches it."""
    for i, v in enumerate(per_epoch_mean):
        if v >= target:
            return i + 1
    return None
