"""The `search` section: validated at load time with clear errors, and the resource arithmetic that
keeps trials from ever waiting on each other on a 2-CPU machine. No Ray is started here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pm_ray.config import ConfigError, load_config
from pm_ray.tune.resources import plan_concurrency
from pm_ray.tune.spec import load_tune_config, trial_config_data
from tinyconfig import tiny_config


def write(tmp_path: Path, search: dict, **sections: dict) -> Path:
    cfg = tiny_config(tmp_path / "runs", **sections)
    cfg["search"] = search
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


EPS = {"space": {"perturbation.epsilon": {"grid": [0, 0.25, 0.5, 0.75]}}}


def test_valid_search_section_and_overrides(tmp_path) -> None:
    path = write(
        tmp_path,
        {
            "space": {
                "perturbation.epsilon": [0, 0.5],
                "trainer.lr": {"loguniform": [1e-4, 1e-2]},
                "merge.options.per_module": {"choice": [True, False]},
            },
            "scheduler": "asha",
            "objective": "aaa",
        },
    )
    spec = load_tune_config(
        path,
        [
            "trainer.steps_per_task=3",
            "search.num_samples=2",
            "search.scheduler.grace_period=2",
            "search.space.lora.rank={choice: [4, 8]}",
        ],
    )
    assert spec.base.trainer.steps_per_task == 3
    assert (
        spec.search.num_samples == 2
        and spec.search.scheduler.type == "asha"
        and spec.search.scheduler.grace_period == 2
    )
    assert spec.search.space["perturbation.epsilon"].kind == "grid"  # a bare list is a grid
    assert set(spec.search.space) == {"perturbation.epsilon", "trainer.lr", "merge.options.per_module", "lora.rank"}
    assert spec.name == "tune-tune" and spec.experiment_dir == (tmp_path / "runs" / "tune-tune").resolve()
    data = trial_config_data(spec.base_data(), {"perturbation.epsilon": 0.25, "lora.rank": 8, "trainer.lr": 3e-3})
    assert data["perturbation"]["epsilon"] == 0.25 and data["lora"]["rank"] == 8 and data["trainer"]["lr"] == 3e-3


@pytest.mark.parametrize(
    ("search", "expected"),
    [
        (
            {"space": {"perturbation.epsilom": {"grid": [0, 0.5]}}},
            "unknown config key 'perturbation.epsilom'; did you mean 'perturbation.epsilon'?",
        ),
        ({"space": {"trainer.lr": {"normal": [0, 1]}}}, "unknown distribution 'normal'"),
        ({"space": {"trainer.lr": {"loguniform": [0, 1e-2]}}}, "loguniform: low must be > 0"),
        ({"space": {"trainer.lr": {"uniform": [1e-2]}}}, "uniform: expected [low, high]"),
        ({"space": {"trainer.lr": {"uniform": [1e-2, 1e-3]}}}, "low must be < high"),
        ({"space": {"trainer.lr": {"grid": []}}}, "grid: expected at least one value"),
        ({"space": {"trainer.lr": 0.1}}, "expected one distribution"),
        ({"space": {"perturbation.epsilon": {"grid": [0, 0.5, 1.0]}}}, "epsilon=1.0 is outside [0, 1)"),
        ({"space": {"merge.strategy": {"choice": ["pm", "tiess"]}}}, "unknown strategy 'tiess' (did you mean 'ties'?)"),
        ({"space": {"storage.run_name": {"grid": ["a", "b"]}}}, "storage.* cannot be searched"),
        ({"space": {"trainer.num_workers": {"randint": [1, 4]}}}, "use grid or choice"),
        ({"space": {}}, "the search space is empty"),
        (
            {"space": {"perturbation.epsilon": [0]}, "objectiv": "acc"},
            "unknown key 'search.objectiv'; did you mean 'search.objective'?",
        ),
        (
            {"space": {"perturbation.epsilon": [0]}, "objective": "bwt"},
            "search.objective: Input should be 'acc' or 'aaa'",
        ),
        ({"space": {"perturbation.epsilon": [0]}, "scheduler": {"type": "hyperband"}}, "search.scheduler.type"),
    ],
)
def test_bad_search_section_is_a_clear_error(tmp_path, search, expected) -> None:
    path = write(tmp_path, search)
    with pytest.raises(ConfigError) as err:
        load_tune_config(path)
    assert expected in str(err.value)
    assert str(path) in str(err.value)


def test_missing_search_section_and_bad_base_config(tmp_path) -> None:
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path / "runs")))
    with pytest.raises(ConfigError, match="no 'search' section"):
        load_tune_config(path)
    with pytest.raises(ConfigError, match="did you mean 'trainer.lr'"):
        load_tune_config(write(tmp_path, EPS), ["trainer.lrr=0.1"])
    with pytest.raises(
        ConfigError, match="did you mean 'search.space.perturbation.epsilon'|did you mean 'perturbation.epsilon'"
    ):
        load_tune_config(write(tmp_path, EPS), ["search.space.perturbation.epsilonn=[0]"])


def test_cli_bad_space_exits_2_before_ray(tmp_path, capsys) -> None:
    import ray

    from pm_ray.cli import main

    was_running = ray.is_initialized()
    path = write(tmp_path, {"space": {"perturbation.epsilom": [0, 0.5]}})
    assert main(["tune", str(path), "--quiet"]) == 2
    assert "did you mean 'perturbation.epsilon'" in capsys.readouterr().err
    assert ray.is_initialized() == was_running
    assert not (tmp_path / "runs").exists()  # nothing written


def test_trial_that_never_fits_the_cluster_is_refused(tmp_path) -> None:
    ddp = {"engine": "ddp", "num_workers": 2, "cpus_per_worker": 1.0}
    spec = load_tune_config(write(tmp_path, EPS, trainer=ddp))
    with pytest.raises(ConfigError) as err:
        plan_concurrency(spec, {"CPU": 2.0})
    assert "needs 2.1 CPU" in str(err.value) and "trainer.cpus_per_worker to 0.95" in str(err.value)
    # driver 0.1 + 2 x 0.95 fills 2 CPUs exactly: one trial at a time, whatever was asked for
    spec = load_tune_config(
        write(tmp_path, {**EPS, "max_concurrent_trials": 4}, trainer={**ddp, "cpus_per_worker": 0.95})
    )
    limit, demand = plan_concurrency(spec, {"CPU": 2.0})
    assert limit == 1 and demand.bundle["CPU"] == pytest.approx(0.1) and demand.total["CPU"] == pytest.approx(2.0)
    # in-process trials: 1 CPU each -> 2 at once; the searched engine's worst case decides
    spec = load_tune_config(
        write(
            tmp_path,
            {"space": {"trainer.engine": ["single", "ddp"]}},
            trainer={"num_workers": 2, "cpus_per_worker": 0.5},
        )
    )
    assert plan_concurrency(spec, {"CPU": 2.0})[0] == 1
    spec = load_tune_config(write(tmp_path, {**EPS, "trial_resources": {"cpu": 3}}))
    with pytest.raises(ConfigError, match="search.trial_resources.cpu"):
        plan_concurrency(spec, {"CPU": 2.0})
    assert plan_concurrency(load_tune_config(write(tmp_path, EPS)), {"CPU": 2.0})[0] == 2


def test_jobs_tune_epsilon_is_valid() -> None:
    root = Path(__file__).resolve().parents[2]
    spec = load_tune_config(root / "jobs" / "tune_epsilon.yaml")
    assert list(spec.search.space["perturbation.epsilon"].args) == [0, 0.25, 0.5, 0.75]
    assert spec.base.tasks.suite == "cit5" and spec.base.tasks.variant == "quick"
    assert plan_concurrency(spec, {"CPU": 2.0})[0] >= 1
    load_config(None)  # the base loader is untouched by the search section


def test_strategy_option_is_a_tunable_field_with_bounds(tmp_path) -> None:
    magmax = {"merge": {"strategy": "magmax"}}
    spec = load_tune_config(write(tmp_path, {"space": {"merge.options.lam": {"uniform": [0.1, 1.0]}}}, **magmax))
    assert spec.search.space["merge.options.lam"].kind == "uniform"
    assert trial_config_data(spec.base_data(), {"merge.options.lam": 0.3})["merge"]["options"] == {"lam": 0.3}
    bad = [
        (
            {"space": {"merge.options.lam": {"uniform": [0, 1.0]}}},
            magmax,
            "merge.options.lam: magmax: lam=0.0 must be > 0",
        ),
        ({"space": {"merge.options.lamda": [0.5]}}, magmax, "did you mean 'lam'?"),
        (
            {"space": {"merge.options.lam": [0.5], "merge.strategy": ["magmax", "pm"]}},
            magmax,
            "merge strategy 'pm' has no option 'lam'",
        ),
        ({"space": {"merge.options.density": {"uniform": [0.5, 1.5]}}}, {"merge": {"strategy": "ties"}}, "density="),
    ]
    for search, sections, expected in bad:
        with pytest.raises(ConfigError) as err:
            load_tune_config(write(tmp_path, search, **sections))
        assert expected in str(err.value), (search, str(err.value))
