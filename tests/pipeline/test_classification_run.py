"""Classification streams end to end (the P&M paper's class-incremental protocol) on tiny:bert,
engine single, 3 tasks with disjoint label sets: one head per task, trained with its task and never
touched by the merge; the merge is the instruction pipeline's (α, task vectors of the encoder's
LoRA); a resume re-adds the committed heads and ends bit-identical; bad streams exit 2 unwritten."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from pm_ray.cli import main
from pm_ray.config import config_from_dict
from pm_ray.core.tensors import load_tensors
from pm_ray.pipeline import run_continual
from runcli import run_in_process_until_task_1_commits
from tinyconfig import tiny_config, write_config

pytestmark = pytest.mark.integration

# three tasks, each over its own classes; a row's class is signalled by a keyword in the text
TASKS = {
    "colours": ["red", "green", "blue"],
    "animals": ["cat", "dog"],
    "fruit": ["apple", "pear", "plum"],
}


def write_stream(root: Path, rows: int = 48) -> list[dict]:
    rng = random.Random(0)
    filler = "the a one some this that here there with and".split()
    entries = []
    for name, labels in TASKS.items():
        path = root / f"{name}.jsonl"
        with path.open("w") as f:
            for i in range(rows):
                label = labels[i % len(labels)]
                words = rng.sample(filler, 4) + [label]
                rng.shuffle(words)
                f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
        entries.append({"name": name, "kind": "classification", "path": str(path), "max_test": 12})
    return entries


def cls_config(storage: Path, name: str, files: list[dict], **sections: dict) -> dict:
    sections = {"trainer": {"steps_per_task": 30, "lr": 2e-2, "max_length": 32}, **sections}
    cfg = tiny_config(storage, storage={"path": str(storage), "run_name": name}, **sections)
    cfg["model"] = {"name_or_path": "tiny:bert"}
    cfg["tasks"] = {"suite": None, "files": files}
    return cfg


def head(run_dir: Path, i: int, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    return load_tensors(run_dir / "tasks" / f"{i}-{name}" / "head.safetensors")


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("cls")
    return root / "runs", write_stream(root)


@pytest.fixture(scope="module")
def pm_run(ray_session, stream):
    storage, files = stream
    return run_continual(config_from_dict(cls_config(storage, "pm", files)), quiet=True)


def test_each_task_has_its_own_head_and_the_merge_is_pm(pm_run) -> None:
    state = pm_run.state
    assert state.completed == 3 and state.task_names == list(TASKS)
    assert state.alphas[0] == 1.0 and all(0.0 < a < 1.0 for a in state.alphas[1:])
    for i, (name, labels) in enumerate(TASKS.items(), start=1):
        tensors, meta = head(pm_run.run_dir, i, name)
        assert meta == {"kind": "task_head", "task": i, "labels": sorted(labels)}  # the reader sorts labels
        assert tensors["weight"].shape == (len(labels), 32) and tensors["bias"].shape == (len(labels),)
        assert float(tensors["bias"].abs().sum()) > 0  # trained (a new head's bias starts at 0)
    # the accuracy matrix is task-agnostic (argmax over every seen class): the stream is learnable
    assert [len(row) for row in state.accuracy] == [1, 2, 3]
    assert state.accuracy[0][0] > 1 / 3 + 0.2


def test_heads_of_finished_tasks_are_not_trained_again(ray_session, stream, pm_run) -> None:
    """A 2-task run trains task 1's head exactly as the 3-task run did (same seed): the third task
    (and the merges after task 1) left the saved head of task 1 as it was after its own training."""
    storage, files = stream
    short = run_continual(config_from_dict(cls_config(storage, "pm2", files[:2])), quiet=True)
    for i, name in enumerate(list(TASKS)[:2], start=1):
        a, _ = head(pm_run.run_dir, i, name)
        b, _ = head(short.run_dir, i, name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert short.state.accuracy == pm_run.state.accuracy[:2]


def test_resume_readds_the_committed_heads(ray_session, stream, pm_run, monkeypatch) -> None:
    storage, files = stream
    cfg = config_from_dict(cls_config(storage, "resumed", files))
    run_in_process_until_task_1_commits(cfg, monkeypatch)
    assert json.loads((storage / "resumed" / "state.json").read_text())["completed"] == 1
    resumed = run_continual(cfg, quiet=True)
    assert resumed.state.accuracy == pm_run.state.accuracy
    assert resumed.state.alphas == pm_run.state.alphas
    for i, name in enumerate(TASKS, start=1):
        a, _ = head(pm_run.run_dir, i, name)
        b, _ = head(resumed.run_dir, i, name)
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"model": {"name_or_path": "tiny:llama"}}, "'tiny:llama' is a causal LM"),
        ({"merge": {"strategy": "trm"}}, "merge.strategy='trm'"),
        ({"mixed": True}, "one kind of task"),
    ],
)
def test_bad_classification_streams_exit_2_and_write_nothing(tmp_path, stream, change, needle, capsys) -> None:
    _, files = stream
    files = [dict(f) for f in files]
    if change.pop("mixed", False):
        path = tmp_path / "qa.jsonl"
        path.write_text(
            "".join(json.dumps({"instruction": "Say hi.", "input": str(i), "output": "hi"}) + "\n" for i in range(8))
        )
        files[1] = {"name": "qa", "kind": "instruction", "path": str(path), "max_test": 4}
    storage = tmp_path / "runs"
    cfg = cls_config(storage, "bad", files)
    for section, values in change.items():
        cfg.setdefault(section, {}).update(values)
    assert main(["run", str(write_config(tmp_path / "bad.yaml", cfg))]) == 2
    assert needle in capsys.readouterr().err
    assert not (storage / "bad").exists()


@pytest.mark.parametrize("adapter", [False, True])
def test_export_refuses_a_classification_run(pm_run, tmp_path, adapter, capsys) -> None:
    out = tmp_path / "export"
    argv = ["export", str(pm_run.run_dir), str(out)] + (["--adapter"] if adapter else [])
    assert main(argv) == 2
    assert "classification run (per-task heads) is not exported" in capsys.readouterr().err
    assert not out.exists()


def test_eval_rescores_the_merged_encoder_with_every_head(pm_run, capsys) -> None:
    """`pm-ray eval` rebuilds the model from the files (W0 + merged delta, the saved heads) and gives
    exactly the run's last accuracy row, task-agnostic, with the task-aware score beside it."""
    assert main(["eval", str(pm_run.run_dir)]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert list(scores) == list(TASKS)
    assert [scores[name]["score"] for name in TASKS] == pm_run.state.accuracy[-1]
    assert all(s["metric"] == "task_agnostic_accuracy" and s["task_aware_score"] >= s["score"] for s in scores.values())
