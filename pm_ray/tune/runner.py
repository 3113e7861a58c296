"""`run_tune`: a Ray Tune experiment whose trials are whole continual runs.

    <storage.path>/<search.name>/       the Tune experiment directory (Tuner.restore resumes it)
      tune.yaml                         the resolved base config + search section, as first started
      runs/trial-<id>/                  each trial's pm-ray run directory (resumable on its own)
      trial-<id>/                       Tune's per-trial files (result.json, progress.csv)
      mlflow.db, mlflow-artifacts/      one MLflow run per trial in experiment <search.name>
                                        (unless tracking.uri is set, or tracking is disabled)
      results.parquet, results.md       one row per trial
      best.yaml                         the best trial's config, runnable with `pm-ray run`
      objective_vs_epsilon.png          the objective against ε (or the first numeric searched key)

Running the same command again resumes an interrupted experiment: finished trials are kept, trials
that were running restart and resume their run directories from the last committed task.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pm_ray.config import ConfigError, RunConfig, config_from_dict
from pm_ray.core.tensors import atomic_write_bytes
from pm_ray.pipeline import RunFailed, init_ray
from pm_ray.preflight import check_run
from pm_ray.rundir import config_fingerprint
from pm_ray.tune.resources import TrialDemand, plan_concurrency, trial_demand
from pm_ray.tune.results import collect_rows, finish_tracking, format_table, pick_best, write_outputs
from pm_ray.tune.space import SearchSection, TrialResources
from pm_ray.tune.spec import TuneSpec, trial_config_data
from pm_ray.tune.trainable import run_trial, trial_dirname

log = logging.getLogger(__name__)

SPEC_FILE = "tune.yaml"


@dataclass
class TuneSummary:
    experiment_dir: Path
    rows: list[dict[str, Any]]  # one per trial, in trial order
    best: dict[str, Any] | None
    table: str
    files: dict[str, Path] = field(default_factory=dict)
    max_concurrent_trials: int = 1
    demand: str = ""
    resumed: bool = False
    wall_s: float = 0.0


# ---- the experiment's identity ---------------------------------------------------------------------


def _spec_document(spec: TuneSpec) -> dict[str, Any]:
    return {"config": spec.base_data(), "search": spec.search.model_dump(mode="json")}


def _check_same_experiment(spec: TuneSpec, path: Path) -> None:
    """A resumed experiment must search the same space over the same base config (resume-free
    fields, e.g. tracking and eval sizes, may change, as for `pm-ray run`)."""
    saved = yaml.safe_load(path.read_text()) or {}
    old_cfg = config_from_dict(saved.get("config", {}), str(path))
    old_search = SearchSection.model_validate(saved.get("search", {}))
    problems = []
    if config_fingerprint(old_cfg) != config_fingerprint(spec.base):
        problems.append("the base run config")
    mine = spec.search.model_dump(mode="json")
    theirs = old_search.model_dump(mode="json")
    for key in ("space", "objective", "num_samples", "algorithm", "scheduler", "seed"):
        if mine[key] != theirs[key]:
            problems.append(f"search.{key}")
    if problems:
        raise ConfigError(
            f"{path.parent}: this tuning experiment was started with a different {', '.join(problems)}; "
            "give search.name another value to start a new experiment, or the same settings to resume it"
        )


# ---- Tune objects ----------------------------------------------------------------------------------


class TrialResourceRequest:
    """tune.with_resources callable: one trial's placement group from its config.

    engine=single: one bundle with the trial's CPUs (the run happens in the trial process).
    ddp/deepspeed: one bundle for the trial driver only. Ray Train V2 schedules its worker group in a
    placement group of its own, so worker bundles here would be reserved twice and, on a small
    cluster, never fit; the concurrency limit accounts for the workers instead."""

    def __init__(self, base: dict[str, Any], resources: dict[str, Any]) -> None:
        self.base, self.resources = base, resources

    def __call__(self, config: dict[str, Any]) -> Any:
        from ray import tune

        cfg = config_from_dict(trial_config_data(self.base, config))
        bundle = trial_demand(cfg, TrialResources.model_validate(self.resources)).bundle
        return tune.PlacementGroupFactory([{k: v for k, v in bundle.items() if v or k == "CPU"}])


def _search_alg(search: SearchSection, concurrency: int) -> Any:
    """grid/random: Tune's variant generator (which takes the concurrency limit itself; Tune ignores
    max_concurrent_trials for it); optuna: a Searcher, limited by a ConcurrencyLimiter."""
    if search.algorithm == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=search.seed), max_concurrent=concurrency)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=search.seed, max_concurrent=concurrency)


def _scheduler(search: SearchSection, num_tasks: int) -> Any:
    if search.scheduler.type == "asha":
        from ray.tune.schedulers import ASHAScheduler

        s = search.scheduler
        return ASHAScheduler(
            time_attr="task",
            max_t=s.max_t or max(num_tasks, s.grace_period),
            grace_period=s.grace_period,
            reduction_factor=s.reduction_factor,
        )
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


def stream_length(cfg: RunConfig, limit_searched: bool = False) -> int:
    """Tasks in the stream without building it (the scheduler's max_t); an upper bound when
    tasks.limit is itself searched."""
    if cfg.tasks.files:
        n = len(cfg.tasks.files)
    else:
        from pm_ray.data.suites import CIT5_TASKS

        n = len(CIT5_TASKS) if cfg.tasks.suite == "cit5" else 100
    return min(n, cfg.tasks.limit) if cfg.tasks.limit and not limit_searched else n


def _prepare_tracking(spec: TuneSpec) -> dict[str, str] | None:
    """All trials log to one MLflow experiment (one run per trial): by default an sqlite DB in the
    experiment directory, created here once so that trials never race on its schema."""
    if not spec.base.tracking.enabled:
        return None
    from pm_ray.tracking import ensure_experiment, tracking_uri_for

    uri = tracking_uri_for(spec.experiment_dir, spec.base.tracking.uri)
    experiment = spec.name
    ensure_experiment(uri, experiment, spec.experiment_dir / "mlflow-artifacts")
    return {"uri": uri, "experiment": experiment}


# ---- the experiment ------------------------------------------------------------------------------


def run_tune(spec: TuneSpec, *, quiet: bool = False, retry_errored: bool = False, stream: Any = None) -> TuneSummary:
    """Run (or resume) the tuning experiment; write the results table, best config and plot."""
    import ray
    from ray import tune

    out = stream if stream is not None else sys.stdout
    started = time.time()
    check_run(spec.base)  # model, LoRA targets, storage.path, DeepSpeed config: before Ray starts
    exp_dir = spec.experiment_dir
    spec_path = exp_dir / SPEC_FILE
    if spec_path.is_file():
        _check_same_experiment(spec, spec_path)
    elif exp_dir.exists() and any(exp_dir.iterdir()):
        raise ConfigError(
            f"{exp_dir}: exists but is not a pm-ray tuning experiment (no {SPEC_FILE}); choose another search.name"
        )

    init_ray(spec.base)
    cluster = {k: float(v) for k, v in ray.cluster_resources().items()}
    concurrency, demand = plan_concurrency(spec, cluster)
    if spec.search.max_concurrent_trials and concurrency < spec.search.max_concurrent_trials:
        print(
            f"[pm-ray tune] max_concurrent_trials {spec.search.max_concurrent_trials} -> {concurrency}: "
            f"a trial needs {demand.text}, the cluster has {cluster.get('CPU', 0):g} CPU",
            file=out,
        )
    if not spec_path.is_file():
        atomic_write_bytes(spec_path, yaml.safe_dump(_spec_document(spec), sort_keys=False).encode())
    tracking = _prepare_tracking(spec)

    base = spec.base_data()
    runs_dir = str(exp_dir / "runs")
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, runs_dir=runs_dir, tracking=tracking),
        TrialResourceRequest(base, spec.search.trial_resources.model_dump()),
    )
    resumed = tune.Tuner.can_restore(str(exp_dir))
    if resumed:
        print(f"[pm-ray tune] resuming {exp_dir} (finished trials are kept)", file=out)
        tuner = tune.Tuner.restore(
            str(exp_dir),
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=retry_errored,
            restart_errored=False,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={key: dist.to_tune(spec.search.algorithm) for key, dist in spec.search.space.items()},
            tune_config=tune.TuneConfig(
                metric=spec.search.objective,
                mode="max",
                search_alg=_search_alg(spec.search, concurrency),
                scheduler=_scheduler(spec.search, stream_length(spec.base, "tasks.limit" in spec.search.space)),
                num_samples=spec.search.num_samples,
                reuse_actors=False,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                storage_path=str(spec.storage_root),
                name=spec.name,
                verbose=0 if quiet else 1,
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
    if quiet:  # Tune prints its experiment banner even at verbose=0
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            grid = tuner.fit()
    else:
        grid = tuner.fit()

    rows = collect_rows(grid, spec)
    best = pick_best(rows, spec.search.objective)
    table = format_table(rows, spec, best)
    files = write_outputs(spec, rows, best, table)
    if tracking is not None:
        finish_tracking(tracking, rows, best)
    summary = TuneSummary(
        experiment_dir=exp_dir,
        rows=rows,
        best=best,
        table=table,
        files=files,
        max_concurrent_trials=concurrency,
        demand=demand.text,
        resumed=resumed,
        wall_s=time.time() - started,
    )
    if best is None:
        errors = "; ".join(f"{r['trial']}: {r['error']}" for r in rows if r.get("error"))
        raise RunFailed(f"no trial of {exp_dir} finished the stream{f' ({errors})' if errors else ''}\n{table}")
    return summary


__all__ = ["TuneSummary", "run_tune", "TrialResourceRequest", "TrialDemand", "stream_length"]
