"""`pm-ray run` as a subprocess in its own session, for tests that kill or signal it (importable
from any test module: tests/ is on sys.path)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cli(config: Path, *overrides: str) -> subprocess.Popen:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "pm_ray.cli", "run", str(config), "--quiet", *overrides],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        text=True,
    )


def read_state(run_dir: Path) -> dict:
    return json.loads((run_dir / "state.json").read_text())


def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
) -> Any:
    """The predicate's first true value; fails when `proc` exits first (with its output: its stdout
    pipe, or the file `log` it writes to) or after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            text = log.read_text() if log is not None else proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{text}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def wait_for_first_commit(run_dir: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until the run in `run_dir` has committed task 1 (fails if `proc` exits first)."""
    wait_for(
        lambda: (run_dir / "state.json").exists() and read_state(run_dir)["completed"] >= 1,
        timeout,
        "task 1 to commit",
        proc,
    )


def kill_after_first_commit(config: Path, run_dir: Path) -> dict:
    """`pm-ray run` into `run_dir` (storage.run_name = its name), SIGKILLed with its whole session
    once task 1 is committed; the state.json it left."""
    proc = cli(config, f"storage.run_name={run_dir.name}")
    wait_for_first_commit(run_dir, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return read_state(run_dir)


def run_in_process_until_task_1_commits(cfg: Any, monkeypatch: Any) -> None:
    """Run `cfg` in this process (engine single) and stop it right after task 1 commits (its
    Ray Train report raises), leaving a run directory to resume."""
    import pytest

    from pm_ray.pipeline import run_continual
    from pm_ray.train import checkpoints

    def stop_after_task_1(metrics: dict, in_ray_train: bool) -> None:
        if metrics["task"] == 1:
            raise RuntimeError("stopped after task 1 (test)")

    with monkeypatch.context() as patch:
        patch.setattr(checkpoints, "report", stop_after_task_1)
        with pytest.raises(Exception, match="stopped after task 1"):
            run_continual(cfg, quiet=True)
