"""The report of one run (<run_dir>/report/: summary.md and PNG plots) from its state.json, read
through :meth:`pm_ray.rundir.RunDir.read_state` (the one validator of that file). No MLflow here.
Tables are in pm_ray/tables.py, plots in pm_ray/plots.py."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pm_ray.core.coefficient import alpha_stats
from pm_ray.core.metrics import continual_metrics
from pm_ray.core.tensors import atomic_write_bytes
from pm_ray.plots import plot_accuracy_heatmap, plot_alphas, plot_comparison, plot_task_curves
from pm_ray.rundir import RunDir, StateFileError
from pm_ray.tables import (
    MISSING,
    format_alpha,
    format_alphas,
    format_comparison_table,
    format_diagnostics_table,
    format_number,
    format_results_table,
)

REPORT_DIR = "report"

__all__ = [
    "StateFileError",
    "alpha_stats",
    "diagnostics_summary",
    "format_alpha",
    "format_alphas",
    "format_comparison_table",
    "format_diagnostics_table",
    "format_number",
    "format_results_table",
    "plot_accuracy_heatmap",
    "plot_alphas",
    "plot_comparison",
    "plot_task_curves",
    "write_report",
]


def _final_metrics(state: Mapping[str, Any]) -> dict[str, float]:
    """The stored metrics; for a run that stopped early, those of the part of the stream it did learn."""
    if state.get("metrics"):
        return dict(state["metrics"])
    try:
        return continual_metrics(state["accuracy"]) if state["accuracy"] else {}
    except ValueError:  # a lower-triangle score is missing: no honest summary number
        return {}


MERGE_START_KEYS = ("start_grad_norm", "first_steps_loss_drop")


def diagnostics_summary(diagnostics: Sequence[Any]) -> dict[str, float]:
    """Comparison columns from the per-task diagnostics: the means over tasks 2..T of the gradient
    norm at the first step and the loss drop over the first steps (those tasks start from a merged
    model; task 1 starts from the pretrained one, so it says nothing about a merge)."""
    rows = [d for d in diagnostics if isinstance(d, dict)]
    out: dict[str, float] = {}
    for key in MERGE_START_KEYS:
        values = [d[key] for d in rows[1:] if isinstance(d.get(key), (int, float))]
        if values:
            out[key] = sum(values) / len(values)
    return out


def write_report(run_dir: str | Path) -> dict[str, Any]:
    """Tables and plots of one run from its state.json, into <run_dir>/report/. Prints nothing.

    Returns {"table": terminal text, "metrics": dict, "plots": [PNG paths]}."""
    run_dir = Path(run_dir)
    state = asdict(RunDir(run_dir).read_state())
    names, R, alphas = state["task_names"], state["accuracy"], state.get("alphas", [])
    metrics = _final_metrics(state)
    summary_row = {
        "strategy": state.get("strategy", MISSING),
        **metrics,
        "alphas": alphas,
        "wall_s": state.get("wall_s"),
        **diagnostics_summary(state.get("diagnostics", [])),
    }
    progress = f"{state.get('run_name', run_dir.name)}: {state['completed']}/{len(names)} tasks"
    table = "\n\n".join([progress, format_results_table(R, names), format_comparison_table([summary_row])])

    out = run_dir / REPORT_DIR
    plots = [
        plot_accuracy_heatmap(R, names, out / "accuracy.png"),
        plot_alphas(alphas, names, out / "alphas.png"),
        plot_task_curves(R, names, out / "task_curves.png"),
    ]
    markdown = (
        "\n\n".join(
            [
                f"# {state.get('run_name', run_dir.name)}",
                f"Strategy `{state.get('strategy', MISSING)}`, {state['completed']}/{len(names)} tasks, {float(state.get('wall_s', 0.0)):.1f} s.",
                "## Accuracy matrix",
                format_results_table(R, names, markdown=True),
                "## Summary",
                format_comparison_table([summary_row], markdown=True),
                "## Per task (diagnostics: the first steps of task t+1 start at the merged model of task t)",
                format_diagnostics_table(state.get("diagnostics", []), names, alphas, markdown=True),
                "## Plots",
                "\n".join(f"![{p.stem}]({p.name})" for p in plots),
            ]
        )
        + "\n"
    )
    atomic_write_bytes(out / "summary.md", markdown.encode())
    return {"table": table, "metrics": metrics, "plots": [str(p) for p in plots]}
