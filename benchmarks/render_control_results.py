"""Regenerate docs/results.md's classification-control section from `make rank-cls`'s output.

    .venv/bin/python benchmarks/render_control_results.py runs/rank_cls/compare-rank_cls.json \
        [--wall-s 1800 --machine "..."]

Copies the comparison JSON to benchmarks/results/rank_textcls.json and its plots to docs/img/, then
rewrites the `control-results` block of docs/results.md (and the summary into the README's
`control-summary` block): the paper's qualitative pattern checked
per claim with paired per-seed differences (merge-only against sequential; the task-vector
perturbation against merge-only; Gaussian noise against merge-only), then the whole comparison
report (accuracy matrices, means with 95% intervals, per-task scores with standard errors, every run).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from doc_blocks import replace_block
from render_rank_results import _diff_text, _per_seed, parser, publish

from pm_ray.compare_report import comparison_markdown, summary_table
from pm_ray.stats import paired_difference
from pm_ray.tables import _render

ROOT = Path(__file__).resolve().parents[1]
# (claim, strategy, against): the P&M paper's pattern on class-incremental classification
CLAIMS = (
    ("merge-only above sequential", "merge_only", "sequential"),
    ("the task-vector perturbation adds to merge-only", "pm", "merge_only"),
    ("Gaussian noise adds nothing to merge-only", "pm_gaussian", "merge_only"),
    ("P&M above sequential", "pm", "sequential"),
)


# the head loss of each strategy's runs: trainer.head_logits own (no suffix) or seen (`_seen`)
PROTOCOLS = (("", "own"), ("_seen", "seen"))


def claim_rows(payload: Mapping[str, Any]) -> list[list[str]]:
    entries = {e["strategy"]: e for e in payload["strategies"]}
    rows = []
    for (claim, base, base_against), (suffix, loss) in ((c, p) for p in PROTOCOLS for c in CLAIMS):
        name, against = base + suffix, base_against + suffix
        if name not in entries or against not in entries:
            continue
        cells = [loss, claim, f"{name} − {against}"]
        for key in ("acc", "aaa", "forgetting"):
            cells.append(_diff_text(paired_difference(_per_seed(entries[name], key), _per_seed(entries[against], key))))
        rows.append(cells)
    return rows


def _heading(payload: Mapping[str, Any], wall_s: float | None, machine: str) -> str:
    seeds, ci = payload["seeds"], f"{payload['confidence']:.0%}"
    when = f" in {wall_s / 60:.0f} min" if wall_s is not None else ""
    rows = sorted(set(payload["strategies"][0]["test_rows"].values()))
    heading = (
        f"`make rank-cls` (jobs/rank_cls.yaml), measured{when} on {machine}: {len(seeds)} seeds "
        f"({', '.join(map(str, seeds))}), {'/'.join(map(str, rows))} test rows a task, task-agnostic accuracy "
        f"(argmax over every seen class); ± is the half-width of the {ci} Student-t interval over seeds."
    )
    return heading


def claims_table(payload: Mapping[str, Any]) -> str:
    header = ["head loss", "the paper's claim", "paired difference", "ΔACC", "ΔAAA", "Δforgetting"]
    return _render(header, claim_rows(payload), [False, False, False, True, True, True], True)


def render(payload: Mapping[str, Any], *, wall_s: float | None, machine: str) -> str:
    """The docs/results.md block: heading, the claims, plots, the whole comparison report."""
    ci = f"{payload['confidence']:.0%}"
    return (
        f"{_heading(payload, wall_s, machine)}\n\n#### The paper's pattern, claim by claim (paired per-seed differences; "
        f"`(excludes 0)`: the {ci} interval excludes 0)\n\n{claims_table(payload)}\n\n"
        "![ACC and forgetting](img/compare-rank_cls.png)\n![alpha per task](img/compare-rank_cls-alphas.png)\n\n"
        + comparison_markdown(payload).replace("### ", "#### ")
    )


def main() -> None:
    args = parser(__doc__, "make rank-cls").parse_args()
    payload = publish(args.comparison, "rank_textcls.json")
    block = render(payload, wall_s=args.wall_s, machine=args.machine)
    replace_block(args.doc, "control-results", block)
    summary = (
        f"{_heading(payload, args.wall_s, args.machine)}\n\n{summary_table(payload)}\n\n{claims_table(payload)}\n\n"
        "Accuracy matrices, per-task scores with their standard errors and every run: `docs/results.md`."
    )
    replace_block(args.readme, "control-summary", summary)
    print(block)


if __name__ == "__main__":
    main()
