"""benchmarks/task_time_breakdown.py: phase fractions from state.json diagnostics."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("task_time_breakdown", ROOT / "benchmarks" / "task_time_breakdown.py")
ttb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ttb)


def test_phases_and_other_sum_to_task_time():
    diag = {"task": 1, "train_s": 70.0, "fisher_s": 5.0, "merge_s": 2.0, "eval_s": 20.0, "task_s": 100.0}
    seconds = ttb.task_seconds(diag)
    assert seconds == {"train": 70.0, "fisher": 5.0, "merge": 2.0, "evaluation": 20.0, "other": pytest.approx(3.0)}
    assert sum(ttb.fractions(seconds).values()) == pytest.approx(1.0)


def test_old_state_without_phase_timings_is_not_split():
    state = {
        "strategy": "pm",
        "diagnostics": [{"task": 1, "train_s": 60.0, "task_s": 100.0}, {"task": 2, "train_s": 90.0, "task_s": 100.0}],
    }
    out = ttb.breakdown(state)
    assert out["fraction"] == {"train": 0.75, "not_split": 0.25}
    assert out["phase_timings_recorded"] is False
    assert out["train_fraction_meets_target"] is True


def test_comparison_payload_and_cli(tmp_path, capsys):
    state = {
        "strategy": "seq",
        "diagnostics": [{"task": 1, "train_s": 1.0, "task_s": 4.0, "fisher_s": 1.0, "merge_s": 1.0, "eval_s": 1.0}],
    }
    path = tmp_path / "cmp.json"
    path.write_text(json.dumps({"runs": [state, {"no": "diagnostics"}]}))
    report = ttb.main([str(path)])
    assert report["files"]["cmp.json"][0]["fraction"]["train"] == 0.25
    assert json.loads(capsys.readouterr().out)["benchmark"] == "task_time_breakdown"


def test_missing_times_raise():
    with pytest.raises(ValueError, match="train_s"):
        ttb.task_seconds({"task": 3, "task_s": 1.0})
