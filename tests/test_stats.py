"""finetune/stats.py against values worked out by hand (no model, no data)."""

import itertools
import math

import numpy as np
import pytest

from finetune import stats

T_975_DF4 = 2.776445105  # Student t, 97.5% quantile, 4 degrees of freedom (tables; scipy.stats.t.ppf(0.975, 4))


def test_mean_std_by_hand():
    mean, std = stats.mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5)
    # sample variance: (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    assert std == pytest.approx(math.sqrt(5 / 3))
    assert stats.mean_std([7.5]) == (7.5, None)  # one seed: the spread is undefined (not 0, not NaN)


def test_paired_ci_by_hand_five_seeds():
    treatment = [70.0, 72.0, 68.0, 75.0, 71.0]
    baseline = [69.0, 70.0, 69.0, 72.0, 70.0]
    # differences 1, 2, -1, 3, 1: mean 1.2; squared deviations .04 + .64 + 4.84 + 3.24 + .04 = 8.8; s^2 = 8.8 / 4
    mean_d = 1.2
    se = math.sqrt(8.8 / 4) / math.sqrt(5)
    half = T_975_DF4 * se  # 1.8416...
    delta, (lo, hi) = stats.paired_ci(treatment, baseline)
    assert delta == pytest.approx(mean_d)
    assert lo == pytest.approx(mean_d - half, abs=1e-8)
    assert hi == pytest.approx(mean_d + half, abs=1e-8)
    assert (lo, hi) == pytest.approx((-0.6416856, 3.0416856), abs=1e-6)
    # the direction is treatment - baseline
    d2, (lo2, hi2) = stats.paired_ci(baseline, treatment)
    assert d2 == pytest.approx(-1.2) and (lo2, hi2) == pytest.approx((-hi, -lo))


def test_paired_ci_is_on_the_differences_not_the_arms():
    # both arms vary a lot across seeds but move together: the paired interval is narrow
    base = [50.0, 60.0, 70.0, 80.0, 90.0]
    treat = [b + d for b, d in zip(base, [1.0, 1.1, 0.9, 1.0, 1.0])]
    _, (lo, hi) = stats.paired_ci(treat, base)
    assert 0.8 < lo < 1.0 < hi < 1.2


def test_paired_ci_other_confidence_and_edge_cases():
    from scipy.stats import t

    d = np.array([0.5, -1.0, 2.0])
    _, (lo, hi) = stats.paired_ci(d, np.zeros(3), confidence=0.9)
    half = t.ppf(0.95, 2) * d.std(ddof=1) / math.sqrt(3)
    assert (lo, hi) == pytest.approx((d.mean() - half, d.mean() + half))
    assert stats.paired_ci([3.0], [1.0]) == (2.0, (None, None))  # one seed: no interval
    assert stats.paired_ci([3.0, 4.0], [1.0, 2.0]) == (2.0, (2.0, 2.0))  # no spread: a zero-width interval, not NaN
    with pytest.raises(ValueError):
        stats.paired_ci([1.0, 2.0, 3.0], [1.0, 2.0])


def _pairs(both_right, baseline_only, treatment_only, both_wrong):
    """Per-example correctness of (treatment, baseline) with the four cells of McNemar's table."""
    t = [1] * both_right + [0] * baseline_only + [1] * treatment_only + [0] * both_wrong
    b = [1] * both_right + [1] * baseline_only + [0] * treatment_only + [0] * both_wrong
    rng = np.random.default_rng(0)
    order = rng.permutation(len(t))  # the order of the examples does not matter, only the pairing
    return np.array(t)[order], np.array(b)[order]


def test_mcnemar_exact_p_by_hand():
    t, b = _pairs(both_right=5, baseline_only=1, treatment_only=9, both_wrong=3)
    r = stats.mcnemar(t, b)
    assert (r["b"], r["c"]) == (1, 9)
    # two-sided exact binomial: 2 * P(X <= 1), X ~ Bin(10, 1/2) = 2 * (1 + 10) / 1024
    assert r["p"] == pytest.approx(2 * sum(math.comb(10, i) for i in range(2)) / 2**10, abs=1e-15)
    assert r["p"] == pytest.approx(0.021484375, abs=1e-15)
    swapped = stats.mcnemar(b, t)
    assert (swapped["b"], swapped["c"]) == (9, 1) and swapped["p"] == pytest.approx(r["p"])


