"""Regenerate the README's demo results section from the demo's output files (no typed numbers).

    .venv/bin/python benchmarks/render_demo_results.py runs/compare-demo.json [--wall-s 512 --machine "..."]

Copies the comparison JSON to benchmarks/results/demo.json and rewrites the README block between
the `demo-results` markers with both accuracy matrices and the summary table, rendered by the same
code that `pm-ray compare` prints with.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from doc_blocks import replace_block

from pm_ray.compare_report import comparison_markdown
from pm_ray.compare_results import as_payload

ROOT = Path(__file__).resolve().parents[1]


def render(data: list[dict] | dict, *, wall_s: float | None, machine: str) -> str:
    """The README block from a comparison JSON of either format (pm_ray.compare_results.as_payload)."""
    payload = as_payload(data)
    report = comparison_markdown(payload)
    when = f" in {wall_s:.0f} s" if wall_s is not None else ""
    seeds = payload["seeds"]
    resolution = (
        "one seed, so read differences against the resolution given by the test rows"
        if len(seeds) == 1
        else f"{len(seeds)} seeds; ± is the 95% interval over seeds"
    )
    return (
        f"`make demo` (jobs/demo.yaml), measured{when} on {machine}; {resolution}.\n\n{report.replace('### ', '#### ')}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("comparison", type=Path)
    p.add_argument("--wall-s", type=float, default=None, help="measured wall time of `make demo`")
    p.add_argument("--machine", default="the 2-core CPU development machine")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = p.parse_args()
    payload = json.loads(args.comparison.read_text())
    results = ROOT / "benchmarks" / "results" / "demo.json"
    if args.comparison.resolve() != results.resolve():
        shutil.copyfile(args.comparison, results)
    block = render(payload, wall_s=args.wall_s, machine=args.machine)
    replace_block(args.readme, "demo-results", block)
    print(block)


if __name__ == "__main__":
    main()
