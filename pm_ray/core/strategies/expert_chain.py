"""Shared state of the strategies that fine-tune sequentially and merge the experts afterwards.

Task t trains from the previous *expert*, so its cumulative task vector is τ_t = θ*_t − W0 =
τ_{t-1} + Δ_t. MagMax needs only a running reduction of the τ's; TIES and DARE need them all
(kept dense, one per finished task: memory grows linearly with the stream, which is why these two
are baselines and not the default).
"""

from __future__ import annotations

from typing import Any

from pm_ray.core.strategies.base import MergeStrategy, TaskUpdate
from pm_ray.core.tensors import TensorDict, split_prefixed, with_prefix


class ExpertChain(MergeStrategy):
    train_from = "expert"
    keeps_all_task_vectors = False

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.task_vectors: list[TensorDict] = []

    def expert(self, update: TaskUpdate) -> TensorDict:
        """τ_t = start_t + Δ_t, relative to W0."""
        start = self.previous(update, "start")
        return {key: start[key] + d.float() for key, d in update.delta.items()}

    def remember(self, task_vector: TensorDict) -> list[TensorDict]:
        if self.keeps_all_task_vectors:
            self.task_vectors.append(task_vector)
        return self.task_vectors

    def extra_state(self) -> TensorDict:
        out: TensorDict = {}
        for i, tau in enumerate(self.task_vectors, start=1):
            out.update(with_prefix(tau, f"tau{i}"))
        return out

    def extra_meta(self) -> dict[str, Any]:
        return {"stored_task_vectors": len(self.task_vectors)}

    def load_extra_state(self, tensors: TensorDict, meta: dict[str, Any]) -> None:
        count = int(meta.get("stored_task_vectors", 0))
        self.task_vectors = [split_prefixed(tensors, f"tau{i}") for i in range(1, count + 1)]
