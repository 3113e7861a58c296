"""Tiny-model run configs for tests (importable from any test module: tests/ is on sys.path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def tiny_config(storage_path: Path, /, **sections: dict[str, Any]) -> dict[str, Any]:
    """A 3-task run on tiny:llama that takes seconds; ``sections`` update the defaults."""
    cfg: dict[str, Any] = {
        "model": {"name_or_path": "tiny:llama"},
        "tasks": {"suite": "cit5", "variant": "quick", "limit": 3},
        "lora": {"rank": 4, "alpha": 8},
        "trainer": {
            "engine": "single",
            "num_workers": 1,
            "steps_per_task": 6,
            "batch_size": 4,
            "max_length": 96,
            "lr": 5e-3,
        },
        "fisher": {"num_samples": 8, "batch_size": 4},
        "eval": {"max_rows": 8, "max_new_tokens": 4, "batch_size": 8},
        "storage": {"path": str(storage_path)},
        "tracking": {"enabled": False},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def two_worker_config(runs: Path, engine: str, zero_stage: int = 2, *, tracking: bool = True) -> dict[str, Any]:
    """A 3-task tiny:llama stream on 2 CPU workers. 7 Fisher rows (4 + 3 per rank, batches of 2)
    and 7 eval rows per task make the ranks' shards unequal."""
    return tiny_config(
        runs,
        trainer={"engine": engine, "num_workers": 2, "zero_stage": zero_stage},
        fisher={"num_samples": 7, "batch_size": 2},
        eval={"max_rows": 7, "max_new_tokens": 4, "batch_size": 2},
        tracking={"enabled": tracking, "experiment": f"test-{engine}"},
    )


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path
