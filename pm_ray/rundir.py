"""The run directory: the durable state of one continual run (everything else can be recomputed).

    <storage_path>/<run_name>/
      config.yaml        resolved config, as run
      state.json         completed tasks, α per task, accuracy matrix, content hashes (atomic writes)
      data/<i>-<name>/   the task stream as Parquet (train.parquet, test.parquet)
      merged/            delta.safetensors (θ̂ − W0 on the adapted modules) + stack.json for merges
                         that are Σ α_i Δ_i of the saved task adapters
      stats/             the merge strategy's state per shard, for the last completed task only
      tasks/<i>-<name>/  expert adapter (PEFT format), per-task metrics; lora_A.safetensors (the
                         task's LoRA A matrices) when it trained with O-LoRA's orthogonality term
      export/            dense Hugging Face model, on demand

state.json is the commit point: a task counts as done only once state.json says so, and files it
names are written (atomically) before it. Only JSON/YAML/safetensors/Parquet are read back.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pm_ray.config import ConfigError, RunConfig, config_from_dict, dump_config
from pm_ray.core.tensors import atomic_write_bytes

STATE_VERSION = 1

# Fields that may differ between the first run and a resume without changing the results.
RESUME_FREE_FIELDS = {"storage", "tracking", "ray", "eval"}
# fields that do not change a run's results: where it runs and how it reports (a resumed run may
# land on another cluster shape)
RESUME_FREE_SECTION_FIELDS = {
    "trainer": {"max_failures", "log_every", "placement_strategy"},
    "merge": {"shard_placement"},
}


@dataclass
class RunState:
    run_name: str
    strategy: str
    task_names: list[str]
    completed: int = 0
    alphas: list[Any] = field(default_factory=list)
    accuracy: list[list[float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    stats_files: list[str] = field(default_factory=list)
    data_hashes: dict[str, str] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    wall_s: float = 0.0
    version: int = STATE_VERSION


class StateFileError(ValueError):
    """state.json exists but is not what the pipeline writes (the message names the file and field)."""


def _field(raw: dict[str, Any], path: Path, key: str, kind: type | tuple[type, ...], expected: str) -> Any:
    if key not in raw:
        raise StateFileError(f"{path}: missing field {key!r} ({expected})")
    value = raw[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise StateFileError(f"{path}: field {key!r} is {value!r}; expected {expected}")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_state(raw: Any, path: Path) -> RunState:
    """The one check of state.json: version, fields and their shapes (what readers rely on)."""
    from pm_ray.core.coefficient import alpha_stats

    if not isinstance(raw, dict):
        raise StateFileError(f"{path}: top level is a {type(raw).__name__}; expected a JSON object")
    if raw.get("version") != STATE_VERSION:
        raise StateFileError(
            f"{path}: written by an incompatible pm-ray version (state version {raw.get('version')!r}; "
            f"expected {STATE_VERSION})"
        )
    unknown = set(raw) - set(RunState.__dataclass_fields__)
    if unknown:
        raise StateFileError(f"{path}: unknown fields {sorted(unknown)}")
    names = _field(raw, path, "task_names", list, "a list of task names")
    if not all(isinstance(name, str) for name in names):
        raise StateFileError(f"{path}: field 'task_names' is {names!r}; expected a list of strings")
    completed = _field(raw, path, "completed", int, f"an integer in 0..{len(names)}")
    if not 0 <= completed <= len(names):
        raise StateFileError(f"{path}: field 'completed' is {completed}; expected an integer in 0..{len(names)}")
    accuracy = _field(raw, path, "accuracy", list, "a list of rows of scores")
    if len(accuracy) != completed:
        raise StateFileError(
            f"{path}: field 'accuracy' has {len(accuracy)} rows; expected one per completed task ({completed})"
        )
    for l, row in enumerate(accuracy):
        if not isinstance(row, list):
            raise StateFileError(f"{path}: field 'accuracy': row {l + 1} is {row!r}; expected a list of scores")
        for i, value in enumerate(row):
            if value is not None and not _is_number(value):
                raise StateFileError(
                    f"{path}: field 'accuracy': R[{l + 1}][{i + 1}] is {value!r}; expected a number, null or NaN"
                )
    alphas = raw.get("alphas", [])
    if (
        not isinstance(alphas, list)
        or len(alphas) > completed
        or not all(a is None or isinstance(a, dict) or _is_number(a) for a in alphas)
    ):
        raise StateFileError(
            f"{path}: field 'alphas' is {alphas!r}; expected at most {completed} entries of number, object or null"
        )
    try:
        [alpha_stats(a) for a in alphas]
    except ValueError as err:
        raise StateFileError(f"{path}: field 'alphas': {err}") from None
    for key, kind, expected in (
        ("metrics", dict, "an object"),
        ("diagnostics", list, "a list"),
        ("wall_s", (int, float), "a number of seconds"),
    ):
        if key in raw and (not isinstance(raw[key], kind) or isinstance(raw[key], bool)):
            raise StateFileError(f"{path}: field {key!r} is {raw[key]!r}; expected {expected}")
    for key in ("run_name", "strategy"):
        _field(raw, path, key, str, "a string")
    return RunState(**raw)


def write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def config_fingerprint(config: RunConfig) -> str:
    data = config.model_dump(mode="json")
    for key in RESUME_FREE_FIELDS:
        data.pop(key, None)
    for section, keys in RESUME_FREE_SECTION_FIELDS.items():
        for key in keys:
            data[section].pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).resolve()

    # paths
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def state_path(self) -> Path:
        return self.path / "state.json"

    @property
    def merged_dir(self) -> Path:
        return self.path / "merged"

    @property
    def stats_dir(self) -> Path:
        return self.path / "stats"

    def data_dir(self, index: int, name: str) -> Path:
        return self.path / "data" / f"{index}-{name}"

    def task_dir(self, index: int, name: str) -> Path:
        return self.path / "tasks" / f"{index}-{name}"

    def exists(self) -> bool:
        return self.state_path.is_file()

    def load_tasks(self, state: RunState) -> list[Any]:
        """The run's own copy of its task stream (data/<i>-<name>/, written when it was created)."""
        from pm_ray.data.readers import load_task

        tasks = []
        for i, name in enumerate(state.task_names, start=1):
            d = self.data_dir(i, name)
            meta = read_json(d / "task.json")
            tasks.append(load_task(name, meta["kind"], d / "train.parquet", d / "test.parquet"))
        return tasks

    # state
    def read_state(self) -> RunState:
        if not self.state_path.is_file():
            raise FileNotFoundError(
                f"{self.state_path}: no state.json (not a pm-ray run directory, or the run never started)"
            )
        try:
            raw = json.loads(self.state_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StateFileError(f"{self.state_path}: not valid JSON ({err})") from None
        return validate_state(raw, self.state_path)

    def write_state(self, state: RunState) -> None:
        write_json(self.state_path, asdict(state))

    def read_config(self) -> RunConfig:
        if not self.config_path.is_file():
            raise FileNotFoundError(f"{self.config_path}: missing")
        return config_from_dict(yaml.safe_load(self.config_path.read_text()) or {}, str(self.config_path))

    def write_config(self, config: RunConfig) -> None:
        atomic_write_bytes(self.config_path, dump_config(config).encode())

    def check_resumable(self, config: RunConfig) -> None:
        """A resumed run must have been started with a config that gives the same results."""
        previous = self.read_config()
        if config_fingerprint(previous) == config_fingerprint(config):
            return
        old, new = previous.model_dump(mode="json"), config.model_dump(mode="json")
        diffs = [
            f"{section}.{key}: {old[section].get(key)!r} -> {value!r}"
            for section, values in new.items()
            if section not in RESUME_FREE_FIELDS and isinstance(values, dict)
            for key, value in values.items()
            if old.get(section, {}).get(key) != value and key not in RESUME_FREE_SECTION_FIELDS.get(section, ())
        ]
        raise ConfigError(
            f"{self.path}: this run directory was started with a different config ({'; '.join(diffs)}); "
            "use another storage.run_name, or the same settings to resume"
        )
