"""The 2-worker DeepSpeed ZeRO-2 run that test_run.py (against DDP, MLflow, a rerun) and
test_zero3.py (against ZeRO-3) both compare with: run once per session."""

from __future__ import annotations

from typing import Any

import pytest

from pm_ray.config import config_from_dict
from pm_ray.pipeline import run_continual
from tinyconfig import two_worker_config


@pytest.fixture(scope="session")
def zero2_run(tmp_path_factory, ray_session) -> Any:
    """The stream under DeepSpeed ZeRO-2 (MLflow on): its RunSummary."""
    cfg = two_worker_config(tmp_path_factory.mktemp("deepspeed"), "deepspeed")
    return run_continual(config_from_dict(cfg), config_stem="deepspeed", quiet=True)
