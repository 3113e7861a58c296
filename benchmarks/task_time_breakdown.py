"""Where a task's wall time goes: fractions per phase from a run's state.json diagnostics.

state.json records per task ``train_s`` (from the task's start to the end of training: adapter,
engine and the steps), ``task_s`` (the whole task, commit included) and, in runs recorded since
the phase timings exist (pm_ray/train/checkpoints.py TaskProgress), ``fisher_s``, ``merge_s`` and
``eval_s``. ``other`` is task_s minus the phases recorded; when a state.json predates the phase
timings, Fisher, merge and evaluation are not separable and land in ``not_split`` instead.
Time outside the tasks (Ray start, worker group, teardown, the report) is not in state.json.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/task_time_breakdown.py runs/quickstart/state.json ...

Accepts state.json files, or JSON lists/dicts holding state-like entries (with ``diagnostics``).
Prints one JSON object: per file, per task and summed over the tasks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

PHASE_KEYS = {"train": "train_s", "fisher": "fisher_s", "merge": "merge_s", "evaluation": "eval_s"}
TARGET_TRAIN_FRACTION = 0.70


def task_seconds(diag: dict[str, Any]) -> dict[str, float]:
    """Seconds per phase of one task's diagnostics; sums to task_s."""
    if "task_s" not in diag or "train_s" not in diag:
        raise ValueError(f"diagnostics of task {diag.get('task')} lack train_s/task_s: {sorted(diag)}")
    total = float(diag["task_s"])
    out = {phase: float(diag[key]) for phase, key in PHASE_KEYS.items() if key in diag}
    rest = total - sum(out.values())
    split = all(key in diag for key in PHASE_KEYS.values())
    out["other" if split else "not_split"] = max(rest, 0.0)
    return out


def fractions(seconds: dict[str, float]) -> dict[str, float]:
    total = sum(seconds.values())
    return {phase: round(s / total, 4) if total else 0.0 for phase, s in seconds.items()}


def breakdown(state: dict[str, Any]) -> dict[str, Any]:
    """Per-task and whole-run seconds and fractions of one state.json."""
    tasks = [task_seconds(d) for d in state["diagnostics"]]
    total: dict[str, float] = {}
    for t in tasks:
        for phase, s in t.items():
            total[phase] = total.get(phase, 0.0) + s
    run_fracs = fractions(total)
    return {
        "strategy": state.get("strategy"),
        "tasks": len(tasks),
        "phase_timings_recorded": all("not_split" not in t for t in tasks),
        "total_s": {phase: round(s, 2) for phase, s in total.items()},
        "fraction": run_fracs,
        "per_task_fraction": [fractions(t) for t in tasks],
        "train_fraction_target": f">= {TARGET_TRAIN_FRACTION}",
        "train_fraction_meets_target": run_fracs.get("train", 0.0) >= TARGET_TRAIN_FRACTION,
        "mean_task_s": round(sum(total.values()) / len(tasks), 2) if tasks else 0.0,
        "state_wall_s": state.get("wall_s"),
    }


def states_in(payload: Any) -> list[dict[str, Any]]:
    """The state-like entries (dicts with ``diagnostics``) of a state.json or a comparison JSON."""
    if isinstance(payload, dict) and "diagnostics" in payload:
        return [payload]
    items = payload.values() if isinstance(payload, dict) else payload if isinstance(payload, list) else []
    found = [s for item in items for s in states_in(item)]
    if not found and not isinstance(payload, (dict, list)):
        return []
    return found


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args(argv)
    report: dict[str, Any] = {
        "benchmark": "task_time_breakdown",
        "note": "fractions of the tasks' wall time (state.json task_s); Ray start-up, worker-group creation "
        "and teardown are outside the tasks and not counted",
        "files": {},
    }
    for path in args.paths:
        states = states_in(json.loads(path.read_text()))
        if not states:
            raise SystemExit(f"{path}: no state.json-like entry (a dict with 'diagnostics')")
        report["files"][path.name] = [breakdown(s) for s in states]
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
