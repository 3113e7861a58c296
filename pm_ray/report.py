"""Results of continual runs as terminal/Markdown tables and PNG plots (no MLflow here).

R is the accuracy matrix: R[l][i] = score on task i after learning task l (0-based in code). Only the
lower triangle (i <= l) is shown; entries above the diagonal may be absent, None or NaN.

An α per task is a float (one coefficient), a {module: float} dict (per-module coefficients, shown as
mean with min..max) or None (strategies without coefficients).

Plots are drawn on a bare ``Figure`` with the Agg canvas: no pyplot global state and no GUI backend,
so they work from Ray workers and threads, and never change the backend of whoever imported us.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pm_ray.core.metrics import continual_metrics
from pm_ray.core.tensors import atomic_write_bytes

Alpha = float | Mapping[str, float] | None

STATE_FILE = "state.json"
REPORT_DIR = "report"
COMPARISON_COLUMNS = ("strategy", "acc", "aaa", "forgetting", "bwt", "alphas", "wall_s")
MISSING = "-"


class StateFileError(ValueError):
    """state.json exists but is not what the pipeline writes (the message names the file and field)."""


# ---- values -----------------------------------------------------------------------------------------


def _score(R: Sequence[Sequence[Any]], l: int, i: int) -> float | None:
    """R[l][i] as a float, or None when absent/None/NaN."""
    row = R[l]
    if i >= len(row) or row[i] is None:
        return None
    value = float(row[i])
    return None if math.isnan(value) else value


def _check_matrix(R: Sequence[Sequence[Any]], task_names: Sequence[str]) -> None:
    if len(task_names) < len(R):
        raise ValueError(f"accuracy matrix has {len(R)} rows but only {len(task_names)} task names; expected one name per row")
    for l, row in enumerate(R):
        if not isinstance(row, Sequence) or isinstance(row, str):
            raise ValueError(f"accuracy matrix row {l + 1} is {row!r}; expected a list of scores")
        for i, value in enumerate(row):
            if value is not None and not isinstance(value, (int, float)):
                raise ValueError(f"accuracy matrix R[{l + 1}][{i + 1}] is {value!r}; expected a number, null or NaN")


def format_number(value: Any) -> str:
    """3 decimals for ordinary magnitudes; scientific notation where 3 decimals would hide the value."""
    if value is None:
        return MISSING
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:.3f}"
        return f"{value:.3e}"
    return str(value)


def alpha_stats(alpha: Alpha) -> tuple[float, float, float] | None:
    """(mean, min, max) of one task's α; None when the strategy has no coefficient."""
    if alpha is None:
        return None
    if isinstance(alpha, Mapping):
        values = [_alpha_value(v, alpha) for v in alpha.values()]
        if not values:
            return None
        return sum(values) / len(values), min(values), max(values)
    value = _alpha_value(alpha, alpha)
    return value, value, value


def _alpha_value(value: Any, alpha: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"α {alpha!r}: {value!r} is not a number; expected a number, a {{module: number}} dict or None")
    return float(value)


def format_alpha(alpha: Alpha) -> str:
    """'0.523' for a float, '0.523 (0.410..0.620)' for per-module α, '-' for none."""
    stats = alpha_stats(alpha)
    if stats is None:
        return MISSING
    mean, low, high = stats
    if isinstance(alpha, Mapping) and low != high:
        return f"{mean:.3f} ({low:.3f}..{high:.3f})"
    return f"{mean:.3f}"


def format_alphas(alphas: Sequence[Alpha] | None) -> str:
    if not alphas or all(alpha_stats(a) is None for a in alphas):
        return MISSING
    return ", ".join(format_alpha(a) for a in alphas)


# ---- tables -----------------------------------------------------------------------------------------


