"""The task schema: what a task is, and validation of its tables with errors that point at the row."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pyarrow as pa

TaskKind = Literal["instruction", "classification"]
TASK_KINDS: tuple[str, ...] = ("instruction", "classification")

# Column -> (required, description of the expected value).
INSTRUCTION_COLUMNS: dict[str, tuple[bool, str]] = {
    "instruction": (True, "a non-empty string"),
    "input": (False, "a string or null"),
    "output": (True, "a string"),
    "choices": (False, "a list of at least 2 distinct strings containing the output, or null"),
    "references": (False, "a non-empty list of accepted answer strings (generation), or null"),
}
CLASSIFICATION_COLUMNS: dict[str, tuple[bool, str]] = {
    "text": (True, "a non-empty string"),
    "label": (True, "a string or an integer class id"),
}


class TaskDataError(ValueError):
    """Malformed task data. The message names the source (file), row, column and what was expected."""

    def __init__(self, source: str, message: str, *, row: int | None = None, column: str | None = None):
        where = source
        if row is not None:
            where += f", row {row}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {message}")
        self.source = source
        self.row = row
        self.column = column


@dataclass
class Task:
    """One task of a stream. `train`/`test` are validated, normalised Arrow tables.

    instruction: columns instruction (str), input (str, "" when absent), output (str),
                 and choices (list<str>) when the task is multiple-choice, or references
                 (list<str>, every accepted answer; exact match against any) for generation.
    classification: columns text (str), label (str); `labels` lists the task's classes in order.
    """

    name: str
    kind: TaskKind
    train: pa.Table
    test: pa.Table
    labels: list[str] | None = None
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def has_choices(self) -> bool:
        return self.kind == "instruction" and "choices" in self.test.column_names


def columns_for(kind: str) -> dict[str, tuple[bool, str]]:
    if kind == "instruction":
        return INSTRUCTION_COLUMNS
    if kind == "classification":
        return CLASSIFICATION_COLUMNS
    raise ValueError(f"unknown task kind {kind!r}: expected one of {list(TASK_KINDS)}")


def _check_string(
    value: object, *, source: str, row: int, column: str, expected: str, allow_null: bool, allow_empty: bool
) -> str:
    if value is None:
        if allow_null:
            return ""
        raise TaskDataError(source, f"null value, expected {expected}", row=row, column=column)
    if not isinstance(value, str):
        raise TaskDataError(
            source, f"got {type(value).__name__} {value!r}, expected {expected}", row=row, column=column
        )
    if not allow_empty and not value.strip():
        raise TaskDataError(source, f"empty string, expected {expected}", row=row, column=column)
    return value


def _check_choices(value: object, output: str, *, source: str, row: int) -> list[str] | None:
    expected = INSTRUCTION_COLUMNS["choices"][1]
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise TaskDataError(source, f"got {value!r}, expected {expected}", row=row, column="choices")
    if len(value) < 2 or len(set(value)) != len(value):
        raise TaskDataError(source, f"got {value!r}, expected {expected}", row=row, column="choices")
    if output not in value:
        raise TaskDataError(source, f"output {output!r} is not one of the choices {value!r}", row=row, column="choices")
    return value


def _check_references(value: object, *, source: str, row: int) -> list[str] | None:
    expected = INSTRUCTION_COLUMNS["references"][1]
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        raise TaskDataError(source, f"got {value!r}, expected {expected}", row=row, column="references")
    return value


def _uniform_optional(values: list, column: str, source: str) -> pa.Array | None:
    """An optional list column: present on every row (an Arrow list column) or on none (None)."""
    nulls = [i for i, c in enumerate(values) if c is None]
    if nulls and len(nulls) != len(values):
        raise TaskDataError(
            source,
            f"{column} given on some rows but null here; a task has {column} on every row or on none",
            row=nulls[0],
            column=column,
        )
    return None if nulls else pa.array(values, pa.list_(pa.string()))


def validate_table(table: pa.Table, kind: str, *, source: str) -> pa.Table:
    """Check `table` against the schema of `kind` and return it normalised (see `Task`).

    Raises TaskDataError naming `source`, the 0-based data row and the column on the first problem.
    """
    spec = columns_for(kind)
    if table.num_rows == 0:
        raise TaskDataError(source, f"empty task split: no rows (a {kind} task needs at least one)")
    missing = [c for c, (required, _) in spec.items() if required and c not in table.column_names]
    if missing:
        raise TaskDataError(
            source,
            f"missing column(s) {missing}; a {kind} task needs {[c for c, (r, _) in spec.items() if r]}"
            f" (optional: {[c for c, (r, _) in spec.items() if not r]}); found {table.column_names}",
        )
    rows = table.to_pylist()
    if kind == "instruction":
        return _normalise_instruction(rows, table.column_names, source=source)
    return _normalise_classification(rows, source=source)


def _normalise_instruction(rows: list[dict], column_names: list[str], *, source: str) -> pa.Table:
    instructions, inputs, outputs, choices, references = [], [], [], [], []
    has_choices = "choices" in column_names
    has_references = "references" in column_names
    for i, r in enumerate(rows):
        instructions.append(
            _check_string(
                r["instruction"],
                source=source,
                row=i,
                column="instruction",
                expected=INSTRUCTION_COLUMNS["instruction"][1],
                allow_null=False,
                allow_empty=False,
            )
        )
        inputs.append(
            _check_string(
                r.get("input"),
                source=source,
                row=i,
                column="input",
                expected=INSTRUCTION_COLUMNS["input"][1],
                allow_null=True,
                allow_empty=True,
            )
        )
        out = _check_string(
            r["output"],
            source=source,
            row=i,
            column="output",
            expected=INSTRUCTION_COLUMNS["output"][1],
            allow_null=False,
            allow_empty=True,
        )
        outputs.append(out)
        if has_choices:
            choices.append(_check_choices(r.get("choices"), out, source=source, row=i))
        if has_references:
            references.append(_check_references(r.get("references"), source=source, row=i))
    columns: dict[str, pa.Array] = {
        "instruction": pa.array(instructions, pa.string()),
        "input": pa.array(inputs, pa.string()),
        "output": pa.array(outputs, pa.string()),
    }
    for name, values, present in (("choices", choices, has_choices), ("references", references, has_references)):
        array = _uniform_optional(values, name, source) if present else None
        if array is not None:
            columns[name] = array
    if "choices" in columns and "references" in columns:
        raise TaskDataError(
            source, "a task has choices (multiple choice) or references (generation), not both", column="references"
        )
    return pa.table(columns)


def _normalise_classification(rows: list[dict], *, source: str) -> pa.Table:
    texts, labels = [], []
    for i, r in enumerate(rows):
        texts.append(
            _check_string(
                r["text"],
                source=source,
                row=i,
                column="text",
                expected=CLASSIFICATION_COLUMNS["text"][1],
                allow_null=False,
                allow_empty=False,
            )
        )
        label = r["label"]
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise TaskDataError(
                source,
                f"got {type(label).__name__} {label!r}, expected {CLASSIFICATION_COLUMNS['label'][1]}",
                row=i,
                column="label",
            )
        if isinstance(label, str) and not label.strip():
            raise TaskDataError(source, "empty label, expected a non-empty class name", row=i, column="label")
        labels.append(str(label))
    return pa.table({"text": pa.array(texts, pa.string()), "label": pa.array(labels, pa.string())})


def example_key(row: dict, kind: str) -> tuple[str, ...]:
    """The identity of an example's input, used for train/test overlap checks."""
    if kind == "instruction":
        return (row["instruction"].strip(), (row.get("input") or "").strip())
    return (row["text"].strip(),)
