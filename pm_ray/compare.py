"""`pm-ray compare SPEC.yaml [--seeds 0,1,2]`: the same stream under several strategies and seeds.

    base: quickstart.yaml                      # a run config, relative to the spec file
    overrides: {tasks.variant: full}           # optional; every entry, before the command line and its own
    seeds: [0, 1, 2]                           # optional; --seeds overrides it
    strategies:
      sequential: {merge.strategy: sequential, perturbation.mode: none}
      pm: {merge.strategy: pm}

Every strategy runs under every seed (``trainer.seed``: LoRA init, batch order, perturbation draws;
``tasks.seed`` stays, so every run sees the same data, and DARE's drop masks keep
``merge.options.seed``). Each (strategy, seed) is its own
run directory: ``compare-<name>`` with one seed (or no seeds list: the base config's seed), and
``compare-<name>-seed<s>`` with several, so an interrupted comparison resumes run by run and a
finished run is reused as it is. The report (pm_ray/compare_results.py for the JSON,
pm_ray/compare_report.py for the tables and plots) is printed and written to
``<storage>/compare-<spec stem>.{md,json}``; every run logs to the MLflow store
``<storage>/compare-<spec stem>.mlflow.db`` (artifacts in ``compare-<spec stem>-mlflow-artifacts``;
unless ``tracking.uri`` is set), with plots ``compare-<spec stem>.png`` (ACC and
forgetting, error bars over seeds), ``-alphas.png`` and ``-accuracy-<strategy>.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from pm_ray.config import ConfigError, RunConfig, load_config, read_yaml_mapping
from pm_ray.core.tensors import atomic_write_bytes
from pm_ray.preflight import check_run

SPEC_KEYS = {"base", "overrides", "strategies", "seeds"}


class Spec(NamedTuple):
    base: Path
    overrides: dict[str, Any]  # the spec's common overrides, applied before the command line's and each entry's
    strategies: dict[str, dict[str, Any]]
    seeds: list[int] | None


def _check_seeds(seeds: Any, where: str) -> list[int]:
    if not isinstance(seeds, list) or not seeds:
        raise ConfigError(f"{where}: {seeds!r}; expected a non-empty list of integer seeds >= 0, e.g. [0, 1, 2]")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"{where}: {s!r} is not an integer >= 0 (seeds {seeds!r})")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: {seeds!r} repeats a seed; expected distinct seeds")
    return list(seeds)


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` -> [0, 1, 2]; anything else is a ConfigError naming the value."""
    items = [item.strip() for item in text.split(",")]
    seeds = []
    for item in items:
        if not item.isdigit():  # digits only: no sign, no empty item
            raise ConfigError(
                f"--seeds {text!r}: {item!r} is not an integer >= 0; expected comma-separated seeds, e.g. --seeds 0,1,2"
            )
        seeds.append(int(item))
    return _check_seeds(seeds, f"--seeds {text!r}")


def load_spec(path: Path) -> Spec:
    if not path.is_file():
        raise ConfigError(f"{path}: comparison spec does not exist")
    spec = read_yaml_mapping(path)
    if not isinstance(spec, dict) or set(spec) - SPEC_KEYS or "base" not in spec or "strategies" not in spec:
        raise ConfigError(
            f"{path}: expected the keys 'base' (a run config) and 'strategies' (name -> overrides), "
            f"optionally 'overrides' (dotted key -> value) and 'seeds' (a list); got {sorted(spec) if isinstance(spec, dict) else spec!r}"
        )
    strategies = spec["strategies"]
    if not isinstance(strategies, dict) or not strategies:
        raise ConfigError(f"{path}: 'strategies' must map names to dicts of dotted overrides")
    for name, overrides in strategies.items():
        if not isinstance(overrides, dict):
            raise ConfigError(f"{path}: strategies.{name} must be a dict of dotted overrides, got {overrides!r}")
    common = spec.get("overrides", {})
    if not isinstance(common, dict):
        raise ConfigError(f"{path}: 'overrides' must be a dict of dotted overrides, got {common!r}")
    seeds = _check_seeds(spec["seeds"], f"{path}: seeds") if "seeds" in spec else None
    return Spec((path.parent / spec["base"]).resolve(), common, strategies, seeds)


