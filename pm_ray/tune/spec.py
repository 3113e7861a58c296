"""The ``search`` section of a tuning config, validated at load time (no Ray needed).

    search:
      name: tune-epsilon                 # the Tune experiment (default tune-<config file stem>)
      space:
        perturbation.epsilon: {grid: [0, 0.25, 0.5, 0.75]}
        trainer.lr: {loguniform: [1.0e-4, 1.0e-2]}
        lora.rank: {choice: [4, 8, 16]}
        merge.strategy: [pm, average]    # a bare list is a grid
      objective: acc                     # acc | aaa of the accuracy matrix at the end of the stream (maximised)
      num_samples: 1                     # grid: repeats of the grid; random/optuna: number of trials
      algorithm: grid                    # grid | random | optuna (needs the optuna package)
      scheduler: {type: asha, grace_period: 1, reduction_factor: 2}   # or fifo
      max_concurrent_trials: 2           # capped to what fits the cluster
      trial_resources: {cpu: 1, driver_cpu: 0.1}
      seed: 0

Every space key must be a dotted config key (the same machinery as ``key=value`` overrides, with
the closest valid key suggested), and every value a distribution can produce must pass the config's
own validation (e.g. ε in [0, 1)), checked on the grid/choice values and the ends of each range.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from pm_ray.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    parse_value,
    put_dotted,
    read_yaml_mapping,
    set_dotted,
)
from pm_ray.tune.space import Distribution, SearchSection

OBJECTIVES: tuple[str, ...] = ("acc", "aaa")
# Set by `pm-ray tune` for every trial (run directory, MLflow experiment) or shared by all trials.
MANAGED_PREFIXES: tuple[str, ...] = ("storage", "tracking", "ray")
# Fields that change what one trial reserves on the cluster: searched only over discrete values, so
# that the worst case can be checked against the cluster before anything starts.
RESOURCE_KEYS: tuple[str, ...] = (
    "trainer",
    "trainer.engine",
    "trainer.num_workers",
    "trainer.cpus_per_worker",
    "trainer.use_gpu",
)


# ---- loading ------------------------------------------------------------------------------------


@dataclass
class TuneSpec:
    """A validated tuning config: the base run config plus the search section."""

    base: RunConfig
    search: SearchSection
    source: str
    stem: str

    @property
    def name(self) -> str:
        return self.search.name or f"tune-{self.stem}"

    @property
    def storage_root(self) -> Path:
        return Path(self.base.storage.path).expanduser().resolve()

    @property
    def experiment_dir(self) -> Path:
        return self.storage_root / self.name

    def base_data(self) -> dict[str, Any]:
        return self.base.model_dump(mode="json")


def _search_keys(model: type[BaseModel] = SearchSection, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys.extend(_search_keys(field.annotation, prefix + name + "."))
    return keys


def _format_search_error(err: ValidationError, source: str) -> str:
    valid = _search_keys()
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        if loc and loc[0] == "space" and len(loc) >= 2:
            where = f"search.space[{loc[1]!r}]"
        else:
            where = "search." + ".".join(loc) if loc else "search"
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(".".join(loc), valid, n=1)
            hint = f"; did you mean 'search.{close[0]}'?" if close else ""
            lines.append(f"{source}: unknown key {where!r}{hint}")
        elif e["type"] == "missing":
            lines.append(f"{source}: {where} is required")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = "" if e["type"] == "value_error" else f" (got {e.get('input')!r})"
            lines.append(f"{source}: {where}: {msg}{got}")
    return "\n".join(lines)


def set_key(data: dict[str, Any], key: str, value: Any) -> None:
    """A searched value into a config mapping (numpy scalars from Tune's samplers as Python numbers)."""
    set_dotted(data, key, plain(value))


def plain(value: Any) -> Any:
    """numpy scalars (what Tune's samplers return) as Python numbers, recursively."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and type(value).__module__ == "numpy":
        return value.item()
    return value


def _set_dotted_plain(data: dict[str, Any], key: str, raw: str) -> None:
    """``search.<field>=value``; ``search.space.<dotted config key>={grid: [...]}`` sets one dimension."""
    value = parse_value(raw) if raw.strip() else raw
    if key.startswith("space."):
        space = data.get("space")
        if space is None:
            space = data["space"] = {}
        if not isinstance(space, dict):
            raise ConfigError("override 'search.space...': search.space is not a mapping")
        space[key[len("space.") :]] = value
        return

    def scheduler_shorthand(node: dict[str, Any], part: str, child: Any) -> Any:
        if part == "scheduler" and node is data and isinstance(child, str):  # `scheduler: asha`
            child = node[part] = {"type": child}
        return child

    put_dotted(data, key, value, where=f"'search.{key}'", section=scheduler_shorthand)


def check_space(search: SearchSection, base: RunConfig, source: str) -> None:
    """Every key a valid dotted config key not managed by tune; every probed value valid for it."""
    base_data = base.model_dump(mode="json")
    for key, dist in search.space.items():
        where = f"{source}: search.space[{key!r}]"
        head = key.split(".")[0]
        if head in MANAGED_PREFIXES:
            raise ConfigError(
                f"{where}: {head}.* cannot be searched: pm-ray tune sets the run directory and MLflow "
                "experiment of every trial, and Ray settings are shared by all trials"
            )
        try:
            set_key(copy.deepcopy(base_data), key, None)
        except ConfigError as err:
            raise ConfigError(f"{source}: search.space: {str(err).removeprefix('override: ')}") from None
        if (key in RESOURCE_KEYS or any(r.startswith(key + ".") for r in RESOURCE_KEYS)) and not dist.discrete:
            raise ConfigError(
                f"{where}: {dist.kind} over a resource field; use grid or choice so that every "
                "trial's resources can be checked against the cluster"
            )
        for context, value in _probes(search, base_data, key, dist):
            data = copy.deepcopy(context)
            set_key(data, key, value)
            try:
                config_from_dict(data, f"{where} value {value!r}")
            except ConfigError as err:
                raise ConfigError(f"{err}\n{where}: {dist.describe()} produces invalid values for {key}") from None


def _probes(
    search: SearchSection, base_data: dict[str, Any], key: str, dist: Distribution
) -> list[tuple[dict[str, Any], Any]]:
    """(config, value) pairs to validate. A ``merge.options.<key>`` is checked against the typed
    options of every strategy a trial can get (each searched ``merge.strategy`` value)."""
    contexts = [base_data]
    strategies = search.space.get("merge.strategy")
    if key.startswith("merge.options.") and strategies is not None and strategies.discrete:
        contexts = []
        for name in strategies.args:
            context = copy.deepcopy(base_data)
            set_key(context, "merge.strategy", name)
            contexts.append(context)
    return [(context, value) for context in contexts for value in dist.probe_values()]


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    base, search = [], []
    for item in overrides:
        (search if item.strip().startswith("search.") else base).append(item)
    return base, search


def load_tune_config(path: str | Path, overrides: list[str] | None = None) -> TuneSpec:
    """Read an experiment YAML with a ``search`` section; ``overrides`` are dotted ``key=value``
    items for the run config, or ``search.<field>=value`` for the search section."""
    source = str(path)
    data = read_yaml_mapping(path)
    search_data = data.pop("search", None)
    if search_data is None:
        raise ConfigError(
            f"{path}: no 'search' section; add e.g.\nsearch:\n  space:\n    perturbation.epsilon: {{grid: [0, 0.25, 0.5]}}"
        )
    if not isinstance(search_data, dict):
        raise ConfigError(f"{path}: 'search' must be a mapping, got {type(search_data).__name__}")
    base_overrides, search_overrides = split_overrides(list(overrides or []))
    for item in search_overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. search.num_samples=4)")
        key, _, raw = item.partition("=")
        _set_dotted_plain(search_data, key.strip().removeprefix("search."), raw)
    data = apply_overrides(data, base_overrides)
    base = config_from_dict(_absolute_paths(data), source)
    try:
        search = SearchSection.model_validate(search_data)
    except ValidationError as err:
        raise ConfigError(_format_search_error(err, source)) from None
    check_space(search, base, source)
    return TuneSpec(base=base, search=search, source=source, stem=Path(path).stem)


def _abs(path: str) -> str:
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def _absolute_paths(data: dict[str, Any]) -> dict[str, Any]:
    """Trials run in Ray worker processes whose working directory is not the caller's: relative
    paths of the config are resolved here, against the caller's working directory."""
    data = copy.deepcopy(data)
    storage = data.setdefault("storage", {}) or {}
    data["storage"] = storage
    storage["path"] = _abs(str(storage.get("path") or "./runs"))
    tasks = data.get("tasks") or {}
    for entry in tasks.get("files") or []:
        if isinstance(entry, dict):
            for split in ("train", "test"):
                if isinstance(entry.get(split), str):
                    entry[split] = _abs(entry[split])
    model = data.get("model") or {}
    ref = model.get("name_or_path")
    if isinstance(ref, str) and ref.startswith((".", "~")):
        model["name_or_path"] = _abs(ref)
    trainer = data.get("trainer") or {}
    if isinstance(trainer.get("deepspeed_config"), str):
        trainer["deepspeed_config"] = _abs(trainer["deepspeed_config"])
    tracking = data.get("tracking") or {}
    uri = tracking.get("uri")
    if isinstance(uri, str) and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        tracking["uri"] = "sqlite:///" + _abs(uri[len("sqlite:///") :])
    return data


def trial_config_data(base_data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(base_data)
    for key, value in params.items():
        set_key(data, key, value)
    return data
