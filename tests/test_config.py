from __future__ import annotations

import pytest

from pm_ray.config import ConfigError, RunConfig, apply_overrides, config_from_dict, dump_config, load_config


def test_defaults_are_the_embedded_quickstart() -> None:
    cfg = load_config(None)
    assert cfg.model.name_or_path == "bundled:smollm2-135m-instruct"
    assert cfg.tasks.suite == "bbni" and cfg.merge.strategy == "pm" and cfg.perturbation.epsilon == 0.5
    assert cfg.tracking.uri is None and cfg.ray.address is None


def test_yaml_and_overrides(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("merge: {strategy: pm}\ntrainer: {lr: 0.01}\n")
    cfg = load_config(
        path,
        [
            "trainer.lr=3e-4",
            "lora.targets=[q_proj, v_proj]",
            "merge.options={per_module: true}",
            "perturbation.probs=[0.5, 0.25, 0.25]",
            "storage.run_name=null",
        ],
    )
    assert cfg.merge.strategy == "pm" and cfg.trainer.lr == 3e-4
    assert cfg.lora.targets == ["q_proj", "v_proj"] and cfg.merge.options == {"per_module": True}
    assert cfg.perturbation.probs == (0.5, 0.25, 0.25)
    assert config_from_dict(__import__("yaml").safe_load(dump_config(cfg))) == cfg  # round trip


@pytest.mark.parametrize(
    "text,needle",
    [
        ("[1, 2]", "expected a mapping"),
        ("merge: {strategy: [unclosed", "not valid YAML"),
        ("trainer: {stepz: 3}", "unknown config key 'trainer.stepz'"),
        ("lora: {rank: 0}", "lora.rank"),
        ("tasks: {suite: null}", "no tasks"),
    ],
)
def test_bad_files_name_file_and_field(tmp_path, text, needle) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_bad_overrides() -> None:
    with pytest.raises(ConfigError, match="not of the form key=value"):
        apply_overrides({}, ["trainer.lr"])
    with pytest.raises(ConfigError, match="did you mean 'perturbation.epsilon'"):
        apply_overrides({}, ["perturbation.epsilom=0.1"])
    with pytest.raises(ConfigError, match="epsilon=-0.1 is outside"):
        load_config(None, ["perturbation.epsilon=-0.1"])
    assert isinstance(load_config(None, ["merge.strategy=magmax", "merge.options.lam=0.3"]), RunConfig)
    with pytest.raises(ConfigError, match=r"trainer.precision: Input should be 'auto', 'fp32' or 'bf16-mixed'"):
        load_config(None, ["trainer.precision=fp16"])


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (
            ["merge.strategy=magmax", "merge.options={lamda: 0.5}"],
            "merge.options.lamda: merge strategy 'magmax' has no option 'lamda'; did you mean 'lam'?",
        ),
        (["merge.options.lam=0.3"], "merge.options.lam: merge strategy 'pm' has no option 'lam'"),
        (["merge.strategy=ties", "merge.options.density=0"], "merge.options.density: ties: density=0 must be > 0"),
        (["merge.strategy=dare", "merge.options.drop=1.0"], "merge.options.drop: dare: drop=1.0 must be < 1"),
        (
            ["merge.strategy=fixed", "merge.options.alpha=1.5"],
            "merge.options.alpha: fixed: alpha=1.5 is outside [0, 1]",
        ),
        (
            ["merge.strategy=trm", "merge.options.snapshots=0"],
            "merge.options.snapshots: trm: snapshots=0 must be an int >= 1",
        ),
        (["merge.strategy=pm", "merge.options.per_module=maybe"], "merge.options.per_module: pm: per_module='maybe'"),
        (
            ["merge.strategy=trm", "merge.options.snapshots=8", "trainer.steps_per_task=5"],
            "trainer.steps_per_task=5 does not fit merge strategy 'trm': trm records LoRA_t after each of merge.options.snapshots=8",
        ),
    ],
)
def test_strategy_options_checked_at_load(overrides, needle) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_override_through_a_value_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"override 'merge.options.lam.deep': 'lam' is a value, not a section"):
        load_config(None, ["merge.strategy=magmax", "merge.options={lam: 0.5}", "merge.options.lam.deep=2"])


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["orthogonal.lam=-0.5"], "orthogonal.lam: Input should be greater than or equal to 0 (got -0.5)"),
        (["orthogonal.l2=-1"], "orthogonal.l2: Input should be greater than or equal to 0 (got -1)"),
        (["orthogonal.lam=.inf"], "orthogonal.lam: Input should be a finite number"),
        (["orthogonal.enabled=maybe"], "orthogonal.enabled: Input should be a valid boolean"),
        (["orthogonal.lamda=1"], "unknown config key 'orthogonal.lamda'; did you mean 'orthogonal.lam'?"),
        (
            ["merge.strategy=olora", "orthogonal.enabled=false"],
            "orthogonal.enabled=false contradicts merge.strategy='olora'",
        ),
    ],
)
def test_orthogonal_section_errors_name_the_field(overrides, needle) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_orthogonal_training_is_a_strategy_or_the_option() -> None:
    assert not load_config(None).orthogonal_training()
    assert not load_config(None, ["orthogonal.enabled=false"]).orthogonal_training()
    olora = load_config(None, ["merge.strategy=olora"])
    assert olora.orthogonal_training() and olora.orthogonal.lam == 0.5 and olora.orthogonal.l2 == 0.0
    assert load_config(None, ["merge.strategy=olora", "orthogonal.enabled=true"]).orthogonal_training()
    combined = load_config(None, ["merge.strategy=pm", "orthogonal.enabled=true", "orthogonal.lam=2"])
    assert combined.orthogonal_training() and combined.orthogonal.lam == 2.0
    assert not load_config(None, ["merge.strategy=pm", "orthogonal.lam=2"]).orthogonal_training()
    assert config_from_dict(olora.model_dump(mode="json")) == olora  # round trip (the workers' copy)


def test_placement_options_are_checked_at_load() -> None:
    cfg = load_config(None)
    assert cfg.trainer.placement_strategy == "PACK" and cfg.merge.shard_placement == "default"  # Ray's defaults
    cfg = load_config(None, ["trainer.placement_strategy=SPREAD", "merge.shard_placement=spread"])
    assert cfg.trainer.placement_strategy == "SPREAD" and cfg.merge.shard_placement == "spread"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["trainer.placement_strategy=spread"])
    assert "trainer.placement_strategy: Input should be 'PACK', 'SPREAD', 'STRICT_PACK' or 'STRICT_SPREAD'" in str(
        err.value
    )
    with pytest.raises(ConfigError, match=r"merge.shard_placement: Input should be 'default' or 'spread'"):
        load_config(None, ["merge.shard_placement=SPREAD"])
