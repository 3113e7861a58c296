"""Summary statistics of a comparison over seeds (pure Python + numpy/scipy, no torch, no Ray).

- :func:`summarize`: mean, sample standard deviation and a Student-t confidence interval of one
  metric over seeds (n - 1 degrees of freedom).
- :func:`paired_difference`: the per-seed difference of a strategy to a reference (``sequential``),
  seed by seed, summarised the same way. Pairing by seed removes the seed-to-seed variation that
  both runs share (same LoRA init, batch order and perturbation draws).
- :func:`binomial_se`: the standard error sqrt(p (1 - p) / n) of a score measured on n test rows.

Values that cannot be computed (the spread of a single seed) are ``None``, so that the result is
valid JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

CONFIDENCE = 0.95


def _floats(values: Sequence[Any], what: str) -> list[float]:
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{what}: {value!r} is not a number")
        out.append(float(value))
    return out


def t_quantile(confidence: float, dof: int) -> float:
    """The two-sided Student-t critical value t_{(1 + confidence) / 2, dof}."""
    from scipy.stats import t

    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence!r} must be in (0, 1)")
    if dof < 1:
        raise ValueError(f"degrees of freedom {dof!r} must be >= 1")
    return float(t.ppf((1 + confidence) / 2, dof))


def summarize(values: Sequence[Any], *, confidence: float = CONFIDENCE, what: str = "values") -> dict[str, Any]:
    """{n, mean, std, ci_half, ci_low, ci_high} of ``values`` (NaN entries are dropped and counted
    in ``missing``). std uses n - 1 (the sample standard deviation); the interval is
    mean ± t_{(1+confidence)/2, n-1} · std / sqrt(n). With fewer than two values std and the interval
    are None; with none, the mean is None too."""
    present = [v for v in _floats(values, what) if not math.isnan(v)]
    n = len(present)
    out: dict[str, Any] = {
        "n": n,
        "mean": None,
        "std": None,
        "ci_half": None,
        "ci_low": None,
        "ci_high": None,
        "confidence": confidence,
    }
    if len(values) != n:
        out["missing"] = len(values) - n
    if not n:
        return out
    mean = math.fsum(present) / n
    out["mean"] = mean
    if n >= 2:
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in present) / (n - 1))
        half = t_quantile(confidence, n - 1) * std / math.sqrt(n)
        out.update(std=std, ci_half=half, ci_low=mean - half, ci_high=mean + half)
    return out


def paired_difference(
    values: Mapping[Any, Any], reference: Mapping[Any, Any], *, confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """values[s] - reference[s] for every seed s present (and numeric) in both, summarised with
    :func:`summarize`; ``per_seed`` holds the differences keyed like the inputs, and
    ``significant`` says whether the interval excludes 0 (None without an interval)."""
    seeds = [s for s in values if s in reference]
    diffs = {}
    for s in seeds:
        a, b = _floats([values[s]], f"seed {s}")[0], _floats([reference[s]], f"reference seed {s}")[0]
        diffs[s] = a - b
    out = {"per_seed": diffs, **summarize(list(diffs.values()), confidence=confidence, what="differences")}
    low, high = out["ci_low"], out["ci_high"]
    out["significant"] = None if low is None else bool(low > 0 or high < 0)
    return out


def binomial_se(p: float, n: int) -> float | None:
    """Standard error sqrt(p (1 - p) / n) of a proportion p measured on n rows (None when n is 0).
    p outside [0, 1] (a score that is not a proportion) is clipped so the root stays real."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"test rows {n!r} must be an integer >= 0")
    p = _floats([p], "score")[0]
    if n == 0 or math.isnan(p):
        return None
    p = min(max(p, 0.0), 1.0)
    return math.sqrt(p * (1 - p) / n)
