"""The 2-worker runs several test modules compare with, each run once per session: DeepSpeed ZeRO-2
(test_run.py against DDP, MLflow, a rerun; test_zero3.py against ZeRO-3) and DDP (test_run.py;
test_ray_data_loader.py, whose Ray Data run must train on the same batches)."""

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


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory, ray_session) -> Any:
    """The stream under DDP (MLflow on), local loader: its RunSummary."""
    cfg = two_worker_config(tmp_path_factory.mktemp("ddp"), "ddp")
    return run_continual(config_from_dict(cfg), config_stem="ddp", quiet=True)
