"""`pm-ray compare`: the same stream and seed under two strategies, both matrices and one table."""

from __future__ import annotations

import json

import pytest
import yaml

from pm_ray.cli import main
from tinyconfig import tiny_config, write_config


@pytest.mark.integration
def test_compare_prints_both_matrices_alphas_and_rows(tmp_path, capsys, ray_session) -> None:
    storage = tmp_path / "runs"
    write_config(tmp_path / "base.yaml", tiny_config(storage, tasks={"limit": 2}, trainer={"steps_per_task": 2}))
    spec = tmp_path / "demo.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "base": "base.yaml",
                "strategies": {
                    "pm": {"merge.strategy": "pm"},
                    "sequential": {"merge.strategy": "sequential", "perturbation.mode": "none"},
                },
            }
        )
    )
    assert main(["compare", str(spec), "--quiet"]) == 0
    out = capsys.readouterr().out
    report = (storage / "compare-demo.md").read_text()
    assert report.strip() in out
    assert "### pm: accuracy after each task" in report and "### sequential: accuracy after each task" in report
    assert "Test rows per task: drug_sentiment 8, arithmetic 8" in report
    payload = json.loads((storage / "compare-demo.json").read_text())
    assert [r["strategy"] for r in payload] == ["pm", "sequential"]
    for row in payload:
        state = json.loads((storage / f"compare-{row['strategy']}" / "state.json").read_text())
        assert row["accuracy"] == state["accuracy"] and row["alphas"] == state["alphas"]
        assert row["data_hashes"] == state["data_hashes"] == payload[0]["data_hashes"]
        assert row["test_rows"] == {"drug_sentiment": 8, "arithmetic": 8} and row["tasks"] == state["task_names"]
    assert payload[1]["alphas"] == [1.0, 1.0] and payload[0]["alphas"][0] == 1.0
