"""Deterministic, label-balanced train/test subsets of one pool of examples.

For a single-file source (a BIG-bench or SuperNI task) the test split is drawn first, then the
training split from the rest, so the two never share an input. Draws are balanced across labels
(round robin over the labels in sorted order, each label's examples in a seeded shuffle): with
enough examples every label gets ⌊n/L⌋ or ⌈n/L⌉ rows; a label with too few rows gives all it has
and the others fill in. The label of a row is its output for multiple-choice rows and for
generation tasks with few distinct outputs (≤ `MAX_LABELS`), its `label` for classification rows
(`text`, `label`); other generation tasks are drawn uniformly. The same (rows, seed, sizes) always give the same subsets.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

from pm_ray.data.schema import TaskDataError

MAX_LABELS = 32
Row = dict[str, Any]


def _key(row: Row) -> tuple[str, str]:
    if "text" in row and "instruction" not in row:  # a classification row
        return (str(row["text"]).strip(), "")
    return (str(row["instruction"]).strip(), str(row.get("input") or "").strip())


def dedupe(rows: list[Row]) -> list[Row]:
    """First occurrence of each (instruction, input), or text: a repeated input would leak across splits."""
    seen: set[tuple[str, str]] = set()
    out = []
    for row in rows:
        key = _key(row)
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def label_of(rows: list[Row]) -> list[str] | None:
    """Per-row labels used for balancing, or None when the task is open-ended generation."""
    if "label" in rows[0] and "output" not in rows[0]:
        return [str(r["label"]) for r in rows]
    outputs = [str(r["output"]) for r in rows]
    if "choices" in rows[0] or len(set(outputs)) <= MAX_LABELS:
        return outputs
    return None


def balanced_take(indices: list[int], labels: list[str] | None, count: int | None, rng: random.Random) -> list[int]:
    """`count` of `indices` (all when None), balanced over `labels`, in a seeded order."""
    pool = list(indices)
    rng.shuffle(pool)
    if count is None or count >= len(pool):
        return pool
    if labels is None:
        return pool[:count]
    groups: dict[str, list[int]] = defaultdict(list)
    for i in pool:
        groups[labels[i]].append(i)
    queues = [groups[k] for k in sorted(groups)]
    taken: list[int] = []
    depth = 0
    while len(taken) < count:
        for queue in queues:
            if depth < len(queue) and len(taken) < count:
                taken.append(queue[depth])
        depth += 1
    rng.shuffle(taken)
    return taken


def split_rows(
    rows: list[Row], *, max_train: int | None, max_test: int, seed: int, source: str
) -> tuple[list[Row], list[Row]]:
    """(train, test) subsets of `rows`: test first, then train from the remaining examples."""
    rows = dedupe(rows)
    if len(rows) < 2:
        raise TaskDataError(source, f"{len(rows)} distinct example(s): a task needs at least 2 to split")
    if max_test >= len(rows):
        raise TaskDataError(source, f"max_test={max_test} leaves no training rows ({len(rows)} distinct examples)")
    labels = label_of(rows)
    rng = random.Random(f"pm-ray-split/{seed}")
    test = balanced_take(list(range(len(rows))), labels, max_test, rng)
    chosen = set(test)
    train = balanced_take([i for i in range(len(rows)) if i not in chosen], labels, max_train, rng)
    return [rows[i] for i in train], [rows[i] for i in test]


def subsample(rows: list[Row], count: int | None, *, seed: int) -> list[Row]:
    """A balanced subset of an existing split (files that come with their own train/test)."""
    if count is None or count >= len(rows):
        return rows
    labels = label_of(rows)
    take = balanced_take(list(range(len(rows))), labels, count, random.Random(f"pm-ray-subsample/{seed}"))
    return [rows[i] for i in take]


def hold_out(rows: list[Row], count: int, *, seed: int, label_key: str = "output") -> tuple[list[Row], list[Row]]:
    """(kept, held): `count` label-balanced rows held out of a training split, both in their order.

    The validation split that settings are chosen on: drawn from the training rows only, so the
    test rows stay untouched, and the same (rows, count, seed) always hold out the same rows.
    """
    if label_key == "output":
        labels = label_of(rows)
    else:
        labels = [str(r[label_key]) for r in rows]
    held = set(balanced_take(list(range(len(rows))), labels, count, random.Random(f"pm-ray-validation/{seed}")))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]
