"""O-LoRA's training-time terms (Wang et al., arXiv 2310.14152): keep the new LoRA's input subspace
orthogonal to those of the earlier tasks.

A LoRA on module m has A_t[m] of shape r × d_in (its rows span the input subspace the adapter reads)
and B_t[m] of shape d_out × r. With the earlier tasks' A matrices frozen, task t trains on

    L = L_task + λ₁ · L_orth + λ₂ · L_L2

    L_orth = Σ_{i<t} Σ_m ‖A_i[m] A_t[m]ᵀ‖²_F     (sum of squared entries of the r × r overlaps)
    L_L2   = Σ_m (‖A_t[m]‖²_F + ‖B_t[m]‖²_F)     (squared L2 of the new LoRA's factors)

λ₁ = 0.5 in the paper; λ₂ is small (0 by default here). L_orth is zero exactly when every row of
A_t is orthogonal to every row of every old A_i. The paper writes the squared entries; its public
code sums absolute values instead — this module follows the paper's equation.

Pure torch: the tensors are per-module dicts keyed like everything else in pm_ray.core (the base
model's module names). Old A's may be on another device or dtype than the new ones; each product
is taken on the new A's device in at least float32 (float64 stays float64, for gradcheck).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from pm_ray.core.tensors import check_same_layout

TensorMap = Mapping[str, torch.Tensor]


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def check_old_layout(new_a: TensorMap, old_a: Sequence[TensorMap]) -> None:
    """ValueError unless every old task has an A of the new A's shape for exactly the new A's modules."""
    for index, old in enumerate(old_a, start=1):
        check_same_layout(
            new_a,
            old,
            reference_name="the new adapter's A (same LoRA rank and targets expected)",
            other_name=f"O-LoRA: old task {index}'s A",
        )


def orthogonality_loss(new_a: TensorMap, old_a: Sequence[TensorMap]) -> torch.Tensor:
    """L_orth = Σ_{i<t} Σ_m ‖A_i[m] A_t[m]ᵀ‖²_F, differentiable in the new A's (old ones are constants).

    ``new_a``: module -> A_t[m] (r × d_in); ``old_a``: one such mapping per earlier task. Zero (a
    scalar on the new A's device) when there are no earlier tasks.
    """
    if not new_a:
        raise ValueError("O-LoRA: the new adapter has no A matrices")
    check_old_layout(new_a, old_a)
    first = next(iter(new_a.values()))
    total = torch.zeros((), device=first.device, dtype=_compute_dtype(first))
    for key, a_new in new_a.items():
        a = a_new.to(_compute_dtype(a_new))
        for old in old_a:
            overlap = old[key].detach().to(a.device, a.dtype) @ a.T  # r_old × r_new
            total = total + overlap.pow(2).sum()
    return total


def l2_loss(factors: Iterable[torch.Tensor]) -> torch.Tensor:
    """L_L2 = Σ ‖P‖²_F over the new LoRA's factors (every A_t[m] and B_t[m])."""
    terms = [p.to(_compute_dtype(p)).pow(2).sum() for p in factors]
    if not terms:
        raise ValueError("O-LoRA: no LoRA factors to regularise")
    return torch.stack([t.to(terms[0].device, terms[0].dtype) for t in terms]).sum()


def olora_penalty(
    new_a: TensorMap,
    new_b: TensorMap,
    old_a: Sequence[TensorMap],
    *,
    lam: float,
    l2: float = 0.0,
) -> torch.Tensor:
    """λ₁ · L_orth + λ₂ · L_L2 (the terms O-LoRA adds to the task loss); a λ of 0 skips its term."""
    if lam < 0 or l2 < 0:
        raise ValueError(f"O-LoRA: lam={lam} and l2={l2} must be >= 0")
    if not new_a:
        raise ValueError("O-LoRA: the new adapter has no A matrices")
    first = next(iter(new_a.values()))
    total = torch.zeros((), device=first.device, dtype=_compute_dtype(first))
    if lam and old_a:
        total = total + lam * orthogonality_loss(new_a, old_a)
    if l2:
        total = total + l2 * l2_loss([*new_a.values(), *new_b.values()])
    return total


def overlap(new_a: TensorMap, old_a: Sequence[TensorMap]) -> float:
    """Σ_{i<t} Σ_m ‖A_i[m] A_t[m]ᵀ‖²_F / (‖A_i[m]‖²_F ‖A_t[m]‖²_F), in float64, detached: a
    scale-free measure (each term is in [0, 1]: 0 = orthogonal, 1 = rank-1 and parallel) for diagnostics and tests."""
    check_old_layout(new_a, old_a)
    total = 0.0
    for key, a_new in new_a.items():
        a = a_new.detach().to("cpu", torch.float64)
        for old in old_a:
            o = old[key].detach().to("cpu", torch.float64)
            norms = float(a.pow(2).sum() * o.pow(2).sum())
            total += float((o @ a.T).pow(2).sum()) / norms if norms else 0.0
    return total
