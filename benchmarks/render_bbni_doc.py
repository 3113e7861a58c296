"""docs/bbni.md's tables, generated from the result files (no typed numbers).

    .venv/bin/python benchmarks/render_bbni_doc.py benchmarks/results/bbni_probe.json \
        benchmarks/results/demo.json > docs/bbni_tables.md

bbni_probe.json: `benchmarks/suite_difficulty.py --suite bbni --probe` over every candidate (zero-shot,
and each task trained alone from the base model with the demo's budget).
demo.json: `make demo`'s comparison (the sequential row gives the score right after each task is
learned in the stream and after the whole stream).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from tabulate import tabulate


def stderr(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def candidate_table(probe: dict) -> str:
    rows = []
    for name in probe["tasks"]:
        n = probe["zero_shot"][name]["total"]
        zero, own = probe["zero_shot"][name]["score"], probe["after_own_training"][name]
        rows.append([name, probe["rows"][name]["train"], n, probe["zero_shot"][name]["metric"],
                     f"{zero:.3f} ± {stderr(zero, n):.3f}", f"{own:.3f} ± {stderr(own, n):.3f}", f"{own - zero:+.3f}"])
    return tabulate(rows, headers=["candidate", "train rows", "test rows", "metric", "zero-shot",
                                   "trained alone", "gain"], tablefmt="github")


def stream_table(demo: list[dict]) -> str:
    seq = next(r for r in demo if r["strategy"] == "sequential")
    names, R = seq["tasks"], seq["accuracy"]
    rows = []
    for i, name in enumerate(names):
        n = seq["test_rows"][name]
        learned, final = R[i][i], R[-1][i]
        rows.append([name, n, f"{learned:.3f} ± {stderr(learned, n):.3f}", f"{final:.3f} ± {stderr(final, n):.3f}",
                     f"{max(R[l][i] for l in range(i, len(R))) - final:.3f}"])
    return tabulate(rows, headers=["task", "test rows", "right after learning it", "after the stream",
                                   "forgetting"], tablefmt="github")


def main() -> None:
    probe = json.loads(Path(sys.argv[1]).read_text())
    parts = ["### Every candidate: zero-shot and trained alone\n",
             f"Budget: {probe['config']['steps']} steps of {probe['config']['batch_size']} sequences, lr "
             f"{probe['config']['lr']}, rank-{probe['config']['rank']} LoRA on k,v; ± is the standard error "
             "sqrt(p(1-p)/n) of the test rows.\n", candidate_table(probe)]
    if len(sys.argv) > 2:
        demo = json.loads(Path(sys.argv[2]).read_text())
        parts += ["\n### The chosen stream under sequential fine-tuning (`make demo`)\n", stream_table(demo)]
    print("\n".join(parts))


if __name__ == "__main__":
    main()
