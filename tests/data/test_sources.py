"""BIG-bench / SuperNI readers, every tasks.files format, deterministic balanced subsets."""

from __future__ import annotations

import collections
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pm_ray.data import bigbench
from pm_ray.data.schema import TaskDataError
from pm_ray.data.sources import load_sources
from pm_ray.data.subsample import split_rows

LABELS = ["play_music", "get_weather", "book_restaurant"]


def bigbench_mc(n: int = 60, append: bool | None = None) -> dict:
    examples = [
        {"input": f"Utterance: request number {i}", "target_scores": {lab: int(lab == LABELS[i % 3]) for lab in LABELS}}
        for i in range(n)
    ]
    task = {"name": "intent", "task_prefix": "Predict the intent of the utterance.\n", "examples": examples}
    if append is not None:
        task["append_choices_to_input"] = append
    return task


def bigbench_gen(n: int = 40) -> dict:
    return {
        "description": "Answer the question.",
        "examples": [{"input": f"What is {i} plus one?", "target": [str(i + 1), f"{i + 1}."]} for i in range(n)],
    }


def superni(n: int = 30) -> dict:
    return {
        "Definition": ["Write the word backwards."],
        "Positive Examples": [{"input": "abc", "output": "cba", "explanation": "reversed"}],
        "Instances": [{"id": f"t-{i}", "input": f"word{i}", "output": [f"{i}drow"]} for i in range(n)],
    }


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def write_archive(path: Path, tasks: dict[str, dict]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in tasks.items():
            raw = json.dumps(data).encode()
            info = tarfile.TarInfo(f"{bigbench.TASKS_ROOT}/{name}/task.json")
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))
    return path


def test_bigbench_multiple_choice_rows_follow_bigbench() -> None:
    rows = bigbench.bigbench_rows(bigbench_mc(3), source="t")
    assert rows[1] == {
        "instruction": "Predict the intent of the utterance.",
        "input": "Utterance: request number 1\n  choice: play_music\n  choice: get_weather\n  choice: book_restaurant",
        "output": "get_weather",
        "choices": LABELS,
    }
    hidden = bigbench.bigbench_rows(bigbench_mc(3, append=False), source="t")
    assert hidden[1]["input"] == "Utterance: request number 1"  # the task's own append_choices_to_input
    forced = bigbench.bigbench_rows(bigbench_mc(3, append=False), source="t", choices_in_prompt="list")
    assert forced[1]["input"] == rows[1]["input"]
    assert (
        bigbench.bigbench_rows(bigbench_mc(3), source="t", choices_in_prompt="hide")[1]["input"] == hidden[1]["input"]
    )


def test_bigbench_generation_and_ni_prompt() -> None:
    rows = bigbench.bigbench_rows(bigbench_gen(2), source="t")
    assert rows[1] == {
        "instruction": "Answer the question.",
        "input": "What is 1 plus one?",
        "output": "2",
        "references": ["2", "2."],
    }
    ni = {
        "task_prefix": "Definition: Long text. Things to Avoid: x. Prompt: Answer briefly.",
        "examples": [{"input": "q", "target": "a"}],
    }
    assert bigbench.bigbench_rows(ni, source="t", instruction_part="prompt")[0]["instruction"] == "Answer briefly."
    with pytest.raises(TaskDataError, match="Prompt:"):
        bigbench.bigbench_rows(bigbench_gen(2), source="t", instruction_part="prompt")


@pytest.mark.parametrize(
    "example,needle",
    [
        ({"input": "x", "target_scores": {"a": 1, "b": 1}}, "exactly one best choice"),
        ({"input": "x", "target_scores": {"a": 1}}, "at least 2 choices"),
        ({"input": "", "target": "a"}, "'input' must be a non-empty string"),
        ({"input": "x"}, "expected 'target'"),
        ({"input": "x", "target": [3]}, "expected 'target'"),
    ],
)
def test_malformed_bigbench_names_file_and_example(tmp_path, example, needle) -> None:
    task = bigbench_mc(5)
    task["examples"][3] = example
    path = write_json(tmp_path / "task.json", task)
    with pytest.raises(TaskDataError, match="example 3") as err:
        load_sources([{"name": "t", "path": str(path), "format": "bigbench", "max_test": 2}])
    assert str(path) in str(err.value) and needle in str(err.value)


def test_malformed_superni_names_file_and_instance(tmp_path) -> None:
    data = superni(5)
    data["Instances"][2]["output"] = []
    path = write_json(tmp_path / "task001.json", data)
    with pytest.raises(TaskDataError, match=r"task001\.json, instance 2: 'output' must be a non-empty list"):
        load_sources([{"name": "t", "path": str(path), "max_test": 2}])
    with pytest.raises(TaskDataError, match="'Definition'"):
        load_sources(
            [
                {
                    "name": "t",
                    "path": str(write_json(tmp_path / "d.json", {**data, "Definition": []})),
                    "format": "superni",
                    "max_test": 2,
                }
            ]
        )


