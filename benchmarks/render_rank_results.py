"""Regenerate docs/results.md's ranking section from the ranking benchmark's output (no typed numbers).

    .venv/bin/python benchmarks/render_rank_results.py runs/rank/compare-rank.json \
        [--wall-s 5400 --machine "..."] [--candidates pm,fisher_elementwise]

Copies the comparison JSON to benchmarks/results/rank_bbni.json and its plots to docs/img/, writes
the summary and the goal table into the README's `rank-summary` block, then rewrites the
`rank-results` block of docs/results.md: the comparison report (accuracy matrices,
means with 95% intervals over seeds, the paired difference to sequential, per-task scores with
their standard errors, every run) and the plasticity goal of the P&M variants, checked per criterion:
ACC and AAA at least sequential's (mean over seeds; whether the paired interval excludes 0),
forgetting at most half of sequential's, and forgetting no worse than plain P&M by more than the
paired interval.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from doc_blocks import replace_block

from pm_ray.compare_report import comparison_markdown, summary_table
from pm_ray.compare_results import as_payload
from pm_ray.stats import paired_difference
from pm_ray.tables import _render

ROOT = Path(__file__).resolve().parents[1]
PLAIN = "pm"  # plain P&M: the forgetting bound of the goal


def _per_seed(entry: Mapping[str, Any], key: str) -> dict[str, float]:
    return {str(r["seed"]): float(r[key]) for r in entry["runs"]}


def _diff_text(d: Mapping[str, Any]) -> str:
    half = d.get("ci_half")
    text = f"{d['mean']:+.3f}" + ("" if half is None else f" ± {half:.3f}")
    return text + (" (excludes 0)" if d.get("significant") else "")


def goal_rows(payload: Mapping[str, Any], candidates: list[str]) -> list[list[str]]:
    """One row per candidate: ΔACC, ΔAAA (paired, vs sequential), forgetting / sequential's,
    Δforgetting vs plain P&M, and whether each criterion is met."""
    entries = {e["strategy"]: e for e in payload["strategies"]}
    seq, plain = entries["sequential"], entries.get(PLAIN)
    rows = []
    for name in candidates:
        e = entries[name]
        d_acc = paired_difference(_per_seed(e, "acc"), _per_seed(seq, "acc"))
        d_aaa = paired_difference(_per_seed(e, "aaa"), _per_seed(seq, "aaa"))
        ratio = e["forgetting"] / seq["forgetting"] if seq["forgetting"] else float("nan")
        cells = [
            name,
            _diff_text(d_acc) + (" met" if d_acc["mean"] >= 0 else " missed"),
            _diff_text(d_aaa) + (" met" if d_aaa["mean"] >= 0 else " missed"),
            f"{ratio:.2f}" + (" met" if ratio <= 0.5 else " missed"),
        ]
        if plain is None or name == PLAIN:
            cells.append("-")
        else:
            d_forg = paired_difference(_per_seed(e, "forgetting"), _per_seed(plain, "forgetting"))
            worse = d_forg["significant"] and d_forg["mean"] > 0
            cells.append(_diff_text(d_forg) + (" missed" if worse else " met"))
        rows.append(cells)
    return rows


def goal_table(payload: Mapping[str, Any], candidates: list[str]) -> str:
    header = [
        "variant",
        "ΔACC vs sequential (goal ≥ 0)",
        "ΔAAA vs sequential (goal ≥ 0)",
        "forgetting / sequential's (goal ≤ 0.5)",
        f"Δforgetting vs {PLAIN} (goal: interval not above 0)",
    ]
    return _render(header, goal_rows(payload, candidates), [False, True, True, True, True], True)


def _heading(payload: Mapping[str, Any], wall_s: float | None, machine: str) -> str:
    seeds, ci = payload["seeds"], f"{payload['confidence']:.0%}"
    when = f" in {wall_s / 3600:.1f} h" if wall_s is not None else ""
    rows = sorted(set(payload["strategies"][0]["test_rows"].values()))
    return (
        f"`make rank` (jobs/rank.yaml), measured{when} on {machine}: {len(seeds)} seeds "
        f"({', '.join(map(str, seeds))}), {'/'.join(map(str, rows))} test rows a task; "
        f"± is the half-width of the {ci} Student-t interval over seeds."
    )


GOAL_NOTE = (
    "Δ is the paired per-seed difference (same seed, same data); `met` compares the mean with the goal, "
    "`(excludes 0)` marks a 95% interval that excludes 0."
)


def render(payload: Mapping[str, Any], *, wall_s: float | None, machine: str, candidates: list[str]) -> str:
    """The docs/results.md block: heading, goal table, plots, the whole comparison report."""
    return (
        f"{_heading(payload, wall_s, machine)}\n\n"
        f"#### The plasticity goal (issue: beat sequential on ACC and AAA, halve its forgetting)\n\n"
        f"{goal_table(payload, candidates)}\n\n{GOAL_NOTE}\n\n"
        f"![ACC and forgetting](img/compare-rank.png)\n![alpha per task](img/compare-rank-alphas.png)\n\n"
        + comparison_markdown(payload).replace("### ", "#### ")
    )


def render_summary(payload: Mapping[str, Any], *, wall_s: float | None, machine: str, candidates: list[str]) -> str:
    """The README block: heading, the summary table and the goal table."""
    return (
        f"{_heading(payload, wall_s, machine)}\n\n{summary_table(payload)}\n\n"
        f"{goal_table(payload, candidates)}\n\n{GOAL_NOTE} Accuracy matrices, per-task scores with their "
        "standard errors and every run: `docs/results.md`."
    )


def parser(doc: str, command: str) -> argparse.ArgumentParser:
    """The renderers' common arguments: the comparison JSON, its measured wall time, the machine."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("comparison", type=Path)
    p.add_argument("--wall-s", type=float, default=None, help=f"measured wall time of `{command}`")
    p.add_argument("--machine", default="the 2-core CPU development machine")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    return p


def publish(comparison: Path, results_name: str) -> dict[str, Any]:
    """The comparison's payload; the JSON copied to benchmarks/results/<results_name> and its plots
    to docs/img/ (unless it is that copy)."""
    payload = as_payload(json.loads(comparison.read_text()))
    results = ROOT / "benchmarks" / "results" / results_name
    if comparison.resolve() != results.resolve():
        shutil.copyfile(comparison, results)
        img = ROOT / "docs" / "img"
        img.mkdir(exist_ok=True)
        for png in comparison.parent.glob(f"{comparison.stem}*.png"):
            shutil.copyfile(png, img / png.name)
    return payload


def main() -> None:
    p = parser(__doc__, "make rank")
    p.add_argument("--candidates", default="pm", help="the P&M variants the goal is checked for")
    args = p.parse_args()
    payload = publish(args.comparison, "rank_bbni.json")
    candidates = [c for c in args.candidates.split(",") if c]
    block = render(payload, wall_s=args.wall_s, machine=args.machine, candidates=candidates)
    replace_block(args.doc, "rank-results", block)
    summary = render_summary(payload, wall_s=args.wall_s, machine=args.machine, candidates=candidates)
    replace_block(args.readme, "rank-summary", summary)
    print(block)


if __name__ == "__main__":
    main()
