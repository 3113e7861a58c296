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
import importlib.util
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pm_ray.config import ConfigError, RunConfig, apply_overrides, config_from_dict, parse_value, read_yaml_mapping

DISTRIBUTIONS: tuple[str, ...] = ("grid", "choice", "uniform", "loguniform", "randint")
OBJECTIVES: tuple[str, ...] = ("acc", "aaa")
# Set by `pm-ray tune` for every trial (run directory, MLflow experiment) or shared by all trials.
MANAGED_PREFIXES: tuple[str, ...] = ("storage", "tracking", "ray")
# Fields that change what one trial reserves on the cluster: searched only over discrete values, so
# that the worst case can be checked against the cluster before anything starts.
RESOURCE_KEYS: tuple[str, ...] = ("trainer", "trainer.engine", "trainer.num_workers", "trainer.cpus_per_worker", "trainer.use_gpu")


class Distribution(BaseModel):
    """One dimension of the search space: exactly one of grid / choice / uniform / loguniform / randint."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["grid", "choice", "uniform", "loguniform", "randint"]
    args: tuple[Any, ...]

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, Distribution):
            return value
        if isinstance(value, dict) and set(value) == {"kind", "args"}:
            return value
        if isinstance(value, list):  # shorthand: a bare list is a grid
            value = {"grid": value}
        if not isinstance(value, dict) or len(value) != 1:
            raise ValueError(f"expected one distribution such as {{grid: [0, 0.5]}} or {{loguniform: [1e-4, 1e-2]}} "
                             f"(one of {', '.join(DISTRIBUTIONS)}), got {value!r}")
        (kind, args), = value.items()
        if kind not in DISTRIBUTIONS:
            close = difflib.get_close_matches(str(kind), DISTRIBUTIONS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown distribution {kind!r}{hint}; expected one of {', '.join(DISTRIBUTIONS)}")
        if not isinstance(args, list):
            raise ValueError(f"{kind}: expected a list, got {args!r}")
        if kind in ("grid", "choice"):
            if not args:
                raise ValueError(f"{kind}: expected at least one value, got []")
            return {"kind": kind, "args": tuple(args)}
        if len(args) != 2:
            raise ValueError(f"{kind}: expected [low, high], got {args!r}")
        low, high = args
        numbers = (int,) if kind == "randint" else (int, float)
        if any(isinstance(v, bool) or not isinstance(v, numbers) for v in (low, high)):
            what = "integers" if kind == "randint" else "numbers"
            raise ValueError(f"{kind}: low and high must be {what}, got {args!r}")
        if not all(math.isfinite(v) for v in (low, high)):
            raise ValueError(f"{kind}: low and high must be finite, got {args!r}")
        if kind == "randint" and low > high or kind != "randint" and low >= high:
            raise ValueError(f"{kind}: low must be {'<=' if kind == 'randint' else '<'} high, got {args!r}")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"loguniform: low must be > 0, got {args!r}")
        return {"kind": kind, "args": (low, high) if kind == "randint" else (float(low), float(high))}

    @property
    def discrete(self) -> bool:
        return self.kind in ("grid", "choice")

    def probe_values(self) -> list[Any]:
        """Values checked against the config: all grid/choice values, the ends of a range (a float
        range's high end is exclusive, so its largest float below is checked)."""
        if self.discrete:
            return list(self.args)
        low, high = self.args
        if self.kind == "randint":
            return [low, high]
        return [low, (low + high) / 2, math.nextafter(high, low)]

    def to_tune(self, algorithm: str) -> Any:
        """The Ray Tune domain. A grid stays an exhaustive grid only for algorithm=grid; random and
        optuna sample it as a categorical choice."""
        from ray import tune

        if self.kind == "grid" and algorithm == "grid":
            return tune.grid_search(list(self.args))
        if self.discrete:
            return tune.choice(list(self.args))
        low, high = self.args
        if self.kind == "uniform":
            return tune.uniform(low, high)
        if self.kind == "loguniform":
            return tune.loguniform(low, high)
        return tune.randint(low, high + 1)  # inclusive here, exclusive in Tune

    def describe(self) -> str:
        return f"{self.kind} {list(self.args)}"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SchedulerSection(_Section):
    type: Literal["fifo", "asha"] = "fifo"
    grace_period: int = Field(1, ge=1)  # tasks every trial runs before ASHA may stop it
    reduction_factor: float = Field(2.0, gt=1)
    max_t: int | None = Field(None, ge=1)  # default: the number of tasks in the stream

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value


class TrialResources(_Section):
    # engine=single (the whole run inside the trial process): CPUs of one trial.
    cpu: float | None = Field(None, gt=0)  # default trainer.cpus_per_worker
    # engines ddp/deepspeed: the trial process only drives a TorchTrainer whose workers get their
    # own placement group (trainer.num_workers x trainer.cpus_per_worker).
    driver_cpu: float | None = Field(None, ge=0)  # default ray.driver_cpus


class SearchSection(_Section):
    name: str | None = None  # the Tune experiment directory under storage.path (default tune-<stem>)
    space: dict[str, Distribution]
    objective: Literal["acc", "aaa"] = "acc"
    num_samples: int = Field(1, ge=1)
    algorithm: Literal["grid", "random", "optuna"] = "grid"
    scheduler: SchedulerSection = SchedulerSection()
    max_concurrent_trials: int | None = Field(None, ge=1)
    trial_resources: TrialResources = TrialResources()
    seed: int = 0

    @field_validator("space")
    @classmethod
    def _non_empty(cls, value: dict[str, Distribution]) -> dict[str, Distribution]:
        if not value:
            raise ValueError("the search space is empty; give at least one dotted config key, "
                             "e.g. perturbation.epsilon: {grid: [0, 0.25, 0.5]}")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and (not value or "/" in value or value.startswith(".")):
            raise ValueError(f"search.name {value!r} must be a plain directory name")
        return value

    @model_validator(mode="after")
    def _algorithm(self) -> SearchSection:
        if self.algorithm == "optuna" and importlib.util.find_spec("optuna") is None:
            raise ValueError("algorithm 'optuna' needs the optuna package (pip install optuna); "
                             "or use algorithm: grid | random")
        return self


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
    """Set a dotted config key in a config dict, with config.py's key validation (unknown keys
    suggest the closest valid key). The value is set as is: no string round trip."""
    apply_overrides(data, [f"{key}=null"])  # validates the key and creates missing sections
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = plain(value)


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
        space[key[len("space."):]] = value
        return
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if part == "scheduler" and node is data and isinstance(child, str):  # the `scheduler: asha` shorthand
            child = node[part] = {"type": child}
        if not isinstance(child, dict):
            raise ConfigError(f"override 'search.{key}': {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def check_space(search: SearchSection, base: RunConfig, source: str) -> None:
    """Every key a valid dotted config key not managed by tune; every probed value valid for it."""
    base_data = base.model_dump(mode="json")
    for key, dist in search.space.items():
        where = f"{source}: search.space[{key!r}]"
        head = key.split(".")[0]
        if head in MANAGED_PREFIXES:
            raise ConfigError(f"{where}: {head}.* cannot be searched: pm-ray tune sets the run directory and MLflow "
                              "experiment of every trial, and Ray settings are shared by all trials")
        try:
            set_key(copy.deepcopy(base_data), key, None)
        except ConfigError as err:
            raise ConfigError(f"{source}: search.space: {str(err).removeprefix('override: ')}") from None
        if (key in RESOURCE_KEYS or any(r.startswith(key + ".") for r in RESOURCE_KEYS)) and not dist.discrete:
            raise ConfigError(f"{where}: {dist.kind} over a resource field; use grid or choice so that every "
                              "trial's resources can be checked against the cluster")
        for context, value in _probes(search, base_data, key, dist):
            data = copy.deepcopy(context)
            set_key(data, key, value)
            try:
                config_from_dict(data, f"{where} value {value!r}")
            except ConfigError as err:
                raise ConfigError(f"{err}\n{where}: {dist.describe()} produces invalid values for {key}") from None


def _probes(search: SearchSection, base_data: dict[str, Any], key: str, dist: Distribution) -> list[tuple[dict[str, Any], Any]]:
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
        raise ConfigError(f"{path}: no 'search' section; add e.g.\nsearch:\n  space:\n    perturbation.epsilon: {{grid: [0, 0.25, 0.5]}}")
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
        tracking["uri"] = "sqlite:///" + _abs(uri[len("sqlite:///"):])
    return data


# ---- trials ---------------------------------------------------------------------------------------


def trial_config_data(base_data: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(base_data)
    for key, value in params.items():
        set_key(data, key, value)
    return data


def in_process(cfg: RunConfig) -> bool:
    """Whether the pipeline runs the worker loop inside the calling process (mirrors pipeline._fit)."""
    return cfg.trainer.engine == "single" or cfg.trainer.num_workers == 1 and cfg.trainer.engine != "deepspeed"


@dataclass(frozen=True)
class TrialDemand:
    bundle: dict[str, float]  # the trial's own placement group (what Tune reserves)
    total: dict[str, float]  # bundle + the Ray Train worker group's separate placement group
    text: str


def trial_demand(cfg: RunConfig, resources: TrialResources) -> TrialDemand:
    gpu = 1.0 if cfg.trainer.use_gpu else 0.0
    if in_process(cfg):
        cpu = resources.cpu if resources.cpu is not None else cfg.trainer.cpus_per_worker
        bundle = {"CPU": cpu, "GPU": gpu}
        return TrialDemand(bundle, dict(bundle), f"{cpu:g} CPU{f' + {gpu:g} GPU' if gpu else ''} "
                                                 f"(engine={cfg.trainer.engine}: the whole run in the trial process)")
    driver = resources.driver_cpu if resources.driver_cpu is not None else cfg.ray.driver_cpus
    driver = max(driver, 0.01)  # a placement group bundle cannot be empty
    n, cpw = cfg.trainer.num_workers, cfg.trainer.cpus_per_worker
    bundle = {"CPU": driver, "GPU": 0.0}
    total = {"CPU": driver + n * cpw, "GPU": n * gpu}
    gpu_text = f" + {total['GPU']:g} GPU" if gpu else ""
    worker_gpu = f" + {gpu:g} GPU" if gpu else ""
    text = (f"{total['CPU']:g} CPU{gpu_text} (trial driver {driver:g} CPU + {n} Ray Train workers x "
            f"{cpw:g} CPU{worker_gpu}, engine={cfg.trainer.engine})")
    return TrialDemand(bundle, total, text)


def resource_variants(spec: TuneSpec) -> list[RunConfig]:
    """The base config under every combination of the searched resource fields' values."""
    base_data = spec.base_data()
    keys = [k for k, d in spec.search.space.items() if k in RESOURCE_KEYS or any(r.startswith(k + ".") for r in RESOURCE_KEYS)]
    if not keys:
        return [spec.base]
    combos = itertools.product(*(spec.search.space[k].args for k in keys))
    return [config_from_dict(trial_config_data(base_data, dict(zip(keys, values))), spec.source) for values in combos]


def plan_concurrency(spec: TuneSpec, cluster: dict[str, float]) -> tuple[int, TrialDemand]:
    """How many trials may run at once without their resources ever waiting on each other.

    Raises ConfigError when a single trial can never fit the cluster."""
    worst: TrialDemand | None = None
    fit = math.inf
    for cfg in resource_variants(spec):
        demand = trial_demand(cfg, spec.search.trial_resources)
        for res, need in demand.total.items():
            have = float(cluster.get(res, 0.0))
            if need <= 0:
                continue
            if need > have + 1e-6:
                raise ConfigError(_does_not_fit(cfg, demand, res, have, spec.search.trial_resources))
            n = math.floor(have / need + 1e-6)
            if n < fit:
                fit, worst = n, demand
    if worst is None:  # nothing requested: Tune's own accounting is all there is
        worst = trial_demand(spec.base, spec.search.trial_resources)
        fit = spec.search.max_concurrent_trials or 1
    limit = int(fit)
    if spec.search.max_concurrent_trials is not None:
        limit = min(limit, spec.search.max_concurrent_trials)
    return max(limit, 1), worst


def _does_not_fit(cfg: RunConfig, demand: TrialDemand, res: str, have: float, resources: TrialResources) -> str:
    msg = f"a trial needs {demand.text} but the Ray cluster has {have:g} {res}: it could never start."
    if res == "CPU" and not in_process(cfg):
        driver = demand.bundle["CPU"]
        n = cfg.trainer.num_workers
        if have > driver:
            msg += (f" Lower trainer.cpus_per_worker to {math.floor((have - driver) / n * 100) / 100:g} "
                    f"(= ({have:g} - {driver:g} driver) / {n} workers), or trainer.num_workers.")
        else:
            msg += " Lower search.trial_resources.driver_cpu."
    elif res == "CPU":
        msg += f" Set search.trial_resources.cpu (or trainer.cpus_per_worker) to at most {have:g}."
    return msg
