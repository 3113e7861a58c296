"""Terminal and Markdown tables of continual runs (rendered with tabulate).

R is the accuracy matrix: R[l][i] = score on task i after learning task l (0-based in code). Only the
lower triangle (i <= l) is shown; entries above the diagonal may be absent, None or NaN.

An α per task is a float (one coefficient), a {module: float} dict (per-module coefficients, shown as
mean with min..max) or None (strategies without coefficients).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import tabulate as tabulate_module
from tabulate import DataRow, TableFormat, tabulate

from pm_ray.core.coefficient import alpha_stats

Alpha = float | Mapping[str, float] | None

COMPARISON_COLUMNS = ("strategy", "acc", "aaa", "forgetting", "bwt", "alphas", "wall_s")
MISSING = "-"


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
        raise ValueError(
            f"accuracy matrix has {len(R)} rows but only {len(task_names)} task names; expected one name per row"
        )
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


_MIN_PADDING_LOCK = threading.Lock()


def _markdown_rule(colwidths: list[int], colaligns: list[str]) -> str:
    cells = ["-" * (w - 3) + ":" if a == "right" else "-" * (w - 2) for w, a in zip(colwidths, colaligns)]
    return "| " + " | ".join(cells) + " |"


# A pipe table whose rule row is itself a row of cells ("| --- | --: |"), aligned like the rest.
MARKDOWN = TableFormat(
    lineabove=None,
    linebelowheader=_markdown_rule,
    linebetweenrows=None,
    linebelow=None,
    headerrow=DataRow("|", "|", "|"),
    datarow=DataRow("|", "|", "|"),
    padding=1,
    with_header_hide=None,
)


def _render(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool], markdown: bool) -> str:
    """A tabulate table, columns as wide as their widest cell (at least 3): a pipe table when
    ``markdown`` (still aligned), else tabulate's "simple" format."""
    if markdown:
        header = [h.replace("|", "\\|") for h in header]
        rows = [[c.replace("|", "\\|") for c in row] for row in rows]
    header = [h.ljust(3) for h in header]
    align = ["right" if r else "left" for r in right]
    with _MIN_PADDING_LOCK:  # tabulate widens headers by MIN_PADDING; pm-ray's tables are tight
        saved, tabulate_module.MIN_PADDING = tabulate_module.MIN_PADDING, 0
        try:
            text = tabulate(
                rows, header, tablefmt=MARKDOWN if markdown else "simple", disable_numparse=True, colalign=align
            )
        finally:
            tabulate_module.MIN_PADDING = saved
    return "\n".join(line.rstrip() if not markdown else line for line in text.splitlines())


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


def format_diagnostics_table(
    diagnostics: Sequence[Any], names: Sequence[str], alphas: Sequence[Any], *, markdown: bool = False
) -> str:
    """One row per task: where its training started (grad norm, loss drop) and how it ended."""
    columns = ["task", "start_grad_norm", "first_steps_loss_drop", "final_loss", "train_s", "task_s", "alpha"]
    body = []
    for i, d in enumerate(d for d in diagnostics if isinstance(d, dict)):
        alpha = alphas[i] if i < len(alphas) else None
        body.append(
            [
                f"{i + 1} {names[i] if i < len(names) else '?'}",
                *(
                    format_number(d.get(k)) if d.get(k) is not None else MISSING
                    for k in ("start_grad_norm", "first_steps_loss_drop", "final_loss")
                ),
                *(f"{d[k]:.1f}" if isinstance(d.get(k), (int, float)) else MISSING for k in ("train_s", "task_s")),
                format_alphas([alpha]) if alpha is not None else MISSING,
            ]
        )
    return _render(columns, body, [False] + [True] * (len(columns) - 1), markdown)
