"""A tuning trial whose continual run is a Ray Train TorchTrainer (engine=ddp, 2 workers) on the shared
2-CPU test Ray: the trial's placement group holds only its driver (0.1 CPU); the Train V2 worker group
takes its own placement group (2 x 0.95 CPU), and the concurrency limit keeps trials from waiting on
each other's workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_tune_integration import write_tune_config

from pm_ray.tune import load_tune_config, run_tune

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_ray_train_trial_reports_every_task(tmp_path, ray_session) -> None:
    path = write_tune_config(
        tmp_path,
        {
            "name": "ddp",
            "space": {"perturbation.epsilon": {"grid": [0.5]}},
            "objective": "aaa",
            "max_concurrent_trials": 2,
        },
        trainer={"engine": "ddp", "num_workers": 2, "cpus_per_worker": 0.95, "steps_per_task": 6},
    )
    summary = run_tune(load_tune_config(path), quiet=True)

    assert summary.max_concurrent_trials == 1  # 0.1 + 2 x 0.95 fills the 2 CPUs
    (row,) = summary.rows
    assert row["status"] == "completed" and row["tasks"] == 2
    trial_dir = tmp_path / "runs" / "ddp" / f"trial-{row['trial']}"
    reports = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
    assert [r["task"] for r in reports] == [1, 2]
    assert reports[-1]["aaa"] == pytest.approx(row["aaa"])
    assert (Path(row["run_dir"]) / "ray").is_dir()  # the run went through a TorchTrainer
