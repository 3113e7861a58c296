"""Load-time checks that need more than the config model: everything a worker or actor would
reject is rejected here, by the driver, before the run directory is written or Ray starts.

    model.name_or_path     resolves (tiny / bundled / local directory), without loading weights
    lora.targets           match modules of the backbone (its module tree built on the meta device)
    storage.path           is, or can be created as, a writable directory
    trainer.deepspeed_config   a JSON file that exists and holds a mapping
    the task stream        one kind of task (instruction or classification) on a backbone of that
                           kind; every task has at least one training row per worker
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

from pm_ray.config import ConfigError, RunConfig


def check_model(cfg: RunConfig) -> None:
    """A model reference that cannot resolve is exit 2, without loading weights."""
    from pm_ray.models.backbone import BackboneError, bundled_model_dir

    ref = cfg.model.name_or_path
    try:
        if ref.startswith("bundled:"):
            bundled_model_dir(ref[len("bundled:") :])
        elif ref.startswith("tiny:"):
            if ref not in ("tiny:llama", "tiny:bert"):
                raise BackboneError(f"unknown tiny model {ref!r}; expected tiny:llama or tiny:bert")
        elif ref.startswith((".", "/", "~")) and not Path(ref).expanduser().is_dir():
            raise BackboneError(f"model path {ref!r} does not exist")
    except BackboneError as err:
        raise ConfigError(f"model.name_or_path: {err}") from None


def check_lora_targets(cfg: RunConfig) -> None:
    """The workers' ``resolve_targets`` check, on the backbone's modules built on the meta device.
    A bundled model with the default targets is known to have them (and its GGUF header takes
    seconds to read), so it is skipped."""
    if cfg.lora.targets is None and cfg.model.name_or_path.startswith("bundled:"):
        return
    from pm_ray.models.lora import resolve_targets
    from pm_ray.models.skeleton import causal_lm_skeleton

    skeleton = causal_lm_skeleton(cfg.model.name_or_path)
    if skeleton is None:  # a hub id: checked where it is downloaded
        return
    try:
        resolve_targets(skeleton, cfg.lora.targets)
    except ValueError as err:
        names = sorted({name.rsplit(".", 1)[-1] for name, _ in skeleton.named_modules() if name})
        wanted = cfg.lora.targets if isinstance(cfg.lora.targets, list) else [cfg.lora.targets]
        close = [m for t in wanted if isinstance(t, str) for m in difflib.get_close_matches(t, names, n=1)]
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"lora.targets: {err}{hint}") from None


def check_storage(cfg: RunConfig) -> Path:
    """storage.path resolved; a ConfigError naming it when it cannot hold run directories."""
    storage = Path(cfg.storage.path).expanduser().resolve()
    existing = storage
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"storage.path: {storage} cannot be created: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"storage.path: {storage} cannot be written ({existing} is not writable)")
    return storage


def make_storage(storage: Path) -> None:
    """Create storage.path (a ConfigError naming it when the filesystem refuses)."""
    try:
        storage.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"storage.path: {storage} cannot be created ({err.strerror or err})") from None


def check_deepspeed_config(cfg: RunConfig) -> None:
    value = cfg.trainer.deepspeed_config
    if cfg.trainer.engine != "deepspeed" or not isinstance(value, str):
        return
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"trainer.deepspeed_config: {path} does not exist")
    try:
        loaded = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"trainer.deepspeed_config: {path} is not valid JSON ({err})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"trainer.deepspeed_config: {path} must hold a JSON object, got {type(loaded).__name__}")


def check_run(cfg: RunConfig) -> Path:
    """Every check that needs no task data; returns the resolved storage path."""
    check_model(cfg)
    check_lora_targets(cfg)
    check_deepspeed_config(cfg)
    return check_storage(cfg)


def model_kind(name_or_path: str) -> str | None:
    """'instruction' (a causal LM) or 'classification' (an encoder, given per-task heads), without
    loading weights; None where only the hub knows (a hub id)."""
    from pm_ray.models.backbone import bundled_model_dir

    if name_or_path.startswith("tiny:"):
        return "classification" if name_or_path == "tiny:bert" else "instruction"
    if name_or_path.startswith("bundled:"):
        return bundled_model_dir(name_or_path[len("bundled:") :])[1].kinds[0]
    config = Path(name_or_path).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        meta = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"model.name_or_path: {config} is not valid JSON ({err})") from None
    causal = meta.get("is_decoder") or any(str(a).endswith("ForCausalLM") for a in meta.get("architectures") or [])
    return "instruction" if causal else "classification"


def check_task_kinds(cfg: RunConfig, tasks: list[Any]) -> None:
    """A stream is all instruction tasks (a causal LM) or all classification tasks (an encoder with
    one head per task, the P&M paper's class-incremental protocol)."""
    from pm_ray.core.strategies import strategy_class

    kinds = sorted({t.kind for t in tasks})
    if len(kinds) > 1:
        listing = ", ".join(f"{t.name} ({t.kind})" for t in tasks)
        raise ConfigError(f"tasks: a stream holds one kind of task, instruction or classification; got {listing}")
    kind, backbone = kinds[0], model_kind(cfg.model.name_or_path)
    if backbone is not None and backbone != kind:
        what = {"instruction": "a causal LM", "classification": "an encoder"}
        examples = {
            "instruction": "tiny:llama, bundled:smollm2-135m-instruct, ...",
            "classification": "tiny:bert, bundled:minilm-l6, a BERT-style directory",
        }
        raise ConfigError(
            f"model.name_or_path: {cfg.model.name_or_path!r} is {what[backbone]}, but the tasks are "
            f"{kind} tasks ({', '.join(t.name for t in tasks)}), which need {what[kind]} ({examples[kind]})"
        )
    if kind != "classification":
        return
    problems = [
        (cfg.trainer.engine == "deepspeed" and cfg.trainer.zero_stage == 3, "trainer.zero_stage=3"),
        (
            strategy_class(cfg.merge.strategy).has_worker_step,
            f"merge.strategy={cfg.merge.strategy!r} (its objectives are defined on a causal LM's next-token logits)",
        ),
    ]
    names = {t.name for t in tasks}
    if len(names) < len(tasks):
        problems.append((True, "two tasks with the same name (each task has its own head, keyed by name)"))
    for bad, what in problems:
        if bad:
            raise ConfigError(f"tasks: a classification stream does not support {what}")


def check_tasks(cfg: RunConfig, tasks: list[Any]) -> None:
    """Each worker trains on its own shard of a task's rows: at least one row per worker."""
    workers = 1 if cfg.trainer.engine == "single" else cfg.trainer.num_workers
    for task in tasks:
        if task.train.num_rows < workers:
            raise ConfigError(
                f"tasks: task {task.name!r} has {task.train.num_rows} training rows, fewer than "
                f"trainer.num_workers={workers} (every worker trains on its own shard)"
            )
