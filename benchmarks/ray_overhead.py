"""Ray's price: a 1-task tiny run through `pm-ray run` on Ray Train against the same run in-process.

Ray Train path: trainer.engine=deepspeed, num_workers=1 (ZeRO-2; with one worker `ddp` would run
in-process, see pipeline._fit, so DeepSpeed is the one-worker Ray Train path and its own set-up
is part of the price). In-process: trainer.engine=single. Both start Ray (the merge actors), train
1 task of tiny:llama (cit5 quick), take its Fisher, merge and evaluate; only the trainer differs.

Each side runs with S and 2S steps per task, the four commands interleaved (A_S B_S A_2S B_2S,
--repeats rounds), each a fresh run directory, timed from outside (whole process). Then

    per-step s   = (wall(2S) - wall(S)) / S             per side, medians
    per-step ratio = step_s(ray) / step_s(single), pair by pair, from each run's state.json
                   (the steady-state mean step the worker measured itself: free of start-up noise)
    fixed s      = wall_ray(n) - wall_single(n) - n * (median step_s ray - median step_s single),
                   pair by pair, n in (S, 2S): what Ray Train adds that does not grow with the
                   steps (worker group, DeepSpeed init, teardown) Workers run at the driver's
niceness (RAY_worker_niceness) so neither side is favoured on a loaded machine.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/ray_overhead.py --steps 15 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from tinyconfig import tiny_config  # noqa: E402

SIDES = {
    "ray_train_deepspeed_1w": {"engine": "deepspeed", "num_workers": 1, "zero_stage": 2, "cpus_per_worker": 1},
    "in_process_single": {"engine": "single", "num_workers": 1},
}


def median(values: list[float]) -> float:
    return statistics.median(values)


def summary(values: list[float], digits: int = 3) -> dict[str, float]:
    return {
        "min": round(min(values), digits),
        "median": round(median(values), digits),
        "max": round(max(values), digits),
    }


def run_once(work: Path, side: str, steps: int, i: int, keep: Path | None = None) -> dict[str, float]:
    storage = work / f"{side}-{steps}-{i}"
    cfg = tiny_config(
        storage,
        trainer={**SIDES[side], "steps_per_task": steps, "log_every": 1000},
        tasks={"suite": "cit5", "variant": "quick", "limit": 1},
        storage={"run_name": "bench"},
    )
    path = work / f"{side}-{steps}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    nice = str(os.nice(0))
    env = {
        **os.environ,
        "RAY_worker_niceness": nice,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_AUTH_MODE": "disabled",
        "PYTHONPATH": str(ROOT),
    }
    cmd = [sys.executable, "-m", "pm_ray.cli", "run", "--quiet", str(path)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{side} {steps} steps failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    state_path = storage / "bench" / "state.json"
    diag = json.loads(state_path.read_text())["diagnostics"][0]
    if keep is not None and i == 0:  # one state.json per side and length, for task_time_breakdown.py
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(state_path, keep / f"state_{side}_{steps}steps.json")
    shutil.rmtree(storage, ignore_errors=True)
    return {"wall_s": wall, "train_s": diag["train_s"], "task_s": diag["task_s"], "step_s": diag.get("step_s", 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=15, help="S; the long runs have 2S steps")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep-states", type=Path, default=None, help="copy the first round's state.json files here")
    args = parser.parse_args()
    load0 = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="ray_overhead_"))
    s = args.steps
    runs: dict[tuple[str, int], list[dict[str, float]]] = {(side, n): [] for side in SIDES for n in (s, 2 * s)}
    for i in range(args.repeats):
        for n in (s, 2 * s):
            order = list(SIDES) if i % 2 == 0 else list(reversed(SIDES))
            for side in order:
                runs[(side, n)].append(run_once(work, side, n, i, args.keep_states))
    shutil.rmtree(work, ignore_errors=True)
    ray_side, single_side = SIDES
    wall = {key: median([r["wall_s"] for r in v]) for key, v in runs.items()}
    per_step = {side: (wall[(side, 2 * s)] - wall[(side, s)]) / s for side in SIDES}
    step_s = {side: median([r["step_s"] for n in (s, 2 * s) for r in runs[(side, n)]]) for side in SIDES}
    step_ratio_pairs = [
        a["step_s"] / b["step_s"]
        for n in (s, 2 * s)
        for a, b in zip(runs[(ray_side, n)], runs[(single_side, n)])
        if b["step_s"]
    ]
    # fixed: the pair's wall gap less what its steps account for (state.json's steady step times)
    fixed_pairs = [
        a["wall_s"] - b["wall_s"] - n * (step_s[ray_side] - step_s[single_side])
        for n in (s, 2 * s)
        for a, b in zip(runs[(ray_side, n)], runs[(single_side, n)])
    ]
    print(
        json.dumps(
            {
                "benchmark": "ray_overhead",
                "machine": f"{os.cpu_count()} cores, load average {load0:.1f} at start",
                "other_load_present": True,
                "note": "2-core machine shared with other work; the four commands interleaved, whole-process wall time",
                "model": "tiny:llama",
                "tasks": 1,
                "steps": [s, 2 * s],
                "repeats": args.repeats,
                "batch": [4, 96],
                "sides": {
                    ray_side: "pm-ray run, Ray Train TorchTrainer, DeepSpeed ZeRO-2, 1 worker",
                    single_side: "pm-ray run, engine single (worker loop in the driver; Ray for the merge actor)",
                },
                "wall_s": {f"{side}@{n}": summary([r["wall_s"] for r in v]) for (side, n), v in runs.items()},
                "train_s": {f"{side}@{n}": summary([r["train_s"] for r in v]) for (side, n), v in runs.items()},
                "state_step_s": {f"{side}@{n}": summary([r["step_s"] for r in v], 4) for (side, n), v in runs.items()},
                "per_step_s_from_wall_difference": {k: round(v, 4) for k, v in per_step.items()},
                "per_step_ratio_from_wall_difference": round(per_step[ray_side] / per_step[single_side], 3)
                if per_step[single_side] > 0
                else None,
                "per_step_ratio_from_state_step_s": summary(step_ratio_pairs),
                "fixed_s_ray_over_single": summary(fixed_pairs, 2),
                "targets": {"fixed_s": "<= 25", "per_step_ratio": "<= 1.10"},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
