"""Causal-LM losses from the logits of the answer positions only.

An instruction example's loss is on its answer tokens (labels != -100): a few of its ~100
positions. The LM head (hidden x vocabulary: 28M multiply-adds a token on SmolLM2-135M, a fifth of
the model) and the log-softmax over the vocabulary are needed only where a position predicts an
answer token:

    keep[n, p] = labels[n, p + 1] != -100          (position p predicts token p + 1)

Hugging Face causal LMs (transformers >= 5) take that boolean mask as ``logits_to_keep`` and
return the kept positions' logits as one (K, V) matrix in row-major order; the targets are
``labels[:, 1:][labels[:, 1:] != -100]`` in the same order. From them

    loss      = (1/K) Σ_k CE(logits_k, target_k)                  (HF's token mean over the batch)
    ℓ_n       = (1/K_n) Σ_{k in row n} CE(logits_k, target_k)      (per example; 0 without targets)

which are exactly the losses of the full logits. Models whose forward takes no ``logits_to_keep``
get the full logits, sliced the same way (``answer_logits`` hides the difference).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


@dataclass
class AnswerLogits:
    """Logits (K, V) of the K positions that predict an answer token, their targets (K,) and the
    example each belongs to (K,)."""

    logits: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor

    def token_losses(self) -> torch.Tensor:
        return F.cross_entropy(self.logits.float(), self.targets, reduction="none")

    def mean_loss(self) -> torch.Tensor:
        """The token mean over the batch (a batch without any target token has loss 0)."""
        if not self.targets.numel():
            return self.logits.sum() * 0.0
        return self.token_losses().mean()

    def per_example_loss(self, num_examples: int) -> torch.Tensor:
        """ℓ_n, float32, shape (N,)."""
        losses = self.token_losses()
        total = torch.zeros(num_examples, dtype=losses.dtype, device=losses.device).index_add(0, self.rows, losses)
        count = torch.zeros(num_examples, dtype=losses.dtype, device=losses.device)
        count = count.index_add(0, self.rows, torch.ones_like(losses))
        return total / count.clamp(min=1)


def answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """keep[n, p]: position p of example n predicts an answer token (bool, the shape of labels)."""
    keep = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def takes_logits_mask(model: nn.Module) -> bool:
    """Whether the (PEFT-wrapped) causal LM's forward takes ``logits_to_keep``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def answer_logits(
    model: nn.Module, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor, *, sliced: bool | None = None
) -> AnswerLogits:
    """Run ``model(**inputs)`` (``model`` may be a wrapper, e.g. a DeepSpeed engine, of a model that
    ``sliced`` says takes ``logits_to_keep``; None: ask ``takes_logits_mask(model)``)."""
    keep = answer_mask(labels)
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[keep]
    targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
    if sliced is None:
        sliced = takes_logits_mask(model)
    if sliced:
        logits = model(**inputs, logits_to_keep=keep).logits
    else:
        logits = model(**inputs).logits[keep]
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(
            f"answer_logits: the model returned {logits.shape[0]} kept positions for {targets.shape[0]} "
            "answer tokens; expected a causal LM that reads logits_to_keep as a boolean (batch, sequence) mask"
        )
    return AnswerLogits(logits=logits, targets=targets, rows=rows)
