"""trainer.data_loader=ray_data: the session's 3-task DDP run on 2 workers (1 CPU each, the session's
2 CPUs; local loader, tests/pipeline/conftest.py) again with the Ray Data loader, whose run also
loses a training worker after task 1 commits (Ray Train restarts the group, which resumes at the
task boundary and reads tasks 2 and 3's datasets again). Every rank trains on identical batches
either way, so the α's and the accuracy matrix are identical too."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pm_ray.config import config_from_dict
from pm_ray.pipeline import run_continual
from tinyconfig import two_worker_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def read_state(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being replaced
        return None


def kill_a_training_worker_after_task_1(ray: Any, run_dir: Path, killed: dict[str, Any]) -> None:
    """SIGKILL one Ray Train worker of this session's Ray once state.json has committed task 1."""
    from ray._private.state import actors

    deadline = time.time() + 600
    while time.time() < deadline:
        state = read_state(run_dir)
        if state and state["completed"] >= 1:
            workers = [
                a for a in actors().values() if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"
            ]
            if workers:
                os.kill(workers[0]["Pid"], signal.SIGKILL)
                killed.update(pid=workers[0]["Pid"], completed=state["completed"])
            return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_session, ddp_run) -> dict[str, dict[str, Any]]:
    cfg = two_worker_config(tmp_path_factory.mktemp("ray_data"), "ddp", tracking=False)
    cfg["trainer"]["data_loader"] = "ray_data"
    cfg["storage"]["run_name"] = "ray_data"
    run_dir = Path(cfg["storage"]["path"]) / "ray_data"
    killed: dict[str, Any] = {}
    killer = threading.Thread(target=kill_a_training_worker_after_task_1, args=(ray_session, run_dir, killed))
    killer.start()
    summary = run_continual(config_from_dict(cfg), config_stem="ray_data", quiet=True)
    killer.join()
    return {
        "local": {"state": read_state(ddp_run.run_dir)},
        "ray_data": {"state": read_state(summary.run_dir), "killed": killed},
    }


def test_ray_data_batches_equal_the_local_loaders(runs) -> None:
    local, ray_data = runs["local"]["state"], runs["ray_data"]["state"]
    assert local["completed"] == ray_data["completed"] == 3
    for task, (a, b) in enumerate(zip(local["diagnostics"], ray_data["diagnostics"]), start=1):
        assert len(a["train_batches_sha256"]) == 2, "one digest per rank"
        assert a["train_batches_sha256"][0] != a["train_batches_sha256"][1], "the ranks' batches are disjoint"
        assert b["train_batches_sha256"] == a["train_batches_sha256"], f"task {task}"
    assert ray_data["alphas"] == local["alphas"]
    assert ray_data["accuracy"] == local["accuracy"]
    assert [d["final_loss"] for d in ray_data["diagnostics"]] == [d["final_loss"] for d in local["diagnostics"]]


def test_the_group_restarted_after_task_1_read_the_same_batches(runs) -> None:
    """The worker died with task 1 committed; the restarted group trained tasks 2 and 3 on the batches an
    uninterrupted local run trains on (the previous test compares all of them)."""
    killed = runs["ray_data"]["killed"]
    assert killed.get("completed") == 1, f"the kill must land between task 1's commit and the end: {killed}"
    assert runs["ray_data"]["state"]["completed"] == 3
