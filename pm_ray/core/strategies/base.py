"""The merge-strategy interface: after task t, turn Δ_t (and its Fisher) into the merged model θ̂_t.

All parameters are relative to the frozen backbone W0 and per adapted module:

    expert        θ*_t − W0 = start_t + Δ_t
    merged        θ̂_t − W0            (what is evaluated, and exported)
    start_{t+1}   where task t+1 trains from: θ̂_t for most strategies, θ*_t for those that
                  fine-tune sequentially and merge afterwards (MagMax, TIES, DARE)

A strategy keeps only what it needs between tasks (state_dict), so the merge actor can persist it
and resume. Coefficient strategies expose per-module partials (num, den) so a sharded merge can
add them across shards before dividing (two-phase solve); elementwise strategies have none.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from pm_ray.core.coefficient import Alpha, Partials
from pm_ray.core.strategies.options import StrategyOptions, validate_options
from pm_ray.core.tensors import (
    CheckCache,
    TensorDict,
    check_finite,
    check_same_layout,
    load_tensors,
    save_tensors,
    split_prefixed,
    with_prefix,
)


@dataclass
class TaskUpdate:
    """What task t hands to the merge: its dense task vector, Fisher and strategy-specific extras."""

    task: int
    delta: TensorDict
    fisher: TensorDict | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class WorkerStep:
    """What a strategy with a worker-side step gets on every training worker once task t trained."""

    model: Any  # the PEFT model with LoRA_t attached, weights W0 + start_t
    w0: TensorDict  # frozen base weights of the adapted modules
    merged_prev: TensorDict  # θ̂_{t-1} − W0 (zeros before the first task)
    snapshots: list[dict[str, Any]]  # LoRA_t's factors after each of record_steps()
    alpha: Alpha | None  # P&M's α_t from all merge shards (strategies with solves_line_alpha)
    batches: list[dict[str, Any]]  # this rank's task-t batches (worker_batches of them)
    grad_all_reduce: Callable[[Any], Any]  # sums a tensor over the ranks
    world_size: int


@dataclass
class MergeResult:
    alpha: Alpha | None
    merged: TensorDict
    start_next: TensorDict


class MergeStrategy(ABC):
    """Base class; subclasses set ``name`` and ``Options`` and implement :meth:`_merge`.

    What a strategy is, for the code around it, is said by class-level flags (never by its name):

    train_from          where task t+1 trains from: "merged" θ̂_t or the "expert" θ*_t
    needs_fisher        the merge needs the task's diagonal Fisher F_t
    solves_line_alpha   α_t = num/den from per-module partials, which a sharded merge sums across
                        shards before dividing (:meth:`partials`, :meth:`solve_alpha`)
    keeps_adapter_stack θ̂_t − W0 = Σ_i α_i Δ_i exactly, so the merge is also a stack of
                        (α_i, adapter_i) pairs (merged/stack.json)
    has_worker_step     the training workers run :meth:`worker_step` after task t trained and
                        hand its extras to the merge (TRM's coefficient optimisation)
    trains_orthogonal   the tasks train with O-LoRA's orthogonality term whatever the config's
                        ``orthogonal.enabled`` says (the ``olora`` strategy); any other strategy
                        trains with it when ``orthogonal.enabled`` is true
    """

    name: ClassVar[str]
    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    train_from: ClassVar[str] = "merged"  # "merged" | "expert"
    needs_fisher: ClassVar[bool] = False
    solves_line_alpha: ClassVar[bool] = False
    keeps_adapter_stack: ClassVar[bool] = False
    has_worker_step: ClassVar[bool] = False
    trains_orthogonal: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        self.options = validate_options(self.name, self.Options, options)
        self.merged: TensorDict = {}
        self.start: TensorDict = {}
        self.num_tasks = 0
        self.checks = CheckCache()  # tensors of the current task already checked (partials, then merge)
        # An owner that keeps no earlier MergeResult (the merge actor) may let a strategy write
        # θ̂_t into θ̂_{t-1}'s tensors: no θ̂-sized allocation, its page faults or its memory per
        # task. The merged dict of an earlier task's result then changes with the state.
        self.in_place = False

    # ---- the merge -------------------------------------------------------------------------
    def partials(self, update: TaskUpdate) -> Partials:
        """Per-module (num, den) for a two-phase solve; empty for elementwise strategies."""
        return {}

    def solve_alpha(self, partials: Partials) -> Alpha:
        """α_t from (num, den) partials summed over all modules' shards (solves_line_alpha)."""
        raise NotImplementedError(f"{self.name} has no closed-form α (solves_line_alpha is False)")

    # ---- the worker side (has_worker_step) --------------------------------------------------
    def record_steps(self, steps_per_task: int) -> list[int]:
        """Training steps (1-based) after which the workers record LoRA_t's factors for the
        worker step; raises ValueError when ``steps_per_task`` cannot hold them."""
        del steps_per_task
        return []

    @property
    def worker_batches(self) -> int:
        """Task-t batches per rank the worker step needs."""
        return 0

    @property
    def global_alpha(self) -> bool:
        """One α for every module (solves_line_alpha): a sharded merge solves it from all shards'
        partials before any shard merges (two-phase)."""
        return False

    def worker_step(self, step: WorkerStep) -> tuple[dict[str, Any], dict[str, Any]]:
        """(extras for the merge, diagnostics), on every rank; ranks run it in lockstep."""
        raise NotImplementedError(f"{self.name} has no worker step (has_worker_step is False)")

    def merge(self, update: TaskUpdate, *, alpha: Alpha | None = None) -> MergeResult:
        """Merge task ``update.task``; ``alpha`` overrides the coefficient (sharded solve)."""
        self._validate(update)
        merged, start_next, used_alpha = self._merge(update, alpha)
        self.merged, self.start = merged, start_next
        self.num_tasks = update.task
        self.checks.clear()  # the next task checks its tensors afresh
        return MergeResult(alpha=used_alpha, merged=merged, start_next=start_next)

    @abstractmethod
    def _merge(self, update: TaskUpdate, alpha: Alpha | None) -> tuple[TensorDict, TensorDict, Alpha | None]:
        """Return (merged, start_next, alpha used)."""

    def _validate(self, update: TaskUpdate, *, check_delta: bool = True) -> None:
        """Task order and layouts, and Δ_t finite unless ``check_delta`` is false (a caller whose
        own pass over Δ_t shows a NaN/Inf, e.g. the P&M partials)."""
        if update.task != self.num_tasks + 1:
            raise ValueError(
                f"{self.name}: got task {update.task}, expected task {self.num_tasks + 1} (tasks merge in order)"
            )
        if not update.delta:
            raise ValueError(f"{self.name}: task {update.task} has an empty delta (no adapted modules)")
        if check_delta:
            check_finite(update.delta, name=f"delta of task {update.task}", cache=self.checks)
        if self.num_tasks:
            check_same_layout(
                self.merged, update.delta, reference_name="the merged state", other_name=f"delta of task {update.task}"
            )
        if self.needs_fisher:
            if update.fisher is None:
                raise ValueError(f"{self.name} needs the Fisher of task {update.task}, but none was given")
            check_same_layout(update.delta, update.fisher, reference_name="delta", other_name="fisher")

    def previous(self, update: TaskUpdate, which: str = "merged") -> TensorDict:
        """θ̂_{t-1} (or start_t) − W0; zeros before the first task."""
        state = self.merged if which == "merged" else self.start
        if self.num_tasks:
            return state
        return {key: torch.zeros_like(d, dtype=torch.float32) for key, d in update.delta.items()}

    # ---- persistence ------------------------------------------------------------------------
    def extra_state(self) -> TensorDict:
        """Strategy-specific tensors to persist (accumulators, running max, past task vectors)."""
        return {}

    def load_extra_state(self, tensors: TensorDict, meta: dict[str, Any]) -> None:
        del tensors, meta

    def extra_meta(self) -> dict[str, Any]:
        return {}

    def save(self, path: str | Path) -> None:
        tensors = {**with_prefix(self.merged, "merged"), **with_prefix(self.start, "start"), **self.extra_state()}
        meta = {"kind": "merge_strategy", "strategy": self.name, "num_tasks": self.num_tasks, **self.extra_meta()}
        save_tensors(path, tensors, meta)

    def load(self, path: str | Path) -> None:
        tensors, meta = load_tensors(path)
        if meta.get("kind") != "merge_strategy" or meta.get("strategy") != self.name:
            raise ValueError(f"{path}: holds strategy {meta.get('strategy')!r}, expected {self.name!r}")
        self.num_tasks = int(meta["num_tasks"])
        self.merged = split_prefixed(tensors, "merged")
        self.start = split_prefixed(tensors, "start")
        self.load_extra_state(tensors, meta)
