"""One Tune trial = one whole continual run, reporting after every task.

The trial runs ``pipeline.run_continual`` for its config in a background thread and reports to Tune
from state.json, the run directory's commit point (rewritten atomically after every task). The same
mechanism serves every engine:

* engine=single runs the worker loop in-process and makes no Ray Train reports at all;
* engines ddp/deepspeed do report through Ray Train, but a Train report only carries the workers'
  metrics, while Tune needs the continual metrics of the accuracy rows so far (acc, aaa); and the
  last task must be reported only after the pipeline has finished its own bookkeeping (final
  metrics in state.json, report, MLflow run ended), or a scheduler stopping the trial on that
  report could cut it short.

A reported task is therefore always a committed one, and a trial that is restarted (Tuner.restore)
resumes its run directory and reports the same sequence again.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from pm_ray.core.coefficient import alpha_stats
from pm_ray.core.metrics import continual_metrics
from pm_ray.rundir import RunDir, RunState

# How often the trial reads state.json for newly committed tasks. It must be shorter than a task, or two
# tasks' reports arrive together and a scheduler (ASHA) cannot stop the trial after the first: tiny test
# streams commit a task in a fraction of a second. One small JSON read per poll.
POLL_S = 0.05


def trial_run_name(trial_id: str) -> str:
    return f"trial-{trial_id}"


def trial_dirname(trial: Any) -> str:
    """Tune's trial directory name (TuneConfig.trial_dirname_creator): the same as the run's."""
    return trial_run_name(trial.trial_id)


def task_metrics(state: RunState, task: int, run_dir: Path) -> dict[str, Any]:
    """What Tune sees after ``task`` tasks: the continual metrics of the accuracy rows so far."""
    rows = state.accuracy[:task]
    metrics: dict[str, Any] = {
        "task": task,
        "num_tasks": len(state.task_names),
        **continual_metrics(rows),
        "mean_seen_accuracy": sum(rows[-1]) / len(rows[-1]),
    }
    if task <= len(state.diagnostics) and isinstance(state.diagnostics[task - 1].get("final_loss"), (int, float)):
        metrics["loss"] = float(state.diagnostics[task - 1]["final_loss"])
    alpha = state.alphas[task - 1] if task <= len(state.alphas) else None
    stats = alpha_stats(alpha)
    if stats is not None:
        metrics["alpha"] = stats[0]
    metrics["stream_done"] = task == len(state.task_names)
    metrics["run_dir"] = str(run_dir)
    return metrics


def _committed(run: RunDir) -> RunState | None:
    try:
        return run.read_state()
    except (FileNotFoundError, ValueError, OSError):
        return None


def build_trial_config(
    base: dict[str, Any], params: dict[str, Any], runs_dir: str, run_name: str, tracking: dict[str, str] | None
) -> Any:
    from pm_ray.config import config_from_dict
    from pm_ray.tune.spec import set_key, trial_config_data

    data = trial_config_data(base, params)
    set_key(data, "storage.path", runs_dir)
    set_key(data, "storage.run_name", run_name)
    if tracking is not None:
        set_key(data, "tracking.uri", tracking["uri"])
        set_key(data, "tracking.experiment", tracking["experiment"])
    return config_from_dict(data, f"trial {run_name}")


def run_trial(
    config: dict[str, Any],
    *,
    base: dict[str, Any],
    runs_dir: str,
    tracking: dict[str, str] | None = None,
    poll_s: float = POLL_S,
) -> None:
    """The Tune function trainable (bound with tune.with_parameters)."""
    from ray import tune

    from pm_ray.pipeline import run_continual

    run_name = trial_run_name(tune.get_context().get_trial_id())
    cfg = build_trial_config(base, config, runs_dir, run_name, tracking)
    run = RunDir(Path(runs_dir) / run_name)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["summary"] = run_continual(cfg, config_stem=run_name, quiet=True)
        except BaseException as err:  # re-raised in the trial's thread below
            outcome["error"] = err

    # daemon: when Tune stops the trial (e.g. ASHA), the actor exits without waiting for the run
    worker = threading.Thread(target=target, name=f"pm-ray-{run_name}", daemon=True)
    worker.start()
    reported = 0
    while worker.is_alive():
        worker.join(poll_s)
        state = _committed(run)
        if state is None:
            continue
        # the last task of the stream is reported once the pipeline has finished (see module doc)
        while reported < min(state.completed, len(state.task_names) - 1):
            reported += 1
            tune.report(task_metrics(state, reported, run.path))
    if "error" in outcome:
        raise outcome["error"]
    state = outcome["summary"].state
    while reported < state.completed:
        reported += 1
        tune.report(task_metrics(state, reported, run.path))
