"""Read task files (Parquet, JSONL, Alpaca/TRACE JSON) into validated `Task`s and task streams."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from pm_ray.data.schema import TASK_KINDS, Task, TaskDataError, example_key, validate_table

# TRACE (Wang et al. 2023) stores [{"prompt": ..., "answer": ...}]; Alpaca stores
# [{"instruction": ..., "input": ..., "output": ...}]. Both map onto the instruction schema.
TRACE_RENAMES: dict[str, str] = {"prompt": "instruction", "answer": "output"}


class TrainTestOverlapWarning(UserWarning):
    """Some test inputs also occur in the training split of the same task."""


def read_table(path: str | Path) -> pa.Table:
    """Read one split file into an Arrow table (not yet validated against a task kind).

    .parquet -> pyarrow; .jsonl -> pyarrow JSON (one object a line); .json -> a list of objects
    (Alpaca layout, or TRACE's prompt/answer, renamed to instruction/output), or {"data": [...]}.
    """
    p = Path(path)
    source = str(p)
    if not p.exists():
        raise TaskDataError(source, "file does not exist")
    if not p.is_file():
        raise TaskDataError(source, "not a file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".parquet":
            return pq.read_table(p)
        if suffix == ".jsonl":
            if p.stat().st_size == 0:
                raise TaskDataError(source, "empty file: expected one JSON object per line")
            return pa_json.read_json(p)
        if suffix == ".json":
            return _read_json_records(p)
    except TaskDataError:
        raise
    except (pa.ArrowInvalid, json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise TaskDataError(source, f"cannot parse as {suffix[1:]}: {e}") from e
    raise TaskDataError(source, f"unsupported file type {suffix!r}: expected .parquet, .jsonl or .json")


def _read_json_records(p: Path) -> pa.Table:
    source = str(p)
    with p.open(encoding="utf-8") as f:
        data: Any = json.load(f)
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise TaskDataError(source, f"expected a JSON list of objects (Alpaca/TRACE layout), got {type(data).__name__}")
    if not data:
        raise TaskDataError(source, "empty task split: the JSON list has no rows")
    records: list[dict[str, Any]] = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise TaskDataError(source, f"expected a JSON object, got {type(rec).__name__}", row=i)
        if "instruction" not in rec and "prompt" in rec:
            rec = {TRACE_RENAMES.get(k, k): v for k, v in rec.items()}
        records.append(rec)
    keys: list[str] = []
    for rec in records:
        keys.extend(k for k in rec if k not in keys)
    return pa.table({k: _json_column(source, k, [rec.get(k) for rec in records]) for k in keys})


_JSON_TYPE_NAMES: dict[type, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    list: "a list",
    dict: "an object",
}


def _json_column(source: str, column: str, values: list[Any]) -> pa.Array:
    """One Arrow column from JSON values; a value whose JSON type differs from the column's first
    non-null value is reported with its row (Arrow cannot hold mixed types)."""
    first = next(((i, v) for i, v in enumerate(values) if v is not None), None)
    if first is not None:
        i0, v0 = first
        for i, v in enumerate(values):
            if v is not None and type(v) is not type(v0):
                raise TaskDataError(
                    source,
                    f"got {type(v).__name__} {v!r}, expected "
                    f"{_JSON_TYPE_NAMES.get(type(v0), type(v0).__name__)} like row {i0}",
                    row=i,
                    column=column,
                )
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        bad = next((i for i, v in enumerate(values) if v is not None and _arrow_rejects(v)), None)
        raise TaskDataError(source, f"cannot convert values to one Arrow type: {e}", row=bad, column=column) from e


def _arrow_rejects(value: Any) -> bool:
    try:
        pa.array([value])
        return False
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return True


def _read_split(path: str | Path, kind: str) -> pa.Table:
    try:
        table = read_table(path)
    except pa.ArrowInvalid as e:  # mixed types inside a JSON column etc.
        raise TaskDataError(str(path), f"cannot read: {e}") from e
    return validate_table(table, kind, source=str(path))


def make_task(name: str, kind: str, train: pa.Table, test: pa.Table, *, source: str = "") -> Task:
    """Validate in-memory tables into a Task (labels collected for classification)."""
    if kind not in TASK_KINDS:
        raise TaskDataError(source or name, f"unknown task kind {kind!r}: expected one of {list(TASK_KINDS)}")
    train_t = validate_table(train, kind, source=f"{source or name}/train")
    test_t = validate_table(test, kind, source=f"{source or name}/test")
    return _finish_task(
        name, kind, train_t, test_t, train_source=f"{source or name}/train", test_source=f"{source or name}/test"
    )


def load_task(name: str, kind: str, train_path: str | Path, test_path: str | Path) -> Task:
    """Read and validate one task's train and test files."""
    if kind not in TASK_KINDS:
        raise TaskDataError(f"task {name!r}", f"unknown task kind {kind!r}: expected one of {list(TASK_KINDS)}")
    train = _read_split(train_path, kind)
    test = _read_split(test_path, kind)
    return _finish_task(name, kind, train, test, train_source=str(train_path), test_source=str(test_path))


def _finish_task(name: str, kind: str, train: pa.Table, test: pa.Table, *, train_source: str, test_source: str) -> Task:
    labels: list[str] | None = None
    if kind == "instruction":
        if ("choices" in train.column_names) != ("choices" in test.column_names):
            raise TaskDataError(
                test_source,
                "choices must be present in both train and test or in neither "
                f"(train {train_source} has them: {'choices' in train.column_names})",
                column="choices",
            )
    else:
        labels = sorted(set(train.column("label").to_pylist()))
        unseen = sorted(set(test.column("label").to_pylist()) - set(labels))
        if unseen:
            row = test.column("label").to_pylist().index(unseen[0])
            raise TaskDataError(
                test_source,
                f"label {unseen[0]!r} never occurs in the training split {train_source} (its labels: {labels})",
                row=row,
                column="label",
            )
    _warn_overlap(name, kind, train, test)
    return Task(name=name, kind=kind, train=train, test=test, labels=labels)  # type: ignore[arg-type]


def _warn_overlap(name: str, kind: str, train: pa.Table, test: pa.Table) -> int:
    train_keys = {example_key(r, kind) for r in train.to_pylist()}
    overlap = sum(example_key(r, kind) in train_keys for r in test.to_pylist())
    if overlap:
        warnings.warn(
            f"task {name!r}: {overlap} of {test.num_rows} test examples also occur in the "
            "training split (identical inputs)",
            TrainTestOverlapWarning,
            stacklevel=3,
        )
    return overlap
