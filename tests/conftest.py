"""Shared fixtures: one Ray instance per test session, tiny-model run configs."""

from __future__ import annotations

import os
from typing import Any

import pytest

from tinyconfig import tiny_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token file under $HOME from tests


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray on this machine's 2 CPUs, shared by every test that needs one."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={
                "env_vars": {
                    "HF_HUB_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false",
                    "TRANSFORMERS_VERBOSITY": "error",
                }
            },
        )
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_run_config(tmp_path):
    def make(**sections: dict[str, Any]) -> dict[str, Any]:
        return tiny_config(tmp_path / "runs", **sections)

    return make
