"""`ray job submit` of a tiny run against a local head on 127.0.0.1 (with the dashboard)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from localhead import local_head as start_local_head
from tinyconfig import tiny_config, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def local_head():
    with start_local_head() as head:
        yield head


def test_ray_job_submit_runs_a_tiny_stream(local_head, tmp_path) -> None:
    address, env = local_head
    storage = tmp_path / "runs"
    cfg = tiny_config(
        storage, tasks={"limit": 2}, tracking={"enabled": True, "experiment": "job"}, storage={"run_name": "job"}
    )
    config = write_config(tmp_path / "job.yaml", cfg)
    # the wrapper users run: uploads the repository as the working dir, follows the logs
    env = dict(env, RAY_ADDRESS=address)
    submit = subprocess.run(
        [str(REPO / "jobs" / "submit.sh"), str(config)], capture_output=True, text=True, env=env, timeout=400
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    assert "submitted pm-ray-job-" in submit.stdout and "succeeded" in submit.stdout.lower()
    state = json.loads((storage / "job" / "state.json").read_text())
    assert state["completed"] == 2 and state["metrics"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{storage / 'job'}/mlflow.db")
    experiment = client.get_experiment_by_name("job")
    runs = client.search_runs([experiment.experiment_id])
    assert any(r.info.status == "FINISHED" and "mlflow.parentRunId" not in r.data.tags for r in runs)
