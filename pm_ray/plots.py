"""PNG plots of continual runs: the accuracy matrix, α per task, per-task curves, a comparison.

Plots are drawn on a bare ``Figure`` with the Agg canvas: no pyplot global state and no GUI backend,
so they work from Ray workers and threads, and never change the backend of whoever imported us.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pm_ray.core.coefficient import alpha_stats
from pm_ray.core.tensors import atomic_write_bytes
from pm_ray.tables import MISSING, Alpha, _check_matrix, _score


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


def plot_accuracy_heatmap(
    R: Sequence[Sequence[Any]], task_names: Sequence[str], path: str | Path, *, title: str = "accuracy matrix"
) -> Path:
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
                ax.text(
                    i,
                    l,
                    f"{grid[l, i]:.3f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if dark_cell else "black",
                )
    if not T:
        ax.text(0.5, 0.5, "no task completed yet", ha="center", va="center", transform=ax.transAxes)
    labels = [str(name) for name in task_names[:T]]
    ax.set_xticks(range(T), labels, rotation=45, ha="right")
    ax.set_yticks(range(T), [f"{l + 1} {name}" for l, name in enumerate(labels)])
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after learning task")
    ax.set_title(title)
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


def plot_comparison(
    rows: Sequence[Mapping[str, Any]], path: str | Path, *, errors: Mapping[str, Sequence[Any]] | None = None
) -> Path:
    """Side-by-side bars of final accuracy and forgetting per strategy; ``errors`` ({"acc": [...],
    "forgetting": [...]}, one half-width or None per row) draws error bars (e.g. a CI over seeds)."""
    strategies = [str(row.get("strategy", MISSING)) for row in rows]
    figure = _new_figure(max(4.5, 1.5 + 1.0 * len(rows)), 3.5)
    ax = figure.add_subplot()
    width = 0.38
    for offset, key in ((-width / 2, "acc"), (width / 2, "forgetting")):
        values = [float(row[key]) if isinstance(row.get(key), (int, float)) else math.nan for row in rows]
        halves = list((errors or {}).get(key) or [])
        yerr = [float(h) if isinstance(h, (int, float)) else 0.0 for h in halves] if any(halves) else None
        bars = ax.bar([x + offset for x in range(len(rows))], values, width, label=key, yerr=yerr, capsize=4)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=8 if yerr else 0)
    ax.set_xticks(range(len(rows)), strategies, rotation=30, ha="right")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("score")
    ax.margins(y=0.15)  # room for the labels above the error bars
    ax.set_title("final accuracy and forgetting per strategy" + (" (bars: CI over seeds)" if errors else ""))
    ax.legend(loc="best", fontsize=8)
    return _save(figure, path)


def plot_strategy_alphas(entries: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """α per task, one line per strategy (its mean over seeds; error bars: the CI half-width in
    ``alpha_summary`` when there is one). Strategies without α are listed in the title."""
    figure = _new_figure(max(4.5, 2.0 + 0.7 * max((len(e.get("alphas") or []) for e in entries), default=1)), 3.5)
    ax = figure.add_subplot()
    without = []
    for e in entries:
        alphas = list(e.get("alphas") or [])
        points = [(t, a) for t, a in enumerate(alphas) if isinstance(a, (int, float))]
        if not points:
            without.append(str(e.get("strategy", MISSING)))
            continue
        spread = list(e.get("alpha_summary") or [])
        yerr = [(spread[t] or {}).get("ci_half") or 0.0 if t < len(spread) else 0.0 for t, _ in points]
        ax.errorbar(
            [t + 1 for t, _ in points], [a for _, a in points], yerr=yerr, fmt="o-", capsize=3, label=e["strategy"]
        )
    names = next((e.get("tasks") for e in entries if e.get("tasks")), [])
    ax.set_xticks(range(1, len(names) + 1), [f"{t + 1} {n}" for t, n in enumerate(names)], rotation=45, ha="right")
    ax.set_xlabel("task")
    ax.set_ylabel("α")
    ax.set_title("merge coefficient per task" + (f" (no α: {', '.join(without)})" if without else ""), fontsize=9)
    ax.grid(alpha=0.3)
    if len(without) < len(entries):
        ax.legend(loc="best", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no strategy has a merge coefficient α", ha="center", va="center", transform=ax.transAxes)
    return _save(figure, path)
