"""TRM's three objectives on the merged model's logits (our reconstruction; see pm_ray/core/trm.py).

    L_align = mean_n mean_i −log p_θ(c)(y_{i+1} | x_{≤i})                 (task alignment)
    L_cons  = mean_n mean_i KL(p_θ̂_{t-1} ‖ p_θ(c))                       (prediction consistency)
    L_resp  : penalises saturated, over-confident outputs                 (gradient responsiveness)
Every mean is over the answer positions (labels != -100), reduced in at least float32.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the label of prompt and padding positions (as in pm_ray.data.tokenize)


def _target_mean(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mean_n mean_{i ∈ targets(n)} values[n, i] over the shifted target positions of (N, T−1) values."""
    mask = (labels[:, 1:] != IGNORE_INDEX).to(values.dtype)
    return ((values * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    # Reduce in at least float32 (bf16 log-softmax loses the small KL values); float64 stays float64.
    return F.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def task_alignment(logits_c: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """L_align = mean_n mean_i −log p_{θ(c)}(y_{i+1} | x_{≤i}): causal-LM cross-entropy, −100 masked."""
    labels = batch["labels"]
    targets = labels[:, 1:].clamp(min=0)  # masked positions pick token 0 and are zeroed by the mask
    nll = -_log_probs(logits_c).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return _target_mean(nll, labels)


def prediction_consistency(logits_c: torch.Tensor, logits_prev: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_cons = mean_n mean_i Σ_v p_prev(v) (log p_prev(v) − log p_{θ(c)}(v)), p_prev of θ̂_{t-1} (no grad)."""
    log_prev = _log_probs(logits_prev.detach())
    kl = F.kl_div(_log_probs(logits_c), log_prev.to(logits_c.device), log_target=True, reduction="none").sum(-1)
    return _target_mean(kl, labels)


def gradient_responsiveness(logits_c: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_resp = mean_n mean_i Σ_v p_{θ(c)}(v)², the collision probability (1 saturated, 1/V flat).

    Why this term: the softmax Jacobian is J = diag(p) − p pᵀ with trace 1 − Σ_v p_v², so the
    collision probability is exactly how much of the output no logit change can move any more —
    the next task's loss gradients pass through J and vanish as it goes to 1. It is bounded, needs
    no logarithm of tiny probabilities (unlike entropy), and is measured on task-t inputs since the
    next task's data is unknown. It pulls towards flatter outputs and so against L_align: keep its
    weight small (default 0.1).
    """
    probs = _log_probs(logits_c).exp()
    return _target_mean(probs.square().sum(-1), labels)
