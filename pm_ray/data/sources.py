"""Task sources: one entry of `tasks.files` (any supported format) -> a validated `Task`.

An entry is a mapping:
    name, kind (instruction | classification),
    format: auto | jsonl | parquet | alpaca | trace | bigbench | superni,
    train + test (one file per split), or path (one file holding every example, split here:
        the test rows first, then the training rows, never sharing an input),
    max_train, max_test, seed (deterministic, label-balanced subsets; see `subsample`),
    choices_in_prompt (auto | list | hide; BIG-bench multiple choice), instruction_part (full |
    prompt: a Natural Instructions prefix's short `Prompt:` line), positive_examples (SuperNI).
`path: bigbench:<task>` (e.g. bigbench:fact_checker/fever) reads that task.json from the cached
BIG-bench archive (downloaded once per machine, see `bigbench.fetch_archive`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from pm_ray.data import bigbench
from pm_ray.data.readers import _read_json_records, make_task, read_table
from pm_ray.data.schema import TASK_KINDS, Task, TaskDataError
from pm_ray.data.subsample import split_rows, subsample
from pm_ray.data.superni import read_superni, superni_rows

FORMATS: tuple[str, ...] = ("auto", "jsonl", "parquet", "alpaca", "trace", "bigbench", "superni")
SOURCE_KEYS: dict[str, Any] = {
    "name": None,
    "kind": "instruction",
    "format": "auto",
    "train": None,
    "test": None,
    "path": None,
    "max_train": None,
    "max_test": None,
    "seed": 0,
    "choices_in_prompt": "auto",
    "positive_examples": 0,
    "instruction_part": "full",
}
DEFAULT_MAX_TEST = 200  # a single-file source without max_test: 200 test rows
BIGBENCH_SCHEME = "bigbench:"


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (instruction, input, output, optional choices/references) as an Arrow table."""
    columns = ["instruction", "input", "output"] + [c for c in ("choices", "references") if c in rows[0]]
    types = {"choices": pa.list_(pa.string()), "references": pa.list_(pa.string())}
    return pa.table({c: pa.array([r.get(c) for r in rows], types.get(c, pa.string())) for c in columns})


def _detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".jsonl"):
        return suffix[1:]
    if suffix == ".json" and path.is_file():
        try:
            head = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise TaskDataError(str(path), f"cannot parse as JSON: {err}") from err
        if isinstance(head, dict) and "examples" in head:
            return "bigbench"
        if isinstance(head, dict) and "Instances" in head:
            return "superni"
        return "alpaca"
    raise TaskDataError(str(path), f"cannot tell the format from {suffix!r}: set format to one of {list(FORMATS[1:])}")


def _read_rows(ref: str, fmt: str, spec: dict[str, Any]) -> list[dict[str, Any]] | pa.Table:
    """A file's examples: instruction rows for bigbench/superni, an Arrow table for the others."""
    if ref.startswith(BIGBENCH_SCHEME):
        task = ref[len(BIGBENCH_SCHEME) :]
        data = bigbench.read_tasks([task])[task]
        return bigbench.bigbench_rows(
            data, source=ref, choices_in_prompt=spec["choices_in_prompt"], instruction_part=spec["instruction_part"]
        )
    path = Path(ref).expanduser()
    if not path.exists():
        raise TaskDataError(str(path), "file does not exist")
    fmt = _detect_format(path) if fmt == "auto" else fmt
    if fmt == "bigbench":
        return bigbench.bigbench_rows(
            bigbench.read_task_file(path),
            source=str(path),
            choices_in_prompt=spec["choices_in_prompt"],
            instruction_part=spec["instruction_part"],
        )
    if fmt == "superni":
        return read_superni(path, positive_examples=spec["positive_examples"])
    if fmt in ("alpaca", "trace"):
        try:
            return _read_json_records(path)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TaskDataError(str(path), f"cannot parse as JSON: {err}") from err
    if fmt in ("jsonl", "parquet") and path.suffix.lower() != f".{fmt}":
        raise TaskDataError(str(path), f"format {fmt!r} expects a .{fmt} file")
    return read_table(path)


