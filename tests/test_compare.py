"""`pm-ray compare`: every entry runs, the table, JSON and the comparison plot are written."""

from __future__ import annotations

import json

import pytest
import yaml

from pm_ray.compare import run_comparison
from tinyconfig import tiny_config, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_compare_writes_table_json_and_plot(tmp_path, ray_session) -> None:
    from matplotlib.image import imread

    storage = tmp_path / "runs"
    write_config(tmp_path / "base.yaml", tiny_config(storage, tasks={"limit": 2}, trainer={"steps_per_task": 2}))
    spec = tmp_path / "cmp.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "base": "base.yaml",
                "strategies": {
                    "seq": {"merge.strategy": "sequential", "perturbation.mode": "none"},
                    "pm": {"merge.strategy": "pm"},
                },
            },
            sort_keys=False,
        )
    )
    rows, table = run_comparison(spec, [], quiet=True)
    assert [r["strategy"] for r in rows] == ["seq", "pm"] and "pm" in table
    saved = json.loads((storage / "compare-cmp.json").read_text())
    extra = ("accuracy", "tasks", "data_hashes")  # the JSON also carries each strategy's matrix and data hashes
    assert [{k: v for k, v in r.items() if k not in extra} for r in saved] == json.loads(json.dumps(rows))
    for r in saved:
        state = json.loads((storage / f"compare-{r['strategy']}" / "state.json").read_text())
        assert (r["accuracy"], r["tasks"], r["data_hashes"]) == (
            state["accuracy"],
            state["task_names"],
            state["data_hashes"],
        )
    assert (storage / "compare-cmp.md").read_text().strip() == table
    pixels = imread(storage / "compare-cmp.png")
    assert pixels.ndim == 3 and pixels.reshape(-1, pixels.shape[-1]).std(axis=0).max() > 0