def plan_runs(
    spec_path: Path, overrides: list[str], seeds: list[int] | None = None
) -> tuple[list[int], dict[str, list[tuple[int, RunConfig]]]]:
    """Every (strategy, seed) config, validated before the first run starts. ``seeds`` (from the
    command line) replaces the spec's list; with neither, each entry runs once at its own trainer.seed."""
    spec = load_spec(spec_path)
    seeds = seeds if seeds is not None else spec.seeds
    if seeds is not None:
        clash = [o for o in overrides if o.split("=", 1)[0].strip() == "trainer.seed"]
        clash += [f"strategies.{n}" for n, entry in spec.strategies.items() if "trainer.seed" in entry]
        clash += ["overrides"] if "trainer.seed" in spec.overrides else []
        if clash:
            raise ConfigError(
                f"{spec_path}: trainer.seed is set by {', '.join(clash)} but the comparison has seeds {seeds}; "
                "give the seeds as the spec's 'seeds' or --seeds only"
            )
    plan: dict[str, list[tuple[int, RunConfig]]] = {}
    # in order, later winning: the spec's common overrides, the command line's, the entry's own
    common = [f"{key}={json.dumps(value)}" for key, value in spec.overrides.items()]
    for name, entry in spec.strategies.items():
        extra = [*common, *overrides, *(f"{key}={json.dumps(value)}" for key, value in entry.items())]
        plan[name] = []
        for seed in seeds if seeds is not None else [None]:
            if seed is None:
                cfg = load_config(spec.base, [*extra, f"storage.run_name=compare-{name}"])
            else:
                suffix = "" if len(seeds) == 1 else f"-seed{seed}"
                run_name = f"storage.run_name=compare-{name}{suffix}"
                cfg = load_config(spec.base, [*extra, f"trainer.seed={seed}", run_name])
            cfg = shared_tracking(cfg, spec_path)
            check_run(cfg)
            plan[name].append((cfg.trainer.seed, cfg))
    used = seeds if seeds is not None else sorted({s for runs in plan.values() for s, _ in runs})
    return used, plan


def comparison_store(cfg: RunConfig, spec_path: Path) -> tuple[str, Path]:
    """(MLflow URI, artifact dir) that every run of the comparison logs to by default."""
    stem = Path(cfg.storage.path).expanduser().resolve() / f"compare-{spec_path.stem}"
    return f"sqlite:///{stem}.mlflow.db", stem.with_name(stem.name + "-mlflow-artifacts")


def shared_tracking(cfg: RunConfig, spec_path: Path) -> RunConfig:
    """Every run of a comparison logs to one MLflow store, ``<storage>/compare-<spec stem>.mlflow.db``
    (unless ``tracking.uri`` is set): its strategies and seeds side by side in one experiment of
    ``mlflow ui``, and the store's tables are created once, not once per run (~4 s each)."""
    if not cfg.tracking.enabled or cfg.tracking.uri is not None:
        return cfg
    tracking = cfg.tracking.model_copy(update={"uri": comparison_store(cfg, spec_path)[0]})
    return cfg.model_copy(update={"tracking": tracking})


def run_record(name: str, seed: int, summary: Any, max_rows: int | None) -> dict[str, Any]:
    """One finished run as a row of the comparison (the format-1 row plus seed and run name)."""
    from pm_ray.report import diagnostics_summary

    state = summary.state
    return {
        "seed": seed,
        "run_name": summary.run_dir.name,
        "strategy": name,
        **state.metrics,
        "alphas": state.alphas,
        "wall_s": round(state.wall_s, 1),
        **diagnostics_summary(state.diagnostics),
        "test_rows": eval_rows_per_task(summary.run_dir, state, max_rows),
        "accuracy": state.accuracy,
        "tasks": state.task_names,
        "data_hashes": state.data_hashes,
    }


def eval_rows_per_task(run_dir: Path, state: Any, max_rows: int | None) -> dict[str, int]:
    """Test rows each score was computed on: min(eval.max_rows, the task's test split)."""
    import pyarrow.parquet as pq

    rows = {}
    for i, name in enumerate(state.task_names, start=1):
        n = pq.ParquetFile(run_dir / "data" / f"{i}-{name}" / "test.parquet").metadata.num_rows
        rows[name] = n if max_rows is None else min(n, max_rows)
    return rows


def run_comparison(
    spec_path: Path, overrides: list[str], *, seeds: list[int] | None = None, quiet: bool = False
) -> tuple[dict[str, Any], str]:
    """Run (or reuse) every (strategy, seed) and write the report; returns (the JSON payload, the Markdown)."""
    from pm_ray.compare_report import comparison_markdown, comparison_plots
    from pm_ray.compare_results import build_payload
    from pm_ray.pipeline import run_continual

    used, plan = plan_runs(spec_path, overrides, seeds)
    for cfg in {id(cfg): cfg for runs in plan.values() for _, cfg in runs}.values():
        uri, artifact_dir = comparison_store(cfg, spec_path)
        if cfg.tracking.enabled and cfg.tracking.uri == uri:  # artifacts beside the store, not in one run's dir
            from pm_ray.tracking import ensure_experiment

            ensure_experiment(uri, cfg.tracking.experiment, artifact_dir)
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in plan}
    for k in range(max(len(runs) for runs in plan.values())):  # seed by seed: a full comparison first
        for name, runs in plan.items():
            if k < len(runs):
                seed, cfg = runs[k]
                summary = run_continual(cfg, config_stem=name, quiet=quiet)
                records[name].append(run_record(name, seed, summary, cfg.eval.max_rows))
    payload = build_payload(spec_path.stem, used, records)
    table = comparison_markdown(payload)
    storage = Path(next(iter(plan.values()))[0][1].storage.path).expanduser().resolve()
    stem = storage / f"compare-{spec_path.stem}"
    atomic_write_bytes(stem.with_name(stem.name + ".md"), (table + "\n").encode())
    atomic_write_bytes(stem.with_name(stem.name + ".json"), json.dumps(payload, indent=2).encode())
    comparison_plots(payload, stem)
    return payload, table