def _as_rows(data: list[dict[str, Any]] | pa.Table) -> list[dict[str, Any]]:
    return data.to_pylist() if isinstance(data, pa.Table) else data


def _as_table(data: list[dict[str, Any]] | pa.Table, kind: str) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    return rows_to_table(data) if kind == "instruction" else pa.Table.from_pylist(data)


def normalise_spec(spec: Any, index: int) -> dict[str, Any]:
    """Defaults filled in and every field checked; errors name the entry and the field."""
    where = f"tasks.files[{index}]"
    if not isinstance(spec, dict):
        raise TaskDataError(where, f"expected a mapping with keys {list(SOURCE_KEYS)}, got {type(spec).__name__}")
    unknown = [k for k in spec if k not in SOURCE_KEYS]
    if unknown:
        raise TaskDataError(where, f"unknown keys {unknown}; expected some of {list(SOURCE_KEYS)}")
    out = {**SOURCE_KEYS, **{k: v for k, v in spec.items() if v is not None or k in ("max_train", "max_test")}}
    if not isinstance(out["name"], str) or not out["name"].strip():
        raise TaskDataError(where, f"name must be a non-empty string, got {out['name']!r}")
    if out["kind"] not in TASK_KINDS:
        raise TaskDataError(where, f"kind {out['kind']!r}: expected one of {list(TASK_KINDS)}")
    if out["format"] not in FORMATS:
        raise TaskDataError(where, f"format {out['format']!r}: expected one of {list(FORMATS)}")
    single, pair = out["path"] is not None, (out["train"], out["test"]) != (None, None)
    if single == pair or (pair and None in (out["train"], out["test"])):
        raise TaskDataError(where, "give either path (one file, split here) or both train and test files")
    for key in ("max_train", "max_test"):
        if out[key] is not None and (not isinstance(out[key], int) or out[key] < 1):
            raise TaskDataError(where, f"{key} must be a positive integer or null, got {out[key]!r}")
    return out


def load_source(spec: dict[str, Any]) -> Task:
    """Read, split/subsample and validate one normalised source entry into a Task."""
    name, kind, fmt = spec["name"], spec["kind"], spec["format"]
    if spec["path"] is not None:
        source = str(spec["path"])
        rows = _as_rows(_read_rows(source, fmt, spec))
        if not rows:
            raise TaskDataError(source, "no examples")
        train, test = split_rows(
            rows,
            max_train=spec["max_train"],
            max_test=spec["max_test"] or DEFAULT_MAX_TEST,
            seed=spec["seed"],
            source=source,
        )
        return make_task(name, kind, _as_table(train, kind), _as_table(test, kind), source=source)
    tables = []
    for split in ("train", "test"):
        data = _read_rows(str(spec[split]), fmt, spec)
        limit = spec[f"max_{split}"]
        if limit is not None:
            data = subsample(_as_rows(data), limit, seed=spec["seed"])
        tables.append(_as_table(data, kind))
    return make_task(name, kind, tables[0], tables[1], source=f"{spec['train']} + {spec['test']}")


def load_sources(specs: list[Any]) -> list[Task]:
    """The ordered task stream of `tasks.files`; names must be unique."""
    if not specs:
        raise ValueError("task stream is empty: expected a list of task entries")
    normalised = [normalise_spec(s, i) for i, s in enumerate(specs)]
    seen: dict[str, int] = {}
    for i, spec in enumerate(normalised):
        if spec["name"] in seen:
            raise TaskDataError(
                f"tasks.files[{i}]", f"duplicate task name {spec['name']!r} (also tasks.files[{seen[spec['name']]}])"
            )
        seen[spec["name"]] = i
    archived = [
        ref[len(BIGBENCH_SCHEME) :]
        for spec in normalised
        for ref in (spec["path"], spec["train"], spec["test"])
        if isinstance(ref, str) and ref.startswith(BIGBENCH_SCHEME)
    ]
    if archived:  # every BIG-bench task not read before, in one pass over the archive
        bigbench.read_tasks(archived)
    return [load_source(s) for s in normalised]


__all__ = ["FORMATS", "load_source", "load_sources", "normalise_spec", "rows_to_table", "superni_rows"]
