"""The driver's live progress: a tqdm bar (a plain line when stderr is not a terminal) fed from the
rank-0 worker's progress.json and the committed tasks' timings in state.json.

ETA model. A task t of T is: training (S steps), Fisher, merge, evaluation of the t seen tasks.
The first step of a task is warm-up (adapter, engine, first-call costs) and is left out of the step
time: s = steady_s / steady_steps, from progress.json (this task) or else the committed tasks'
step_s. From the committed tasks (state.json diagnostics) come the per-task overhead
o = train_s − S·step_s (warm-up and set-up), the Fisher and merge times f, m, and the evaluation
time per evaluated task e = eval_s / t. The remaining time is

    rest of this task's current phase + its later phases + Σ_{k=t+1..T} (o + S·s + f + m + k·e)

Before any task is committed only the training part is known: the line says so.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from pm_ray.rundir import RunDir, read_json

PHASE_ORDER = ("training", "fisher", "merge", "evaluation")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def task_costs(diagnostics: list[Any], steps: int) -> dict[str, float] | None:
    """Mean per-task costs from the committed tasks' diagnostics (None before the first commit)."""
    rows = [d for d in diagnostics if isinstance(d, dict) and isinstance(d.get("train_s"), (int, float))]
    if not rows:
        return None
    step_s = _mean([d["step_s"] for d in rows if isinstance(d.get("step_s"), (int, float))])
    if step_s is None:  # a run from before the phase timings: whole training time per step
        step_s = _mean([d["train_s"] / max(steps, 1) for d in rows])
    assert step_s is not None
    other = [d["task_s"] - d["train_s"] for d in rows if isinstance(d.get("task_s"), (int, float))]
    costs = {
        "step_s": step_s,
        "overhead_s": max(0.0, _mean([d["train_s"] - step_s * steps for d in rows]) or 0.0),
        "fisher_s": _mean([d["fisher_s"] for d in rows if "fisher_s" in d]) or 0.0,
        "merge_s": _mean([d["merge_s"] for d in rows if "merge_s" in d]) or 0.0,
        "eval_per_task_s": _mean([d["eval_s"] / d.get("task", i + 1) for i, d in enumerate(rows) if "eval_s" in d])
        or 0.0,
    }
    if not any(k in d for d in rows for k in ("fisher_s", "merge_s", "eval_s")):  # older run: lump it into merge
        costs["merge_s"] = _mean(other) or 0.0
    return costs


def estimate(p: dict[str, Any], diagnostics: list[Any]) -> dict[str, Any]:
    """{"step_s", "phase_eta_s", "run_eta_s" (None when unknown), "training_eta_s", "warmup" (bool)}."""
    steps, step, task, num_tasks = p["steps"], p["step"], p["task"], p["num_tasks"]
    phase = p.get("phase", "training")
    costs = task_costs(diagnostics, steps)
    warmup = False
    if p.get("steady_steps") and p.get("steady_s") is not None:
        step_s = p["steady_s"] / p["steady_steps"]
    elif costs is not None:
        step_s = costs["step_s"]
    else:  # only the warm-up step is known: an upper bound at best
        step_s, warmup = p["task_elapsed_s"] / max(step, 1), True
    left_steps = steps - step if phase == "training" else 0
    training_eta = step_s * (left_steps + steps * (num_tasks - task))
    frac_left = 1.0 - p.get("done", 0) / max(p.get("total", 1), 1)
    phase_eta: float | None = step_s * left_steps if phase == "training" else None
    run_eta: float | None = None
    if costs is not None:
        this_task = {
            "training": step_s * left_steps,
            "fisher": costs["fisher_s"],
            "merge": costs["merge_s"],
            "evaluation": costs["eval_per_task_s"] * task,
        }
        order = PHASE_ORDER.index(phase) if phase in PHASE_ORDER else len(PHASE_ORDER)
        if phase != "training" and phase in this_task:
            this_task[phase] *= frac_left
            phase_eta = this_task[phase]
        rest = sum(this_task[name] for name in PHASE_ORDER[order:])
        per_task = costs["overhead_s"] + steps * step_s + costs["fisher_s"] + costs["merge_s"]
        rest += sum(per_task + k * costs["eval_per_task_s"] for k in range(task + 1, num_tasks + 1))
        run_eta = rest
    return {
        "step_s": step_s,
        "phase_eta_s": phase_eta,
        "run_eta_s": run_eta,
        "training_eta_s": training_eta,
        "warmup": warmup,
    }


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def describe(p: dict[str, Any], diagnostics: list[Any]) -> tuple[str, int, int, str]:
    """(description, done, total, postfix) of the progress bar for one progress.json."""
    phase = p.get("phase", "training")
    est = estimate(p, diagnostics)
    desc = f"[pm-ray] task {p['task']}/{p['num_tasks']} ({p['name']}) {phase}"
    done, total = int(p.get("done", p["step"])), int(p.get("total", p["steps"]))
    parts = [f"loss {p['loss']:.4f}"]
    if est["run_eta_s"] is not None:
        parts.append(f"run ETA {_minutes(est['run_eta_s'])}")
    else:
        parts.append(
            f"training ETA {_minutes(est['training_eta_s'])}{' (warm-up)' if est['warmup'] else ''} (+ fisher/merge/eval)"
        )
    return desc, done, total, " | ".join(parts)


class ProgressPrinter(threading.Thread):
    """A live progress bar from the rank-0 worker's progress.json (task i/T, phase and its progress,
    loss, ETA); on a stream that is not a terminal, one line per change."""

    def __init__(self, run: RunDir, stream: Any = sys.stderr, every_s: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.stream, self.every_s = run, stream, every_s
        self.stop = threading.Event()
        self.last = ""
        self.bar: Any = None
        self.key: tuple[Any, ...] | None = None

    def read(self) -> tuple[str, int, int, str] | None:
        path = self.run_dir.path / "progress.json"
        if not path.is_file():
            return None
        try:
            p = read_json(path)
            diagnostics: list[Any] = []
            if self.run_dir.state_path.is_file():
                diagnostics = read_json(self.run_dir.state_path).get("diagnostics", [])
            return describe(p, diagnostics if isinstance(diagnostics, list) else [])
        except (ValueError, OSError, KeyError, TypeError):
            return None

    def line(self) -> str | None:
        got = self.read()
        if got is None:
            return None
        desc, done, total, postfix = got
        return f"{desc} {done}/{total} {postfix}"

    def _show_bar(self, desc: str, done: int, total: int, postfix: str) -> None:
        from tqdm import tqdm

        if self.bar is None:  # tqdm puts ", " before the postfix
            self.bar = tqdm(
                total=total,
                initial=done,
                desc=desc,
                postfix=postfix,
                file=self.stream,
                leave=True,
                dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}",
            )
            self.key = (desc, total)
            return
        key = (desc, total)
        if key != self.key:
            self.bar.reset(total=total)
            self.key = key
        self.bar.set_description_str(desc, refresh=False)
        self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.n = done
        self.bar.refresh()

    def poll(self) -> None:
        got = self.read()
        if got is None:
            return
        text = f"{got[0]} {got[1]}/{got[2]} {got[3]}"
        if text == self.last:
            return
        self.last = text
        if self.stream.isatty():
            self._show_bar(*got)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def run(self) -> None:  # type: ignore[override]
        while not self.stop.wait(self.every_s):
            self.poll()

    def close(self) -> None:
        self.stop.set()
        self.join(timeout=5)
        if self.bar is not None:
            self.bar.close()
