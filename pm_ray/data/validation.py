"""The validation split: rows carved from each task's training split to choose settings on.

`tasks.validation_rows: N` holds N label-balanced rows out of every task's training split (the
model never trains on them, whichever split it is evaluated on), so a run with
`eval.split: validation` and a run with `eval.split: test` train on exactly the same rows and differ
only in what they are scored on. Choose on validation, report test.
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa

from pm_ray.data.readers import make_task
from pm_ray.data.schema import Task, TaskDataError
from pm_ray.data.subsample import hold_out

EvalSplit = Literal["test", "validation"]


def carve_validation(task: Task, rows: int, *, seed: int, evaluate_on: EvalSplit) -> Task:
    """`task` trained on its training split minus `rows` held-out rows, scored on test or on those rows.

    `rows == 0` returns the task unchanged; the config refuses eval.split=validation without rows.
    """
    if rows <= 0:
        return task
    train = task.train.to_pylist()
    if rows >= len(train):
        raise TaskDataError(
            f"tasks.validation_rows={rows}",
            f"task {task.name!r} has {len(train)} training rows: holding {rows} out leaves none to train on",
        )
    kept, held = hold_out(train, rows, seed=seed, label_key="output" if task.kind == "instruction" else "label")
    schema = task.train.schema
    scored = pa.Table.from_pylist(held, schema=schema) if evaluate_on == "validation" else task.test
    return make_task(task.name, task.kind, pa.Table.from_pylist(kept, schema=schema), scored, source=task.name)
