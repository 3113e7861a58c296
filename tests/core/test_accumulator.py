"""The constant-memory accumulator's float32 products against float64, its checks, and its fused
state update (pm_ray/core/accumulator.py). Its α against the full-history reference:
tests/core/test_coefficient.py."""

from __future__ import annotations

import pytest
import torch

from pm_ray.core.accumulator import CurvatureAccumulator
from pm_ray.core.coefficient import alpha_from_partials

BIG = {"big": (1536, 576), "kv": (192, 576), "small": (3, 5), "empty": (0, 4)}  # big: 7 slices of 2^17


def accumulator_after(tasks: int, shapes: dict, seed: int = 0):
    """An accumulator that absorbed ``tasks`` tasks, the merged state, and the next Δ and F."""
    gen = torch.Generator().manual_seed(seed)
    acc, merged = CurvatureAccumulator(), {k: torch.zeros(s) for k, s in shapes.items()}
    for _ in range(tasks + 1):
        delta = {k: 0.01 * torch.randn(s, generator=gen) for k, s in shapes.items()}
        fisher = {k: torch.rand(s, generator=gen) ** 2 for k, s in shapes.items()}
        if _ < tasks:
            acc.absorb(fisher, {k: merged[k] + delta[k] for k in shapes})
            merged = {k: merged[k] + 0.4 * delta[k] for k in shapes}
    return acc, merged, delta, fisher


def test_partials_are_float32_products_within_1e_6_of_float64() -> None:
    """num_m, den_m from float32 products and float32 sums over slices, against the same formula in
    float64 (every product and sum, Ψ − Φ⊙θ̂ too): off by at most 1e-6 of the sum of the terms'
    magnitudes, on a module of seven slices, one of one, a tiny one and an empty one."""
    acc, merged, delta, fisher = accumulator_after(2, BIG)
    got = acc.partials(delta, fisher, merged)
    for key in BIG:
        d, f = delta[key].double(), fisher[key].double()
        phi, psi, theta = acc.phi[key].double(), acc.psi[key].double(), merged[key].double()
        f_d2, phi_d2, rest = f * d * d, phi * d * d, (psi - phi * theta) * d
        num, den = float((f_d2 + rest).sum()), float((f_d2 + phi_d2).sum())
        scale_num = float(f_d2.sum() + (psi * d).abs().sum() + (phi * theta * d).abs().sum())
        scale_den = float(f_d2.sum() + phi_d2.sum())
        assert abs(got[key][0] - num) <= 1e-6 * scale_num
        assert abs(got[key][1] - den) <= 1e-6 * scale_den
    exact = {}
    for key in BIG:
        d, f = delta[key].double(), fisher[key].double()
        phi, psi, theta = acc.phi[key].double(), acc.psi[key].double(), merged[key].double()
        exact[key] = (float((f * d * d + (psi - phi * theta) * d).sum()), float(((f + phi) * d * d).sum()))
    assert alpha_from_partials(got, clip=False) == pytest.approx(alpha_from_partials(exact, clip=False), rel=1e-6)


def test_a_float32_overflow_is_summed_again_in_float64() -> None:
    """Δ = 1e20 is finite but Δ² is not in float32: that module's sums come from float64 products."""
    acc, merged, delta, fisher = accumulator_after(1, {"m": (4, 300_000 // 4)})
    delta["m"][0, 0] = 1e20
    got = acc.partials(delta, fisher, merged)["m"]
    d64 = delta["m"].double()
    f_d2 = float((fisher["m"].double() * d64 * d64).sum())
    rest = float((torch.addcmul(acc.psi["m"], acc.phi["m"], merged["m"], value=-1.0).double() * d64).sum())
    assert got[0] == pytest.approx(f_d2 + rest, rel=1e-12)
    assert got[1] == pytest.approx(f_d2 + float((acc.phi["m"].double() * d64 * d64).sum()), rel=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("fisher_there", [0.0, 0.5])
def test_the_partial_sums_find_a_nan_or_inf_in_delta(bad: float, fisher_there: float) -> None:
    """Δ gets no pass of its own: F·Δ² is NaN/Inf where Δ is (0·Inf is NaN), in any slice."""
    for tasks in (0, 2):
        acc, merged, delta, fisher = accumulator_after(tasks, BIG)
        delta["big"].view(-1)[600_000] = bad
        fisher["big"].view(-1)[600_000] = fisher_there
        with pytest.raises(ValueError, match=r"delta of task 3\['big'\] contains NaN or Inf values"):
            acc.partials(delta, fisher, merged, delta_name="delta of task 3")


def test_absorb_step_is_bit_equal_to_the_dense_formulas() -> None:
    """θ̂ + α·Δ, Φ + F and Ψ + F ⊙ (θ̂ + Δ) as whole-tensor torch ops, bit for bit, sliced or not."""
    acc, merged, delta, fisher = accumulator_after(2, BIG)
    phi = {k: acc.phi[k] + fisher[k] for k in BIG}
    psi = {k: torch.addcmul(acc.psi[k], fisher[k], merged[k] + delta[k]) for k in BIG}
    alpha = {k: 0.1 * i for i, k in enumerate(BIG)}
    out = acc.absorb_step(fisher, merged, delta, alpha=alpha)
    for key in BIG:
        assert torch.equal(out[key], torch.add(merged[key], delta[key], alpha=alpha[key]))
        assert torch.equal(acc.phi[key], phi[key]) and torch.equal(acc.psi[key], psi[key])
    assert acc.num_tasks == 3 and acc.absorb_step(fisher, merged, delta) == {}


def test_bad_input_to_absorb_step_changes_nothing() -> None:
    acc, merged, delta, fisher = accumulator_after(2, BIG)
    before = [{k: v.clone() for k, v in d.items()} for d in (acc.phi, acc.psi, merged)]
    nan_delta = dict(delta, small=delta["small"].clone())
    nan_delta["small"][2, 4] = float("nan")
    negative = dict(fisher, small=fisher["small"].clone())
    negative["small"][0, 0] = -1e-3
    for kwargs, match in (
        ({"delta": nan_delta, "fisher": fisher}, r"delta\['small'\] contains NaN"),
        ({"delta": delta, "fisher": negative}, r"fisher\['small'\] has negative entries"),
        ({"delta": delta, "fisher": fisher, "alpha": {"big": 0.5}}, "per-module α covers 1 modules"),
        ({"delta": delta, "fisher": fisher, "prev": dict(merged, small=merged["small"].double())}, "in_place"),
    ):
        with pytest.raises(ValueError, match=match):
            prev = kwargs.get("prev", merged)
            acc.absorb_step(kwargs["fisher"], prev, kwargs["delta"], alpha=kwargs.get("alpha", 0.5), in_place=True)
        assert acc.num_tasks == 2
        assert all(torch.equal(now[k], then[k]) for now, then in zip((acc.phi, acc.psi, merged), before) for k in BIG)
