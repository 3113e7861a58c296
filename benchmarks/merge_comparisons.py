"""One comparison JSON (and its plots) from several `pm-ray compare` outputs on the same stream.

    .venv/bin/python benchmarks/merge_comparisons.py benchmarks/results/rank_bbni.json \
        runs/rank/compare-rank.json --out runs/rank/compare-rank-all.json

For strategies added to a benchmark after its first runs (possibly on another machine): every run
record is taken as it is, the strategies in file order, and the payload (means, intervals, paired
differences to sequential) is rebuilt from the records by `pm_ray.compare_results.build_payload`.
Refused: a strategy in two files (which run would count?), or runs of different data (the
comparison's data hashes differ), since a paired difference needs the same stream.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pm_ray.compare_report import comparison_markdown, comparison_plots
from pm_ray.compare_results import as_payload, build_payload


def merged_payload(payloads: list[dict[str, Any]]) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {}
    seeds: list[Any] = []
    hashes = None
    for payload in payloads:
        for entry in payload["strategies"]:
            name = entry["strategy"]
            if name in runs:
                raise SystemExit(f"strategy {name!r} is in more than one comparison; keep one of them")
            if hashes is not None and entry["data_hashes"] != hashes:
                raise SystemExit(f"strategy {name!r} ran on other data (data hashes differ); not comparable")
            hashes = entry["data_hashes"]
            runs[name] = entry["runs"]
            seeds += [r["seed"] for r in entry["runs"] if r["seed"] not in seeds]
    return build_payload(payloads[0]["spec"], sorted(seeds), runs, confidence=payloads[0]["confidence"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("comparisons", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True, help="the merged JSON; plots and .md beside it")
    args = p.parse_args()
    payload = merged_payload([as_payload(json.loads(path.read_text())) for path in args.comparisons])
    args.out.write_text(json.dumps(payload, indent=2))
    args.out.with_suffix(".md").write_text(comparison_markdown(payload))
    comparison_plots(payload, args.out.with_suffix(""))
    print(f"wrote {args.out} ({len(payload['strategies'])} strategies, seeds {payload['seeds']})")


if __name__ == "__main__":
    main()
