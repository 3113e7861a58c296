"""An encoder with one linear classification head per task (class-incremental protocol).

Each task adds its own head over its own classes, trained with that task. Prediction is either
task-aware (argmax of the true task's head) or task-agnostic (argmax over the concatenated logits
of all seen tasks' heads, i.e. over every class seen so far). While a task trains, `active_task`
names its head, so a forward without `task` (the training step, the Fisher pass: code written for
any model) computes that task's loss: over its own classes, or with `over_seen` over every seen
class, its own first (then a label's index is the same in both, and the cross-entropy
−log softmax(z_own ⊕ z_others)[y] also pushes the earlier heads' logits down on the new inputs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import SequenceClassifierOutput

ACTIVE = "<active task>"  # forward's default `task`: the head of `active_task` (all heads when unset)


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class TaskHeadClassifier(nn.Module):
    """encoder (a Hugging Face AutoModel) -> mean pooling -> heads[task]."""

    def __init__(self, encoder: nn.Module, *, seed: int = 0):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.heads = nn.ModuleDict()
        self.task_labels: dict[str, list[str]] = {}
        self.active_task: str | None = None
        self.over_seen = False
        self._seed = seed

    def get_input_embeddings(self) -> nn.Module:
        """The encoder's token embeddings (the Fisher pass hooks them when the adapter is frozen)."""
        return self.encoder.get_input_embeddings()

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def add_task(self, name: str, labels: list[str], *, seed: int | None = None) -> nn.Linear:
        """Add (seeded: `seed`, else from the classifier's seed and the head count) a head for task
        `name` over `labels`; returns it. Re-adding is an error."""
        if name in self.heads:
            raise ValueError(f"task {name!r} already has a head")
        if len(labels) < 2:
            raise ValueError(f"task {name!r}: a classification head needs >= 2 labels, got {labels}")
        gen = torch.Generator().manual_seed(self._seed * 1_000_003 + len(self.heads) if seed is None else seed)
        head = nn.Linear(self.hidden_size, len(labels))
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.02)
            head.bias.zero_()
        param = next(self.encoder.parameters())
        self.heads[name] = head.to(device=param.device, dtype=param.dtype)
        self.task_labels[name] = list(labels)
        return head

    def features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return mean_pool(out.last_hidden_state, attention_mask)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        task: str | None = ACTIVE,
        labels: Tensor | None = None,
        **_: Any,
    ) -> SequenceClassifierOutput:
        """Logits of `task`'s head (with cross-entropy `.loss` when labels are given), or with
        task=None the concatenated logits of all heads in the order they were added; by default the
        head of `active_task`."""
        feats = self.features(input_ids, attention_mask)
        over_seen = task == ACTIVE and self.active_task is not None and self.over_seen
        if task == ACTIVE:
            task = self.active_task
        if over_seen:  # the active head's classes first, then every other seen head's
            order = [task] + [name for name in self.heads if name != task]
            logits = torch.cat([self.heads[name](feats) for name in order], dim=-1)
        elif task is None:
            logits = torch.cat([head(feats) for head in self.heads.values()], dim=-1)
        else:
            if task not in self.heads:
                raise KeyError(f"no head for task {task!r}; heads: {list(self.heads)}")
            logits = self.heads[task](feats)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def class_offset(self, task: str) -> int:
        """Index of `task`'s first class in the concatenated (task-agnostic) logits."""
        offset = 0
        for name, labels in self.task_labels.items():
            if name == task:
                return offset
            offset += len(labels)
        raise KeyError(f"no head for task {task!r}; heads: {list(self.heads)}")
