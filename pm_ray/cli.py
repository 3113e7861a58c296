"""`pm-ray run | compare | eval | export | report` (and `tune`, when its module is present).

Exit codes: 0 ok, 2 bad input (config, data, model path; nothing is written), 1 failure,
130 / 143 stopped by SIGINT (Ctrl-C) / SIGTERM (the last committed task is kept; rerun to resume).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


def _cmd_run(args: argparse.Namespace) -> int:
    from pm_ray.config import load_config
    from pm_ray.pipeline import run_continual

    cfg = load_config(args.config, args.overrides)
    summary = run_continual(cfg, config_stem=Path(args.config).stem, quiet=args.quiet)
    print(summary.table)
    print(f"run directory: {summary.run_dir}  ({summary.wall_s:.0f} s)")
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from pm_ray.report import write_report

    report = write_report(Path(args.run_dir))
    print(report["table"])
    for path in report["plots"]:
        print(f"plot: {path}")
    return EXIT_OK


def _cmd_eval(args: argparse.Namespace) -> int:
    from pm_ray.export import evaluate_run

    scores = evaluate_run(Path(args.run_dir), max_rows=args.max_rows)
    print(json.dumps(scores, indent=2))
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from pm_ray.export import export_adapter, export_run

    if not args.adapter:
        if args.rank is not None:
            raise ValueError("--rank applies to --adapter exports only")
        out = export_run(Path(args.run_dir), Path(args.out))
        print(f"exported merged model to {out}")
        return EXIT_OK
    report = export_adapter(Path(args.run_dir), Path(args.out), rank=args.rank)
    for module, info in report["modules"].items():
        print(f"{module}  rank {info['rank']}  relative error {info['relative_error']:.3e}")
    print(
        f"exported merged model as one LoRA adapter ({report['method']}, rank {report['rank']}, max relative error "
        f"{report['max_relative_error']:.3e}) to {Path(args.out).expanduser().resolve()}"
    )
    return EXIT_OK


def _cmd_compare(args: argparse.Namespace) -> int:
    from pm_ray.compare import parse_seeds, run_comparison

    seeds = parse_seeds(args.seeds) if args.seeds is not None else None  # before anything is written
    _, table = run_comparison(Path(args.spec), args.overrides, seeds=seeds, quiet=args.quiet)
    print(table)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pm-ray", description="Continual learning by model merging on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a continual stream: pm-ray run CONFIG [key=value ...]")
    run.add_argument("config")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. merge.strategy=average")
    run.add_argument("--quiet", action="store_true", help="no live progress line")
    run.set_defaults(fn=_cmd_run)
    ev = sub.add_parser("eval", help="re-evaluate a run's merged model on every task")
    ev.add_argument("run_dir")
    ev.add_argument("--max-rows", type=int, default=None)
    ev.set_defaults(fn=_cmd_eval)
    ex = sub.add_parser(
        "export", help="write the merged model as a dense Hugging Face model (or --adapter: one LoRA adapter)"
    )
    ex.add_argument("run_dir")
    ex.add_argument("out")
    ex.add_argument(
        "--adapter",
        action="store_true",
        help="one PEFT LoRA adapter on the base instead (exact for line merges, else truncated SVD)",
    )
    ex.add_argument(
        "--rank",
        type=int,
        default=None,
        help="with --adapter: truncated-SVD rank (default: exact for line merges, else the sum of task ranks)",
    )
    ex.set_defaults(fn=_cmd_export)
    rep = sub.add_parser("report", help="print the results table and write PNG plots")
    rep.add_argument("run_dir")
    rep.set_defaults(fn=_cmd_report)
    cmp_ = sub.add_parser(
        "compare",
        help="the same stream under several strategies (and seeds): pm-ray compare SPEC [--seeds 0,1,2] [key=value ...]",
    )
    cmp_.add_argument("spec")
    cmp_.add_argument("overrides", nargs="*", help="applied to every entry, e.g. tasks.limit=3")
    cmp_.add_argument(
        "--seeds", default=None, help="comma-separated trainer seeds, e.g. 0,1,2 (replaces the spec's 'seeds')"
    )
    cmp_.add_argument("--quiet", action="store_true")
    cmp_.set_defaults(fn=_cmd_compare)
    try:
        from pm_ray.tune.cli import add_tune_parser
    except ImportError:
        pass
    else:
        add_tune_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pm_ray.config import ConfigError
    from pm_ray.data.schema import TaskDataError
    from pm_ray.interrupt import Interrupted
    from pm_ray.pipeline import RunFailed

    parser = build_parser()
    # overrides may come after options (`run cfg.yaml --quiet a.b=1`): argparse leaves those over
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return int(args.fn(args))
    except (ConfigError, TaskDataError, FileNotFoundError) as err:
        print(f"pm-ray: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Interrupted as err:
        print(f"pm-ray: {err}", file=sys.stderr)
        return err.exit_code
    except RunFailed as err:
        print(f"pm-ray: run failed: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except ValueError as err:
        print(f"pm-ray: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
