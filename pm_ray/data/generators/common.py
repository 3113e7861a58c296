"""Helpers shared by the generators."""

from __future__ import annotations

import random
from typing import Callable

Row = dict[str, object]


def unique_rows(
    make: Callable[[random.Random], Row], rng: random.Random, count: int, *, max_tries_factor: int = 50
) -> list[Row]:
    """`count` rows with pairwise distinct (instruction, input), drawn with `make(rng)`."""
    seen: set[tuple[str, str]] = set()
    rows: list[Row] = []
    tries = 0
    while len(rows) < count:
        tries += 1
        if tries > count * max_tries_factor:
            raise ValueError(f"could only generate {len(rows)} distinct examples of {count} requested")
        row = make(rng)
        key = (str(row["instruction"]), str(row.get("input", "")))
        if key not in seen:
            seen.add(key)
            rows.append(row)
    return rows
