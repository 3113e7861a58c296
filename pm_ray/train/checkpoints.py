"""What the worker loop writes at a task boundary: adapters, the merged delta, progress, reports.

All files are written atomically (temporary name in the same directory, fsync, rename), and
before state.json names the task as completed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model_state_dict
from safetensors.torch import save_file

from pm_ray.atomicdir import atomic_directory
from pm_ray.core.tensors import save_tensors
from pm_ray.rundir import RunDir, RunState, write_json


def save_adapter(model: Any, adapter: str, target: Path) -> None:
    """A standard PEFT adapter directory (adapter_model.safetensors + adapter_config.json)."""
    with atomic_directory(target, replace=True) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}
        save_file(state, str(tmp / "adapter_model.safetensors"))
        model.peft_config[adapter].save_pretrained(str(tmp))


def write_merged(run: RunDir, state: RunState, merged: dict[str, torch.Tensor], keeps_adapter_stack: bool, tasks: list[Any]) -> None:
    """merged/delta.safetensors (θ̂ − W0), and for α-merges (keeps_adapter_stack) the equivalent
    stack Σ α_i Δ_i."""
    save_tensors(run.merged_dir / "delta.safetensors", merged, {"kind": "merged_delta", "task": state.completed, "strategy": state.strategy})
    stack_path = run.merged_dir / "stack.json"
    if keeps_adapter_stack:
        stack = [
            {"task": i, "name": tasks[i - 1].name, "alpha": state.alphas[i - 1],
             "adapter": str(run.task_dir(i, tasks[i - 1].name).relative_to(run.path) / "adapter")}
            for i in range(1, state.completed + 1)
        ]
        write_json(stack_path, {"task": state.completed, "stack": stack})
    elif stack_path.exists():
        stack_path.unlink()


def prune_stats(run: RunDir, state: RunState) -> None:
    """After state.json committed a task, the merge state of earlier tasks is no longer needed."""
    keep = {Path(f).name for f in state.stats_files}
    for path in run.stats_dir.glob("shard*-task*.safetensors"):
        if path.name not in keep:
            path.unlink(missing_ok=True)


def write_progress(run: RunDir, task: int, num_tasks: int, name: str, step: int, steps: int, loss: float, t_start: float) -> None:
    elapsed = time.time() - t_start
    write_json(run.path / "progress.json", {
        "task": task, "num_tasks": num_tasks, "name": name, "step": step, "steps": steps, "loss": loss,
        "task_elapsed_s": elapsed, "time": time.time(), "pid": os.getpid(),
    })


def report(metrics: dict[str, Any], in_ray_train: bool) -> None:
    """ray.train.report of the task's metrics from every rank (a collective). No Ray checkpoint:
    the run directory (state.json and the merge state it names) is what a retry or a resume
    starts from, so a copy in Ray's storage would never be read."""
    if not in_ray_train:
        return
    import ray.train

    ray.train.report(metrics)
