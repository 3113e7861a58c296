"""The comparison's Markdown (``compare-<spec>.md``) and plots, rendered from its JSON payload
(pm_ray/compare_results.py), so that benchmarks/ regenerates them from the saved file alone."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pm_ray.compare_results import METRICS
from pm_ray.tables import MISSING, _render, format_alphas, format_comparison_table, format_results_table

LABELS = {"acc": "ACC", "aaa": "AAA", "forgetting": "forgetting", "bwt": "BWT"}
PAIRED = ("acc", "forgetting")  # the paired-difference columns of the summary table


def _mean_ci(s: Mapping[str, Any] | None, signed: bool = False) -> str:
    if not s or s.get("mean") is None:
        return MISSING
    mean = f"{s['mean']:+.3f}" if signed else f"{s['mean']:.3f}"
    return mean if s.get("ci_half") is None else f"{mean} ± {s['ci_half']:.3f}"


def _seeds_text(payload: Mapping[str, Any]) -> str:
    seeds = payload["seeds"]
    if seeds == [None]:
        return "one seed"
    return f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(str(s) for s in seeds)})"


def summary_table(payload: Mapping[str, Any]) -> str:
    """strategy | ACC | AAA | forgetting | BWT | Δ vs reference | α per task | wall s: mean ± the
    half-width of the t-interval over seeds; Δ is the paired per-seed difference (* : interval excludes 0)."""
    ref = payload.get("reference")
    header = ["strategy", *(LABELS[k] for k in METRICS)]
    if ref:
        header += [f"Δ{LABELS[k]} vs {ref}" for k in PAIRED]
    header += ["α per task", "wall s"]
    body = []
    for e in payload["strategies"]:
        cells = [e["strategy"], *(_mean_ci(e["summary"][k]) for k in METRICS)]
        if ref:
            for k in PAIRED:
                d = (e.get("paired") or {}).get(k)
                cells.append(_mean_ci(d, signed=True) + (" *" if d and d.get("significant") else "") if d else MISSING)
        cells += [format_alphas(e["alphas"]), f"{e['wall_s']:.1f}"]
        body.append(cells)
    right = [h not in ("strategy", "α per task") for h in header]
    return _render(header, body, right, True)


def task_table(payload: Mapping[str, Any]) -> str:
    """task | test rows | each strategy's final score (mean over seeds) ± its binomial standard error."""
    entries = payload["strategies"]
    tasks = entries[0]["tasks"]
    header = ["task", "test rows", *(e["strategy"] for e in entries)]
    body = []
    for i, task in enumerate(tasks):
        row = [f"{i + 1} {task}", str(entries[0]["test_rows"].get(task, MISSING))]
        for e in entries:
            score = e["task_scores"].get(task, {})
            mean, se = (score.get("final") or {}).get("mean"), score.get("se")
            row.append(MISSING if mean is None else f"{mean:.3f}" + ("" if se is None else f" ± {se:.3f}"))
        body.append(row)
    return _render(header, body, [False] + [True] * (len(header) - 1), True)


def per_seed_table(payload: Mapping[str, Any]) -> str:
    rows = []
    for e in payload["strategies"]:
        for r in e["runs"]:
            label = e["strategy"] if r.get("seed") is None else f"{e['strategy']} (seed {r['seed']})"
            keep = {k: v for k, v in r.items() if k not in ("seed", "run_name", "accuracy", "tasks", "test_rows")}
            rows.append({**{k: v for k, v in keep.items() if k != "data_hashes"}, "strategy": label})
    return format_comparison_table(rows, markdown=True)


def comparison_markdown(payload: Mapping[str, Any]) -> str:
    entries = payload["strategies"]
    several = len(payload["seeds"]) > 1
    ci = f"{payload['confidence']:.0%}"
    parts = []
    for e in entries:
        parts.append(
            f"### {e['strategy']}: accuracy after each task (row l = the merged model after task l"
            + (f", mean over {len(e['runs'])} seed{'s' if len(e['runs']) != 1 else ''}" if several else "")
            + ")\n\n"
            + format_results_table(e["accuracy"], e["tasks"], markdown=True)
        )
    note = (
        f"mean ± half-width of the {ci} Student-t interval over {_seeds_text(payload)}"
        if several
        else f"{_seeds_text(payload)}: no interval, read differences against the test rows below"
    )
    if payload.get("reference"):
        note += f"; Δ = paired per-seed difference to {payload['reference']}" + (
            " (* : its interval excludes 0)" if several else ""
        )
    parts.append(f"### Summary ({note})\n\n" + summary_table(payload))
    parts.append(
        "### Final score per task (± binomial standard error sqrt(p(1-p)/n) of one seed's score on n test rows)"
        "\n\n" + task_table(payload)
    )
    parts.append("### Every run\n\n" + per_seed_table(payload))
    rows = entries[0]["test_rows"]
    parts.append(
        "Test rows per task: "
        + ", ".join(f"{k} {v}" for k, v in rows.items())
        + " (one answer moves a task's score by 1/rows)."
    )
    return "\n\n".join(parts)


def comparison_plots(payload: Mapping[str, Any], stem: Path) -> list[Path]:
    """``<stem>.png`` (ACC and forgetting with interval error bars), ``<stem>-alphas.png`` (α per task
    per strategy) and ``<stem>-accuracy-<strategy>.png`` (each strategy's mean accuracy matrix)."""
    from pm_ray.plots import plot_accuracy_heatmap, plot_comparison, plot_strategy_alphas

    entries = payload["strategies"]
    errors = {k: [e["summary"][k].get("ci_half") for e in entries] for k in ("acc", "forgetting")}
    paths = [
        plot_comparison(entries, stem.with_name(stem.name + ".png"), errors=errors),
        plot_strategy_alphas(entries, stem.with_name(stem.name + "-alphas.png")),
    ]
    for e in entries:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", str(e["strategy"]))
        path = stem.with_name(f"{stem.name}-accuracy-{safe}.png")
        title = f"{e['strategy']}: accuracy matrix" + (
            f" (mean over {len(e['runs'])} seeds)" if len(e["runs"]) > 1 else ""
        )
        paths.append(plot_accuracy_heatmap(e["accuracy"], e["tasks"], path, title=title))
    return paths
