"""The ranking section's goal table, from synthetic run records: each criterion against a hand check."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from pm_ray.compare_results import build_payload

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the script imports its sibling doc_blocks
_spec = importlib.util.spec_from_file_location("render_rank_results", ROOT / "benchmarks" / "render_rank_results.py")
rrr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rrr)


def run(strategy: str, seed: int, acc: float, aaa: float, forgetting: float) -> dict:
    return {
        "seed": seed,
        "run_name": f"compare-{strategy}-seed{seed}",
        "strategy": strategy,
        "acc": acc,
        "aaa": aaa,
        "forgetting": forgetting,
        "bwt": -forgetting,
        "alphas": [1.0, 0.5],
        "wall_s": 1.0,
        "test_rows": {"a": 200, "b": 200},
        "accuracy": [[0.5], [0.4, 0.5]],
        "tasks": ["a", "b"],
        "data_hashes": {"1-a": "h1", "2-b": "h2"},
    }


def test_goal_rows_check_each_criterion() -> None:
    runs = {
        "sequential": [run("sequential", s, 0.30 + s / 100, 0.50, 0.40) for s in range(3)],
        # pm: ACC above sequential by 0.05 every seed (interval excludes 0), AAA below, forgetting 0.1 = 1/4
        "pm": [run("pm", s, 0.35 + s / 100, 0.45 + s / 100, 0.10) for s in range(3)],
        # the variant: ACC equal on average, forgetting 0.3 (3/4 of sequential), clearly above pm's
        "fisher_elementwise": [
            run("fisher_elementwise", s, acc, 0.55, 0.30 + s / 1000) for s, acc in enumerate((0.29, 0.31, 0.33))
        ],
    }
    payload = build_payload("rank", [0, 1, 2], runs)
    pm, fe = rrr.goal_rows(payload, ["pm", "fisher_elementwise"])
    assert pm[0] == "pm" and pm[1].startswith("+0.050") and "(excludes 0) met" in pm[1]
    assert pm[2].endswith("missed") and pm[3] == "0.25 met" and pm[4] == "-"
    assert fe[1].startswith("+0.000") and fe[1].endswith(" met") and "excludes" not in fe[1]
    assert fe[2].startswith("+0.050") and fe[3] == "0.75 missed"
    assert fe[4].startswith("+0.201") and fe[4].endswith("(excludes 0) missed")
    block = rrr.render(payload, wall_s=7200.0, machine="test box", candidates=["pm"])
    assert "measured in 2.0 h on test box: 3 seeds (0, 1, 2), 200 test rows a task" in block and "#### Summary" in block
    summary = rrr.render_summary(payload, wall_s=None, machine="test box", candidates=["pm"])
    assert "| fisher_elementwise |" in summary and "ΔACC vs sequential (goal ≥ 0)" in summary


_spec_c = importlib.util.spec_from_file_location(
    "render_control_results", ROOT / "benchmarks" / "render_control_results.py"
)
rcr = importlib.util.module_from_spec(_spec_c)
_spec_c.loader.exec_module(rcr)


def test_control_claims_are_paired_differences() -> None:
    runs = {
        "sequential": [run("sequential", s, 0.30 + s / 100, 0.50, 0.40) for s in range(3)],
        # merge_only: +0.10 ACC every seed, forgetting 0.4 -> 0.1
        "merge_only": [run("merge_only", s, 0.40 + s / 100, 0.50, 0.10) for s in range(3)],
        # pm: equal to merge_only on average, with spread
        "pm": [run("pm", s, acc, 0.50, 0.10) for s, acc in enumerate((0.39, 0.41, 0.43))],
    }
    payload = build_payload("rank_cls", [0, 1, 2], runs)
    rows = {r[2]: r for r in rcr.claim_rows(payload)}
    assert {r[0] for r in rows.values()} == {"own"}  # no `_seen` runs
    assert set(rows) == {"merge_only − sequential", "pm − merge_only", "pm − sequential"}  # no pm_gaussian run
    mo = rows["merge_only − sequential"]
    assert mo[3].startswith("+0.100") and mo[3].endswith("(excludes 0)") and mo[5].startswith("-0.300")
    assert rows["pm − merge_only"][3][1:].startswith("0.000") and "excludes" not in rows["pm − merge_only"][3]
    block = rcr.render(payload, wall_s=1800.0, machine="test box")
    assert "measured in 30 min on test box: 3 seeds (0, 1, 2), 200 test rows a task, task-agnostic" in block


_spec_m = importlib.util.spec_from_file_location("merge_comparisons", ROOT / "benchmarks" / "merge_comparisons.py")
mc = importlib.util.module_from_spec(_spec_m)
_spec_m.loader.exec_module(mc)


def test_merged_comparison_equals_one_built_from_all_runs() -> None:
    seq = [run("sequential", s, 0.30 + s / 100, 0.50, 0.40) for s in range(3)]
    added = [run("merge_only", s, 0.33 + s / 50, 0.52, 0.20) for s in range(3)]
    first = build_payload("rank", [0, 1, 2], {"sequential": seq})
    later = build_payload("rank", [0, 1, 2], {"merge_only": added})
    assert mc.merged_payload([first, later]) == build_payload(
        "rank", [0, 1, 2], {"sequential": seq, "merge_only": added}
    )
    with pytest.raises(SystemExit, match="'sequential' is in more than one comparison"):
        mc.merged_payload([first, first])
    other = [{**r, "data_hashes": {"1-a": "other"}} for r in added]
    with pytest.raises(SystemExit, match="ran on other data"):
        mc.merged_payload([first, build_payload("rank", [0, 1, 2], {"merge_only": other})])
