"""TRM — trajectory-regularised merging: optimise the merge inside a subspace spanned by task t's trajectory.

RECONSTRUCTION, not the paper's method: only the abstract of TRM (arXiv 2605.08311) was available.
It names an "augmented trajectory subspace" and three objectives (task alignment, prediction
consistency, gradient responsiveness) and stores no old data; every concrete choice below is ours.

Subspace. LoRA_t is recorded at K steps of task t's training (``snapshot_steps``; the last is the
expert). Per adapted module m (dense, base-weight layout, relative to W0):

    D_0 = δ̂_{t-1} = θ̂_{t-1} − W0,    D_k = Δ_t^{(k)} = s B_t^{(k)} A_t^{(k)}   (k = 1..K, D_K = Δ_t)
    θ(c)[m] = W0[m] + Σ_{j=0..K} c_{g(m), j} D_j[m]

c has shape (K+1,) (global) or (G, K+1), g(m) the transformer layer of m (``layer_groups``). It starts
at the P&M solution θ̂_{t-1} + α Δ_t: c_0 = 1, c_K = α, other c_k = 0.

Objectives on task-t batches only (no old data). Target positions i of example n are those whose
next label is not −100 (HF shift); every term is mean_n mean_{i ∈ targets(n)} so examples weigh
equally and the mean of equal-sized shards is the full-batch value:

    L_align(c) = −log p_{θ(c)}(y_{i+1} | x_{≤i})
    L_cons(c)  = KL(p_{θ̂_{t-1}} ‖ p_{θ(c)})                 (old-knowledge proxy on task-t inputs)
    L_resp(c)  = Σ_v p_{θ(c)}(v)²                             (collision probability, in [1/V, 1])
    L(c) = w_align L_align + w_cons L_cons + w_resp L_resp

Adam on c only; on R data-parallel workers ∇_c L = (Σ_r ∇_c L_r) / R (``grad_all_reduce`` sums).

Memory: the directions are dense per adapted module, K+1 copies of the adapted weights (small for k,v
LoRA, large for all-linear LoRA of a big model) and exist only while merging; what a run stores
between tasks is the K snapshots' LoRA factors (A, B), never dense tensors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.func import functional_call

from pm_ray.core.lora import LoraFactors, base_weight, is_lora_layer
from pm_ray.core.tensors import TensorDict, check_same_layout
from pm_ray.core.trm_objectives import (
    gradient_responsiveness,
    prediction_consistency,
    task_alignment,
)

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass
class TRMSettings:
    """K snapshots, Adam steps and learning rate on c, the objective weights, global or per-layer c."""

    snapshots: int = 4
    steps: int = 30
    lr: float = 0.05
    align_weight: float = 1.0
    consistency_weight: float = 1.0
    responsiveness_weight: float = 0.1
    per_group: bool = False

    def __post_init__(self) -> None:
        for field_name, least in (("snapshots", 1), ("steps", 0)):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"TRMSettings.{field_name}={value!r} must be an int >= {least}")
        if not self.lr > 0:
            raise ValueError(f"TRMSettings.lr={self.lr!r} must be > 0")
        weights = {
            "align_weight": self.align_weight,
            "consistency_weight": self.consistency_weight,
            "responsiveness_weight": self.responsiveness_weight,
        }
        for field_name, value in weights.items():
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"TRMSettings.{field_name}={value!r} must be >= 0")
        if not any(weights.values()):
            raise ValueError(f"TRMSettings: all objective weights are 0 ({weights}); expected at least one > 0")


def snapshot_steps(total_steps: int, k: int) -> list[int]:
    """The K step counts (1-based) after which LoRA_t is recorded: ⌊i·total/K⌋, i = 1..K (last = total)."""
    if k < 1:
        raise ValueError(f"snapshot_steps: k={k} must be >= 1")
    if total_steps < k:
        raise ValueError(f"snapshot_steps: total_steps={total_steps} is fewer than k={k} snapshots")
    return [i * total_steps // k for i in range(1, k + 1)]


def layer_groups(keys: Sequence[str] | Mapping[str, object]) -> dict[str, int]:
    """Group id per module: modules of one transformer layer (first integer path segment, as in
    "model.layers.3.self_attn.k_proj") share a group, numbered by layer index; modules without an
    index (lm_head, ...) share one last group. Ids depend on the whole key set: call it on all modules."""
    indices = {key: (int(m.group(1)) if (m := _LAYER_INDEX.search(key)) else None) for key in keys}
    layers = sorted({i for i in indices.values() if i is not None})
    rank = {layer: g for g, layer in enumerate(layers)}
    return {key: rank[i] if i is not None else len(layers) for key, i in indices.items()}


def trajectory_directions(
    merged_prev: Mapping[str, torch.Tensor], snapshots: Sequence[Mapping[str, torch.Tensor | LoraFactors]]
) -> list[TensorDict]:
    """[D_0, D_1..D_K]: δ̂_{t-1} and the dense Δ_t^{(k)} of each snapshot (LoraFactors or dense), float32."""
    if not snapshots:
        raise ValueError("trajectory_directions: no snapshots; expected K >= 1 (the last is the expert)")
    dense = [{key: v.delta() if isinstance(v, LoraFactors) else v for key, v in snap.items()} for snap in snapshots]
    for k, snap in enumerate(dense, start=1):
        check_same_layout(merged_prev, snap, reference_name="merged_prev", other_name=f"snapshot {k}")
    return [{key: t.detach().float() for key, t in d.items()} for d in [dict(merged_prev), *dense]]


def initial_coefficients(
    k: int, alpha_pm: float | Mapping[str, float], groups: Mapping[str, int] | None = None
) -> torch.Tensor:
    """c at the P&M solution: c_0 = 1, c_K = α (a per-module α is averaged per group), others 0."""
    if k < 1:
        raise ValueError(f"initial_coefficients: k={k} must be >= 1")
    c = torch.zeros(1 if groups is None else max(groups.values()) + 1, k + 1)
    c[:, 0] = 1.0
    for g in range(c.shape[0]):
        if not isinstance(alpha_pm, Mapping):
            c[g, k] = float(alpha_pm)
            continue
        members = list(alpha_pm) if groups is None else [key for key, gid in groups.items() if gid == g]
        if any(key not in alpha_pm for key in members) or not members:
            raise ValueError(f"initial_coefficients: alpha_pm lacks modules of group {g} ({members[:3]})")
        c[g, k] = sum(float(alpha_pm[key]) for key in members) / len(members)
    return c[0] if groups is None else c


def _check_groups(keys: Mapping[str, object], groups: Mapping[str, int] | None, num_groups: int, where: str) -> None:
    if groups is None or any(key not in groups for key in keys):
        raise ValueError(f"{where}: per-group c (2-D) needs a group id for every module (see layer_groups)")
    if any(not 0 <= groups[key] < num_groups for key in keys):
        raise ValueError(f"{where}: c has {num_groups} group rows but groups has ids up to {max(groups.values())}")


def expert_coefficient(c: torch.Tensor, groups: Mapping[str, int] | None = None) -> float | dict[str, float]:
    """The weight c_K on the expert's task vector Δ_t (comparable to P&M's α): a float for a global
    c, {module: c_{g(m), K}} for a per-group c (the form to send to a sharded merge)."""
    if c.dim() == 1:
        return float(c[-1])
    _check_groups(groups or {}, groups, c.shape[0], "expert_coefficient")
    return {key: float(c[g, -1]) for key, g in (groups or {}).items()}


def combine(
    directions: Sequence[Mapping[str, torch.Tensor]], c: torch.Tensor, groups: Mapping[str, int] | None = None
) -> TensorDict:
    """θ(c) − W0 = Σ_j c_{g(m), j} D_j[m] per module, in c's dtype; differentiable in c."""
    rows = c.unsqueeze(0) if c.dim() == 1 else c
    if c.dim() not in (1, 2) or rows.shape[1] != len(directions):
        raise ValueError(
            f"combine: c has shape {tuple(c.shape)}, expected ({len(directions)},) or (G, {len(directions)})"
        )
    if c.dim() == 2:
        _check_groups(directions[0], groups, rows.shape[0], "combine")
    out: TensorDict = {}
    for key in directions[0]:
        row = rows[groups[key]] if groups is not None and c.dim() == 2 else rows[0]
        out[key] = sum(row[j] * d[key].to(c.device, c.dtype) for j, d in enumerate(directions))  # type: ignore[assignment]
    return out


