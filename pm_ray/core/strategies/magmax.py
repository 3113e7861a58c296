"""MagMax (arXiv 2407.06322): sequential fine-tuning, then keep each parameter's largest change.

    τ_t = θ*_t − W0 (experts chained: task t trains from θ*_{t-1})
    M_t[j] = τ_t[j] if |τ_t[j]| >= |M_{t-1}[j]| else M_{t-1}[j]      (sign kept, ties to the later task)
    θ̂_t = W0 + λ · M_t,  λ = 0.5 by default

M is kept incrementally, so the memory is constant in the number of tasks.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from pm_ray.core.coefficient import Alpha
from pm_ray.core.strategies.base import TaskUpdate
from pm_ray.core.strategies.expert_chain import ExpertChain
from pm_ray.core.strategies.options import StrategyOptions
from pm_ray.core.tensors import TensorDict, split_prefixed, with_prefix


class MagMax(ExpertChain):
    name = "magmax"

    class Options(StrategyOptions):
        lam: float = Field(0.5, gt=0)  # λ

    options: Options

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.max_abs: TensorDict = {}

    def _merge(self, update: TaskUpdate, alpha: Alpha | None) -> tuple[TensorDict, TensorDict, None]:
        tau = self.expert(update)
        if self.max_abs:
            self.max_abs = {
                key: torch.where(tau[key].abs() >= self.max_abs[key].abs(), tau[key], self.max_abs[key]) for key in tau
            }
        else:
            self.max_abs = {key: t.clone() for key, t in tau.items()}
        merged = {key: self.options.lam * m for key, m in self.max_abs.items()}
        return merged, tau, None

    def extra_state(self) -> TensorDict:
        return with_prefix(self.max_abs, "maxabs")

    def load_extra_state(self, tensors: TensorDict, meta: dict[str, Any]) -> None:
        self.max_abs = split_prefixed(tensors, "maxabs")
