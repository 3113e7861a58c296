"""Ray Tune search over config fields (ε, branch probabilities, LoRA rank, learning rate, merge
strategy, Fisher samples, ...) where every trial is one whole continual run.

    from pm_ray.tune import load_tune_config, run_tune
    summary = run_tune(load_tune_config("jobs/tune_epsilon.yaml", ["tasks.limit=3"]))
    summary.best["params"], summary.files["best"]

Ray is imported only when a tuning experiment runs; loading and validating a config does not need it.
"""

from pm_ray.tune.resources import plan_concurrency, trial_demand
from pm_ray.tune.space import Distribution, SchedulerSection, SearchSection, TrialResources
from pm_ray.tune.spec import TuneSpec, load_tune_config

__all__ = [
    "Distribution",
    "SchedulerSection",
    "SearchSection",
    "TrialResources",
    "TuneSpec",
    "TuneSummary",
    "load_tune_config",
    "plan_concurrency",
    "run_tune",
    "trial_demand",
]


def __getattr__(name: str):  # run_tune/TuneSummary pull in the pipeline; import them on first use
    if name in ("run_tune", "TuneSummary"):
        from pm_ray.tune import runner

        return getattr(runner, name)
    raise AttributeError(name)
