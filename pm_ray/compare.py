"""`pm-ray compare SPEC.yaml`: the same stream and seed under several strategies, one table.

    base: quickstart.yaml                      # a run config, relative to the spec file
    strategies:
      sequential: {merge.strategy: sequential, perturbation.mode: none}
      pm: {merge.strategy: pm}

Each entry is a separate run directory (``compare-<name>``), so an interrupted comparison resumes
entry by entry. The report (each strategy's accuracy matrix, then one table of ACC, AAA,
forgetting, BWT and α per task, and the test rows behind every score) is printed and written to
``<storage>/compare-<spec stem>.{md,json}``, with a bar plot of final accuracy and forgetting per
strategy (``.png``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pm_ray.config import ConfigError, load_config, read_yaml_mapping
from pm_ray.core.tensors import atomic_write_bytes
from pm_ray.pipeline import run_continual
from pm_ray.preflight import check_run


def load_spec(path: Path) -> tuple[Path, dict[str, dict[str, Any]]]:
    if not path.is_file():
        raise ConfigError(f"{path}: comparison spec does not exist")
    spec = read_yaml_mapping(path)
    if (
        not isinstance(spec, dict)
        or set(spec) - {"base", "strategies"}
        or "base" not in spec
        or "strategies" not in spec
    ):
        raise ConfigError(
            f"{path}: expected exactly the keys 'base' (a run config) and 'strategies' (name -> overrides)"
        )
    strategies = spec["strategies"]
    if not isinstance(strategies, dict) or not strategies:
        raise ConfigError(f"{path}: 'strategies' must map names to dicts of dotted overrides")
    for name, overrides in strategies.items():
        if not isinstance(overrides, dict):
            raise ConfigError(f"{path}: strategies.{name} must be a dict of dotted overrides, got {overrides!r}")
    return (path.parent / spec["base"]).resolve(), strategies


def summary_row(name: str, state: Any) -> dict[str, Any]:
    from pm_ray.report import diagnostics_summary

    return {
        "strategy": name,
        **state.metrics,
        "alphas": state.alphas,
        "wall_s": round(state.wall_s, 1),
        **diagnostics_summary(state.diagnostics),
    }


def eval_rows_per_task(run_dir: Path, state: Any, max_rows: int | None) -> dict[str, int]:
    """Test rows each score was computed on: min(eval.max_rows, the task's test split)."""
    import pyarrow.parquet as pq

    rows = {}
    for i, name in enumerate(state.task_names, start=1):
        n = pq.ParquetFile(run_dir / "data" / f"{i}-{name}" / "test.parquet").metadata.num_rows
        rows[name] = n if max_rows is None else min(n, max_rows)
    return rows


def comparison_report(
    rows: list[dict[str, Any]], matrices: dict[str, tuple[list[str], list[list[float]]]], eval_rows: dict[str, int]
) -> str:
    from pm_ray.report import format_comparison_table, format_results_table

    parts = []
    for name, (task_names, R) in matrices.items():
        parts.append(
            f"### {name}: accuracy after each task (row l = the merged model after task l)\n\n"
            + format_results_table(R, task_names, markdown=True)
        )
    parts.append("### Summary\n\n" + format_comparison_table(rows, markdown=True))
    parts.append(
        "Test rows per task: "
        + ", ".join(f"{k} {v}" for k, v in eval_rows.items())
        + " (one answer moves a task's score by 1/rows)."
    )
    return "\n\n".join(parts)


def run_comparison(spec_path: Path, overrides: list[str], *, quiet: bool = False) -> tuple[list[dict[str, Any]], str]:
    from pm_ray.report import plot_comparison

    base, strategies = load_spec(spec_path)
    configs = {}
    for name, entry in strategies.items():  # validate every entry before the first run starts
        extra = [f"{key}={json.dumps(value)}" for key, value in entry.items()]
        configs[name] = load_config(base, [*overrides, *extra, f"storage.run_name=compare-{name}"])
        check_run(configs[name])
    rows: list[dict[str, Any]] = []
    matrices: dict[str, tuple[list[str], list[list[float]]]] = {}
    eval_rows: dict[str, int] = {}
    hashes: dict[str, dict[str, str]] = {}
    for name, cfg in configs.items():
        summary = run_continual(cfg, config_stem=name, quiet=quiet)
        rows.append(summary_row(name, summary.state))
        matrices[name] = (summary.state.task_names, summary.state.accuracy)
        hashes[name] = summary.state.data_hashes
        eval_rows = eval_rows_per_task(summary.run_dir, summary.state, cfg.eval.max_rows)
        rows[-1]["test_rows"] = eval_rows
    table = comparison_report([{k: v for k, v in r.items() if k != "test_rows"} for r in rows], matrices, eval_rows)
    storage = Path(next(iter(configs.values())).storage.path).expanduser().resolve()
    payload = [
        {
            **r,
            "accuracy": matrices[r["strategy"]][1],
            "tasks": matrices[r["strategy"]][0],
            "data_hashes": hashes[r["strategy"]],
        }
        for r in rows
    ]
    atomic_write_bytes(storage / f"compare-{spec_path.stem}.md", (table + "\n").encode())
    atomic_write_bytes(storage / f"compare-{spec_path.stem}.json", json.dumps(payload, indent=2).encode())
    plot_comparison(rows, storage / f"compare-{spec_path.stem}.png")
    return rows, table
