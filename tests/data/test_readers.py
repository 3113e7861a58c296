from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from pm_ray.data.readers import load_task, read_table
from pm_ray.data.sources import load_sources

ROWS = [{"instruction": "Say hi", "input": "", "output": "hi"}, {"instruction": "Add", "input": "2 3", "output": "5"}]
TEST = [{"instruction": "Add", "input": "4 4", "output": "8"}]


def expected(rows):
    return [{"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]} for r in rows]


def test_parquet_reader(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "train.parquet")
    pq.write_table(pa.Table.from_pylist(TEST), tmp_path / "test.parquet")
    task = load_task("p", "instruction", tmp_path / "train.parquet", tmp_path / "test.parquet")
    assert task.train.to_pylist() == expected(ROWS)
    assert task.test.to_pylist() == expected(TEST)
    assert not task.has_choices


def test_jsonl_reader_fills_missing_input(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps({k: v for k, v in r.items() if v}) for r in ROWS))
    (tmp_path / "test.jsonl").write_text(json.dumps(TEST[0]) + "\n")
    task = load_task("j", "instruction", tmp_path / "train.jsonl", tmp_path / "test.jsonl")
    assert task.train.to_pylist() == expected(ROWS)


def test_alpaca_json_reader(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps(ROWS))
    (tmp_path / "test.json").write_text(json.dumps({"data": TEST}))
    task = load_task("a", "instruction", tmp_path / "train.json", tmp_path / "test.json")
    assert task.train.to_pylist() == expected(ROWS)
    assert task.test.to_pylist() == expected(TEST)


def test_trace_json_prompt_answer_layout(tmp_path):
    trace = [{"prompt": "Translate: hallo", "answer": "hello"}, {"prompt": "Translate: welt", "answer": "world"}]
    (tmp_path / "train.json").write_text(json.dumps(trace))
    (tmp_path / "test.json").write_text(json.dumps(trace[:1]).replace("hallo", "tschuss").replace("hello", "bye"))
    table = read_table(tmp_path / "train.json")
    assert table.column_names == ["instruction", "output"]
    task = load_task("trace", "instruction", tmp_path / "train.json", tmp_path / "test.json")
    assert task.train.to_pylist() == [
        {"instruction": "Translate: hallo", "input": "", "output": "hello"},
        {"instruction": "Translate: welt", "input": "", "output": "world"},
    ]


def test_choices_column_is_kept(tmp_path):
    rows = [
        {"instruction": "Pick", "output": "b", "choices": ["a", "b"]},
        {"instruction": "Pick again", "output": "a", "choices": ["a", "b", "c"]},
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "test.jsonl").write_text(json.dumps({"instruction": "Pick 3", "output": "c", "choices": ["c", "d"]}))
    task = load_task("c", "instruction", tmp_path / "train.jsonl", tmp_path / "test.jsonl")
    assert task.has_choices
    assert task.train.column("choices").to_pylist() == [["a", "b"], ["a", "b", "c"]]


def test_load_sources_keeps_order_and_kinds(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    (tmp_path / "b.jsonl").write_text(json.dumps(TEST[0]))
    (tmp_path / "c_train.jsonl").write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
    (tmp_path / "c_test.jsonl").write_text('{"text": "fine", "label": "pos"}\n')
    tasks = load_sources(
        [
            {
                "name": "second",
                "kind": "instruction",
                "train": str(tmp_path / "a.jsonl"),
                "test": str(tmp_path / "b.jsonl"),
            },
            {
                "name": "first",
                "kind": "classification",
                "train": str(tmp_path / "c_train.jsonl"),
                "test": str(tmp_path / "c_test.jsonl"),
            },
        ]
    )
    assert [t.name for t in tasks] == ["second", "first"]
    assert [t.kind for t in tasks] == ["instruction", "classification"]
    assert tasks[1].labels == ["neg", "pos"]
