"""docs/bbni.md's tables, generated from the result files (no typed numbers).

    .venv/bin/python benchmarks/render_bbni_doc.py benchmarks/results/demo.json \
        benchmarks/results/bbni_probe_*.json

rewrites the `bbni-tables` block of docs/bbni.md.

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

from doc_blocks import replace_block
from tabulate import tabulate

from pm_ray.compare_results import strategy_entries
from pm_ray.data.bbni import BBNI_TASKS, SIZES

ROOT = Path(__file__).resolve().parents[1]


def stderr(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def candidate_table(probes: list[dict]) -> str:
    """One row a candidate; a later probe of the same candidate replaces an earlier one's figures."""
    latest: dict[str, tuple[dict, float | None, dict]] = {}
    for probe in probes:
        for name, result in probe["zero_shot"].items():
            own = probe["after_own_training"].get(name)
            if own is None and name in latest:
                own = latest[name][1]
            latest[name] = (result, own, probe)
    rows = []
    for name, (result, own, probe) in latest.items():
        n, zero = result["total"], result["score"]
        rows.append(
            [
                name,
                probe["rows"][name]["train"],
                n,
                result["metric"],
                f"{zero:.2f} ± {stderr(zero, n):.2f}",
                "-" if own is None else f"{own:.2f} ± {stderr(own, n):.2f}",
                "-" if own is None else f"{own - zero:+.2f}",
                "yes" if name in BBNI_TASKS else "no",
            ]
        )
    return tabulate(
        rows,
        headers=["candidate", "train rows", "test rows", "metric", "zero-shot", "trained alone", "gain", "in bbni"],
        tablefmt="github",
    )


def stream_table(demo: list[dict] | dict, zero_shot: dict[str, float]) -> str:
    """From a comparison JSON of either format; with several seeds, the sequential row's mean matrix."""
    seq = next(r for r in strategy_entries(demo) if r["strategy"] == "sequential")
    names, R = seq["tasks"], seq["accuracy"]
    rows = []
    for i, name in enumerate(names):
        n = seq["test_rows"][name]
        learned, final = R[i][i], R[-1][i]
        zero = zero_shot.get(name)
        rows.append(
            [
                i + 1,
                name,
                n,
                "-" if zero is None else f"{zero:.2f}",
                f"{learned:.2f} ± {stderr(learned, n):.2f}",
                f"{final:.2f} ± {stderr(final, n):.2f}",
                f"{max(R[l][i] for l in range(i, len(R))) - final:.2f}",
            ]
        )
    return tabulate(
        rows,
        headers=[
            "#",
            "task",
            "test rows",
            "zero-shot",
            "right after learning it (sequential)",
            "after the stream (sequential)",
            "forgetting",
        ],
        tablefmt="github",
    )


def read_probe(path: Path) -> dict:
    """A probe's final JSON, or the progress lines of an interrupted probe: zero-shot of every
    candidate, and "trained alone" for the tasks it reached (the others are left out)."""
    text, decoder, lines, at = path.read_text(), json.JSONDecoder(), [], 0
    while at < len(text):  # the probe prints progress lines, then (when it finishes) the whole result
        if text[at].isspace():
            at += 1
            continue
        value, at = decoder.raw_decode(text, at)
        lines.append(value)
    if "after_own_training" in lines[-1]:
        return lines[-1]
    zero = next(x["zero_shot"] for x in lines if "zero_shot" in x)
    own = {x["after"]: x["scores"][x["after"]] for x in lines if "after" in x}
    train, test = SIZES["quick"]
    return {
        "tasks": list(own),
        "config": next(x["config"] for x in lines if "config" in x),
        "rows": {k: {"train": train, "test": test} for k in zero},
        "zero_shot": {k: {"score": v, "total": test, "metric": "-"} for k, v in zero.items()},
        "after_own_training": own,
        "zero_shot_only": [k for k in zero if k not in own],
    }


def main() -> None:
    demo = json.loads(Path(sys.argv[1]).read_text())
    probes = [read_probe(Path(p)) for p in sys.argv[2:]]
    zero_shot = {name: r["score"] for p in probes for name, r in p["zero_shot"].items()}
    cfg = probes[0]["config"]
    block = "\n".join(
        [
            "#### The stream under sequential fine-tuning (`make demo`'s sequential run)\n",
            stream_table(demo, zero_shot),
            "\n#### Candidates: zero-shot and trained alone from the base model\n",
            f"Budget: {cfg['steps']} steps of {cfg['batch_size']} sequences, lr {cfg['lr']}, rank-{cfg['rank']} LoRA "
            "on k,v, in one process (`benchmarks/suite_difficulty.py --probe`). ± is the standard error "
            "sqrt(p(1-p)/n) over the test rows.\n",
            candidate_table(probes),
        ]
    )
    replace_block(ROOT / "docs" / "bbni.md", "bbni-tables", block)
    print(block)


if __name__ == "__main__":
    main()