def test_mcnemar_more_cases():
    assert stats.mcnemar(*_pairs(4, 0, 5, 2))["p"] == pytest.approx(2 / 2**5)  # b=0, c=5: 2 * (1/32)
    assert stats.mcnemar(*_pairs(4, 3, 3, 2))["p"] == pytest.approx(1.0)  # an even split
    r = stats.mcnemar(*_pairs(6, 0, 0, 4))  # no discordant pair: no evidence either way
    assert (r["b"], r["c"], r["p"]) == (0, 0, 1.0)
    # concordant pairs do not change p
    assert stats.mcnemar(*_pairs(50, 1, 9, 30))["p"] == pytest.approx(0.021484375)
    with pytest.raises(ValueError):
        stats.mcnemar([1, 0, 1], [1, 0])


D5 = [1.0, 2.0, -1.0, 3.0, 1.0]  # per-seed differences of the five-seed example above


def test_paired_t_by_hand():
    r = stats.paired_t([70.0, 72.0, 68.0, 75.0, 71.0], [69.0, 70.0, 69.0, 72.0, 70.0])
    t_hand = 1.2 / (math.sqrt(8.8 / 4) / math.sqrt(5))  # mean / (s / sqrt(n)) = 1.80907
    assert r["t"] == pytest.approx(t_hand) and r["df"] == 4 and r["n_seeds"] == 5
    # two-sided p = P(|T_4| > t) = I_x(2, 1/2) with x = 4 / (4 + t^2); for these parameters the regularised
    # incomplete beta is 1 - (1 - x)^(1/2) (1 + x / 2)
    x = 4 / (4 + t_hand**2)
    assert r["p"] == pytest.approx(1 - math.sqrt(1 - x) * (1 + x / 2), rel=1e-9)
    assert r["reason"] is None


def test_paired_t_on_the_committed_all_layers_arm():
    """The RTE lr 5e-4 all-30-layers arm: pooled McNemar said p = 1.5e-10; a paired t over 5 seeds says ~0.002."""
    delta = [-14.8, -11.9, -13.0, -7.9, -6.5]
    r = stats.paired_t(delta, [0.0] * 5)
    assert 0.001 < r["p"] < 0.003


def test_paired_t_undefined_cases_say_why():
    one = stats.paired_t([1.0], [0.0])
    assert one["p"] is None and one["t"] is None and one["reason"] == "fewer than two seeds"
    flat = stats.paired_t([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])  # every seed +1: no spread, t undefined
    assert flat["p"] is None and "same difference" in flat["reason"]
    with pytest.raises(ValueError):
        stats.paired_t([1.0, 2.0], [1.0])


def test_sign_flip_exact_by_enumeration():
    observed = abs(np.mean(D5))
    flips = [abs(np.mean([s * d for s, d in zip(signs, D5)])) for signs in itertools.product([1, -1], repeat=5)]
    p_hand = sum(f >= observed - 1e-12 for f in flips) / 2**5
    assert p_hand == 8 / 32
    r = stats.sign_flip(np.array(D5) + 60.0, [60.0] * 5)
    assert r["p"] == pytest.approx(p_hand) and r["min_p"] == 2 / 32 and r["reason"] is None


def test_sign_flip_floor_and_undefined_cases():
    r = stats.sign_flip([-14.8, -11.9, -13.0, -7.9, -6.5], [0.0] * 5)  # every seed the same sign
    assert r["p"] == pytest.approx(2 / 32) == r["min_p"]  # five seeds cannot give p below 0.0625
    assert stats.sign_flip([1.0], [0.0])["p"] is None
    zero = stats.sign_flip([1.0, 2.0], [1.0, 2.0])
    assert zero["p"] is None and "0" in zero["reason"]


def test_mcnemar_per_seed_is_not_pooled():
    t0, b0 = _pairs(5, 1, 9, 3)  # seed 0: b=1, c=9
    t1, b1 = _pairs(5, 4, 4, 3)  # seed 1: b=4, c=4
    per_seed = stats.mcnemar_per_seed([t0, t1], [b0, b1])
    assert [(m["b"], m["c"]) for m in per_seed] == [(1, 9), (4, 4)]
    assert per_seed[0]["p"] == pytest.approx(0.021484375) and per_seed[1]["p"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        stats.mcnemar_per_seed([t0], [b0, b1])


def test_epochs_to_reach():
    assert stats.epochs_to_reach([50.0, 60.0, 70.0], 60.0) == 2  # reaching counts (>=), 1-based
    assert stats.epochs_to_reach([50.0, 59.99, 70.0], 60.0) == 3
    assert stats.epochs_to_reach([65.0, 50.0], 60.0) == 1  # the first epoch that reaches it, even if it drops later
    assert stats.epochs_to_reach([50.0, 55.0], 60.0) is None
    assert stats.epochs_to_reach(np.array([61.0]), 60.0) == 1
    assert stats.epochs_to_reach([], 60.0) is None
