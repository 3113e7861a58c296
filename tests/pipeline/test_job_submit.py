"""`ray job submit` of a tiny run against a local head on 127.0.0.1 (with the dashboard)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinyconfig import tiny_config, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def local_head(tmp_path):
    """`ray start --head --block` in its own session; the whole group is stopped afterwards."""
    # every port its own: another Ray on this machine (a user's, an embedded one) may hold the defaults,
    # and a job agent that cannot bind its port makes every submission fail with "No available agent"
    gcs, dashboard, agent = free_port(), free_port(), free_port()
    # the cluster's `python` is this environment's, as on a real cluster with pm-ray's dependencies
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    temp_dir = Path("/tmp") / f"pmray-head-{os.getpid()}"
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={agent}", "--num-cpus=2",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True, text=True)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 90
    while time.time() < deadline:
        if head.poll() is not None:
            raise AssertionError(f"ray head exited: {head.stdout.read()}")
        try:
            with socket.create_connection(("127.0.0.1", dashboard), timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(head.pid, signal.SIGKILL)
        raise AssertionError("the dashboard never listened")
    try:
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_a_tiny_stream(local_head, tmp_path) -> None:
    address, env = local_head
    storage = tmp_path / "runs"
    cfg = tiny_config(storage, tasks={"limit": 2}, tracking={"enabled": True, "experiment": "job"}, storage={"run_name": "job"})
    config = write_config(tmp_path / "job.yaml", cfg)
    # the wrapper users run: uploads the repository as the working dir, follows the logs
    env = dict(env, RAY_ADDRESS=address)
    submit = subprocess.run([str(REPO / "jobs" / "submit.sh"), str(config)], capture_output=True, text=True, env=env, timeout=400)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    assert "submitted pm-ray-job-" in submit.stdout and "succeeded" in submit.stdout.lower()
    state = json.loads((storage / "job" / "state.json").read_text())
    assert state["completed"] == 2 and state["metrics"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{storage / 'job'}/mlflow.db")
    experiment = client.get_experiment_by_name("job")
    runs = client.search_runs([experiment.experiment_id])
    assert any(r.info.status == "FINISHED" and "mlflow.parentRunId" not in r.data.tags for r in runs)
