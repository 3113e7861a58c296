"""`pm-ray compare`: every entry runs under every seed; the table, JSON and plots are written; a rerun
reuses the finished runs; --seeds overrides the spec and a bad value writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pm_ray.cli import main
from pm_ray.compare import parse_seeds, plan_runs, run_comparison
from pm_ray.config import ConfigError
from tinyconfig import tiny_config, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STRATEGIES = {
    "sequential": {"merge.strategy": "sequential", "perturbation.mode": "none"},
    "pm": {"merge.strategy": "pm"},
}


def write_spec(tmp_path: Path, tracking: bool = False, **extra) -> Path:
    storage = tmp_path / "runs"
    base = tiny_config(storage, tasks={"limit": 2}, trainer={"steps_per_task": 2}, tracking={"enabled": tracking})
    write_config(tmp_path / "base.yaml", base)
    spec = tmp_path / "cmp.yaml"
    spec.write_text(yaml.safe_dump({"base": "base.yaml", **extra, "strategies": STRATEGIES}, sort_keys=False))
    return spec


def test_compare_one_seed_keeps_run_names_table_json_and_plot(tmp_path, ray_session) -> None:
    from matplotlib.image import imread

    spec, storage = write_spec(tmp_path, tracking=True), tmp_path / "runs"
    payload, table = run_comparison(spec, [], quiet=True)
    assert [e["strategy"] for e in payload["strategies"]] == ["sequential", "pm"] and "pm" in table
    assert payload["seeds"] == [0] and payload["reference"] == "sequential" and payload["same_data"]
    saved = json.loads((storage / "compare-cmp.json").read_text())
    assert saved == json.loads(json.dumps(payload))
    for e in saved["strategies"]:
        state = json.loads((storage / f"compare-{e['strategy']}" / "state.json").read_text())
        (run,) = e["runs"]
        assert run["run_name"] == f"compare-{e['strategy']}" and run["seed"] == 0
        assert (e["accuracy"], e["tasks"], e["data_hashes"]) == (
            state["accuracy"],
            state["task_names"],
            state["data_hashes"],
        )
        assert e["acc"] == state["metrics"]["acc"] and e["summary"]["acc"]["ci_half"] is None
    assert (storage / "compare-cmp.md").read_text().strip() == table
    for name in ("compare-cmp.png", "compare-cmp-alphas.png", "compare-cmp-accuracy-pm.png"):
        pixels = imread(storage / name)
        assert pixels.ndim == 3 and pixels.reshape(-1, pixels.shape[-1]).std(axis=0).max() > 0, name
    # one MLflow store for the whole comparison: both runs (and their per-task child runs) in it
    from mlflow.tracking import MlflowClient

    assert not list(storage.glob("compare-*/mlflow.db"))
    client = MlflowClient(tracking_uri=f"sqlite:///{storage / 'compare-cmp.mlflow.db'}")
    runs = client.search_runs([x.experiment_id for x in client.search_experiments()])
    parents = {r.info.run_name for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert parents == {"compare-sequential", "compare-pm"}
    (experiment,) = client.search_experiments(filter_string="name = 'pm-ray'")
    assert experiment.artifact_location == (storage / "compare-cmp-mlflow-artifacts").resolve().as_uri()
    assert (
        len(
            {
                p.relative_to(storage).parts[1]
                for p in storage.glob("compare-cmp-mlflow-artifacts/*/artifacts/plots/*.png")
            }
        )
        == 2
    )
    assert {r.info.run_id for r in runs if r.info.run_name.startswith("compare-")} == {
        json.loads((storage / f"compare-{n}" / "state.json").read_text())["mlflow_run_id"] for n in ("sequential", "pm")
    }


def test_compare_two_seeds_cli_override_and_reuse(tmp_path, ray_session, capsys) -> None:
    spec, storage = write_spec(tmp_path, seeds=[7]), tmp_path / "runs"
    assert main(["compare", str(spec), "--seeds", "0,1", "--quiet"]) == 0  # --seeds replaces the spec's [7]
    assert "Summary" in capsys.readouterr().out
    payload = json.loads((storage / "compare-cmp.json").read_text())
    assert payload["format"] == 2 and payload["seeds"] == [0, 1] and payload["same_data"]
    runs = sorted(p.name for p in storage.iterdir() if p.is_dir() and p.name.startswith("compare-"))
    assert runs == ["compare-pm-seed0", "compare-pm-seed1", "compare-sequential-seed0", "compare-sequential-seed1"]
    seq, pm = payload["strategies"]
    for e in (seq, pm):
        assert [r["seed"] for r in e["runs"]] == [0, 1]
        assert set(e["summary"]) == {"acc", "aaa", "forgetting", "bwt"}
        for s in e["summary"].values():
            assert s["n"] == 2 and s["ci_low"] <= s["mean"] <= s["ci_high"]
        assert len(e["alpha_summary"]) == 2 and set(e["test_rows"]) == set(e["task_scores"]) == set(e["tasks"])
        assert e["same_data_across_seeds"] and e["data_hashes"] == seq["data_hashes"]
        for r in e["runs"]:
            ran = yaml.safe_load((storage / r["run_name"] / "config.yaml").read_text())
            assert ran["trainer"]["seed"] == r["seed"] and ran["tasks"]["seed"] == 0  # data seed stays
    assert seq["paired"] is None and pm["paired"]["acc"]["n"] == 2
    for k in ("acc", "forgetting"):
        diffs = [pm["runs"][i][k] - seq["runs"][i][k] for i in range(2)]
        assert list(pm["paired"][k]["per_seed"].values()) == pytest.approx(diffs)
    # the seed drives LoRA init and batch order: the experts trained under seeds 0 and 1 differ
    experts = [
        b"".join(p.read_bytes() for p in sorted((storage / f"compare-pm-seed{s}" / "tasks").rglob("*.safetensors")))
        for s in (0, 1)
    ]
    assert experts[0] and experts[0] != experts[1]
    table = (storage / "compare-cmp.md").read_text()
    assert "95% Student-t interval over 2 seeds (0, 1)" in table and "ΔACC vs sequential" in table
    # a rerun reuses every finished run: no state file is rewritten
    stamps = {r: (storage / r / "state.json").stat().st_mtime_ns for r in runs}
    again, _ = run_comparison(spec, [], seeds=[0, 1], quiet=True)
    assert {r: (storage / r / "state.json").stat().st_mtime_ns for r in runs} == stamps
    assert json.loads(json.dumps(again)) == payload


def test_bad_seeds_exit_2_and_write_nothing(tmp_path, capsys) -> None:
    spec, storage = write_spec(tmp_path), tmp_path / "runs"
    assert main(["compare", str(spec), "--seeds", "a,b"]) == 2
    err = capsys.readouterr().err
    assert "--seeds 'a,b'" in err and "'a' is not an integer" in err
    assert not storage.exists()
    for bad in ("", "1,,2", "-1", "0,0", "1.5"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)
    assert parse_seeds("0, 1,2") == [0, 1, 2]


def test_spec_seeds_validation_and_seed_clash(tmp_path) -> None:
    for bad in ([], ["x"], [1, 1], 3):
        with pytest.raises(ConfigError, match="seeds"):
            plan_runs(write_spec(tmp_path, seeds=bad), [])
    spec = write_spec(tmp_path, seeds=[0, 3])
    seeds, plan = plan_runs(spec, [])
    assert seeds == [0, 3]
    assert [cfg.storage.run_name for _, cfg in plan["pm"]] == ["compare-pm-seed0", "compare-pm-seed3"]
    assert [cfg.trainer.seed for _, cfg in plan["pm"]] == [0, 3] and plan["pm"][1][1].tasks.seed == 0
    with pytest.raises(ConfigError, match="trainer.seed is set by trainer.seed=4"):
        plan_runs(spec, ["trainer.seed=4"])
    single = plan_runs(write_spec(tmp_path, seeds=[5]), [])[1]
    assert single["pm"][0][1].storage.run_name == "compare-pm" and single["pm"][0][1].trainer.seed == 5


def test_spec_common_overrides_reach_every_entry(tmp_path) -> None:
    spec = write_spec(tmp_path, overrides={"eval.max_rows": 7, "merge.strategy": "average"})
    _, plan = plan_runs(spec, [])
    assert {name: cfg.eval.max_rows for name, [(_, cfg)] in plan.items()} == {"sequential": 7, "pm": 7}
    assert plan["pm"][0][1].merge.strategy == "pm"  # the entry's own override wins over the common one
    _, plan = plan_runs(spec, ["eval.max_rows=3"])
    assert plan["pm"][0][1].eval.max_rows == 3  # and the command line wins over the spec's overrides
    with pytest.raises(ConfigError, match="'overrides' must be a dict"):
        plan_runs(write_spec(tmp_path, overrides=["eval.max_rows=7"]), [])
    with pytest.raises(ConfigError, match="trainer.seed is set by overrides"):
        plan_runs(write_spec(tmp_path, overrides={"trainer.seed": 3}, seeds=[0, 1]), [])


@pytest.mark.parametrize("spec", ["compare.yaml", "demo.yaml", "rank.yaml", "rank_cls.yaml"])
def test_every_shipped_spec_plans(spec) -> None:
    """The specs in jobs/ (make compare / demo / rank / rank-cls): every entry and seed validates
    and passes the load-time checks, with the strategy its entry names."""
    path = Path(__file__).resolve().parents[1] / "jobs" / spec
    raw = yaml.safe_load(path.read_text())
    seeds, plan = plan_runs(path, [])
    assert list(plan) == list(raw["strategies"])
    assert seeds == raw.get("seeds", seeds)
    for name, runs in plan.items():
        assert all(cfg.merge.strategy == raw["strategies"][name]["merge.strategy"] for _, cfg in runs)
