"""TRM as a merge strategy: take the workers' optimised merge θ(c), else fall back to P&M.

RECONSTRUCTION from the TRM abstract (arXiv 2605.08311); the optimisation itself is in
``pm_ray/core/trm.py``. The coefficients c are optimised on the training workers (they hold the
model and task-t data); the merge only receives the result:

    update.extras["merged"]        θ(c) − W0 = Σ_j c_{g(m), j} D_j[m]   (dense, per module)
    update.extras["coefficients"]  c, shape (K+1,) or (G, K+1)            (optional; for α)
    update.extras["alpha"]         c_K as float or per-module dict        (optional; sharded merges)
    θ̂_t = θ(c);   reported α_t = c_K (global) or {m: c_{g(m), K}} (per layer group)

Without extras (no snapshots, or before the workers ran): the P&M merge θ̂_t = θ̂_{t-1} + α_t Δ_t,
α_t from the accumulator. ``coefficient(update)`` gives that α_t without merging: it is where the
workers initialise c. Either way the Fisher is absorbed with the expert θ*_t = θ̂_{t-1} + Δ_t, as
P&M does, so the curvature state is the same as P&M's and α_PM stays the P&M solution for the
current merged model.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, model_validator

from pm_ray.core.coefficient import Alpha, alpha_stats
from pm_ray.core.strategies.base import TaskUpdate, WorkerStep
from pm_ray.core.strategies.line import PerturbAndMerge
from pm_ray.core.tensors import TensorDict, check_finite, check_same_layout
from pm_ray.core.trm import (
    TRMSettings,
    combine,
    expert_coefficient,
    initial_coefficients,
    layer_groups,
    optimize_coefficients,
    snapshot_steps,
    trajectory_directions,
)


class TrajectoryRegularisedMerge(PerturbAndMerge):
    """P&M's accumulator and fallback, with the merged delta taken from the workers when given.

    The TRM options beyond P&M's are not used by the merge itself: the workers read them
    (``settings``) to record the snapshots and drive :func:`pm_ray.core.trm.optimize_coefficients`.
    """

    name = "trm"
    needs_fisher = True
    keeps_adapter_stack = False  # θ(c) lies in the trajectory subspace, not on Σ α_i Δ_i
    has_worker_step = True

    class Options(PerturbAndMerge.Options):
        snapshots: int = Field(4, ge=1)  # K: LoRA_t recorded after ⌊i·steps/K⌋ steps, i = 1..K
        steps: int = Field(30, ge=0)  # Adam steps on c
        lr: float = Field(0.05, gt=0)
        align_weight: float = Field(1.0, ge=0)
        consistency_weight: float = Field(1.0, ge=0)
        responsiveness_weight: float = Field(0.1, ge=0)
        per_group: bool = False  # one c per transformer layer instead of one global c

        @model_validator(mode="after")
        def _settings(self) -> TrajectoryRegularisedMerge.Options:
            TRMSettings(**self.settings_kwargs())  # e.g. all objective weights 0
            return self

        def settings_kwargs(self) -> dict[str, Any]:
            return self.model_dump(exclude={"per_module", "clip"})

    options: Options

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.settings = TRMSettings(**self.options.settings_kwargs())

    @property
    def worker_batches(self) -> int:  # type: ignore[override]
        return max(1, min(self.settings.steps, 4))

    def record_steps(self, steps_per_task: int) -> list[int]:
        k = self.settings.snapshots
        if steps_per_task < k:
            raise ValueError(
                f"trm records LoRA_t after each of merge.options.snapshots={k} steps, more than the "
                f"{steps_per_task} training steps; lower the snapshots or raise trainer.steps_per_task"
            )
        return snapshot_steps(steps_per_task, k)

    def worker_step(self, step: WorkerStep) -> tuple[dict[str, Any], dict[str, Any]]:
        """Optimise c on the trajectory subspace, starting from P&M's α_t (every rank in lockstep,
        the gradient of c all-reduced); θ(c), c and the reported α_t = c_K go to the merge."""
        s = self.settings
        if step.alpha is None:
            raise ValueError("trm: the worker step needs P&M's alpha_t as its starting point")
        directions = trajectory_directions(step.merged_prev, step.snapshots)
        groups = layer_groups(list(step.w0)) if s.per_group else None
        c_init = initial_coefficients(s.snapshots, step.alpha, groups)
        with step.model.disable_adapter():
            c, log = optimize_coefficients(
                step.model,
                directions,
                step.w0,
                step.batches,
                c_init,
                s,
                grad_all_reduce=step.grad_all_reduce,
                world_size=step.world_size,
                groups=groups,
            )
        c = c.cpu()
        merged = {key: value.cpu() for key, value in combine(directions, c, groups).items()}
        # per module when per_group: the merge client splits it by shard like the delta
        extras = {"merged": merged, "coefficients": c, "alpha": expert_coefficient(c, groups)}
        diag: dict[str, Any] = {"trm_alpha_pm": alpha_stats(step.alpha)[0], "trm_coefficients": c.tolist()}
        if log:
            diag.update({f"trm_{k}_start": v for k, v in log[0].items() if k != "step"})
            diag.update({f"trm_{k}_end": v for k, v in log[-1].items() if k != "step"})
        return extras, diag

    def _merge(self, update: TaskUpdate, alpha: Alpha | None) -> tuple[TensorDict, TensorDict, Alpha | None]:
        if "merged" not in update.extras:
            return super()._merge(update, alpha)
        if alpha is not None:
            raise ValueError(
                f"trm: task {update.task} has extras['merged'] and an alpha override; the optimised merge "
                "has no single α to override (send one or the other)"
            )
        optimised: TensorDict = {key: t.detach().float().cpu() for key, t in update.extras["merged"].items()}
        check_same_layout(
            update.delta, optimised, reference_name="delta", other_name=f"extras['merged'] of task {update.task}"
        )
        check_finite(optimised, name=f"extras['merged'] of task {update.task}")
        used = self._reported_alpha(update)
        prev = self.previous(update)
        self._after_merge(update, prev)  # absorbs F_t with θ*_t = θ̂_{t-1} + Δ_t
        return optimised, optimised, used

    def _reported_alpha(self, update: TaskUpdate) -> Alpha | None:
        """extras["alpha"] if sent, else c_K from extras["coefficients"], else None.

        Per-group c is mapped to modules with ``layer_groups`` of this update's modules, which is
        the workers' grouping only when this strategy holds every module: a sharded merge must send
        extras["alpha"] = ``expert_coefficient(c, groups)`` (a per-module dict, split by shard).
        """
        if "alpha" in update.extras:
            alpha = update.extras["alpha"]
            if isinstance(alpha, dict):
                missing = sorted(set(update.delta) - set(alpha))
                if missing:
                    raise ValueError(
                        f"trm: extras['alpha'] of task {update.task} has no entry for modules {missing[:3]}"
                    )
                return {key: float(alpha[key]) for key in update.delta}
            return float(alpha)
        c = update.extras.get("coefficients")
        if c is None:
            return None
        c = torch.as_tensor(c, dtype=torch.float64)
        groups = layer_groups(list(update.delta))
        num_groups = max(groups.values()) + 1
        if c.dim() not in (1, 2) or c.shape[-1] < 2 or (c.dim() == 2 and c.shape[0] != num_groups):
            raise ValueError(
                f"trm: extras['coefficients'] of task {update.task} has shape {tuple(c.shape)}; expected (K+1,) "
                f"or ({num_groups}, K+1) for the layer groups of its modules, K >= 1 (sharded: send extras['alpha'])"
            )
        return expert_coefficient(c, groups if c.dim() == 2 else None)
