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
        state = {
            k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()
        }
        save_file(state, str(tmp / "adapter_model.safetensors"))
        model.peft_config[adapter].save_pretrained(str(tmp))


def write_merged(
    run: RunDir, state: RunState, merged: dict[str, torch.Tensor], keeps_adapter_stack: bool, tasks: list[Any]
) -> None:
    """merged/delta.safetensors (θ̂ − W0), and for α-merges (keeps_adapter_stack) the equivalent
    stack Σ α_i Δ_i."""
    save_tensors(
        run.merged_dir / "delta.safetensors",
        merged,
        {"kind": "merged_delta", "task": state.completed, "strategy": state.strategy},
    )
    stack_path = run.merged_dir / "stack.json"
    if keeps_adapter_stack:
        stack = [
            {
                "task": i,
                "name": tasks[i - 1].name,
                "alpha": state.alphas[i - 1],
                "adapter": str(run.task_dir(i, tasks[i - 1].name).relative_to(run.path) / "adapter"),
            }
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


WARMUP_STEPS = 1  # the first step of a task also pays for the adapter, the engine and first-call costs

PHASES = ("training", "fisher", "merge", "evaluation")


def write_progress(
    run: RunDir,
    task: int,
    num_tasks: int,
    name: str,
    step: int,
    steps: int,
    loss: float,
    t_start: float,
    *,
    phase: str = "training",
    done: int | None = None,
    total: int | None = None,
    steady_s: float | None = None,
    steady_steps: int = 0,
) -> None:
    """progress.json: where rank 0 is (task, phase and its progress done/total, training step, loss) and
    the time since the task started; steady_s is the training time after the warm-up steps, over
    steady_steps steps (what the driver's ETA extrapolates from)."""
    elapsed = time.time() - t_start
    write_json(
        run.path / "progress.json",
        {
            "task": task,
            "num_tasks": num_tasks,
            "name": name,
            "phase": phase,
            "done": step if done is None else done,
            "total": steps if total is None else total,
            "step": step,
            "steps": steps,
            "loss": loss,
            "task_elapsed_s": elapsed,
            "steady_s": steady_s,
            "steady_steps": steady_steps,
            "time": time.time(),
            "pid": os.getpid(),
        },
    )


def fisher_batch_count(num_rows: int, num_samples: int, batch_size: int, world_size: int) -> int:
    """Batches rank 0 sees in data.tokenize.fisher_batches (it holds the largest round-robin share)."""
    mine = -(-min(num_samples, num_rows) // world_size)
    return -(-mine // batch_size)


class TaskProgress:
    """Rank 0's progress.json for one task, and its phase timings for state.json's diagnostics
    (step_s: mean steady-state training step, i.e. after the warm-up steps; fisher_s, merge_s,
    eval_s: wall time of each phase). Writes nothing on other ranks."""

    TIMING_KEYS = {"fisher": "fisher_s", "merge": "merge_s", "evaluation": "eval_s"}

    def __init__(self, run: RunDir, task: int, num_tasks: int, name: str, steps: int, enabled: bool = True) -> None:
        self.run, self.task, self.num_tasks, self.name, self.steps, self.enabled = (
            run,
            task,
            num_tasks,
            name,
            steps,
            enabled,
        )
        self.t_start = time.time()
        self.t_steady: float | None = None
        self.step_done, self.loss = 0, float("nan")
        self.steady: tuple[float | None, int] = (None, 0)
        self.phase_name, self.phase_start = "training", self.t_start
        self.timings: dict[str, float] = {}

    def _write(self, done: int, total: int) -> None:
        if self.enabled:
            steady_s, steady_steps = self.steady
            write_progress(
                self.run,
                self.task,
                self.num_tasks,
                self.name,
                self.step_done,
                self.steps,
                self.loss,
                self.t_start,
                phase=self.phase_name,
                done=done,
                total=total,
                steady_s=steady_s,
                steady_steps=steady_steps,
            )

    def step(self, step: int, loss: float, write: bool) -> None:
        """After training step `step` (1-based); the steady-state clock starts after the warm-up."""
        now = time.time()
        self.step_done, self.loss = step, loss
        if step == WARMUP_STEPS:
            self.t_steady = now
        elif self.t_steady is not None and step > WARMUP_STEPS:
            self.steady = (now - self.t_steady, step - WARMUP_STEPS)
        if write:
            self._write(step, self.steps)

    def _close_phase(self, now: float) -> None:
        if self.phase_name == "training":
            steady_s, n = self.steady
            if steady_s is not None and n:
                self.timings["step_s"] = steady_s / n
        elif self.phase_name in self.TIMING_KEYS:
            key = self.TIMING_KEYS[self.phase_name]
            self.timings[key] = self.timings.get(key, 0.0) + now - self.phase_start

    def phase(self, name: str, done: int = 0, total: int = 1) -> None:
        """Enter phase `name` (one of PHASES); the previous phase's time goes to the timings."""
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; expected one of {PHASES}")
        now = time.time()
        self._close_phase(now)
        self.phase_name, self.phase_start = name, now
        self._write(done, total)

    def iterate(self, name: str, items: Any, total: int) -> Any:
        """Yield from `items` inside phase `name`, writing done/total before each item."""
        self.phase(name, 0, total)
        for i, item in enumerate(items):
            if i:
                self._write(i, total)
            yield item

    def finish(self) -> dict[str, float]:
        """Close the last phase; returns the timings (for state.json's diagnostics)."""
        self._close_phase(time.time())
        self.phase_name = "done"
        return dict(self.timings)


def report(metrics: dict[str, Any], in_ray_train: bool) -> None:
    """ray.train.report of the task's metrics from every rank (a collective). No Ray checkpoint:
    the run directory (state.json and the merge state it names) is what a retry or a resume
    starts from, so a copy in Ray's storage would never be read."""
    if not in_ray_train:
        return
    import ray.train

    ray.train.report(metrics)
