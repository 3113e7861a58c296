"""Merges along the task vector: θ̂_t = θ̂_{t-1} + α_t Δ_t, differing only in how α_t is chosen.

sequential   α_t = 1                   (plain sequential LoRA fine-tuning; the lower bound)
olora        α_t = 1, and every task trains with O-LoRA's orthogonality term (the `orthogonal`
             config section; pm_ray/core/orthogonal.py)
average      α_t = 1/t                 (running average of the experts θ*_1..θ*_t)
fixed        α_t = c                   (a constant)
pm           α_t = clip(num/den, 0, 1) (P&M's closed form; see coefficient.py), global or
                                       per module, from the constant-memory accumulator
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import field_validator

from pm_ray.core.accumulator import CurvatureAccumulator
from pm_ray.core.coefficient import Alpha, Partials, alpha_from_partials
from pm_ray.core.strategies.base import MergeStrategy, TaskUpdate
from pm_ray.core.strategies.options import StrategyOptions
from pm_ray.core.tensors import TensorDict, split_prefixed, with_prefix


class LineMerge(MergeStrategy):
    keeps_adapter_stack = True

    def coefficient(self, update: TaskUpdate) -> Alpha:
        raise NotImplementedError

    def _merge(self, update: TaskUpdate, alpha: Alpha | None) -> tuple[TensorDict, TensorDict, Alpha]:
        used = self.coefficient(update) if alpha is None else alpha
        prev = self.previous(update)
        merged: TensorDict = {}
        for key, d in update.delta.items():
            a = used[key] if isinstance(used, dict) else used
            merged[key] = torch.add(prev[key], d.float(), alpha=a)  # one pass: prev + a·d
        self._after_merge(update, prev)
        return merged, merged, used

    def _after_merge(self, update: TaskUpdate, merged_prev: TensorDict) -> None:
        """Hook for strategies that keep statistics of each finished task."""


class Sequential(LineMerge):
    name = "sequential"

    def coefficient(self, update: TaskUpdate) -> Alpha:
        return 1.0


class OLoRA(Sequential):
    """O-LoRA (arXiv 2310.14152): sequential merging; the orthogonality of each new LoRA's A to the
    earlier tasks' is a training-time term (the worker loop's, weighted by ``orthogonal.lam``)."""

    name = "olora"
    trains_orthogonal = True


class Average(LineMerge):
    name = "average"

    def coefficient(self, update: TaskUpdate) -> Alpha:
        return 1.0 / update.task


class Fixed(LineMerge):
    name = "fixed"

    class Options(StrategyOptions):
        alpha: float = 0.5  # α_t for t >= 2 (α_1 = 1)

        @field_validator("alpha")
        @classmethod
        def _unit(cls, value: float) -> float:
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"alpha={value} is outside [0, 1]")
            return value

    options: Options

    def coefficient(self, update: TaskUpdate) -> Alpha:
        return 1.0 if update.task == 1 else self.options.alpha


class PerturbAndMerge(LineMerge):
    """P&M stage 2 with the constant-memory accumulator (Φ, Ψ)."""

    name = "pm"
    needs_fisher = True
    solves_line_alpha = True

    class Options(StrategyOptions):
        per_module: bool = False  # one α per adapted module instead of one global α
        clip: bool = True  # α clipped to [0, 1]

    options: Options

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.accumulator = CurvatureAccumulator()

    def partials(self, update: TaskUpdate) -> Partials:
        self._validate(update, check_delta=False)  # Δ's finiteness shows in the partial sums
        assert update.fisher is not None
        return self.accumulator.partials(
            update.delta, update.fisher, self.previous(update), cache=self.checks, **self._names(update)
        )

    def _names(self, update: TaskUpdate) -> dict[str, str]:
        """How the accumulator's checks name this task's tensors."""
        return {"delta_name": f"delta of task {update.task}", "fisher_name": f"fisher of task {update.task}"}

    @property
    def global_alpha(self) -> bool:
        """One α for all modules: a sharded merge solves it from every shard's partials first."""
        return not self.options.per_module

    def solve_alpha(self, partials: Partials) -> Alpha:
        return alpha_from_partials(partials, per_module=self.options.per_module, clip=self.options.clip)

    def coefficient(self, update: TaskUpdate) -> Alpha:
        return self.solve_alpha(self.partials(update))

    def _merge(self, update: TaskUpdate, alpha: Alpha | None) -> tuple[TensorDict, TensorDict, Alpha]:
        """θ̂_t = θ̂_{t-1} + α_t Δ_t and the accumulator update, in one loop over the modules."""
        used = self.coefficient(update) if alpha is None else alpha
        assert update.fisher is not None
        merged = self.accumulator.absorb_step(
            update.fisher,
            self.previous(update),
            update.delta,
            alpha=used,
            in_place=self.in_place,
            cache=self.checks,
            **self._names(update),
        )
        return merged, merged, used

    def _after_merge(self, update: TaskUpdate, merged_prev: TensorDict) -> None:
        """Absorb F_t with θ*_t = θ̂_{t-1} + Δ_t (for subclasses whose merge is not on the line)."""
        assert update.fisher is not None
        self.accumulator.absorb_step(update.fisher, merged_prev, update.delta, cache=self.checks, **self._names(update))

    def extra_state(self) -> TensorDict:
        return with_prefix(self.accumulator.state_dict(), "acc")

    def extra_meta(self) -> dict[str, Any]:
        return {"accumulated_tasks": self.accumulator.num_tasks}

    def load_extra_state(self, tensors: TensorDict, meta: dict[str, Any]) -> None:
        acc = split_prefixed(tensors, "acc")
        self.accumulator = CurvatureAccumulator()
        self.accumulator.phi = split_prefixed(acc, "phi")
        self.accumulator.psi = split_prefixed(acc, "psi")
        self.accumulator.num_tasks = int(meta["accumulated_tasks"])
