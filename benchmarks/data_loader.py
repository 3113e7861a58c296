"""trainer.data_loader: local vs ray_data, side by side, on a short tiny:llama run.

Both sides run the same stream (cit5 quick, --tasks tasks, --steps steps per task) on 2 DDP workers
of 1 CPU each, through `run_continual` on ONE Ray started here with this machine's CPUs (what
`pm-ray run` starts), so Ray's own start-up is outside the figures and both sides pay the same
worker-group start. The runs alternate (local, ray_data), (ray_data, local), ... for --pairs pairs,
each into a fresh run directory. Per run: the whole run's wall time, and from state.json per task
`train_s` (adapter + engine + every step, so it holds whatever a task's first batch waited for) and
`step_s` (the mean step after the first). Both sides must train on identical batches (state.json's
`train_batches_sha256`), or the benchmark stops.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/data_loader.py --pairs 3 \
        --out benchmarks/results/data_loader_tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from benchmarks.train_throughput import machine, summary  # noqa: E402
from tinyconfig import tiny_config  # noqa: E402

SIDES = ("local", "ray_data")


def run_once(work: Path, loader: str, tasks: int, steps: int, index: int) -> dict[str, Any]:
    from pm_ray.config import config_from_dict
    from pm_ray.pipeline import run_continual

    storage = work / f"{loader}-{index}"
    cfg = tiny_config(
        storage,
        tasks={"suite": "cit5", "variant": "quick", "limit": tasks},
        trainer={
            "engine": "ddp",
            "num_workers": 2,
            "cpus_per_worker": 1,
            "steps_per_task": steps,
            "log_every": 1000,
            "data_loader": loader,
        },
        storage={"run_name": "bench"},
    )
    started = time.perf_counter()
    summary_ = run_continual(config_from_dict(cfg), config_stem=loader, quiet=True)
    wall = time.perf_counter() - started
    state = json.loads((summary_.run_dir / "state.json").read_text())
    shutil.rmtree(storage, ignore_errors=True)
    diag = state["diagnostics"]
    return {
        "wall_s": wall,
        "train_s": [d["train_s"] for d in diag],
        "step_s": [d.get("step_s", 0.0) for d in diag],
        "task_s": [d["task_s"] for d in diag],
        "digests": [d["train_batches_sha256"] for d in diag],
        "alphas": state["alphas"],
        "accuracy": state["accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--machine", default="", help="free text naming the machine, copied to the JSON")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ray's workers start from this process's niceness and add RAY_worker_niceness (Ray's default 15:
    # under `nice -n 10` they would run at 19 and starve behind any other load on the machine)
    os.environ["RAY_worker_niceness"] = "0"
    load_start = os.getloadavg()[0]
    machine_text = machine() + (f"; {args.machine}" if args.machine else "")
    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    work = Path(tempfile.mkdtemp(prefix="data_loader_"))
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    order_log: list[str] = []
    try:
        for pair in range(args.pairs):
            order = SIDES if pair % 2 == 0 else tuple(reversed(SIDES))
            for side in order:
                runs[side].append(run_once(work, side, args.tasks, args.steps, pair))
                order_log.append(side)
                print(f"pair {pair} {side}: {runs[side][-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    for a, b in zip(runs["local"], runs["ray_data"]):
        if a["digests"] != b["digests"] or a["alphas"] != b["alphas"] or a["accuracy"] != b["accuracy"]:
            raise SystemExit("local and ray_data trained on different batches (or reached different results)")

    def per_task(side: str, key: str, task: int) -> list[float]:
        return [r[key][task] for r in runs[side]]

    wall_diff = [b["wall_s"] - a["wall_s"] for a, b in zip(runs["local"], runs["ray_data"])]
    result = {
        "benchmark": "data_loader",
        "machine": machine_text,
        "load_average_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "note": (
            "tiny:llama, cit5 quick, DDP 2 workers x 1 CPU on one Ray with this machine's CPUs; "
            "pairs alternate their order; identical batches, alphas and accuracy on both sides (checked)"
        ),
        "tasks": args.tasks,
        "steps_per_task": args.steps,
        "pairs": args.pairs,
        "order": order_log,
        "wall_s": {side: summary([r["wall_s"] for r in runs[side]], 2) for side in SIDES},
        "wall_s_ray_data_minus_local_per_pair": [round(d, 2) for d in wall_diff],
        "train_s_per_task": {
            side: [summary(per_task(side, "train_s", t), 3) for t in range(args.tasks)] for side in SIDES
        },
        "step_s_per_task": {
            side: [summary(per_task(side, "step_s", t), 4) for t in range(args.tasks)] for side in SIDES
        },
        "median_train_s_ray_data_minus_local_per_task": [
            round(
                statistics.median(per_task("ray_data", "train_s", t))
                - statistics.median(per_task("local", "train_s", t)),
                3,
            )
            for t in range(args.tasks)
        ],
        "runs": {
            side: [{k: r[k] for k in ("wall_s", "train_s", "step_s", "task_s")} for r in runs[side]] for side in SIDES
        },
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
