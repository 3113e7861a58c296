"""pm_ray.stats against hand-computed values and scipy's own interval."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pm_ray.stats import binomial_se, paired_difference, summarize, t_quantile


def test_t_quantile_matches_tables() -> None:
    # two-sided 95% critical values from a Student-t table
    assert t_quantile(0.95, 1) == pytest.approx(12.706204736, rel=1e-9)
    assert t_quantile(0.95, 2) == pytest.approx(4.302652730, rel=1e-9)
    assert t_quantile(0.95, 4) == pytest.approx(2.776445105, rel=1e-9)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile(0.95, 0)
    with pytest.raises(ValueError, match="confidence"):
        t_quantile(1.0, 3)


def test_summarize_three_seeds_by_hand() -> None:
    s = summarize([1.0, 2.0, 3.0])
    # mean 2, sample std sqrt(((1-2)^2 + 0 + (3-2)^2) / 2) = 1, half = t_{.975,2} / sqrt(3)
    half = 4.302652729911275 / math.sqrt(3)
    assert (s["n"], s["mean"], s["std"]) == (3, 2.0, pytest.approx(1.0))
    assert s["ci_half"] == pytest.approx(half) and s["ci_half"] == pytest.approx(2.4841377)
    assert (s["ci_low"], s["ci_high"]) == (pytest.approx(2 - half), pytest.approx(2 + half))
    assert "missing" not in s


def test_summarize_matches_scipy_interval() -> None:
    from scipy import stats

    x = np.array([0.61, 0.55, 0.72, 0.58, 0.66])
    s = summarize(x.tolist())
    low, high = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert s["mean"] == pytest.approx(x.mean()) and s["std"] == pytest.approx(x.std(ddof=1))
    assert (s["ci_low"], s["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    s90 = summarize(x.tolist(), confidence=0.9)
    assert s90["ci_half"] < s["ci_half"] and s90["confidence"] == 0.9


def test_summarize_one_seed_none_and_nan() -> None:
    one = summarize([0.4])
    assert one["mean"] == 0.4 and one["std"] is None and one["ci_low"] is None and one["ci_half"] is None
    empty = summarize([])
    assert empty["n"] == 0 and empty["mean"] is None
    nan = summarize([0.2, float("nan"), 0.4])
    assert nan["n"] == 2 and nan["missing"] == 1 and nan["mean"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="'x' is not a number"):
        summarize([0.1, "x"])


def test_paired_difference_by_seed() -> None:
    pm = {0: 0.50, 1: 0.60, 2: 0.55}
    seq = {0: 0.40, 1: 0.52, 2: 0.49, 3: 0.9}  # seed 3 has no partner: left out
    d = paired_difference(pm, seq)
    assert d["per_seed"] == {0: pytest.approx(0.10), 1: pytest.approx(0.08), 2: pytest.approx(0.06)}
    diffs = np.array([0.10, 0.08, 0.06])
    half = 4.302652729911275 * diffs.std(ddof=1) / math.sqrt(3)
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.08) and d["std"] == pytest.approx(0.02)
    assert d["ci_half"] == pytest.approx(half) and d["significant"] is True  # 0.08 ± 0.0497 excludes 0
    noisy = paired_difference({0: 0.5, 1: 0.4}, {0: 0.45, 1: 0.47})
    assert noisy["significant"] is False
    single = paired_difference({0: 0.5}, {0: 0.4})
    assert single["mean"] == pytest.approx(0.1) and single["significant"] is None
    same = paired_difference(pm, pm)
    assert same["mean"] == 0 and same["std"] == 0 and same["ci_half"] == 0 and same["significant"] is False


def test_binomial_se() -> None:
    assert binomial_se(0.5, 100) == pytest.approx(0.05)
    assert binomial_se(0.8, 200) == pytest.approx(math.sqrt(0.8 * 0.2 / 200))
    assert binomial_se(0.0, 40) == 0.0 and binomial_se(1.0, 40) == 0.0
    assert binomial_se(0.3, 0) is None and binomial_se(float("nan"), 10) is None
    assert binomial_se(1.2, 10) == 0.0  # clipped into [0, 1]
    with pytest.raises(ValueError, match="test rows"):
        binomial_se(0.5, -1)
