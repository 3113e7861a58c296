"""The run directory: the durable state of one continual run (everything else can be recomputed).

    <storage_path>/<run_name>/
      config.yaml        resolved config, as run
      state.json         completed tasks, α per task, accuracy matrix, content hashes (atomic writes)
      data/<i>-<name>/   the task stream as Parquet (train.parquet, test.parquet)
      merged/            delta.safetensors (θ̂ − W0 on the adapted modules) + stack.json for merges
                         that are Σ α_i Δ_i of the saved task adapters
      stats/             the merge strategy's state per shard, for the last completed task only
      tasks/<i>-<name>/  expert adapter (PEFT format), per-task metrics
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
RESUME_FREE_TRAINER_FIELDS = {"max_failures", "log_every"}


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
    for key in RESUME_FREE_TRAINER_FIELDS:
        data["trainer"].pop(key, None)
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
            raise FileNotFoundError(f"{self.state_path}: no state.json (not a pm-ray run directory, or the run never started)")
        raw = read_json(self.state_path)
        if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
            got = raw.get("version") if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(f"{self.state_path}: written by an incompatible pm-ray version (state version {got!r}, expected {STATE_VERSION})")
        known = set(RunState.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{self.state_path}: unknown fields {sorted(unknown)}")
        return RunState(**raw)

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
            if old.get(section, {}).get(key) != value and key not in RESUME_FREE_TRAINER_FIELDS
        ]
        raise ConfigError(
            f"{self.path}: this run directory was started with a different config ({'; '.join(diffs)}); "
            "use another storage.run_name, or the same settings to resume"
        )