def weight_names(model: torch.nn.Module, keys: Sequence[str] | Mapping[str, object]) -> dict[str, str]:
    """Module key -> the name of its dense base weight in ``model.named_parameters()``."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    names = {key: by_id.get(id(base_weight(model, key))) for key in keys}
    missing = [key for key, name in names.items() if name is None]
    if missing:
        raise ValueError(f"weight_names: the base weights of {missing[:3]} are not parameters of the model")
    return names  # type: ignore[return-value]


def merged_logits(
    model: torch.nn.Module,
    names: Mapping[str, str],
    w0: Mapping[str, torch.Tensor],
    directions: Sequence[Mapping[str, torch.Tensor]],
    c: torch.Tensor,
    groups: Mapping[str, int] | None,
    batch: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    """Logits of θ(c) = W0 + combine(c): the adapted weights are substituted for this call only."""
    delta = combine(directions, c, groups)
    params = {
        names[key]: (w0[key].to(d.device, d.dtype) + d).to(base_weight(model, key).dtype) for key, d in delta.items()
    }
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    return functional_call(model, params, args=(), kwargs=inputs).logits


def _check_no_active_lora(model: torch.nn.Module) -> None:
    for module in model.modules():
        if is_lora_layer(module) and (module.merged or not module.disable_adapters):
            raise ValueError(
                "optimize_coefficients: the model has an active or merged LoRA adapter; pass the backbone "
                "inside `with peft_model.disable_adapter():` (unmerged) or a plain model"
            )


def optimize_coefficients(
    model: torch.nn.Module,
    directions: Sequence[Mapping[str, torch.Tensor]],
    w0: Mapping[str, torch.Tensor],
    batches: Sequence[Mapping[str, torch.Tensor]],
    c_init: torch.Tensor,
    settings: TRMSettings,
    *,
    grad_all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    world_size: int = 1,
    groups: Mapping[str, int] | None = None,
) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Adam on c for ``settings.steps`` steps over ``batches`` (cycled); returns (c, per-step log).

    ``model``: the backbone (LoRA disabled, or a plain HF model); only the adapted modules' weights
    are replaced, by w0 + combine(c), so its other weights must be W0's. Its parameters are never
    changed and get no ``.grad``. ``w0``: the base weights of the adapted modules (the worker's
    weights may hold θ̂_{t-1} folded in). ``grad_all_reduce`` sums a tensor over the ``world_size``
    workers (every worker must call this with the same number of steps). p_{θ̂_{t-1}} is computed
    once per batch and kept (memory: N·T·V logits per batch). The log is of this worker's batches.
    """
    if world_size < 1 or (world_size > 1 and grad_all_reduce is None):
        raise ValueError(f"optimize_coefficients: world_size={world_size} needs >= 1, and a grad_all_reduce when > 1")
    if not batches:
        raise ValueError("optimize_coefficients: batches is empty; expected task-t batches with 'labels'")
    if len(directions) != settings.snapshots + 1:
        raise ValueError(
            f"optimize_coefficients: {len(directions)} directions, expected snapshots+1={settings.snapshots + 1}"
        )
    if c_init.dim() != (2 if settings.per_group else 1):
        raise ValueError(
            f"optimize_coefficients: c_init has shape {tuple(c_init.shape)} but per_group={settings.per_group}"
        )
    for j, d in enumerate(directions):
        check_same_layout(w0, d, reference_name="w0", other_name=f"directions[{j}]")
    _check_no_active_lora(model)
    if settings.per_group and groups is None:
        groups = layer_groups(list(w0))
    names = weight_names(model, list(w0))
    device = next(model.parameters()).device
    moved = [{key: t.to(device) for key, t in d.items()} for d in directions]
    w0_moved = {key: t.to(device) for key, t in w0.items()}
    on_device = [{name: v.to(device) for name, v in batch.items()} for batch in batches]
    c = c_init.detach().clone().to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([c], lr=settings.lr)
    weights = {
        "task_alignment": settings.align_weight,
        "prediction_consistency": settings.consistency_weight,
        "gradient_responsiveness": settings.responsiveness_weight,
    }
    modes = {module: module.training for module in model.modules()}
    log: list[dict[str, float]] = []
    try:
        model.eval()  # no dropout: the objective must be a deterministic function of c
        prev_c = torch.zeros_like(c.detach())
        prev_c[..., 0] = 1.0  # θ̂_{t-1} = W0 + D_0
        with torch.no_grad():
            logits_prev = [merged_logits(model, names, w0_moved, moved, prev_c, groups, b) for b in on_device]
        for step in range(settings.steps):
            batch = on_device[step % len(on_device)]
            logits_c = merged_logits(model, names, w0_moved, moved, c, groups, batch)
            terms = {
                "task_alignment": task_alignment(logits_c, batch),
                "prediction_consistency": prediction_consistency(
                    logits_c, logits_prev[step % len(on_device)], batch["labels"]
                ),
                "gradient_responsiveness": gradient_responsiveness(logits_c, batch["labels"]),
            }
            total = sum(weights[name] * value for name, value in terms.items())
            # autograd.grad, not backward(): only c's gradient is formed, no parameter gets a .grad
            (grad,) = torch.autograd.grad(total, [c])  # type: ignore[arg-type]
            if grad_all_reduce is not None:
                grad = grad_all_reduce(grad) / world_size
            c.grad = grad
            optimizer.step()
            log.append({"step": float(step), "total": total.item(), **{k: v.item() for k, v in terms.items()}})  # type: ignore[union-attr]
    finally:
        for module, training in modes.items():
            module.train(training)
    return c.detach(), log
