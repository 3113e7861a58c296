"""Continual-learning metrics from the accuracy matrix R.

R[l][i] = score on task i's test split after learning task l (l, i = 1..T; entries i > l are
ignored, they may be absent or NaN):

    ACC        = mean_i R[T][i]
    AAA        = mean_l mean_{i≤l} R[l][i]
    forgetting = mean_{i<T} max_{i≤l<T} (R[l][i] − R[T][i])
    BWT        = mean_{i<T} (R[T][i] − R[i][i])
    FWT        = mean_{1<i≤T} (R[i-1][i] − b[i])      only with an explicit zero-shot row b

Forgetting and BWT are 0.0 for a single task (nothing to forget). FWT needs R[i-1][i], the score
on task i before training on it, so those entries must be present when a baseline is given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _row(R: Sequence[Sequence[float]], l: int, i: int) -> float:
    try:
        value = float(R[l][i])
    except IndexError:
        raise ValueError(
            f"accuracy matrix: R[{l + 1}][{i + 1}] is missing (row {l + 1} has {len(R[l])} entries)"
        ) from None
    if math.isnan(value):
        raise ValueError(f"accuracy matrix: R[{l + 1}][{i + 1}] is NaN")
    return value


def continual_metrics(R: Sequence[Sequence[float]], zero_shot: Sequence[float] | None = None) -> dict[str, float]:
    """ACC, AAA, forgetting, BWT (and FWT when ``zero_shot`` is given) of a T x T matrix (1-based in the docs)."""
    T = len(R)
    if T == 0:
        raise ValueError("accuracy matrix is empty; expected one row per learned task")
    acc = sum(_row(R, T - 1, i) for i in range(T)) / T
    aaa = sum(sum(_row(R, l, i) for i in range(l + 1)) / (l + 1) for l in range(T)) / T
    if T > 1:
        forgetting = sum(max(_row(R, l, i) for l in range(i, T - 1)) - _row(R, T - 1, i) for i in range(T - 1)) / (
            T - 1
        )
        bwt = sum(_row(R, T - 1, i) - _row(R, i, i) for i in range(T - 1)) / (T - 1)
    else:
        forgetting = bwt = 0.0
    out = {"acc": acc, "aaa": aaa, "forgetting": forgetting, "bwt": bwt}
    if zero_shot is not None:
        if len(zero_shot) != T:
            raise ValueError(f"zero_shot has {len(zero_shot)} entries, expected one per task ({T})")
        if T > 1:
            out["fwt"] = sum(_row(R, i - 1, i) - float(zero_shot[i]) for i in range(1, T)) / (T - 1)
        else:
            out["fwt"] = 0.0
    return out
