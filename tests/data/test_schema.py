from __future__ import annotations

import json
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pm_ray.data.readers import TrainTestOverlapWarning, load_task
from pm_ray.data.schema import TaskDataError, validate_table
from pm_ray.data.sources import load_sources


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = [{"instruction": "add", "input": "1 2", "output": "3"}, {"instruction": "add", "input": "2 2", "output": "4"}]


def test_missing_column_names_file_and_expected_columns(tmp_path):
    bad = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "x", "answer": "y"}])
    good = write_jsonl(tmp_path / "test.jsonl", GOOD)
    with pytest.raises(TaskDataError, match=r"train\.jsonl: missing column\(s\) \['output'\]") as e:
        load_task("t", "instruction", bad, good)
    assert "found ['instruction', 'answer']" in str(e.value)


def test_empty_task_split_is_rejected(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"instruction": pa.array([], pa.string()), "output": pa.array([], pa.string())}), path)
    with pytest.raises(TaskDataError, match=r"train\.parquet: empty task split"):
        load_task("t", "instruction", path, write_jsonl(tmp_path / "test.jsonl", GOOD))


def test_empty_json_list_is_rejected(tmp_path):
    path = tmp_path / "train.json"
    path.write_text("[]")
    with pytest.raises(TaskDataError, match="empty task split"):
        load_task("t", "instruction", path, write_jsonl(tmp_path / "test.jsonl", GOOD))


def test_wrong_output_type_names_row_and_column(tmp_path):
    rows = GOOD + [{"instruction": "add", "input": "3 3", "output": 6}]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(TaskDataError, match=r"train\.json, row 2, column 'output': got int 6, expected a string"):
        load_task("t", "instruction", path, write_jsonl(tmp_path / "test.jsonl", GOOD))


def test_null_instruction_names_row():
    table = pa.table({"instruction": ["a", None], "output": ["x", "y"]})
    with pytest.raises(TaskDataError, match=r"src, row 1, column 'instruction': null value"):
        validate_table(table, "instruction", source="src")


@pytest.mark.parametrize(
    "choices, message",
    [
        ("a|b", "expected a list of at least 2 distinct strings"),
        (["a"], "expected a list of at least 2 distinct strings"),
        (["a", "a"], "expected a list of at least 2 distinct strings"),
        ([1, 2], "expected a list of at least 2 distinct strings"),
        (["b", "c"], "output 'a' is not one of the choices"),
    ],
)
def test_bad_choices(choices, message):
    table = pa.table({"instruction": ["q"], "output": ["a"], "choices": pa.array([choices])})
    with pytest.raises(TaskDataError, match=rf"src, row 0, column 'choices'.*{message}"):
        validate_table(table, "instruction", source="src")


def test_choices_on_some_rows_only_is_rejected():
    table = pa.table({"instruction": ["q", "r"], "output": ["a", "a"], "choices": [["a", "b"], None]})
    with pytest.raises(TaskDataError, match=r"row 1, column 'choices'.*every row or on none"):
        validate_table(table, "instruction", source="src")


@pytest.mark.parametrize(
    "labels, bad_row, message",
    [
        ([0.5, 1.5], 0, "got float 0.5, expected a string or an integer class id"),
        ([True, False], 0, "got bool True, expected a string or an integer class id"),
        (["a", None], 1, "got NoneType None"),
        (["a", " "], 1, "empty label"),
    ],
)
def test_bad_label_type(labels, bad_row, message):
    table = pa.table({"text": ["fine text", "other"], "label": labels})
    with pytest.raises(TaskDataError, match=rf"src, row {bad_row}, column 'label': {message}"):
        validate_table(table, "classification", source="src")


def test_integer_labels_become_class_names(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "c", "label": 1}])
    task = load_task("c", "classification", train, test)
    assert task.labels == ["0", "1"]
    assert task.test.column("label").to_pylist() == ["1"]


def test_test_label_unseen_in_train_is_rejected(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "c", "label": "x"}, {"text": "d", "label": "z"}])
    with pytest.raises(TaskDataError, match=r"test\.jsonl, row 1, column 'label': label 'z' never occurs"):
        load_task("c", "classification", train, test)


def test_duplicate_task_names_are_rejected(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", GOOD)
    test = write_jsonl(tmp_path / "test.jsonl", [{"instruction": "add", "input": "5 5", "output": "10"}])
    spec = {"name": "same", "kind": "instruction", "train": str(train), "test": str(test)}
    with pytest.raises(
        TaskDataError, match=r"tasks\.files\[1\].*duplicate task name 'same' \(also tasks\.files\[0\]\)"
    ):
        load_sources([spec, dict(spec)])


def test_stream_entry_with_unknown_key_is_rejected(tmp_path):
    with pytest.raises(TaskDataError, match=r"tasks\.files\[0\].*unknown keys \['tset'\]"):
        load_sources([{"name": "a", "kind": "instruction", "train": "x", "tset": "y"}])
    with pytest.raises(TaskDataError, match="give either path .* or both train and test"):
        load_sources([{"name": "a", "kind": "instruction", "train": "x"}])


def test_unknown_kind_is_rejected(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", GOOD)
    with pytest.raises(TaskDataError, match="unknown task kind 'regression'"):
        load_task("t", "regression", train, train)


def test_train_test_overlap_warns_with_count(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", GOOD)
    test = write_jsonl(tmp_path / "test.jsonl", [GOOD[0], {"instruction": "add", "input": "9 9", "output": "18"}])
    with pytest.warns(TrainTestOverlapWarning, match="1 of 2 test examples also occur"):
        load_task("t", "instruction", train, test)


def test_no_overlap_no_warning(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", GOOD)
    test = write_jsonl(tmp_path / "test.jsonl", [{"instruction": "add", "input": "9 9", "output": "18"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_task("t", "instruction", train, test)


def test_nonexistent_and_unsupported_files(tmp_path):
    with pytest.raises(TaskDataError, match=r"nope\.jsonl: file does not exist"):
        load_task("t", "instruction", tmp_path / "nope.jsonl", tmp_path / "nope.jsonl")
    csv = tmp_path / "train.csv"
    csv.write_text("instruction,output\na,b\n")
    with pytest.raises(TaskDataError, match=r"unsupported file type '\.csv'"):
        load_task("t", "instruction", csv, csv)


def test_malformed_json_names_file(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[{"instruction": ')
    with pytest.raises(TaskDataError, match=r"train\.json: cannot parse as json"):
        load_task("t", "instruction", path, path)


def test_jsonl_with_mixed_column_types_names_file_and_column(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", GOOD + [{"instruction": "add", "input": "3 3", "output": 6}])
    with pytest.raises(TaskDataError, match=r"train\.jsonl: cannot parse as jsonl: .*output"):
        load_task("t", "instruction", path, path)
