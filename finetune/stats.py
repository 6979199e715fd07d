"""Statistics for comparing two fine-tuning arms over seeds: pure functions on plain numbers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def paired_ci(treatment: Sequence[float], baseline: Sequence[float], confidence: float = 0.95):
    """(mean difference, (lo, hi)): Student-t interval of the per-seed differences treatment - baseline.

    Seeds pair the arms (same seed: same head init, LoRA init and data order), so the interval is on the paired
    differences, which removes the seed-to-seed variance both arms share. None bounds for fewer than two seeds.
    """
    from scipy.stats import t

    d = np.asarray(treatment, dtype=float) - np.asarray(baseline, dtype=float)
    if d.shape[0] != len(baseline) or d.ndim != 1:
        raise ValueError("treatment and baseline need the same number of seeds")
    mean = float(d.mean())
    if len(d) < 2:
        return mean, (None, None)
    half = float(t.ppf(0.5 + confidence / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return mean, (mean - half, mean + half)


def mcnemar(correct_treatment: Sequence[int], correct_baseline: Sequence[int]) -> dict:
    """Exact (binomial) McNemar test on paired per-example correctness, pooled over seeds.

    b = examples the baseline gets right and the treatment wrong, c = the reverse. Under the null that both arms
    err alike, the discordant pairs split 50/50: p = two-sided binomial probability of a split at least as uneven.
    """
    from scipy.stats import binomtest

    t = np.asarray(correct_treatment, dtype=bool)
    b_ = np.asarray(correct_baseline, dtype=bool)
    if t.shape != b_.shape:
        raise ValueError("McNemar needs the same examples in both arms")
    b = int((b_ & ~t).sum())
    c = int((~b_ & t).sum())
    p = 1.0 if b + c == 0 else float(binomtest(c, b + c, 0.5, alternative="two-sided").pvalue)
    return {"b": b, "c": c, "p": p}


def epochs_to_reach(per_epoch_mean: Sequence[float], target: float) -> int | None:
    """First epoch (1-based) whose mean metric is >= target; None if no epoch reaches it."""
    for i, v in enumerate(per_epoch_mean):
        if v >= target:
            return i + 1
    return None