def _render(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool], markdown: bool) -> str:
    """Columns padded to a common width: a pipe table when ``markdown`` (still aligned), else plain."""
    if markdown:
        header = [h.replace("|", "\\|") for h in header]
        rows = [[c.replace("|", "\\|") for c in row] for row in rows]
    widths = [max([len(header[c])] + [len(row[c]) for row in rows] + [3]) for c in range(len(header))]

    def cell(text: str, c: int) -> str:
        return text.rjust(widths[c]) if right[c] else text.ljust(widths[c])

    if markdown:
        rule = ["-" * (widths[c] - 1) + ":" if right[c] else "-" * widths[c] for c in range(len(header))]
        lines = [header, rule, *rows]
        return "\n".join("| " + " | ".join(cell(t, c) for c, t in enumerate(line)) + " |" for line in lines)
    rule = ["-" * w for w in widths]
    lines = [header, rule, *rows]
    return "\n".join("  ".join(cell(t, c) for c, t in enumerate(line)).rstrip() for line in lines)


def format_results_table(R: Sequence[Sequence[Any]], task_names: Sequence[str], *, markdown: bool = False) -> str:
    """The lower triangle of R, one row per learned task, scores to 3 decimals; a 'mean' column of the
    tasks seen so far. Missing lower-triangle entries show as '-'."""
    _check_matrix(R, task_names)
    seen = [str(name) for name in task_names[: len(R)]]
    header = ["after task", *seen, "mean"]
    rows = []
    for l in range(len(R)):
        scores = [_score(R, l, i) for i in range(l + 1)]
        present = [s for s in scores if s is not None]
        mean = sum(present) / len(present) if present else None
        cells = [MISSING if s is None else f"{s:.3f}" for s in scores] + [""] * (len(R) - l - 1)
        rows.append([f"{l + 1} {seen[l]}", *cells, MISSING if mean is None else f"{mean:.3f}"])
    return _render(header, rows, [False] + [True] * (len(R) + 1), markdown)


def format_comparison_table(rows: Sequence[Mapping[str, Any]], *, markdown: bool = False) -> str:
    """One row per strategy: the standard columns, then any extra diagnostic keys in first-seen order.
    ``alphas`` may be a list of per-task α (summarised) or a preformatted string."""
    extras: list[str] = []
    for row in rows:
        extras += [key for key in row if key not in COMPARISON_COLUMNS and key not in extras]
    columns = [*COMPARISON_COLUMNS, *extras]
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            if column == "alphas" and not isinstance(value, str):
                cells.append(format_alphas(value))
            elif column == "wall_s" and isinstance(value, (int, float)) and not isinstance(value, bool):
                cells.append(f"{value:.1f}")
            else:
                cells.append(format_number(value))
        body.append(cells)
    right = [column not in ("strategy", "alphas") for column in columns]
    return _render(columns, body, right, markdown)


# ---- plots ------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: str | Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_accuracy_heatmap(R: Sequence[Sequence[Any]], task_names: Sequence[str], path: str | Path) -> Path:
    """The lower triangle of R as a heatmap, each cell annotated with its score."""
    import numpy as np

    _check_matrix(R, task_names)
    T = len(R)
    grid = np.full((T, T), np.nan)
    for l in range(T):
        for i in range(l + 1):
            score = _score(R, l, i)
            if score is not None:
                grid[l, i] = score
    present = grid[~np.isnan(grid)]
    # Scores are usually in [0, 1]: a fixed scale makes heatmaps of different runs comparable.
    low, high = min(0.0, float(present.min(initial=0.0))), max(1.0, float(present.max(initial=1.0)))
    figure = _new_figure(2.4 + 0.8 * T, 2.0 + 0.6 * T)
    ax = figure.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid if T else np.full((1, 1), np.nan)), cmap="viridis", vmin=low, vmax=high)
    for l in range(T):
        for i in range(l + 1):
            if not np.isnan(grid[l, i]):
                dark_cell = grid[l, i] < (low + high) / 2
                ax.text(i, l, f"{grid[l, i]:.3f}", ha="center", va="center", fontsize=7, color="white" if dark_cell else "black")
    if not T:
        ax.text(0.5, 0.5, "no task completed yet", ha="center", va="center", transform=ax.transAxes)
    labels = [str(name) for name in task_names[:T]]
    ax.set_xticks(range(T), labels, rotation=45, ha="right")
    ax.set_yticks(range(T), [f"{l + 1} {name}" for l, name in enumerate(labels)])
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after learning task")
    ax.set_title("accuracy matrix")
    figure.colorbar(image, ax=ax)
    return _save(figure, path)