def test_superni_rows_and_positive_examples(tmp_path) -> None:
    path = write_json(tmp_path / "task001.json", superni(30))
    [task] = load_sources([{"name": "rev", "path": str(path), "max_test": 10, "max_train": 12}])
    assert (task.train.num_rows, task.test.num_rows) == (12, 10)
    row = task.test.to_pylist()[0]
    assert row["instruction"] == "Write the word backwards." and row["references"] == [row["output"]]
    [shot] = load_sources(
        [{"name": "rev", "path": str(path), "format": "superni", "max_test": 10, "positive_examples": 1}]
    )
    assert shot.test.to_pylist()[0]["instruction"].endswith("Positive Example 1 -\nInput: abc\nOutput: cba")


def test_archive_reader_reads_members_without_extracting(tmp_path, monkeypatch) -> None:
    archive = write_archive(tmp_path / bigbench.ARCHIVE_NAME, {"intent": bigbench_mc(40), "plus/one": bigbench_gen(30)})
    found = bigbench.read_archive_tasks(archive, ["plus/one", "intent"])
    assert set(found) == {"plus/one", "intent"} and len(found["intent"]["examples"]) == 40
    with pytest.raises(TaskDataError, match="no task.json for \\['missing'\\]"):
        bigbench.read_archive_tasks(archive, ["missing"])
    # `bigbench:<task>` paths read the cached archive (no download when it is there)
    monkeypatch.setenv("PM_RAY_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "archives").mkdir(parents=True)
    archive.rename(tmp_path / "cache" / "archives" / bigbench.ARCHIVE_NAME)
    tasks = load_sources(
        [
            {"name": "intent", "path": "bigbench:intent", "max_test": 9, "max_train": 12},
            {"name": "plus", "path": "bigbench:plus/one", "max_test": 5},
        ]
    )
    assert [t.name for t in tasks] == ["intent", "plus"] and tasks[0].has_choices and not tasks[1].has_choices
    assert tasks[1].train.num_rows == 25  # max_train unset: every remaining example
    # both task.json files were read out in that one pass and kept: later loads never open the archive
    kept = bigbench.members_dir(tmp_path / "cache" / "archives" / bigbench.ARCHIVE_NAME)
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("task.json")) == [
        "intent/task.json",
        "plus/one/task.json",
    ]
    (tmp_path / "cache" / "archives" / bigbench.ARCHIVE_NAME).write_bytes(b"not a gzip file")
    again = load_sources([{"name": "intent", "path": "bigbench:intent", "max_test": 9, "max_train": 12}])
    assert again[0].test.equals(tasks[0].test) and again[0].train.equals(tasks[0].train)


def test_split_is_deterministic_disjoint_and_balanced() -> None:
    rows = bigbench.bigbench_rows(bigbench_mc(300), source="t")
    rows = rows[:200] + [r for r in rows[200:] if r["output"] != "book_restaurant"]  # imbalance the pool
    train, test = split_rows(rows, max_train=90, max_test=60, seed=3, source="t")
    again = split_rows(rows, max_train=90, max_test=60, seed=3, source="t")
    assert (train, test) == again
    assert split_rows(rows, max_train=90, max_test=60, seed=4, source="t") != (train, test)
    assert not {r["input"] for r in train} & {r["input"] for r in test}
    assert collections.Counter(r["output"] for r in test) == {lab: 20 for lab in LABELS}
    assert collections.Counter(r["output"] for r in train) == {lab: 30 for lab in LABELS}
    # a label with too few rows gives all it has; the others fill in
    small, _ = split_rows(rows, max_train=None, max_test=240, seed=0, source="t")
    counts = collections.Counter(r["output"] for r in _)
    assert counts["book_restaurant"] == 66 and sum(counts.values()) == 240


@pytest.mark.parametrize(
    "fmt,suffix",
    [("jsonl", ".jsonl"), ("parquet", ".parquet"), ("alpaca", ".json"), ("trace", ".json"), ("auto", ".jsonl")],
)
def test_split_file_formats(tmp_path, fmt, suffix) -> None:
    records = [{"instruction": "Say the number.", "input": str(i), "output": str(i)} for i in range(20)]
    paths = {}
    for split in ("train", "test"):
        path = tmp_path / f"{split}{suffix}"
        chunk = records[:14] if split == "train" else records[14:]
        if suffix == ".parquet":
            pq.write_table(pa.Table.from_pylist(chunk), path)
        elif suffix == ".jsonl":
            path.write_text("\n".join(json.dumps(r) for r in chunk))
        elif fmt == "trace":
            write_json(path, [{"prompt": r["input"], "answer": r["output"]} for r in chunk])
        else:
            write_json(path, chunk)
        paths[split] = str(path)
    [task] = load_sources([{"name": "n", "format": fmt, **paths, "max_train": 10, "seed": 1}])
    assert (task.train.num_rows, task.test.num_rows) == (10, 6)
    [again] = load_sources([{"name": "n", "format": fmt, **paths, "max_train": 10, "seed": 1}])
    assert task.train.equals(again.train)


