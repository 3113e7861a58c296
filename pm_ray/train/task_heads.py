"""Per-task classification heads on a training worker (classification streams; a no-op otherwise).

    heads = TaskHeads.for_run(model, cfg, run, tasks, state.completed)   # re-adds the committed heads
    heads.begin_task(t, task)             # after LoRA_t is attached: a new head, the only one trained
    heads.end_task(task_dir, write=rank == 0)   # freezes it; rank 0 writes it

The class-incremental setting of the P&M paper (per-task heads the merge never scales): task t trains LoRA_t and its own
linear head over its own classes (its loss over its own classes, trainer.head_logits=own, the
default, or over every seen class, seen); the merge combines the encoder's task vectors only and never
scales a head; evaluation scores every seen task task-agnostically over the concatenated heads
(`pm_ray/eval/classification.py`). A head is seeded from (trainer.seed, t), the same on every rank
and in a resumed run, and written to ``tasks/<i>-<name>/head.safetensors`` (atomic) before
state.json commits the task, so a resumed run (or a Ray Train retry) re-adds exactly the committed
heads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pm_ray.config import RunConfig
from pm_ray.core.tensors import load_tensors, save_tensors
from pm_ray.eval.classification import find_task_head_classifier
from pm_ray.models.heads import TaskHeadClassifier
from pm_ray.rundir import RunDir

HEAD_FILE = "head.safetensors"


def head_seed(seed: int, t: int) -> int:
    return seed * 1_000_003 + t


class TaskHeads:
    """The classifier's heads across the stream (`classifier` is None for instruction streams)."""

    def __init__(self, classifier: TaskHeadClassifier | None, seed: int = 0, over_seen: bool = False) -> None:
        self.classifier, self.seed, self.over_seen = classifier, seed, over_seen
        self.current: str | None = None
        self.task = 0

    @classmethod
    def for_run(cls, model: Any, cfg: RunConfig, run: RunDir, tasks: list[Any], completed: int) -> TaskHeads:
        classifier = find_task_head_classifier(model)
        heads = cls(classifier, cfg.trainer.seed, cfg.trainer.head_logits == "seen")
        if classifier is None:
            return heads
        for i in range(1, completed + 1):
            task = tasks[i - 1]
            path = run.task_dir(i, task.name) / HEAD_FILE
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path}: missing; a classification run needs the head of every committed task (1..{completed}) "
                    "to resume"
                )
            tensors, meta = load_tensors(path)
            if meta.get("kind") != "task_head" or meta.get("task") != i or meta.get("labels") != task.labels:
                raise ValueError(f"{path}: holds {meta!r}, expected the head of task {i} over {task.labels}")
            head = classifier.add_task(task.name, list(task.labels), seed=head_seed(cfg.trainer.seed, i))
            with torch.no_grad():
                head.weight.copy_(tensors["weight"])
                head.bias.copy_(tensors["bias"])
            head.requires_grad_(False)
        return heads

    def begin_task(self, t: int, task: Any) -> None:
        """Add task t's head, make it the active one and the only trainable one (PEFT's add_adapter
        freezes every non-LoRA parameter, the earlier heads included)."""
        if self.classifier is None:
            return
        for head in self.classifier.heads.values():
            head.requires_grad_(False)
        head = self.classifier.add_task(task.name, list(task.labels), seed=head_seed(self.seed, t))
        head.requires_grad_(True)
        self.classifier.active_task = self.current = task.name
        self.classifier.over_seen = self.over_seen
        self.task = t

    def end_task(self, task_dir: Path, *, write: bool) -> None:
        """Freeze the finished head; rank 0 writes it (before state.json commits the task)."""
        if self.classifier is None or self.current is None:
            return
        head = self.classifier.heads[self.current]
        head.requires_grad_(False)
        if write:
            save_tensors(
                task_dir / HEAD_FILE,
                {"weight": head.weight.float(), "bias": head.bias.float()},
                {"kind": "task_head", "task": self.task, "labels": self.classifier.task_labels[self.current]},
            )
