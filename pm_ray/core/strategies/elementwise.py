"""Incremental Fisher merging: the elementwise minimiser of P&M's own quadratic objective.

P&M minimises the second-order estimate of the total loss increase only along the line
θ̂_{t-1} + α Δ_t. With diagonal Fishers the unconstrained minimiser of the same objective (plus a
damping term) is elementwise (Fisher merging, Matena & Raffel, arXiv 2111.09832, done incrementally):

    Q_t(θ) = Σ_{i≤t} γ^{t−i} ½ (θ − θ*_i)ᵀ F̃_i (θ − θ*_i) + ½ λ ‖θ‖²        (θ relative to W0)

    θ̂_t^elem = (γΨ + F̃_t ⊙ θ*_t) / (γΦ + F̃_t + λ)                          (elementwise)

    θ̂_t = (1 − β) · (θ̂_{t-1} + α_t Δ_t) + β · θ̂_t^elem                        (blend with the line)

with the constant-memory accumulators of the ``pm`` strategy, here decayed:
Φ = Σ_{i<t} γ^{t−1−i} F̃_i, Ψ = Σ_{i<t} γ^{t−1−i} F̃_i ⊙ θ*_i, and after the merge
Φ ← γΦ + F̃_t, Ψ ← γΨ + F̃_t ⊙ θ*_t (the numerator and denominator above are exactly the new
accumulators). θ*_t = θ̂_{t-1} + Δ_t (task t trains from the merged model).

Options (``merge.options``):
    damping λ          relative to the mean of (γΦ + F̃_t) per module: λ = damping · mean; 0 is
                       the exact unconstrained minimiser. Where γΦ + F̃_t + λ = 0 (no curvature and
                       no damping) Q_t is flat and the element keeps the line value.
    blend β ∈ [0, 1]   0 = P&M's line merge (exactly the ``pm`` strategy when γ = 1 and no
                       normalisation), 1 = the elementwise optimum.
    normalize_fisher   F̃_i = F_i / mean(F_i) per module before it enters anything (so a task's
                       weight does not depend on its loss scale). Per module, not over the whole
                       model, so that every shard of modules normalises on its own, exactly.
    decay γ ∈ (0, 1]   older curvature counts less (a plasticity knob); 1 = plain sum.
    per_module, clip   as for ``pm``: the line coefficient α_t (global α is solved from every
                       shard's partials, two-phase).

The reported α_t is the line coefficient (the β = 0 end), the same quantity ``pm`` reports. The
merged delta is dense (not Σ α_i Δ_i), so no adapter stack is written.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from pm_ray.core.accumulator import CurvatureAccumulator
from pm_ray.core.coefficient import Alpha, Partials
from pm_ray.core.strategies.base import TaskUpdate
from pm_ray.core.strategies.line import PerturbAndMerge
from pm_ray.core.tensors import TensorDict, check_fisher


def normalize_per_module(fisher: TensorDict) -> TensorDict:
    """F / mean(F) per module (float32); a module whose Fisher is all zero stays zero."""
    out: TensorDict = {}
    for key, f in fisher.items():
        f32 = f.detach().float().cpu()
        mean = float(f32.to(torch.float64).mean())
        out[key] = f32 / mean if mean > 0.0 else f32.clone()
    return out


def elementwise_optimum(phi: torch.Tensor, psi: torch.Tensor, damping: float, fallback: torch.Tensor) -> torch.Tensor:
    """ψ / (φ + λ), λ = damping · mean(φ); ``fallback`` where the denominator is 0."""
    lam = damping * float(phi.to(torch.float64).mean())
    den = phi + lam
    flat = den <= 0.0
    if not bool(flat.any()):
        return psi / den
    return torch.where(flat, fallback, psi / torch.where(flat, torch.ones_like(den), den))


class FisherElementwise(PerturbAndMerge):
    """The ``pm`` accumulator and line α, with the merge moved to the elementwise optimum (β)."""

    name = "fisher_elementwise"
    needs_fisher = True
    solves_line_alpha = True  # the line α (for β < 1 and the report), two-phase when global
    keeps_adapter_stack = False  # the merge is dense, not Σ α_i Δ_i

    class Options(PerturbAndMerge.Options):
        damping: float = Field(1e-4, ge=0)  # λ relative to the per-module mean of γΦ + F̃_t
        blend: float = Field(1.0, ge=0, le=1)  # β: 0 = line (pm), 1 = elementwise optimum
        normalize_fisher: bool = False  # F̃_i = F_i / mean(F_i) per module
        decay: float = Field(1.0, gt=0, le=1)  # γ on Φ and Ψ before each new task is added

    options: Options

    def _fisher(self, update: TaskUpdate) -> TensorDict:
        """F̃_t: the task's Fisher, normalised per module when asked."""
        assert update.fisher is not None
        check_fisher(update.fisher, name=f"fisher of task {update.task}", cache=self.checks)
        if self.options.normalize_fisher:
            return normalize_per_module(update.fisher)
        return update.fisher

    def _decayed(self) -> CurvatureAccumulator:
        """The accumulator as task t sees it: (γΦ, γΨ)."""
        gamma = self.options.decay
        if gamma == 1.0 or not self.accumulator.num_tasks:
            return self.accumulator
        view = CurvatureAccumulator()
        view.phi = {key: gamma * phi for key, phi in self.accumulator.phi.items()}
        view.psi = {key: gamma * psi for key, psi in self.accumulator.psi.items()}
        view.num_tasks = self.accumulator.num_tasks
        return view

    def partials(self, update: TaskUpdate) -> Partials:
        self._validate(update, check_delta=False)  # Δ's finiteness shows in the partial sums
        fisher = self._fisher(update)
        return self._decayed().partials(
            update.delta, fisher, self.previous(update), cache=self.checks, **self._names(update)
        )

    def _merge(self, update: TaskUpdate, alpha: Alpha | None) -> tuple[TensorDict, TensorDict, Alpha]:
        used = self.coefficient(update) if alpha is None else alpha
        fisher = self._fisher(update)
        prev = self.previous(update)
        acc = self._decayed()
        beta = self.options.blend
        merged: TensorDict = {}
        phi_new: TensorDict = {}
        psi_new: TensorDict = {}
        for key, d in update.delta.items():
            a = used[key] if isinstance(used, dict) else used
            line = torch.add(prev[key], d.float(), alpha=a)  # bit-equal to LineMerge's point
            f = fisher[key].detach().float().cpu()
            expert = prev[key] + d.float()
            if acc.num_tasks:  # the same fused ops as CurvatureAccumulator.add: bit-equal α and Ψ
                phi, psi = acc.phi[key] + f, torch.addcmul(acc.psi[key], f, expert)
            else:
                phi, psi = f.clone(), f * expert
            phi_new[key], psi_new[key] = phi, psi
            if beta == 0.0:
                merged[key] = line
                continue
            elem = elementwise_optimum(phi, psi, self.options.damping, line)
            merged[key] = elem if beta == 1.0 else (1.0 - beta) * line + beta * elem
        self.accumulator.phi, self.accumulator.psi = phi_new, psi_new
        self.accumulator.num_tasks += 1
        return merged, merged, used

    def extra_meta(self) -> dict[str, Any]:
        return {**super().extra_meta(), "decay": self.options.decay, "normalize_fisher": self.options.normalize_fisher}