def test_format_mismatch_and_bad_entries(tmp_path) -> None:
    path = write_json(tmp_path / "x.json", [{"instruction": "a", "output": "b"}])
    with pytest.raises(TaskDataError, match="format 'parquet' expects a .parquet file"):
        load_sources([{"name": "n", "format": "parquet", "train": str(path), "test": str(path)}])
    with pytest.raises(TaskDataError, match="give either path"):
        load_sources([{"name": "n", "path": str(path), "train": str(path)}])
    with pytest.raises(TaskDataError, match=r"tasks.files\[1\]: duplicate task name 'n'"):
        load_sources([{"name": "n", "path": str(path)}, {"name": "n", "path": str(path)}])


def test_bbni_suite_builds_deterministically_from_the_archive(tmp_path, monkeypatch) -> None:
    """The bbni builder over a fixture archive with the suite's member names: same hashes twice,
    the cache is reused, and the sizes of the quick variant hold."""
    from pm_ray.data.bbni import BBNI_TASKS, CANDIDATES, SIZES
    from pm_ray.data.suites import build_suite

    members = {}
    for name in BBNI_TASKS:
        member = CANDIDATES[name]["path"].removeprefix("bigbench:")
        if "natural_instructions" in member:
            data = bigbench_gen(400)
            data["task_prefix"] = f"Definition: long {name}. Prompt: Answer {name}."
        else:
            data = bigbench_mc(400)
        members[member] = data
    cache = tmp_path / "cache"
    (cache / "archives").mkdir(parents=True)
    write_archive(cache / "archives" / bigbench.ARCHIVE_NAME, members)
    monkeypatch.setenv("PM_RAY_CACHE", str(cache))
    first = build_suite("bbni", variant="quick", cache_dir=tmp_path / "a")
    second = build_suite("bbni", variant="quick", cache_dir=tmp_path / "b")
    manifests = [json.loads((tmp_path / d / "bbni-quick-seed0" / "manifest.json").read_text()) for d in "ab"]
    assert manifests[0]["tasks"] == manifests[1]["tasks"]
    assert [t.name for t in first] == list(BBNI_TASKS)
    for a, b in zip(first, second):
        assert a.train.equals(b.train) and a.test.equals(b.test)
        assert (a.train.num_rows, a.test.num_rows) == SIZES["quick"]
    assert first[1].test.to_pylist()[0]["instruction"] == "Answer qasc_answer."  # the NI Prompt: line
    listed = build_suite("bbni", variant="quick", cache_dir=tmp_path / "a", choices_in_prompt="hide")
    assert (
        "choice:" in first[0].test.to_pylist()[0]["input"] and "choice:" not in listed[0].test.to_pylist()[0]["input"]
    )
    assert (tmp_path / "a" / "bbni-quick-seed0-choices-hide" / "manifest.json").exists()


def _serve_registry(root: Path, listing: dict):
    """A real HTTP server on 127.0.0.1 serving `root` plus a PEP 691 JSON listing of bigbench."""
    import http.server
    import threading

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path == "/simple/bigbench/":
                body = json.dumps(listing).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/vnd.pypi.simple.v1+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("hash_ok", [True, False])
def test_fetch_archive_checks_the_registry_sha256_and_writes_atomically(tmp_path, monkeypatch, hash_ok) -> None:
    import hashlib

    served = tmp_path / "served"
    served.mkdir()
    archive = write_archive(served / bigbench.ARCHIVE_NAME, {"intent": bigbench_mc(10)})
    digest = hashlib.sha256(archive.read_bytes()).hexdigest() if hash_ok else "0" * 64
    listing = {
        "files": [{"filename": bigbench.ARCHIVE_NAME, "url": f"/{bigbench.ARCHIVE_NAME}", "hashes": {"sha256": digest}}]
    }
    server = _serve_registry(served, listing)
    try:
        monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_port}/simple")
        cache = tmp_path / "cache"
        if hash_ok:
            got = bigbench.fetch_archive(cache, quiet=True)
            assert got.read_bytes() == archive.read_bytes()
            assert bigbench.read_archive_tasks(got, ["intent"])["intent"]["examples"]
        else:
            with pytest.raises(TaskDataError, match="does not match the registry.s 0{64}"):
                bigbench.fetch_archive(cache, quiet=True)
            assert list(cache.iterdir()) == []  # nothing half-written is left
    finally:
        server.shutdown()
