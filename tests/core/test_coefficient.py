"""α_t against a dense scalar minimisation, and the constant-memory form against the reference."""

from __future__ import annotations

import pytest
import torch

from pm_ray.core.accumulator import CurvatureAccumulator
from pm_ray.core.coefficient import (
    add_partials,
    alpha_from_partials,
    optimal_alpha,
)

SHAPES = {"layers.0.k_proj": (4, 3), "layers.0.v_proj": (4, 3), "layers.1.k_proj": (2, 5)}


def rand_dict(gen: torch.Generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {k: scale * torch.randn(s, generator=gen) for k, s in SHAPES.items()}


def rand_fisher(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {k: torch.rand(s, generator=gen) ** 2 for k, s in SHAPES.items()}


def total_loss(theta, experts, fishers, keys=None) -> float:
    keys = keys or list(theta)
    return sum(
        0.5 * float(((theta[k] - e[k]).double() ** 2 * f[k].double()).sum())
        for e, f in zip(experts, fishers)
        for k in keys
    )


def line_minimiser(merged_prev, delta, experts, fishers, keys=None, lo=-20.0, hi=20.0) -> float:
    """Golden-section search of the dense loss along θ̂_{t-1} + a Δ (independent of the formula)."""

    def f(a: float) -> float:
        theta = {k: merged_prev[k].double() + a * delta[k].double() for k in merged_prev}
        return total_loss(theta, experts, fishers, keys)

    ratio = (5**0.5 - 1) / 2
    a, b = lo, hi
    for _ in range(200):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if f(c) < f(d):
            b = d
        else:
            a = c
    return (a + b) / 2


def random_history(seed: int, t: int):
    gen = torch.Generator().manual_seed(seed)
    experts = [rand_dict(gen) for _ in range(t - 1)]
    fishers = [rand_fisher(gen) for _ in range(t)]
    merged_prev = rand_dict(gen, 0.5)
    delta = rand_dict(gen)
    experts.append({k: merged_prev[k] + delta[k] for k in SHAPES})
    return delta, merged_prev, experts, fishers


@pytest.mark.parametrize("seed", range(5))
def test_optimal_alpha_is_the_line_minimiser(seed: int) -> None:
    delta, merged_prev, experts, fishers = random_history(seed, t=4)
    alpha = optimal_alpha(delta, merged_prev, experts, fishers, clip=False)
    assert alpha == pytest.approx(line_minimiser(merged_prev, delta, experts, fishers), abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_per_module_alpha_minimises_each_module(seed: int) -> None:
    delta, merged_prev, experts, fishers = random_history(seed, t=3)
    alphas = optimal_alpha(delta, merged_prev, experts, fishers, per_module=True, clip=False)
    assert set(alphas) == set(SHAPES)
    for key in SHAPES:
        assert alphas[key] == pytest.approx(line_minimiser(merged_prev, delta, experts, fishers, keys=[key]), abs=1e-6)


def test_clipping_and_first_task() -> None:
    gen = torch.Generator().manual_seed(0)
    delta, fisher = rand_dict(gen), rand_fisher(gen)
    zeros = {k: torch.zeros(s) for k, s in SHAPES.items()}
    assert optimal_alpha(delta, zeros, [delta], [fisher]) == pytest.approx(1.0)
    # Old tasks whose experts lie behind θ̂_{t-1}, opposite to Δ: the unclipped optimum is negative.
    old = {k: -10 * d for k, d in delta.items()}
    unclipped = optimal_alpha(delta, zeros, [old, delta], [fisher, fisher], clip=False)
    assert unclipped < 0
    assert optimal_alpha(delta, zeros, [old, delta], [fisher, fisher]) == 0.0


def test_zero_delta_gives_zero_with_warning() -> None:
    gen = torch.Generator().manual_seed(1)
    zeros = {k: torch.zeros(s) for k, s in SHAPES.items()}
    with pytest.warns(RuntimeWarning, match="α set to 0.0"):
        assert optimal_alpha(zeros, zeros, [zeros], [rand_fisher(gen)]) == 0.0
    acc = CurvatureAccumulator()
    with pytest.warns(RuntimeWarning, match="α set to 0.0"):
        assert acc.alpha(zeros, rand_fisher(gen), zeros, per_module=True) == {k: 0.0 for k in SHAPES}


@pytest.mark.parametrize("per_module", [False, True])
def test_accumulator_equals_reference_over_six_tasks(per_module: bool, tmp_path) -> None:
    gen = torch.Generator().manual_seed(42)
    acc = CurvatureAccumulator()
    merged = {k: torch.zeros(s) for k, s in SHAPES.items()}
    experts, fishers = [], []
    for t in range(1, 7):
        delta, fisher = rand_dict(gen), rand_fisher(gen)
        expert = {k: merged[k] + delta[k] for k in SHAPES}
        reference = optimal_alpha(delta, merged, experts + [expert], fishers + [fisher], per_module=per_module)
        got = acc.alpha(delta, fisher, merged, per_module=per_module)
        if per_module:
            for key in SHAPES:
                assert got[key] == pytest.approx(reference[key], rel=1e-6)
        else:
            assert got == pytest.approx(reference, rel=1e-6)
        if t == 1:
            assert got == pytest.approx(1.0) if not per_module else all(v == pytest.approx(1.0) for v in got.values())
        # merge with the global/per-module α, then absorb; round-trip through disk every other task
        alpha = got
        merged = {k: merged[k] + (alpha[k] if per_module else alpha) * delta[k] for k in SHAPES}
        acc.absorb(fisher, expert)
        experts.append(expert)
        fishers.append(fisher)
        if t % 2 == 0:
            acc.save(tmp_path / "stats.safetensors")
            acc = CurvatureAccumulator.load(tmp_path / "stats.safetensors")
            assert acc.num_tasks == t
    assert set(acc.phi) == set(SHAPES)  # constant size: one Φ and one Ψ per module


def test_sharded_partials_add_up_to_the_global_alpha() -> None:
    delta, merged_prev, experts, fishers = random_history(7, t=3)
    full, shard_a, shard_b = CurvatureAccumulator(), CurvatureAccumulator(), CurvatureAccumulator()
    keys_a, keys_b = ["layers.0.k_proj"], ["layers.0.v_proj", "layers.1.k_proj"]
    sub = lambda d, ks: {k: d[k] for k in ks}  # noqa: E731
    for e, f in zip(experts[:-1], fishers[:-1]):
        full.absorb(f, e)
        shard_a.absorb(sub(f, keys_a), sub(e, keys_a))
        shard_b.absorb(sub(f, keys_b), sub(e, keys_b))
    parts = add_partials(
        shard_a.partials(sub(delta, keys_a), sub(fishers[-1], keys_a), sub(merged_prev, keys_a)),
        shard_b.partials(sub(delta, keys_b), sub(fishers[-1], keys_b), sub(merged_prev, keys_b)),
    )
    assert alpha_from_partials(parts, clip=False) == pytest.approx(
        full.alpha(delta, fishers[-1], merged_prev, clip=False), abs=1e-9
    )
    assert alpha_from_partials(parts, clip=False) == pytest.approx(
        optimal_alpha(delta, merged_prev, experts, fishers, clip=False), abs=1e-6
    )


def test_bad_input_names_the_offender() -> None:
    gen = torch.Generator().manual_seed(3)
    delta, fisher = rand_dict(gen), rand_fisher(gen)
    zeros = {k: torch.zeros(s) for k, s in SHAPES.items()}
    bad_keys = dict(fisher)
    bad_keys["layers.9.q_proj"] = bad_keys.pop("layers.1.k_proj")
    with pytest.raises(ValueError, match=r"missing modules \['layers.1.k_proj'\].*layers.9.q_proj"):
        optimal_alpha(delta, zeros, [delta], [bad_keys])
    bad_shape = dict(fisher, **{"layers.0.v_proj": torch.ones(3, 4)})
    with pytest.raises(ValueError, match=r"layers.0.v_proj.*shape \(3, 4\).*expected \(4, 3\)"):
        CurvatureAccumulator().alpha(delta, bad_shape, zeros)
    negative = dict(fisher, **{"layers.0.k_proj": -torch.ones(4, 3)})
    with pytest.raises(ValueError, match=r"layers.0.k_proj.*negative"):
        CurvatureAccumulator().absorb(negative, delta)
    with pytest.raises(ValueError, match="experts has 2 entries but fishers has 1"):
        optimal_alpha(delta, zeros, [delta, delta], [fisher])


def test_load_rejects_other_files(tmp_path) -> None:
    from pm_ray.core.tensors import save_tensors

    save_tensors(tmp_path / "x.safetensors", {"a": torch.ones(2)}, {"kind": "something_else"})
    with pytest.raises(ValueError, match="not a curvature accumulator"):
        CurvatureAccumulator.load(tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="no such safetensors file"):
        CurvatureAccumulator.load(tmp_path / "missing.safetensors")
