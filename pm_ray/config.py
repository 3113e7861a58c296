"""Typed run configuration: YAML files plus dotted ``key=value`` overrides, validated at load time.

    pm-ray run jobs/quickstart.yaml merge.strategy=average trainer.steps_per_task=20

Unknown keys are errors that suggest the closest valid key; every error names the file and field.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError, model_validator
from pydantic_core import PydanticCustomError

# The sections live in config_sections; they are re-exported here, where callers import them.
from pm_ray.config_sections import (  # noqa: F401
    DiagnosticsSection,
    EvalSection,
    FisherSection,
    LoraSection,
    MergeSection,
    ModelSection,
    OrthogonalSection,
    PerturbationSection,
    RaySection,
    Section,
    StorageSection,
    TaskFile,
    TasksSection,
    TrackingSection,
    TrainerSection,
)


class ConfigError(ValueError):
    """Bad configuration: the message names the file, field and value and what was expected."""


class RunConfig(Section):
    model: ModelSection = ModelSection()
    lora: LoraSection = LoraSection()
    tasks: TasksSection = TasksSection()
    perturbation: PerturbationSection = PerturbationSection()
    merge: MergeSection = MergeSection()
    orthogonal: OrthogonalSection = OrthogonalSection()
    fisher: FisherSection = FisherSection()
    trainer: TrainerSection = TrainerSection()
    eval: EvalSection = EvalSection()
    diagnostics: DiagnosticsSection = DiagnosticsSection()
    storage: StorageSection = StorageSection()
    tracking: TrackingSection = TrackingSection()
    ray: RaySection = RaySection()

    @model_validator(mode="after")
    def _strategy_fits_training(self) -> RunConfig:
        """What the workers would check: e.g. TRM's K snapshots must fit in trainer.steps_per_task."""
        from pm_ray.core.strategies import build_strategy

        steps = self.trainer.steps_per_task
        try:
            build_strategy(self.merge.strategy, **self.merge.options).record_steps(steps)
        except ValueError as err:
            raise PydanticCustomError(
                "strategy_option",
                "{text}",
                {"text": f"trainer.steps_per_task={steps} does not fit merge strategy {self.merge.strategy!r}: {err}"},
            ) from None
        return self

    @model_validator(mode="after")
    def _validation_rows_for_validation_split(self) -> RunConfig:
        if self.eval.split == "validation" and self.tasks.validation_rows == 0:
            raise PydanticCustomError(
                "validation_split",
                "{text}",
                {
                    "text": "eval.split=validation needs tasks.validation_rows > 0 (rows held out of each training split)"
                },
            )
        return self

    @model_validator(mode="after")
    def _zero3_combinations(self) -> RunConfig:
        """What ZeRO-3 does not support yet: every other combination reads or writes parameters
        only through pm_ray/train/zero3.py."""
        from pm_ray.core.strategies import strategy_class

        if self.trainer.zero_stage != 3 or self.trainer.engine != "deepspeed":
            return self
        strategy = strategy_class(self.merge.strategy)
        problems = [
            (strategy.has_worker_step, f"merge.strategy={self.merge.strategy!r} (its worker step edits the weights)"),
            (
                self.orthogonal.enabled or strategy.trains_orthogonal,
                "O-LoRA (orthogonal.enabled / merge.strategy=olora: its term reads LoRA factors outside a forward)",
            ),
            (self.perturbation.mode == "gaussian", "perturbation.mode=gaussian (it edits LoRA B outside a forward)"),
            (self.model.name_or_path.startswith("tiny:bert"), "model.name_or_path=tiny:bert (a classifier)"),
        ]
        for bad, what in problems:
            if bad:
                raise PydanticCustomError(
                    "zero3", "{text}", {"text": f"trainer.zero_stage=3 does not support {what}; use zero_stage<=2"}
                )
        return self

    @model_validator(mode="after")
    def _olora_is_orthogonal(self) -> RunConfig:
        from pm_ray.core.strategies import strategy_class

        if self.orthogonal.enabled is False and strategy_class(self.merge.strategy).trains_orthogonal:
            raise PydanticCustomError(
                "orthogonal",
                "{text}",
                {
                    "text": f"orthogonal.enabled=false contradicts merge.strategy={self.merge.strategy!r} "
                    "(O-LoRA: sequential merging with the orthogonality term); use merge.strategy=sequential "
                    "for plain sequential LoRA"
                },
            )
        return self

    def orthogonal_training(self) -> bool:
        """Whether tasks train with O-LoRA's term: orthogonal.enabled if given, else whether the strategy
        implies it (olora)."""
        from pm_ray.core.strategies import strategy_class

        if self.orthogonal.enabled is not None:
            return self.orthogonal.enabled
        return strategy_class(self.merge.strategy).trains_orthogonal

    def run_name(self, default_stem: str = "run") -> str:
        return self.storage.run_name or f"{self.merge.strategy}-{default_stem}"


# ---- loading ------------------------------------------------------------------------------------


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_valid_keys(annotation, dotted + "."))
    return keys


def parse_value(text: str) -> Any:
    """``key=value`` values are YAML scalars/flow collections: 0.5, true, null, [a, b], {k: 1}."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted config key (``trainer.lr``, ``merge.options.lam``) in a config mapping, creating
    missing sections; an unknown key suggests the closest valid one. The one setter behind
    ``key=value`` overrides and tuning search spaces (``value`` is set as is)."""
    valid = _valid_keys(RunConfig)
    if key not in valid and not any(key.startswith(v + ".") for v in valid if v.endswith("options")):
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"override: unknown config key {key!r}{hint}")
    put_dotted(data, key, value, where=repr(key))


def put_dotted(
    data: dict[str, Any],
    key: str,
    value: Any,
    *,
    where: str,
    section: Callable[[dict[str, Any], str, Any], Any] | None = None,
) -> None:
    """Walk `key`'s dotted path in `data` (creating missing sections) and set its last part to `value`.
    `section(node, part, child)` may rewrite a section on the way (e.g. a shorthand string); a value
    met where a section is needed is a ConfigError naming `where`."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if section is not None:
            child = section(node, part, child)
        if not isinstance(child, dict):
            raise ConfigError(f"override {where}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. merge.strategy=average)")
        key, _, raw = item.partition("=")
        set_dotted(data, key.strip(), parse_value(raw))
    return data


def _format_error(err: ValidationError, source: str) -> str:
    valid = _valid_keys(RunConfig)
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        # The message names its own keys: strategy options, and the cross-section checks of RunConfig
        # (at the root, where the input would be the whole config).
        if e["type"] == "strategy_option" or not e["loc"]:
            lines.append(f"{source}: {e['msg']}")
        elif e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(f"{source}: unknown config key {loc!r}{hint}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: {loc or '<root>'}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any], source: str = "<config>") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is an empty mapping)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: config file does not exist")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(loaded).__name__}")
    return loaded


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML file (or start from defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = read_yaml_mapping(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    data = apply_overrides(data, list(overrides or []))
    return config_from_dict(data, source)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
