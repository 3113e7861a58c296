"""The driver: one continual run end to end.

    resolve config -> open or resume the run directory -> start/join Ray -> merge actors
    -> ONE TorchTrainer whose workers walk the whole stream -> metrics, report, MLflow

Bad input (config, data, model path) is detected here, before Ray starts and before anything is
written: the run directory is assembled in a temporary directory and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pm_ray.atomicdir import atomic_directory
from pm_ray.config import ConfigError, RunConfig
from pm_ray.core.metrics import continual_metrics
from pm_ray.interrupt import Interrupted, StopRequest, stop_on_signals
from pm_ray.progress import ProgressPrinter
from pm_ray.rundir import RunDir, RunState

WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}


class RunFailed(RuntimeError):
    """The run started but did not finish (exit code 1); the run directory keeps the last committed task."""


@dataclass
class RunSummary:
    run_dir: Path
    state: RunState
    table: str
    wall_s: float


# ---- preparing the run directory ------------------------------------------------------------------


def _resolve_tasks(cfg: RunConfig, cache_dir: Path) -> list[Any]:
    from pm_ray.data.sources import load_sources
    from pm_ray.data.suites import build_suite

    if cfg.tasks.files:
        tasks = load_sources([f.model_dump() for f in cfg.tasks.files])
    else:
        assert cfg.tasks.suite is not None
        tasks = build_suite(
            cfg.tasks.suite,
            variant=cfg.tasks.variant,
            seed=cfg.tasks.seed,
            cache_dir=cache_dir,
            choices_in_prompt=cfg.tasks.choices_in_prompt,
        )
    if cfg.tasks.limit:
        tasks = tasks[: cfg.tasks.limit]
    return tasks


def _write_task_data(root: Path, index: int, task: Any) -> str:
    import pyarrow.parquet as pq

    d = root / "data" / f"{index}-{task.name}"
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(task.train, d / "train.parquet")
    pq.write_table(task.test, d / "test.parquet")
    digest = hashlib.sha256((d / "train.parquet").read_bytes() + (d / "test.parquet").read_bytes()).hexdigest()[:16]
    (d / "task.json").write_text(
        json.dumps({"name": task.name, "kind": task.kind, "labels": task.labels, "sha256": digest})
    )
    return digest


def prepare_run_dir(cfg: RunConfig, run_name: str) -> RunDir:
    """Create the run directory (atomically) or check that an existing one can be resumed."""
    from pm_ray import preflight
    from pm_ray.data.validation import carve_validation

    storage = Path(cfg.storage.path).expanduser().resolve()
    run = RunDir(storage / run_name)
    if run.exists():
        run.check_resumable(cfg)
        return run
    if run.path.exists() and any(run.path.iterdir()):
        raise ConfigError(
            f"{run.path}: exists but is not a pm-ray run directory (no state.json); choose another storage.run_name"
        )
    preflight.check_run(cfg)
    preflight.make_storage(storage)
    with atomic_directory(run.path) as tmp:
        tasks = _resolve_tasks(cfg, storage / ".cache")
        tasks = [
            carve_validation(t, cfg.tasks.validation_rows, seed=cfg.tasks.seed, evaluate_on=cfg.eval.split)
            for t in tasks
        ]
        preflight.check_task_kinds(cfg, tasks)
        preflight.check_tasks(cfg, tasks)
        hashes = {f"{i}-{t.name}": _write_task_data(tmp, i, t) for i, t in enumerate(tasks, start=1)}
        staged = RunDir(tmp)
        staged.write_config(cfg)
        staged.write_state(
            RunState(
                run_name=run_name, strategy=cfg.merge.strategy, task_names=[t.name for t in tasks], data_hashes=hashes
            )
        )
    return run


# ---- Ray ------------------------------------------------------------------------------------------


def init_ray(cfg: RunConfig) -> None:
    import ray

    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # Worker stdout (DeepSpeed banners, Ray Train bookkeeping) drowns the progress line; a worker's
    # exception still reaches the driver through the trainer. PM_RAY_WORKER_LOGS=1 shows it all.
    show_worker_logs = os.environ.get("PM_RAY_WORKER_LOGS", "0") == "1"
    if address:
        ray.init(address=address, log_to_driver=show_worker_logs)
    else:
        # Ray starts workers at nice 15, so on a small machine anything else (an editor's indexer, a
        # test run) starves training; the local cluster pm-ray starts exists for this run alone.
        # `ray job submit` already runs the driver's workers at 0. Set RAY_worker_niceness to override.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(include_dashboard=False, log_to_driver=show_worker_logs, runtime_env={"env_vars": WORKER_ENV})


# ---- the run ---------------------------------------------------------------------------------------


def _start_tracking(cfg: RunConfig, run: RunDir, state: RunState) -> dict[str, Any] | None:
    if not cfg.tracking.enabled:
        return None
    from pm_ray.tracking import RunTracker, flatten, tracking_uri_for

    uri = tracking_uri_for(run.path, cfg.tracking.uri)
    artifact_dir = run.path / "mlflow-artifacts"
    tracker = RunTracker.start(
        uri,
        cfg.tracking.experiment,
        state.run_name,
        artifact_dir,
        params=flatten(cfg.model_dump(mode="json")),
        resume_run_id=state.mlflow_run_id,
    )
    if state.mlflow_run_id != tracker.run_id:
        state.mlflow_run_id = tracker.run_id
        run.write_state(state)
    return {
        "uri": uri,
        "run_id": tracker.run_id,
        "run_name": state.run_name,
        "artifact_dir": str(artifact_dir),
        "tracker": tracker,
    }


def _fit(cfg: RunConfig, run: RunDir, loop_config: dict[str, Any], stop: StopRequest) -> None:
    """The worker loop in this process (engine=single) or on a TorchTrainer's workers, whose
    controller ``stop`` aborts on Ctrl-C / SIGTERM; with trainer.data_loader=ray_data the trainer
    also gets every rank's training rows as Ray Datasets (`_training_datasets`)."""
    from pm_ray.train.loop import train_loop_per_worker

    if cfg.trainer.engine == "single" or cfg.trainer.num_workers == 1 and cfg.trainer.engine != "deepspeed":
        # no TorchTrainer, so no datasets to hand it: trainer.data_loader=ray_data reads locally here
        train_loop_per_worker({**loop_config, "in_ray_train": False, "data_loader": "local"})
        return
    from ray.train import FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pm_ray.data.ray_dataset import training_data_config

    class Trainer(TorchTrainer):
        def _register_sigint_handler(self, controller: Any) -> None:  # Ray Train's exits 1, silently
            stop.on_stop(lambda: _abort(controller))  # pm_ray.interrupt handles SIGINT/SIGTERM

    attempt = len(list((run.path / "ray").glob("train-*"))) if (run.path / "ray").exists() else 0
    ray_data = cfg.trainer.data_loader == "ray_data"
    trainer = Trainer(
        train_loop_per_worker,
        train_loop_config={**loop_config, "in_ray_train": True, "data_loader": cfg.trainer.data_loader},
        datasets=_training_datasets(cfg, run) if ray_data else None,
        dataset_config=training_data_config() if ray_data else None,
        scaling_config=ScalingConfig(
            num_workers=cfg.trainer.num_workers,
            use_gpu=cfg.trainer.use_gpu,
            resources_per_worker={"CPU": cfg.trainer.cpus_per_worker},
            placement_strategy=cfg.trainer.placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.trainer.use_gpu else "gloo"),
        run_config=RayRunConfig(
            storage_path=str(run.path / "ray"),
            name=f"train-{attempt}",
            failure_config=FailureConfig(max_failures=cfg.trainer.max_failures),
        ),
    )
    trainer.fit()


