"""DARE (arXiv 2311.03099): drop-and-rescale each task vector, then average.

For each cumulative task vector τ_i of the chained experts and each module, with a mask drawn
from a generator seeded by (seed, i, module) so that shards and re-runs agree:
    τ̃_i = m_i ⊙ τ_i / (1 − p),   m_i[j] ~ Bernoulli(1 − p)
    θ̂_t = W0 + λ · (1/t) Σ_i τ̃_i          (p = 0.5, λ = 1 by default)
The mean (rather than task arithmetic's sum) is ours: the τ_i are cumulative, so a sum would count
the early tasks t times.
"""

from __future__ import annotations

import zlib

import torch
from pydantic import Field

from pm_ray.core.coefficient import Alpha
from pm_ray.core.strategies.base import TaskUpdate
from pm_ray.core.strategies.expert_chain import ExpertChain
from pm_ray.core.strategies.options import StrategyOptions
from pm_ray.core.tensors import TensorDict


def dare_mask(shape: torch.Size, drop: float, *, seed: int, task: int, key: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed((seed * 1_000_003 + task * 7919 + zlib.crc32(key.encode())) % 2**63)
    return (torch.rand(shape, generator=generator) >= drop).float()


class Dare(ExpertChain):
    name = "dare"
    keeps_all_task_vectors = True

    class Options(StrategyOptions):
        drop: float = Field(0.5, ge=0, lt=1)  # p: the drop probability
        lam: float = Field(1.0, gt=0)  # λ
        seed: int = 0  # of the masks (shards and re-runs draw the same masks)

    options: Options

    def _merge(self, update: TaskUpdate, alpha: Alpha | None) -> tuple[TensorDict, TensorDict, None]:
        tau = self.expert(update)
        history = self.remember(tau)
        merged: TensorDict = {}
        drop, seed = self.options.drop, self.options.seed
        for key in tau:
            total = torch.zeros_like(tau[key])
            for i, t in enumerate(history, start=1):
                total += dare_mask(t[key].shape, drop, seed=seed, task=i, key=key) * t[key] / (1.0 - drop)
            merged[key] = self.options.lam * total / len(history)
        return merged, tau, None
