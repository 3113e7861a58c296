"""What one trial reserves on the cluster, and how many trials fit at once without their
resources ever waiting on each other (the worst case over the searched resource fields)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from pm_ray.config import ConfigError, RunConfig, config_from_dict
from pm_ray.tune.space import TrialResources
from pm_ray.tune.spec import RESOURCE_KEYS, TuneSpec, trial_config_data


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
        return TrialDemand(
            bundle,
            dict(bundle),
            f"{cpu:g} CPU{f' + {gpu:g} GPU' if gpu else ''} "
            f"(engine={cfg.trainer.engine}: the whole run in the trial process)",
        )
    driver = resources.driver_cpu if resources.driver_cpu is not None else cfg.ray.driver_cpus
    driver = max(driver, 0.01)  # a placement group bundle cannot be empty
    n, cpw = cfg.trainer.num_workers, cfg.trainer.cpus_per_worker
    bundle = {"CPU": driver, "GPU": 0.0}
    total = {"CPU": driver + n * cpw, "GPU": n * gpu}
    gpu_text = f" + {total['GPU']:g} GPU" if gpu else ""
    worker_gpu = f" + {gpu:g} GPU" if gpu else ""
    text = (
        f"{total['CPU']:g} CPU{gpu_text} (trial driver {driver:g} CPU + {n} Ray Train workers x "
        f"{cpw:g} CPU{worker_gpu}, engine={cfg.trainer.engine})"
    )
    return TrialDemand(bundle, total, text)


def resource_variants(spec: TuneSpec) -> list[RunConfig]:
    """The base config under every combination of the searched resource fields' values."""
    base_data = spec.base_data()
    keys = [
        k
        for k, d in spec.search.space.items()
        if k in RESOURCE_KEYS or any(r.startswith(k + ".") for r in RESOURCE_KEYS)
    ]
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
            msg += (
                f" Lower trainer.cpus_per_worker to {math.floor((have - driver) / n * 100) / 100:g} "
                f"(= ({have:g} - {driver:g} driver) / {n} workers), or trainer.num_workers."
            )
        else:
            msg += " Lower search.trial_resources.driver_cpu."
    elif res == "CPU":
        msg += f" Set search.trial_resources.cpu (or trainer.cpus_per_worker) to at most {have:g}."
    return msg
