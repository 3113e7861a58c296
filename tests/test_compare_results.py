"""The comparison JSON/Markdown/plots from synthetic run records (no Ray, no training)."""

from __future__ import annotations

import json
import math

import pytest

from pm_ray.compare_report import comparison_markdown, comparison_plots
from pm_ray.compare_results import as_payload, build_payload, mean_matrix, strategy_entries


def record(strategy: str, seed: int, acc: float, forgetting: float, alpha=None) -> dict:
    R = [[0.5], [0.4, acc * 2 - 0.4]]
    return {
        "seed": seed,
        "run_name": f"compare-{strategy}-seed{seed}",
        "strategy": strategy,
        "acc": acc,
        "aaa": 0.5,
        "forgetting": forgetting,
        "bwt": -forgetting,
        "alphas": [1.0, alpha],
        "wall_s": 10.0,
        "test_rows": {"a": 40, "b": 40},
        "accuracy": R,
        "tasks": ["a", "b"],
        "data_hashes": {"1-a": "h1", "2-b": "h2"},
    }


def payload() -> dict:
    runs = {
        "sequential": [record("sequential", s, acc, 0.3) for s, acc in ((0, 0.40), (1, 0.44), (2, 0.42))],
        "pm": [
            record("pm", s, acc, 0.1, {"m1": a, "m2": a + 0.2})
            for s, acc, a in ((0, 0.5, 0.3), (1, 0.5, 0.5), (2, 0.53, 0.4))
        ],
    }
    return build_payload("cmp", [0, 1, 2], runs)


def test_build_payload_summaries_and_paired() -> None:
    p = payload()
    assert p["format"] == 2 and p["seeds"] == [0, 1, 2] and p["reference"] == "sequential" and p["same_data"]
    seq, pm = p["strategies"]
    assert (
        seq["paired"] is None
        and seq["acc"] == pytest.approx(0.42)
        and seq["summary"]["acc"]["std"] == pytest.approx(0.02)
    )
    assert seq["summary"]["acc"]["ci_half"] == pytest.approx(4.302652729911275 * 0.02 / math.sqrt(3))
    d = pm["paired"]["acc"]
    assert list(d["per_seed"]) == ["0", "1", "2"] and list(d["per_seed"].values()) == pytest.approx([0.1, 0.06, 0.11])
    assert pm["paired"]["forgetting"]["mean"] == pytest.approx(-0.2) and pm["paired"]["forgetting"][
        "std"
    ] == pytest.approx(0)
    # α per task: the per-module mean of each seed, then the mean over seeds
    assert pm["alphas"] == pytest.approx([1.0, 0.5]) and seq["alphas"][1] is None and seq["alpha_summary"][1] is None
    assert pm["accuracy"][1][1] == pytest.approx((0.6 + 0.6 + 0.66) / 3)
    se = pm["task_scores"]["b"]["se"]
    assert se == pytest.approx(math.sqrt(0.62 * 0.38 / 40))
    assert pm["wall_s"] == 30.0 and p["wall_s"] == 60.0
    json.dumps(p, allow_nan=False)  # strict JSON: no NaN anywhere


def test_no_reference_and_mean_matrix() -> None:
    p = build_payload("x", [0], {"pm": [record("pm", 0, 0.5, 0.1)]})
    assert p["reference"] is None and p["strategies"][0]["paired"] is None
    assert mean_matrix([[[0.2], [0.4, None]], [[0.4], [float("nan"), 0.8]]]) == [[pytest.approx(0.3)], [0.4, 0.8]]


def test_format_one_is_read_back() -> None:
    old = [
        {k: v for k, v in record(s, 0, 0.4, 0.2).items() if k not in ("seed", "run_name")} for s in ("pm", "sequential")
    ]
    assert strategy_entries(old) == old
    p = as_payload(old)
    assert p["seeds"] == [None] and [e["strategy"] for e in p["strategies"]] == ["pm", "sequential"]
    assert as_payload(p) is p and "one seed" in comparison_markdown(p)
    with pytest.raises(ValueError, match="not a pm-ray comparison JSON"):
        as_payload({"rows": []})


def test_markdown_and_plots(tmp_path) -> None:
    from matplotlib.image import imread

    p = payload()
    md = comparison_markdown(p)
    assert "95% Student-t interval over 3 seeds (0, 1, 2)" in md
    assert "0.510 ± 0.043" in md  # pm: mean ACC ± t_{.975,2} · std / sqrt(3)
    assert "+0.090 ± " in md and " *" in md  # pm's paired ΔACC excludes 0
    assert "0.620 ± 0.077" in md  # task b's final score and its binomial SE
    paths = comparison_plots(p, tmp_path / "compare-cmp")
    assert [x.name for x in paths] == [
        "compare-cmp.png",
        "compare-cmp-alphas.png",
        "compare-cmp-accuracy-sequential.png",
        "compare-cmp-accuracy-pm.png",
    ]
    for path in paths:
        assert imread(path).ndim == 3
