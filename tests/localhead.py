"""A local Ray head for `ray job submit` tests (importable from any test module: tests/ is on sys.path)."""

from __future__ import annotations

import json
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
def local_head(
    gcs_port: int | None = None, head_env: dict[str, str] | None = None
) -> Iterator[tuple[str, dict[str, str]]]:
    """`ray start --head --block` in its own session; the whole group is stopped afterwards.

    ``gcs_port``: the GCS port (what :func:`start_node` joins; a free one when None); ``head_env``:
    extra environment of the head's processes only (e.g. the GCS's RAY_health_check_* settings)."""
    # every port its own: another Ray on this machine (a user's, an embedded one) may hold the defaults,
    # and a job agent that cannot bind its port makes every submission fail with "No available agent"
    gcs, dashboard, agent = gcs_port or free_port(), free_port(), free_port()
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
        env={**env, **(head_env or {})},
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
        kill_session(head)  # the workers, each in a process group of its own
        shutil.rmtree(temp_dir, ignore_errors=True)


def start_node(gcs_port: int, env: dict[str, str], num_cpus: int, resources: dict[str, float]) -> subprocess.Popen:
    """A second raylet (`ray start --address=... --block`) joining the head at ``gcs_port``, in its own
    session: :func:`kill_session` is the node failing (and stops it)."""
    ports = {
        name: free_port()
        for name in (
            "node-manager-port",
            "object-manager-port",
            "metrics-export-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
        )
    }
    return subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            f"--address=127.0.0.1:{gcs_port}",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(resources)}",
            "--object-store-memory=200000000",  # the default (30% of the memory) per node is far too much here
            "--disable-usage-stats",
            *(f"--{name}={port}" for name, port in ports.items()),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        text=True,
    )


def session_pids(sid: int) -> list[int]:
    """The processes of session ``sid`` (Linux /proc). A raylet starts each worker in a process group
    of its own, but they stay in the session of the `ray start` that started the raylet."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session
        except OSError:  # exited meanwhile
            continue
        if int(fields[3]) == sid:
            pids.append(int(stat.parent.name))
    return pids


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL every process in ``proc``'s session (it leads one: start_new_session=True), i.e. all
    that it started, workers included, and reap ``proc``."""
    for pid in session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
