"""`pm-ray run` as a subprocess in its own session, for tests that kill or signal it (importable
from any test module: tests/ is on sys.path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


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


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{proc.stdout.read()}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out
