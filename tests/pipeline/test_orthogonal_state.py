"""The worker's O-LoRA state (pm_ray/train/orthogonal_state.py) on tiny:llama, without Ray."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pm_ray.config import config_from_dict
from pm_ray.core.lora import lora_layers
from pm_ray.core.orthogonal import olora_penalty
from pm_ray.core.tensors import save_tensors
from pm_ray.models.backbone import load_backbone
from pm_ray.rundir import RunDir
from pm_ray.train.loop import new_adapter
from pm_ray.train.orthogonal_state import LORA_A_FILE, OrthogonalState
from tinyconfig import tiny_config

TASKS = [SimpleNamespace(name="first"), SimpleNamespace(name="second"), SimpleNamespace(name="third")]


def setup(tmp_path, **orthogonal):
    cfg = config_from_dict(tiny_config(tmp_path / "runs", merge={"strategy": "olora"}, orthogonal=orthogonal))
    model, _ = load_backbone("tiny:llama", kind="instruction")
    return cfg, RunDir(tmp_path / "run"), model


def test_tasks_accumulate_write_and_reload(tmp_path) -> None:
    cfg, run, model = setup(tmp_path, lam=0.5, l2=0.01)
    orth = OrthogonalState.for_run(cfg, run, TASKS, 0, torch.device("cpu"))
    model = new_adapter(model, cfg, 1, None)
    orth.begin_task(1, model, "task1")
    assert orth.old == []
    a1 = {k: layer.lora_A["task1"].weight for k, layer in lora_layers(model, "task1").items()}
    b1 = {k: layer.lora_B["task1"].weight for k, layer in lora_layers(model, "task1").items()}
    # task 1: only the L2 term; it reaches LoRA_t's parameters
    penalty = orth.penalty()
    assert float(penalty.detach()) == pytest.approx(float(olora_penalty(a1, b1, [], lam=0.5, l2=0.01).detach()))
    penalty.backward()
    assert all(a.grad is not None for a in a1.values())
    assert orth.end_task(run.task_dir(1, "first"), write=True) == {}
    assert (run.task_dir(1, "first") / LORA_A_FILE).is_file()

    model = new_adapter(model, cfg, 2, "task1")
    orth.begin_task(2, model, "task2")
    assert len(orth.old) == 1 and all(torch.equal(orth.old[0][k], a1[k].detach()) for k in a1)
    diag = orth.end_task(run.task_dir(2, "second"), write=False)  # another rank: keeps, writes nothing
    assert set(diag) == {"orth_loss", "orth_overlap"} and diag["orth_loss"] > 0
    assert not (run.task_dir(2, "second") / LORA_A_FILE).exists()

    # a resume after task 1 loads exactly the committed task's A
    resumed = OrthogonalState.for_run(cfg, run, TASKS, 1, torch.device("cpu"))
    assert sorted(resumed.saved) == [1]
    assert all(torch.equal(resumed.saved[1][k], a1[k].detach()) for k in a1)


def test_resume_without_the_files_is_a_clear_error(tmp_path) -> None:
    cfg, run, _ = setup(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"tasks/1-first/lora_A.safetensors: missing.*committed task \(1..2\)"):
        OrthogonalState.for_run(cfg, run, TASKS, 2, torch.device("cpu"))
    save_tensors(run.task_dir(1, "first") / LORA_A_FILE, {"m": torch.zeros(2, 3)}, {"kind": "lora_A", "task": 2})
    with pytest.raises(ValueError, match="expected the LoRA A matrices of task 1"):
        OrthogonalState.for_run(cfg, run, TASKS, 1, torch.device("cpu"))


def test_disabled_is_a_no_op(tmp_path) -> None:
    cfg = config_from_dict(tiny_config(tmp_path / "runs", merge={"strategy": "pm"}))
    orth = OrthogonalState.for_run(cfg, RunDir(tmp_path / "run"), TASKS, 2, torch.device("cpu"))  # reads nothing
    orth.begin_task(3, None, "task3")
    assert orth.penalty() == 0.0 and orth.end_task(tmp_path / "t", write=True) == {}
    assert not (tmp_path / "t").exists()
