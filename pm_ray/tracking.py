"""MLflow logging for the pipeline driver (the parent run) and the rank-0 worker (one child run per task).

Everything goes through ``MlflowClient`` with an explicit tracking URI, never the fluent active-run
API: the driver and a worker can each hold a tracker on the same run, several trackers coexist in one
process, and nothing depends on the current working directory (under Ray it is a temporary session
dir, which is also why the experiment is created with an explicit artifact_location).

``mlflow`` is imported lazily (~1.2 s) so that ``flatten``/``tracking_uri_for`` and the CLI stay cheap.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pm_ray.core.coefficient import alpha_stats

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

# MLflow 3.17 accepts 6000-char param values, but servers from MLflow < 2.x refuse more than 500;
# 500 keeps runs loggable to any tracking server, and a resolved config never needs more.
MAX_PARAM_VALUE_CHARS = 500
TRUNCATION_MARKER = "...[truncated]"
PARAMS_PER_BATCH = 100  # MLflow's limit for params (and tags) in one log_batch
METRICS_PER_BATCH = 1000  # MLflow's limit for metrics in one log_batch
PARENT_RUN_TAG = "mlflow.parentRunId"
RESUMES_TAG = "pm_ray.resumes"  # how often an ended run was continued
STEP_LOSS_KEY = "loss"


class TrackingError(RuntimeError):
    """The tracking store refused what we asked for (the message names the run/experiment/value)."""


def tracking_uri_for(run_dir: str | Path, uri: str | None) -> str:
    """The configured URI, or by default an sqlite DB inside the run directory."""
    if uri:
        return uri
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys with string values: {"a": {"b": 1}} -> {"a.b": "1"}."""
    flat: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = _param_value(value)
    return flat


