"""Classification with per-task heads: task-agnostic (all seen classes) and task-aware accuracy."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pm_ray.data.schema import Task
from pm_ray.eval.rows import chunks, model_device
from pm_ray.models.heads import TaskHeadClassifier


def find_task_head_classifier(model: nn.Module) -> TaskHeadClassifier | None:
    """The TaskHeadClassifier inside `model` (itself, or wrapped by PEFT / an engine)."""
    for module in model.modules():
        if isinstance(module, TaskHeadClassifier):
            return module
    return None


@torch.no_grad()
def classification_counts(
    model: nn.Module, tokenizer: Any, task: Task, rows: list[dict[str, Any]], *, batch_size: int, max_length: int
) -> tuple[int, int]:
    """(task-agnostic correct, task-aware correct) over `rows`.

    With a TaskHeadClassifier: agnostic = argmax over the concatenated heads of all seen tasks hits
    this task's offset + label index; aware = argmax within this task's head. A single-head
    classifier (logits over task.labels) has nothing to confuse across tasks: both are the same.
    """
    if task.labels is None:
        raise ValueError(f"task {task.name!r} has no labels (not a classification task)")
    device = model_device(model)
    heads = find_task_head_classifier(model)
    index = {name: i for i, name in enumerate(task.labels)}
    if heads is not None:
        if task.name not in heads.task_labels:
            raise ValueError(f"the model has no head for task {task.name!r} (heads: {list(heads.task_labels)})")
        if heads.task_labels[task.name] != task.labels:
            raise ValueError(
                f"head of task {task.name!r} has labels {heads.task_labels[task.name]}, the task has {task.labels}"
            )
        offset, width = heads.class_offset(task.name), len(task.labels)
    agnostic = aware = 0
    for batch in chunks(rows, batch_size):
        enc = tokenizer(
            [str(r["text"]) for r in batch], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        target = torch.tensor([index[str(r["label"])] for r in batch], device=device)
        inputs = {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}
        if heads is None:
            out = model(**inputs)
            logits = out["logits"] if isinstance(out, dict) else out.logits
            hits = int((logits.argmax(-1) == target).sum())
            agnostic += hits
            aware += hits
            continue
        logits = model(**inputs, task=None)["logits"]
        agnostic += int((logits.argmax(-1) == target + offset).sum())
        aware += int((logits[:, offset : offset + width].argmax(-1) == target).sum())
    return agnostic, aware
