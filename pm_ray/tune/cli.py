"""`pm-ray tune CONFIG [key=value ...]`: hooked into pm_ray.cli by ``add_tune_parser``."""

from __future__ import annotations

import argparse
from typing import Any


def _cmd_tune(args: argparse.Namespace) -> int:
    from pm_ray.tune.runner import run_tune
    from pm_ray.tune.spec import load_tune_config

    spec = load_tune_config(args.config, args.overrides)
    summary = run_tune(spec, quiet=args.quiet, retry_errored=args.retry_errored)
    print(summary.table)
    for name, path in summary.files.items():
        print(f"{name}: {path}")
    print(
        f"experiment directory: {summary.experiment_dir}  ({summary.wall_s:.0f} s, "
        f"up to {summary.max_concurrent_trials} trials at once; a trial needs {summary.demand})"
    )
    return 0


def add_tune_parser(subparsers: Any) -> argparse.ArgumentParser:
    tune = subparsers.add_parser(
        "tune",
        help="Ray Tune search over config fields, one whole continual run per trial: pm-ray tune CONFIG [key=value ...]",
        description="Search the config fields listed in the YAML's `search` section (see docs/tune.md). Running the same "
        "command again resumes an interrupted experiment; finished trials are kept.",
    )
    tune.add_argument("config", help="an experiment YAML with a `search` section")
    tune.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides of the run config (trainer.steps_per_task=20) "
        "or of the search section (search.num_samples=4)",
    )
    tune.add_argument("--quiet", action="store_true", help="no Tune progress output")
    tune.add_argument(
        "--retry-errored",
        action="store_true",
        help="when resuming, run trials that ended with an error again (from their run directories)",
    )
    tune.set_defaults(fn=_cmd_tune)
    return tune
