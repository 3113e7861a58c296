"""P&M stage 2: the closed-form merge coefficient α_t.

The merge moves along the task vector, θ̂_t = θ̂_{t-1} + α_t Δ_t, and α_t minimises the second-order
estimate of the total loss increase over the tasks seen so far,

    Σ_{i≤t} ½ (θ̂_t − θ*_i)ᵀ F_i (θ̂_t − θ*_i),

F_i the diagonal empirical Fisher of task i at its expert θ*_i. Setting the derivative to zero:

    α_t = Σ_{i≤t} (θ*_i − θ̂_{t-1})ᵀ F_i Δ_t  /  Σ_{i≤t} Δ_tᵀ F_i Δ_t,     then clip to [0, 1].

``optimal_alpha`` evaluates this over the full history (the reference form). ``CurvatureAccumulator``
(accumulator.py) is our constant-memory exact form: with Φ = Σ_{i<t} F_i and Ψ = Σ_{i<t} F_i ⊙ θ*_i,

    num = ⟨F_t, Δ_t²⟩ + ⟨Ψ − Φ ⊙ θ̂_{t-1}, Δ_t⟩,    den = ⟨Φ + F_t, Δ_t²⟩,

and after the merge Φ += F_t, Ψ += F_t ⊙ θ*_t. Every term is a sum over modules, so (num, den) are
returned per module ("partials"): shards of the modules can be solved on different actors and their
partials added before dividing. θ is always relative to W0 (the formula is shift invariant and the
magnitudes stay small).

The constant-memory form and its numerics: pm_ray/core/accumulator.py.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch

from pm_ray.core.tensors import (
    check_fisher,
    check_same_layout,
    dot64,
)

Partials = dict[str, tuple[float, float]]
"""Per module (num_m, den_m); the global α is Σ num_m / Σ den_m."""

Alpha = float | dict[str, float]


def alpha_stats(alpha: Alpha | Mapping[str, float] | None) -> tuple[float, float, float] | None:
    """(mean, min, max) of one task's α (a float, or per module a {module: float} dict); None for
    strategies without a coefficient. The one summary every table, log and plot of α uses."""
    if alpha is None:
        return None
    values = list(alpha.values()) if isinstance(alpha, Mapping) else [alpha]
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(
                f"α {alpha!r}: {value!r} is not a number; expected a number, a {{module: number}} dict or None"
            )
    if not values:
        return None
    floats = [float(v) for v in values]
    return sum(floats) / len(floats), min(floats), max(floats)


def _clip(value: float, clip: bool) -> float:
    return min(max(value, 0.0), 1.0) if clip else value


def alpha_from_partials(
    partials: Mapping[str, tuple[float, float]], *, per_module: bool = False, clip: bool = True
) -> Alpha:
    """Divide summed partials: one global α, or one α per module.

    A zero denominator means Δ_tᵀ F Δ_t = 0 (a zero task vector, or no curvature along it); the
    coefficient is then set to 0.0 with a warning rather than dividing by zero.
    """
    if not partials:
        raise ValueError("no modules to solve α over (empty partials)")
    if per_module:
        alphas: dict[str, float] = {}
        flat = [key for key, (_, den) in partials.items() if den <= 0.0]
        if flat:
            warnings.warn(
                f"Δᵀ F Δ = 0 on {len(flat)} module(s) (e.g. {flat[0]!r}): α set to 0.0 there",
                RuntimeWarning,
                stacklevel=2,
            )
        for key, (num, den) in partials.items():
            alphas[key] = _clip(num / den, clip) if den > 0.0 else 0.0
        return alphas
    num = sum(n for n, _ in partials.values())
    den = sum(d for _, d in partials.values())
    if den <= 0.0:
        warnings.warn(
            "Δᵀ F Δ = 0 (the task vector is zero or has no curvature along it): α set to 0.0",
            RuntimeWarning,
            stacklevel=2,
        )
        return 0.0
    return _clip(num / den, clip)


def add_partials(*parts: Mapping[str, tuple[float, float]]) -> Partials:
    """Sum partials from shards (disjoint modules) or from Fisher shards (same modules)."""
    total: Partials = {}
    for part in parts:
        for key, (num, den) in part.items():
            n0, d0 = total.get(key, (0.0, 0.0))
            total[key] = (n0 + num, d0 + den)
    return total


def optimal_alpha(
    delta: Mapping[str, torch.Tensor],
    merged_prev: Mapping[str, torch.Tensor],
    experts: Sequence[Mapping[str, torch.Tensor]],
    fishers: Sequence[Mapping[str, torch.Tensor]],
    *,
    per_module: bool = False,
    clip: bool = True,
) -> Alpha:
    """Reference form over the full history: tasks 1..t, the new task last.

    ``experts[-1]`` must equal ``merged_prev + delta``. Returns a float, or ``dict[str, float]``
    per module when ``per_module`` is true.
    """
    if len(experts) != len(fishers):
        raise ValueError(f"experts has {len(experts)} entries but fishers has {len(fishers)}; expected one per task")
    if not experts:
        raise ValueError("experts and fishers are empty; expected tasks 1..t with the new task last")
    check_same_layout(delta, merged_prev, reference_name="delta", other_name="merged_prev")
    for i, (expert, fisher) in enumerate(zip(experts, fishers, strict=True), start=1):
        check_same_layout(delta, expert, reference_name="delta", other_name=f"experts[{i - 1}] (task {i})")
        check_same_layout(delta, fisher, reference_name="delta", other_name=f"fishers[{i - 1}] (task {i})")
        check_fisher(fisher, name=f"fishers[{i - 1}] (task {i})")
    partials: Partials = {}
    for key, d in delta.items():
        num = sum(dot64(fisher[key] * (expert[key] - merged_prev[key]), d) for expert, fisher in zip(experts, fishers))
        den = sum(dot64(fisher[key] * d, d) for fisher in fishers)
        partials[key] = (num, den)
    return alpha_from_partials(partials, per_module=per_module, clip=clip)
