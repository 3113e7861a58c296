"""Which test rows a rank evaluates, and the model's device."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from pm_ray.data.schema import Task
from pm_ray.data.tokenize import shard_indices


def eval_rows(task: Task, *, max_rows: int | None, rank: int, world_size: int) -> list[dict[str, Any]]:
    """This rank's rows (round robin) of the first `max_rows` test rows (all when None)."""
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
    n = task.test.num_rows if max_rows is None else min(max_rows, task.test.num_rows)
    return task.test.take(shard_indices(n, rank, world_size).tolist()).to_pylist()


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
