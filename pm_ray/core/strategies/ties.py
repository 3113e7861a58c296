"""TIES-merging (arXiv 2306.01708) over the cumulative task vectors τ_1..τ_t of chained experts.

Per module (as mergekit does, so module shards merge independently):
    trim:   keep the top-k fraction of |τ_i| entries of each τ_i, zero the rest (k = 0.2)
    elect:  γ[j] = sign(Σ_i trim(τ_i)[j])                           (sign of the total mass)
    merge:  m[j] = mean over {i : trim(τ_i)[j] ≠ 0, sign = γ[j]} of trim(τ_i)[j]   (disjoint mean)
    θ̂_t = W0 + λ · m,  λ = 0.55 by default
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from pm_ray.core.coefficient import Alpha
from pm_ray.core.strategies.base import TaskUpdate
from pm_ray.core.strategies.expert_chain import ExpertChain
from pm_ray.core.strategies.options import StrategyOptions
from pm_ray.core.tensors import TensorDict


def trim_top_k(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ceil(density·n) largest-magnitude entries (ties broken by index order)."""
    flat = tensor.flatten()
    keep = max(1, math.ceil(density * flat.numel()))
    if keep >= flat.numel():
        return tensor.clone()
    idx = torch.topk(flat.abs(), keep, sorted=False).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.view_as(tensor)


def ties_merge(task_vectors: list[torch.Tensor], density: float) -> torch.Tensor:
    trimmed = torch.stack([trim_top_k(t, density) for t in task_vectors])
    elected = torch.sign(trimmed.sum(dim=0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    count = agree.sum(dim=0).clamp(min=1)
    return (trimmed * agree).sum(dim=0) / count


class Ties(ExpertChain):
    name = "ties"
    keeps_all_task_vectors = True

    class Options(StrategyOptions):
        density: float = Field(0.2, gt=0, le=1)  # k: the fraction of each τ_i kept by trim
        lam: float = Field(0.55, gt=0)  # λ

    options: Options

    def _merge(self, update: TaskUpdate, alpha: Alpha | None) -> tuple[TensorDict, TensorDict, None]:
        tau = self.expert(update)
        history = self.remember(tau)
        merged = {key: self.options.lam * ties_merge([t[key] for t in history], self.options.density) for key in tau}
        return merged, tau, None
