"""O-LoRA's penalty (pm_ray/core/orthogonal.py) against literal loops, and its gradient against autograd."""

from __future__ import annotations

import pytest
import torch

from pm_ray.core.orthogonal import l2_loss, olora_penalty, orthogonality_loss, overlap

SHAPES = {"layers.0.k_proj": (3, 5), "layers.0.v_proj": (3, 4), "layers.1.k_proj": (3, 5)}
D_OUT = 6


def factors(seed: int, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=g, dtype=dtype) for key, shape in SHAPES.items()}


def b_factors(seed: int, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {key: torch.randn((D_OUT, r), generator=g, dtype=dtype) for key, (r, _) in SHAPES.items()}


def literal_orth(new: dict, old: list[dict]) -> float:
    """Σ_i Σ_m Σ_{j,k} (Σ_c A_i[m][j, c] A_t[m][k, c])², one scalar at a time."""
    total = 0.0
    for a_old in old:
        for key, a in new.items():
            o = a_old[key]
            for j in range(o.shape[0]):
                for k in range(a.shape[0]):
                    entry = sum(float(o[j, c]) * float(a[k, c]) for c in range(a.shape[1]))
                    total += entry**2
    return total


def literal_l2(tensors: list[torch.Tensor]) -> float:
    return sum(float(x) ** 2 for t in tensors for x in t.flatten())


def test_orthogonality_loss_is_the_literal_sum_of_squared_overlaps() -> None:
    new, old = factors(0), [factors(1), factors(2)]
    value = orthogonality_loss(new, old)
    assert value.dtype == torch.float64 and value.shape == ()
    assert float(value) == pytest.approx(literal_orth(new, old), rel=1e-12)
    assert float(orthogonality_loss(new, [])) == 0.0  # task 1: no old tasks


def test_penalty_weights_both_terms() -> None:
    new, new_b, old = factors(0), b_factors(5), [factors(1)]
    l2_literal = literal_l2([*new.values(), *new_b.values()])
    assert float(l2_loss([*new.values(), *new_b.values()])) == pytest.approx(l2_literal, rel=1e-12)
    value = olora_penalty(new, new_b, old, lam=0.5, l2=0.01)
    assert float(value) == pytest.approx(0.5 * literal_orth(new, old) + 0.01 * l2_literal, rel=1e-12)
    assert float(olora_penalty(new, new_b, old, lam=0.0)) == 0.0
    assert float(olora_penalty(new, new_b, [], lam=2.0, l2=0.1)) == pytest.approx(0.1 * l2_literal, rel=1e-12)
    with pytest.raises(ValueError, match="must be >= 0"):
        olora_penalty(new, new_b, old, lam=-1.0)


def test_orthogonal_rows_have_zero_penalty_and_overlap() -> None:
    eye = torch.eye(6, dtype=torch.float64)
    old = [{"m": eye[:3]}]
    new = {"m": eye[3:].clone()}
    assert float(orthogonality_loss(new, old)) == 0.0 and overlap(new, old) == 0.0
    # same rows: ‖I₃‖²_F / (‖I₃‖²_F ‖I₃‖²_F) = 1/3; a rank-1 pair of parallel rows reaches 1
    assert overlap({"m": eye[:3].clone()}, old) == pytest.approx(1 / 3)
    assert overlap({"m": 2 * eye[:1]}, [{"m": -eye[:1]}]) == pytest.approx(1.0)


def test_gradient_matches_autograd_gradcheck() -> None:
    new, new_b, old = factors(0), b_factors(3), [factors(1), factors(2)]
    keys = list(SHAPES)

    def f(*tensors: torch.Tensor) -> torch.Tensor:
        a = dict(zip(keys, tensors[: len(keys)]))
        b = dict(zip(keys, tensors[len(keys) :]))
        return olora_penalty(a, b, old, lam=0.7, l2=0.05)

    inputs = tuple(t.clone().requires_grad_(True) for t in [*new.values(), *new_b.values()])
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


def test_gradient_is_the_closed_form() -> None:
    """∂/∂A_t ‖A_i A_tᵀ‖²_F = 2 A_t A_iᵀ A_i, summed over old tasks; old A's get no gradient."""
    new, old = factors(0), [factors(1), factors(2)]
    leaves = {k: v.clone().requires_grad_(True) for k, v in new.items()}
    old_leaves = [{k: v.clone().requires_grad_(True) for k, v in o.items()} for o in old]
    orthogonality_loss(leaves, old_leaves).backward()
    for key, a in new.items():
        expected = sum(2 * a @ o[key].T @ o[key] for o in old)
        torch.testing.assert_close(leaves[key].grad, expected)
    assert all(v.grad is None for o in old_leaves for v in o.values())


def test_mixed_dtypes_and_devices_compute_in_float32() -> None:
    new = {k: v.to(torch.bfloat16) for k, v in factors(0, torch.float32).items()}
    old = [factors(1, torch.float32)]
    value = orthogonality_loss(new, old)
    assert value.dtype == torch.float32
    reference = literal_orth({k: v.float() for k, v in new.items()}, old)
    assert float(value) == pytest.approx(reference, rel=1e-5)


def test_layout_mismatch_names_the_module() -> None:
    new, old = factors(0), factors(1)
    with pytest.raises(ValueError, match="old task 1.*missing modules \\['layers.1.k_proj'\\]"):
        orthogonality_loss(new, [{k: v for k, v in old.items() if k != "layers.1.k_proj"}])
    with pytest.raises(ValueError, match="layers.0.k_proj.*same LoRA rank"):
        orthogonality_loss(new, [{**old, "layers.0.k_proj": torch.zeros(2, 5)}])
    with pytest.raises(ValueError, match="no A matrices"):
        orthogonality_loss({}, [])