def _training_datasets(cfg: RunConfig, run: RunDir) -> dict[str, Any]:
    """trainer.data_loader=ray_data: one lazy Ray Dataset per (task still to train, rank), holding the
    rows that rank trains on, in its order (`rank_training_dataset`). Only the tokenizer is loaded
    here; the rows are tokenised by Ray Data tasks when the rank starts reading them."""
    from pm_ray.data.ray_dataset import load_tokenizer, rank_training_dataset, train_dataset_name
    from pm_ray.data.tokenize import task_batch_seed

    state = run.read_state()
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    world_size = cfg.trainer.num_workers
    datasets: dict[str, Any] = {}
    for t, task in enumerate(run.load_tasks(state), start=1):
        if t <= state.completed:  # a resumed run (or a Ray Train retry) never trains these again
            continue
        for rank in range(world_size):
            datasets[train_dataset_name(t, rank)] = rank_training_dataset(
                task,
                tokenizer,
                rank=rank,
                world_size=world_size,
                seed=task_batch_seed(cfg.trainer.seed, t),
                batch_size=cfg.trainer.batch_size,
                num_batches=cfg.trainer.steps_per_task,
                max_length=cfg.trainer.max_length,
            )
    return datasets


def _abort(controller: Any) -> None:
    """Ray Train's graceful abort: the controller stops the worker group and exits."""
    import ray

    try:
        ray.get(controller.abort.remote(), timeout=60)
    except Exception:  # noqa: BLE001  (the controller exits as it aborts)
        pass


