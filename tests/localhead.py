"""A local Ray head for `ray job submit` tests (importable from any test module: tests/ is on sys.path)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_head() -> Iterator[tuple[str, dict[str, str]]]:
    """`ray start --head --block` in its own session; the whole group is stopped afterwards."""
    # every port its own: another Ray on this machine (a user's, an embedded one) may hold the defaults,
    # and a job agent that cannot bind its port makes every submission fail with "No available agent"
    gcs, dashboard, agent = free_port(), free_port(), free_port()
    # the cluster's `python` is this environment's, as on a real cluster with pm-ray's dependencies
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    temp_dir = Path("/tmp") / f"pmray-head-{os.getpid()}"
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={agent}",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        text=True,
    )
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
        try:  # `ray start --block` takes ~30 s to stop on SIGTERM here; the head's state is thrown away
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)
