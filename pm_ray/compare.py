"""`pm-ray compare SPEC.yaml`: the same stream and seed under several strategies, one table.

    base: quickstart.yaml                      # a run config, relative to the spec file
    strategies:
      sequential: {merge.strategy: sequential, perturbation.mode: none}
      pm: {merge.strategy: pm}

Each entry is a separate run directory (``compare-<name>``), so an interrupted comparison resumes
entry by entry. The table is printed and written to ``<storage>/compare-<spec stem>.{md,json}``, with a bar
plot of final accuracy and forgetting per strategy (``.png``).
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
    if not isinstance(spec, dict) or set(spec) - {"base", "strategies"} or "base" not in spec or "strategies" not in spec:
        raise ConfigError(f"{path}: expected exactly the keys 'base' (a run config) and 'strategies' (name -> overrides)")
    strategies = spec["strategies"]
    if not isinstance(strategies, dict) or not strategies:
        raise ConfigError(f"{path}: 'strategies' must map names to dicts of dotted overrides")
    for name, overrides in strategies.items():
        if not isinstance(overrides, dict):
            raise ConfigError(f"{path}: strategies.{name} must be a dict of dotted overrides, got {overrides!r}")
    return (path.parent / spec["base"]).resolve(), strategies


def summary_row(name: str, state: Any) -> dict[str, Any]:
    from pm_ray.report import diagnostics_summary

    return {"strategy": name, **state.metrics, "alphas": state.alphas, "wall_s": round(state.wall_s, 1),
            **diagnostics_summary(state.diagnostics)}


def run_comparison(spec_path: Path, overrides: list[str], *, quiet: bool = False) -> tuple[list[dict[str, Any]], str]:
    from pm_ray.report import format_comparison_table, plot_comparison

    base, strategies = load_spec(spec_path)
    configs = {}
    for name, entry in strategies.items():  # validate every entry before the first run starts
        extra = [f"{key}={json.dumps(value)}" for key, value in entry.items()]
        configs[name] = load_config(base, [*overrides, *extra, f"storage.run_name=compare-{name}"])
        check_run(configs[name])
    rows = []
    for name, cfg in configs.items():
        summary = run_continual(cfg, config_stem=name, quiet=quiet)
        rows.append(summary_row(name, summary.state))
    table = format_comparison_table(rows, markdown=True)
    storage = Path(next(iter(configs.values())).storage.path).expanduser().resolve()
    atomic_write_bytes(storage / f"compare-{spec_path.stem}.md", (table + "\n").encode())
    atomic_write_bytes(storage / f"compare-{spec_path.stem}.json", json.dumps(rows, indent=2).encode())
    plot_comparison(rows, storage / f"compare-{spec_path.stem}.png")
    return rows, table