def plot_alphas(alphas: Sequence[Alpha], task_names: Sequence[str], path: str | Path) -> Path:
    """α_t per task; per-module α as its mean with a min..max bar. Strategies without α get a note."""
    figure = _new_figure(1.8 + 0.6 * max(len(alphas), 1), 3.2)
    ax = figure.add_subplot()
    points = [(t, alpha_stats(a)) for t, a in enumerate(alphas)]
    points = [(t, s) for t, s in points if s is not None]
    if points:
        xs = [t for t, _ in points]
        means = [s[0] for _, s in points]
        below = [s[0] - s[1] for _, s in points]
        above = [s[2] - s[0] for _, s in points]
        ax.errorbar(xs, means, yerr=[below, above], fmt="o-", capsize=4, label="α (mean, min..max over modules)")
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "this strategy has no merge coefficient α", ha="center", va="center", transform=ax.transAxes)
    names = [str(name) for name in task_names[: len(alphas)]]
    ax.set_xticks(range(len(names)), [f"{t + 1} {n}" for t, n in enumerate(names)], rotation=45, ha="right")
    ax.set_xlabel("task")
    ax.set_ylabel("α")
    ax.set_title("merge coefficient per task")
    ax.grid(alpha=0.3)
    return _save(figure, path)


def plot_task_curves(R: Sequence[Sequence[Any]], task_names: Sequence[str], path: str | Path) -> Path:
    """One line per task: its score after each later task, i.e. how much of it is kept over the stream."""
    _check_matrix(R, task_names)
    T = len(R)
    figure = _new_figure(max(4.5, 1.5 + 0.6 * T), 3.5)
    ax = figure.add_subplot()
    for i in range(T):
        steps = [l for l in range(i, T) if _score(R, l, i) is not None]
        ax.plot([l + 1 for l in steps], [_score(R, l, i) for l in steps], marker="o", label=f"{i + 1} {task_names[i]}")
    means = []
    for l in range(T):
        present = [s for s in (_score(R, l, i) for i in range(l + 1)) if s is not None]
        means.append(sum(present) / len(present) if present else math.nan)
    if T:
        ax.plot(range(1, T + 1), means, "k--", linewidth=2, label="mean of seen tasks")
    ax.set_xticks(range(1, T + 1))
    ax.set_xlabel("after learning task")
    ax.set_ylabel("score")
    ax.set_title("per-task score over the stream")
    ax.grid(alpha=0.3)
    if T:
        ax.legend(loc="best", fontsize=7)
    return _save(figure, path)