def _param_value(value: Any) -> str:
    text = "None" if value is None else str(value)
    if len(text) <= MAX_PARAM_VALUE_CHARS:
        return text
    return text[: MAX_PARAM_VALUE_CHARS - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _as_metric_value(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metric {key!r} is {value!r}; expected a number")
    return float(value)


def _ensure_sqlite_parent(uri: str) -> None:
    """sqlite creates the DB file, not its directory."""
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)


def _experiment_id(client: MlflowClient, experiment: str, artifact_dir: Path) -> str:
    """The experiment's id, creating it with artifacts under ``artifact_dir`` when it does not exist."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(experiment)
    if found is None:
        try:
            return client.create_experiment(experiment, artifact_location=artifact_dir.resolve().as_uri())
        except MlflowException:  # another process created it between our lookup and create
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        # A deleted experiment still owns its name; bring it back rather than fail the run.
        client.restore_experiment(found.experiment_id)
    return found.experiment_id


def ensure_experiment(uri: str, experiment: str, artifact_dir: Path) -> str:
    """Create (or restore) ``experiment`` in the store at ``uri`` with artifacts under ``artifact_dir``,
    before several runs log to it (a tuning experiment's trials, a comparison's runs): its
    artifact location is then the shared one, not the first run's, and no two runs race on the schema."""
    from mlflow.tracking import MlflowClient

    _ensure_sqlite_parent(uri)
    return _experiment_id(MlflowClient(tracking_uri=uri), experiment, Path(artifact_dir))


class RunTracker:
    """One MLflow run (parent or child) addressed by id through its own client."""

    def __init__(self, client: MlflowClient, run_id: str, experiment_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id

    @classmethod
    def start(
        cls,
        uri: str,
        experiment: str,
        run_name: str,
        artifact_dir: Path,
        params: Mapping[str, Any],
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
        resume_run_id: str | None = None,
    ) -> RunTracker:
        """Start a run, or continue ``resume_run_id`` (a new run if that id is not in this store)."""
        from mlflow.tracking import MlflowClient

        _ensure_sqlite_parent(uri)
        client = MlflowClient(tracking_uri=uri)
        experiment_id = _experiment_id(client, experiment, Path(artifact_dir))
        tracker = cls._resume(client, resume_run_id) if resume_run_id else None
        if tracker is None:
            run_tags = dict(tags or {})
            if parent_run_id:
                run_tags[PARENT_RUN_TAG] = parent_run_id
            run = client.create_run(experiment_id, tags=run_tags, run_name=run_name)
            tracker = cls(client, run.info.run_id, experiment_id)
        elif tags:
            tracker._log_batch(tags={str(k): str(v) for k, v in tags.items()})
        tracker.log_params(params)
        return tracker

    @classmethod
    def _resume(cls, client: MlflowClient, run_id: str) -> RunTracker | None:
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(run_id)
        except MlflowException:
            # e.g. the resumed run now logs to another tracking URI: a fresh run is the honest record.
            log.warning("MLflow run %s not found in %s; starting a new run", run_id, client.tracking_uri)
            return None
        tracker = cls(client, run_id, run.info.experiment_id)
        # A RUNNING run is being joined (the rank-0 worker logs into the driver's run); an ended one
        # is being continued after a failure or with more tasks: reopen it and count that.
        if run.info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
            resumes = int(run.data.tags.get(RESUMES_TAG, "0")) + 1
            tracker._log_batch(tags={RESUMES_TAG: str(resumes)})
        return tracker

    # ---- logging ----

    def _log_batch(
        self, metrics: Sequence[Any] = (), params: Sequence[Any] = (), tags: Mapping[str, str] | None = None
    ) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(
            self.run_id, metrics=metrics, params=params, tags=[RunTag(k, v) for k, v in (tags or {}).items()]
        )

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flattened (dotted keys), values truncated to MAX_PARAM_VALUE_CHARS, in batches of <=100.

        MLflow params are immutable: on resume, keys already logged with the same value are skipped;
        a changed value (only resume-free fields may change) is kept as a tag ``param_on_resume.<key>``.
        """
        from mlflow.entities import Param

        flat = flatten(params)
        if not flat:
            return
        logged = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in flat.items() if k not in logged]
        changed = {f"param_on_resume.{k}": v for k, v in flat.items() if k in logged and logged[k] != v}
        for batch in _chunks(new, PARAMS_PER_BATCH):
            self._log_batch(params=batch)
        items = list(changed.items())
        for batch in _chunks(items, PARAMS_PER_BATCH):
            self._log_batch(tags=dict(batch))

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(str(k), _as_metric_value(str(k), v), now, step) for k, v in metrics.items()]
        for batch in _chunks(entries, METRICS_PER_BATCH):
            self._log_batch(metrics=batch)

    def log_step_losses(self, losses: Sequence[float], start_step: int = 0, key: str = STEP_LOSS_KEY) -> None:
        """One metric point per training step (steps start_step, start_step+1, ...), in batches."""
        from mlflow.entities import Metric

        # One timestamp for the whole list: get_metric_history orders by (timestamp, step), so the
        # steps come back in order, and later calls (a resumed task) sort after this one.
        now = int(time.time() * 1000)
        entries = [
            Metric(key, _as_metric_value(f"{key}[{start_step + n}]", v), now, start_step + n)
            for n, v in enumerate(losses)
        ]
        for batch in _chunks(entries, METRICS_PER_BATCH):
            self._log_batch(metrics=batch)

    def nested(self, run_name: str, params: Mapping[str, Any] | None = None) -> RunTracker:
        """A child run in the same experiment, linked by the mlflow.parentRunId tag (the UI nests it)."""
        run = self.client.create_run(self.experiment_id, tags={PARENT_RUN_TAG: self.run_id}, run_name=run_name)
        child = RunTracker(self.client, run.info.run_id, self.experiment_id)
        if params:
            child.log_params(params)
        return child

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: artifact to log does not exist or is not a file")
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        if not Path(directory).is_dir():
            raise FileNotFoundError(f"{directory}: artifact directory to log does not exist")
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        allowed = ("FINISHED", "FAILED", "KILLED")
        if status not in allowed:
            raise ValueError(f"run status {status!r}; expected one of {allowed}")
        self.client.set_terminated(self.run_id, status=status)


# ---- reading back -----------------------------------------------------------------------------------


def _run_dict(run: Any) -> dict[str, Any]:
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
    }


def read_run_summary(uri: str, experiment: str) -> list[dict[str, Any]]:
    """Parent runs of an experiment, oldest first, each with its latest metrics and its child runs
    ("children", oldest first). Metrics are the last logged value of each key."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise TrackingError(f"experiment {experiment!r} not found in {uri}")
    runs: list[Any] = []
    page_token = None
    while True:
        page = client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"], page_token=page_token)
        runs.extend(page)
        page_token = page.token
        if not page_token:
            break
    parents = [_run_dict(r) | {"children": []} for r in runs if PARENT_RUN_TAG not in r.data.tags]
    by_id = {p["run_id"]: p for p in parents}
    for run in runs:
        parent = by_id.get(run.data.tags.get(PARENT_RUN_TAG, ""))
        if parent is not None:
            parent["children"].append(_run_dict(run))
    return parents


# ---- the workers' side -----------------------------------------------------------------------------


class TaskTracker:
    """Rank 0's MLflow logging: one nested run per task under the driver's parent run."""

    def __init__(self, parent: Any) -> None:
        self.parent = parent

    def log_task(
        self, task: int, name: str, losses: list[float], alpha: Any, row: list[float], diagnostics: dict[str, Any]
    ) -> None:
        child = self.parent.nested(f"task{task}-{name}", params={"task": task, "task_name": name})
        child.log_step_losses(losses)
        metrics: dict[str, float] = {f"acc_task{i}": v for i, v in enumerate(row, start=1)}
        metrics["mean_seen_accuracy"] = sum(row) / len(row)
        metrics.update({k: float(v) for k, v in diagnostics.items() if isinstance(v, (int, float)) and k != "task"})
        stats = alpha_stats(alpha)
        if isinstance(alpha, dict) and stats is not None:
            metrics.update(dict(zip(("alpha_mean", "alpha_min", "alpha_max"), stats)))
        elif stats is not None:
            metrics["alpha"] = stats[0]
        child.log_metrics(metrics, step=task)
        child.end()
        parent_metrics = {f"R_{task}_{i}": v for i, v in enumerate(row, start=1)}
        if "alpha" in metrics:
            parent_metrics["alpha"] = metrics["alpha"]
        parent_metrics["mean_seen_accuracy"] = metrics["mean_seen_accuracy"]
        self.parent.log_metrics(parent_metrics, step=task)


def task_tracker(loop_config: dict[str, Any], cfg: Any) -> TaskTracker | None:
    info = loop_config.get("mlflow")
    if not info:
        return None
    parent = RunTracker.start(
        info["uri"],
        cfg.tracking.experiment,
        info["run_name"],
        Path(info["artifact_dir"]),
        params={},
        resume_run_id=info["run_id"],
    )
    return TaskTracker(parent)
