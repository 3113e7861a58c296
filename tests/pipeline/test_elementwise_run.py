"""merge.strategy=fisher_elementwise end to end on tiny:llama (engine single, 2 tasks)."""

from __future__ import annotations

import json

import pytest
import torch

from pm_ray.config import config_from_dict
from pm_ray.core.tensors import load_tensors, split_prefixed
from pm_ray.pipeline import run_continual
from tinyconfig import tiny_config

pytestmark = pytest.mark.integration


def test_two_tasks_merge_at_the_elementwise_optimum(ray_session, tmp_path) -> None:
    damping = 0.01
    cfg = tiny_config(
        tmp_path / "runs",
        tasks={"suite": "cit5", "variant": "quick", "limit": 2},
        trainer={"steps_per_task": 4},
        merge={"strategy": "fisher_elementwise", "options": {"damping": damping}},
    )
    summary = run_continual(config_from_dict(cfg), quiet=True)
    run_dir = summary.run_dir
    state = json.loads((run_dir / "state.json").read_text())
    assert state["completed"] == 2 and state["strategy"] == "fisher_elementwise"
    assert state["alphas"][0] == pytest.approx(1.0)  # the line α is reported (α_1 = 1)
    assert [len(r) for r in state["accuracy"]] == [1, 2]
    assert set(state["metrics"]) >= {"acc", "aaa", "forgetting", "bwt"}

    # the exported merge is Ψ / (Φ + λ) from the accumulators the merge actor persisted
    merged, meta = load_tensors(run_dir / "merged" / "delta.safetensors")
    assert meta["task"] == 2 and meta["strategy"] == "fisher_elementwise"
    stats, stats_meta = load_tensors(run_dir / "stats" / "shard0-task2.safetensors")
    assert stats_meta["accumulated_tasks"] == 2
    acc = split_prefixed(stats, "acc")
    phi, psi = split_prefixed(acc, "phi"), split_prefixed(acc, "psi")
    assert set(merged) == set(phi) and merged
    for key in merged:
        expected = psi[key].double() / (phi[key].double() + damping * phi[key].double().mean())
        torch.testing.assert_close(merged[key].double(), expected, rtol=1e-5, atol=1e-8)
    # dense: not a stack of the two rank-4 adapters (no stack.json), and of higher rank than 2·4
    assert not (run_dir / "merged" / "stack.json").exists()
    assert max(int(torch.linalg.matrix_rank(m.double())) for m in merged.values()) > 2 * cfg["lora"]["rank"]
