"""Crashes: the driver killed between tasks, Ctrl-C / SIGTERM. Both end with the α's and metrics of an
uninterrupted run. Training workers killed mid-task (with their node, so one merge shard too) are in
test_two_nodes.py: Ray Train retries from the task boundary with the uninterrupted run's α's."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from pm_ray.config import load_config
from pm_ray.pipeline import run_continual
from runcli import cli, finish, kill_after_first_commit, read_state, wait_for_first_commit
from tinyconfig import tiny_config, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("strategy,options", [("pm", {}), ("trm", {"steps": 4, "snapshots": 2})])
def test_driver_killed_between_tasks_resumes_identically(tmp_path, ray_session, strategy, options) -> None:
    """`pm-ray run` SIGKILLed with its whole session (its embedded Ray too) after task 1 commits; the
    run resumed (run_continual, what the command calls, here on the test session's Ray) ends with the
    α's, matrix and metrics of an uninterrupted run."""
    cfg = tiny_config(
        tmp_path / "runs", trainer={"steps_per_task": 20}, merge={"strategy": strategy, "options": options}
    )
    config = write_config(tmp_path / "resume.yaml", cfg)
    reference = read_state(
        run_continual(load_config(config, ["storage.run_name=reference"]), config_stem="resume", quiet=True).run_dir
    )

    run_dir = tmp_path / "runs" / "crashed"
    interrupted = kill_after_first_commit(config, run_dir)
    assert 1 <= interrupted["completed"] < 3, "the kill must land between tasks, not after the run"

    summary = run_continual(load_config(config, ["storage.run_name=crashed"]), config_stem="resume", quiet=True)
    resumed = read_state(run_dir)
    assert summary.run_dir == run_dir and resumed["completed"] == 3
    assert resumed["alphas"] == reference["alphas"]
    assert resumed["accuracy"] == reference["accuracy"]
    assert resumed["metrics"] == reference["metrics"]


@pytest.mark.parametrize("sig,engine", [(signal.SIGINT, "single"), (signal.SIGTERM, "ddp")])
def test_ctrl_c_or_sigterm_stops_ray_cleanly_and_the_same_command_resumes(tmp_path, sig, engine) -> None:
    """SIGINT to the whole process group (what Ctrl-C in a terminal does), SIGTERM to the driver
    only (what `kill` or a scheduler does): exit 130 / 143 with one line, no Ray stack dump, no
    process of the run left, the committed tasks intact, and the same command finishes the run."""
    workers = {"engine": engine, "num_workers": 1 if engine == "single" else 2}
    config = write_config(
        tmp_path / "stop.yaml", tiny_config(tmp_path / "runs", trainer={"steps_per_task": 24, **workers})
    )
    run_dir = tmp_path / "runs" / "stopped"
    proc = cli(config, "storage.run_name=stopped")
    wait_for_first_commit(run_dir, proc)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out
    name = signal.Signals(sig).name
    assert f"pm-ray: interrupted by {name}: run stopped keeps" in out and "run the same command to resume" in out, out
    assert "***" not in out and "Traceback" not in out and "Stack trace" not in out, out
    deadline = time.time() + 30
    while time.time() < deadline:  # Ray's processes were started in the driver's session
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("processes of the stopped run are still alive")
    stopped = read_state(run_dir)
    assert 1 <= stopped["completed"] < 3, "the signal must land before the run finished"
    meta = json.loads((run_dir / "merged" / "stack.json").read_text())
    assert meta["task"] == stopped["completed"]

    finish(cli(config, "storage.run_name=stopped"))
    resumed = read_state(run_dir)
    assert resumed["completed"] == 3
    assert resumed["alphas"][: stopped["completed"]] == stopped["alphas"]
    assert resumed["accuracy"][: stopped["completed"]] == stopped["accuracy"]
