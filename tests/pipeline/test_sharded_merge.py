"""K merge actors, each owning a slice of the modules, give the α of one actor."""

from __future__ import annotations

import json

import pytest
import torch

from pm_ray.config import config_from_dict
from pm_ray.core.fisher import FisherShard
from pm_ray.merge.actor import MergeClient, create_merge_actors, shard_keys
from pm_ray.pipeline import run_continual
from tinyconfig import tiny_config

pytestmark = pytest.mark.integration


def test_shard_keys_partition() -> None:
    keys = [f"m{i}" for i in range(7)]
    parts = shard_keys(keys, 3)
    assert sorted(k for p in parts for k in p) == sorted(keys)
    assert all(parts) and len(parts) == 3


@pytest.mark.parametrize(
    "strategy,options",
    [
        ("pm", {}),
        ("pm", {"per_module": True}),
        ("ties", {}),
        ("magmax", {}),
        ("fisher_elementwise", {"blend": 0.5, "decay": 0.8, "normalize_fisher": True}),
    ],
)
def test_two_actors_equal_one(ray_session, tmp_path, strategy, options) -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = {f"layers.{i}.{p}": (3, 4) for i in range(3) for p in ("k_proj", "v_proj")}
    results = {}
    for shards in (1, 2):
        name = f"shard-test-{strategy}-{options}-{shards}"
        actors = create_merge_actors(name, strategy, options, shards, str(tmp_path / name))
        client = MergeClient(name, shards, strategy, options)
        gen.manual_seed(0)
        alphas, merged = [], None
        for t in range(1, 5):
            delta = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
            # two data-parallel Fisher shards with 3 and 5 examples
            for count in (3, 5):
                client.add_fisher(
                    t,
                    FisherShard(sums={k: torch.rand(s, generator=gen) * count for k, s in shapes.items()}, count=count),
                )
            info = client.merge(t, delta)
            alphas.append(info["alpha"])
            assert len(info["state_files"]) == shards
            merged, _ = client.current()
        results[shards] = (alphas, merged)
        for actor in actors:
            ray_session.kill(actor)
    (a1, m1), (a2, m2) = results[1], results[2]
    if strategy in ("pm", "fisher_elementwise"):
        for x, y in zip(a1, a2):
            assert x == pytest.approx(y, abs=1e-9)
        assert a1[0] == (pytest.approx({k: 1.0 for k in shapes}) if options.get("per_module") else pytest.approx(1.0))
    for key in shapes:
        torch.testing.assert_close(m1[key], m2[key], rtol=1e-6, atol=1e-7)


def test_pipeline_with_two_merge_shards(ray_session, tmp_path) -> None:
    states = {}
    for shards in (1, 2):
        cfg = tiny_config(tmp_path / "runs", merge={"shards": shards}, storage={"run_name": f"k{shards}"})
        summary = run_continual(config_from_dict(cfg), quiet=True)
        states[shards] = json.loads((summary.run_dir / "state.json").read_text())
    assert states[2]["alphas"] == pytest.approx(states[1]["alphas"], abs=1e-9)
    assert states[2]["accuracy"] == states[1]["accuracy"]
    assert len(states[2]["stats_files"]) == 2
