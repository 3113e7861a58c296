"""Step d of the worker loop: hand task t to the merge actors.

Most strategies need only Δ_t (rank 0 sends it). A strategy with a worker-side step
(``has_worker_step``: TRM) first runs :meth:`~pm_ray.core.strategies.base.MergeStrategy.worker_step`
on every rank, in lockstep, starting from P&M's α_t when it ``solves_line_alpha``, and its extras
go to the merge with Δ_t.
"""

from __future__ import annotations

from typing import Any

import torch

from pm_ray.config import RunConfig
from pm_ray.core.lora import LoraFactors
from pm_ray.core.strategies import MergeStrategy
from pm_ray.core.strategies.base import WorkerStep
from pm_ray.data.schema import Task
from pm_ray.data.tokenize import batch_iterator
from pm_ray.merge.actor import MergeClient
from pm_ray.train.engine import all_reduce_sum, broadcast_object, world


def merge_task(
    strategy: MergeStrategy,
    client: MergeClient,
    cfg: RunConfig,
    *,
    t: int,
    task: Task,
    model: Any,
    tokenizer: Any,
    delta: dict[str, torch.Tensor] | None,
    w0: dict[str, torch.Tensor],
    snapshots: list[dict[str, LoraFactors]],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(merge info on rank 0 — α and the shards' state files — else {}, diagnostics)."""
    rank, world_size = world()
    if not strategy.has_worker_step:
        return (client.merge(t, delta) if rank == 0 else {}), {}
    alpha = broadcast_object(client.alpha(t, delta) if rank == 0 and strategy.solves_line_alpha else None)
    merged_prev, _ = client.current()
    if not merged_prev:
        merged_prev = {key: torch.zeros_like(w) for key, w in w0.items()}
    batches_iter = batch_iterator(
        task,
        tokenizer,
        batch_size=cfg.trainer.batch_size,
        max_length=cfg.trainer.max_length,
        rank=rank,
        world_size=world_size,
        seed=cfg.trainer.seed * 7919 + t,
    )
    batches = [next(batches_iter) for _ in range(strategy.worker_batches)]
    extras, diag = strategy.worker_step(
        WorkerStep(
            model=model,
            w0=w0,
            merged_prev=merged_prev,
            snapshots=snapshots,
            alpha=alpha,
            batches=batches,
            grad_all_reduce=all_reduce_sum,
            world_size=world_size,
        )
    )
    info = client.merge(t, delta, extras=extras) if rank == 0 else {}
    return info, diag