def plot_comparison(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Side-by-side bars of final accuracy and forgetting per strategy."""
    strategies = [str(row.get("strategy", MISSING)) for row in rows]
    figure = _new_figure(max(4.5, 1.5 + 1.0 * len(rows)), 3.5)
    ax = figure.add_subplot()
    width = 0.38
    for offset, key in ((-width / 2, "acc"), (width / 2, "forgetting")):
        values = [float(row[key]) if isinstance(row.get(key), (int, float)) else math.nan for row in rows]
        bars = ax.bar([x + offset for x in range(len(rows))], values, width, label=key)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(range(len(rows)), strategies, rotation=30, ha="right")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("score")
    ax.set_title("final accuracy and forgetting per strategy")
    ax.legend(loc="best", fontsize=8)
    return _save(figure, path)


# ---- the run's report -------------------------------------------------------------------------------


def _field(state: Mapping[str, Any], path: Path, key: str, kind: type | tuple[type, ...], expected: str) -> Any:
    if key not in state:
        raise StateFileError(f"{path}: missing field {key!r} ({expected})")
    value = state[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise StateFileError(f"{path}: field {key!r} is {value!r}; expected {expected}")
    return value


def read_state_file(run_dir: str | Path) -> dict[str, Any]:
    """state.json of a run directory, checked for the fields a report needs."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no state.json (not a pm-ray run directory, or the run never started)")
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StateFileError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(state, dict):
        raise StateFileError(f"{path}: top level is a {type(state).__name__}; expected a JSON object")
    if state.get("version") != 1:
        raise StateFileError(f"{path}: state version {state.get('version')!r}; expected 1")
    names = _field(state, path, "task_names", list, "a list of task names")
    if not all(isinstance(name, str) for name in names):
        raise StateFileError(f"{path}: field 'task_names' is {names!r}; expected a list of strings")
    completed = _field(state, path, "completed", int, f"an integer in 0..{len(names)}")
    if not 0 <= completed <= len(names):
        raise StateFileError(f"{path}: field 'completed' is {completed}; expected an integer in 0..{len(names)}")
    accuracy = _field(state, path, "accuracy", list, "a list of rows of scores")
    if len(accuracy) != completed:
        raise StateFileError(f"{path}: field 'accuracy' has {len(accuracy)} rows; expected one per completed task ({completed})")
    try:
        _check_matrix(accuracy, names)
    except ValueError as err:
        raise StateFileError(f"{path}: field 'accuracy': {err}") from None
    alphas = state.get("alphas", [])
    if not isinstance(alphas, list) or len(alphas) > completed or not all(
        a is None or isinstance(a, dict) or isinstance(a, (int, float)) and not isinstance(a, bool) for a in alphas
    ):
        raise StateFileError(f"{path}: field 'alphas' is {alphas!r}; expected at most {completed} entries of number, object or null")
    try:
        [alpha_stats(a) for a in alphas]
    except ValueError as err:
        raise StateFileError(f"{path}: field 'alphas': {err}") from None
    if not isinstance(state.get("metrics", {}), dict):
        raise StateFileError(f"{path}: field 'metrics' is {state['metrics']!r}; expected an object")
    if not isinstance(state.get("diagnostics", []), list):
        raise StateFileError(f"{path}: field 'diagnostics' is {state['diagnostics']!r}; expected a list")
    wall_s = state.get("wall_s", 0.0)
    if not isinstance(wall_s, (int, float)) or isinstance(wall_s, bool):
        raise StateFileError(f"{path}: field 'wall_s' is {wall_s!r}; expected a number of seconds")
    return state


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


def format_diagnostics_table(diagnostics: Sequence[Any], names: Sequence[str], alphas: Sequence[Any],
                             *, markdown: bool = False) -> str:
    """One row per task: where its training started (grad norm, loss drop) and how it ended."""
    columns = ["task", "start_grad_norm", "first_steps_loss_drop", "final_loss", "train_s", "task_s", "alpha"]
    body = []
    for i, d in enumerate(d for d in diagnostics if isinstance(d, dict)):
        alpha = alphas[i] if i < len(alphas) else None
        body.append([f"{i + 1} {names[i] if i < len(names) else '?'}",
                     *(format_number(d.get(k)) if d.get(k) is not None else MISSING
                       for k in ("start_grad_norm", "first_steps_loss_drop", "final_loss")),
                     *(f"{d[k]:.1f}" if isinstance(d.get(k), (int, float)) else MISSING for k in ("train_s", "task_s")),
                     format_alphas([alpha]) if alpha is not None else MISSING])
    return _render(columns, body, [False] + [True] * (len(columns) - 1), markdown)


def write_report(run_dir: str | Path) -> dict[str, Any]:
    """Tables and plots of one run from its state.json, into <run_dir>/report/. Prints nothing.

    Returns {"table": terminal text, "metrics": dict, "plots": [PNG paths]}."""
    run_dir = Path(run_dir)
    state = read_state_file(run_dir)
    names, R, alphas = state["task_names"], state["accuracy"], state.get("alphas", [])
    metrics = _final_metrics(state)
    summary_row = {"strategy": state.get("strategy", MISSING), **metrics, "alphas": alphas,
                   "wall_s": state.get("wall_s"), **diagnostics_summary(state.get("diagnostics", []))}
    progress = f"{state.get('run_name', run_dir.name)}: {state['completed']}/{len(names)} tasks"
    table = "\n\n".join([progress, format_results_table(R, names), format_comparison_table([summary_row])])

    out = run_dir / REPORT_DIR
    plots = [
        plot_accuracy_heatmap(R, names, out / "accuracy.png"),
        plot_alphas(alphas, names, out / "alphas.png"),
        plot_task_curves(R, names, out / "task_curves.png"),
    ]
    markdown = "\n\n".join([
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
    ]) + "\n"
    atomic_write_bytes(out / "summary.md", markdown.encode())
    return {"table": table, "metrics": metrics, "plots": [str(p) for p in plots]}
