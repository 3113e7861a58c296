"""Exact global reduction of integer counts across data-parallel ranks."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

AllReduce = Callable[[Tensor], "Tensor | None"]


def sum_counts(counts: list[int], all_reduce: AllReduce | None) -> list[int]:
    """Sum integer counts over ranks. `all_reduce` may reduce in place and return None
    (torch.distributed.all_reduce) or return the reduced tensor; None means a single process."""
    local = torch.tensor(counts, dtype=torch.int64)
    if all_reduce is None:
        return [int(c) for c in local]
    out = all_reduce(local)
    reduced = local if out is None or not isinstance(out, Tensor) else out
    return [int(c) for c in reduced]