def _stop(tracking: dict[str, Any] | None, run: RunDir, signum: int) -> Interrupted:
    """After Ctrl-C / SIGTERM: end the MLflow run as KILLED and stop Ray."""
    import ray

    if tracking:
        tracking["tracker"].end(status="KILLED")
    ray.shutdown()
    state = run.read_state()
    return Interrupted(
        signum,
        f"{Interrupted(signum)}: run {state.run_name} keeps {state.completed}/{len(state.task_names)} committed "
        f"tasks in {run.path}; run the same command to resume",
    )


def run_continual(cfg: RunConfig, *, config_stem: str = "run", quiet: bool = False) -> RunSummary:
    """Run (or resume) the stream. Ctrl-C / SIGTERM raise :class:`Interrupted` once Ray stopped."""
    import ray

    from pm_ray.merge.actor import create_merge_actors

    started = time.time()
    run_name = cfg.run_name(config_stem)
    run = prepare_run_dir(cfg, run_name)
    state = run.read_state()
    if state.completed < len(state.task_names):
        init_ray(cfg)
        tracking = _start_tracking(cfg, run, state)
        actors = create_merge_actors(
            run_name,
            cfg.merge.strategy,
            cfg.merge.options,
            cfg.merge.shards,
            str(run.stats_dir),
            cfg.merge.shard_placement,
        )
        loop_config = {
            "config": cfg.model_dump(mode="json"),
            "run_dir": str(run.path),
            "mlflow": {k: v for k, v in tracking.items() if k != "tracker"} if tracking else None,
        }
        printer = ProgressPrinter(run) if not quiet else None
        if printer:
            printer.start()
        try:
            with stop_on_signals() as stop:
                try:
                    _fit(cfg, run, loop_config, stop)
                except BaseException:
                    if stop.signum is not None:
                        raise _stop(tracking, run, stop.signum) from None
                    raise
                if stop.signum is not None and run.read_state().completed < len(state.task_names):
                    raise _stop(tracking, run, stop.signum)
        except Exception as err:  # the trainer's own error carries the worker traceback
            if tracking:
                tracking["tracker"].end(status="FAILED")
            state = run.read_state()
            raise RunFailed(
                f"run {run_name} failed after {state.completed}/{len(state.task_names)} committed tasks: {err}"
            ) from err
        finally:
            if printer:
                printer.close()
            if ray.is_initialized():
                for actor in actors:
                    ray.kill(actor)
        from pm_ray.report import write_report

        state = run.read_state()
        state.metrics = continual_metrics(state.accuracy)
        run.write_state(state)
        report = write_report(run.path)
        if tracking:
            tracker = tracking["tracker"]
            tracker.log_metrics(state.metrics, step=len(state.accuracy))
            for path in report["plots"]:
                tracker.log_artifact(path, "plots")
            for name in ("state.json", "config.yaml"):
                tracker.log_artifact(run.path / name)
            tracker.log_artifacts(run.merged_dir, "merged")
            tracker.end()
    else:
        from pm_ray.report import write_report

        report = write_report(run.path)
    state = run.read_state()
    return RunSummary(run_dir=run.path, state=state, table=report["table"], wall_s=time.time() - started)
