"""`pm-ray tune` end to end on tiny models with engine=single, on the shared 2-CPU test Ray.

The stream is two constant-answer multiple-choice tasks ("yes", then "no"): the seeded tiny random
Llama prefers "no", so an untrained model scores 0 on task 1 and any trained one scores 1. That makes
the objectives deterministic: lr=0 never improves, and ASHA must stop it after its first task.
"""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pm_ray.config import load_config
from pm_ray.tune import load_tune_config, run_tune
from tinyconfig import tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WORDS = "apple river stone cloud green table light music paper window".split()


def yes_no_tasks(root: Path) -> list[dict[str, str]]:
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    files = []
    for answer in ("yes", "no"):
        for split, n in (("train", 48), ("test", 8)):
            with open(root / f"{answer}-{split}.jsonl", "w") as f:
                for _ in range(n):
                    row = {
                        "instruction": "Answer.",
                        "input": " ".join(rng.choice(WORDS) for _ in range(3)),
                        "output": answer,
                        "choices": ["yes", "no"],
                    }
                    f.write(json.dumps(row) + "\n")
        files.append(
            {"name": answer, "train": str(root / f"{answer}-train.jsonl"), "test": str(root / f"{answer}-test.jsonl")}
        )
    return files


def write_tune_config(tmp_path: Path, search: dict, **sections: dict) -> Path:
    sections.setdefault("trainer", {})
    sections["trainer"] = {"steps_per_task": 10, "lr": 0.02, **sections["trainer"]}
    cfg = tiny_config(
        tmp_path / "runs",
        tasks={"suite": None, "files": yes_no_tasks(tmp_path / "data"), "limit": None},
        eval={"max_rows": 8},
        **sections,
    )
    cfg["search"] = search
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def result_lines(trial_dir: Path) -> int:
    path = trial_dir / "result.json"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_grid_of_three_trials_picks_the_best_with_one_mlflow_run_each(tmp_path, ray_session) -> None:
    from pm_ray.tracking import read_run_summary

    path = write_tune_config(
        tmp_path,
        {
            "name": "grid",
            "space": {"trainer.lr": {"grid": [0.0, 0.005, 0.02]}},
            "objective": "aaa",
            "max_concurrent_trials": 2,
        },
        tracking={"enabled": True},
    )
    spec = load_tune_config(path)
    summary = run_tune(spec, quiet=True)

    assert [r["status"] for r in summary.rows] == ["completed"] * 3
    assert [r["params"]["trainer.lr"] for r in summary.rows] == [0.0, 0.005, 0.02]
    by_lr = {r["params"]["trainer.lr"]: r for r in summary.rows}
    assert by_lr[0.0]["aaa"] == pytest.approx(0.25)  # R = [[0], [0, 1]]: never learned "yes"
    assert summary.best is not None
    assert summary.best["objective"] == max(r["aaa"] for r in summary.rows) > by_lr[0.0]["aaa"]
    assert summary.best["params"]["trainer.lr"] == 0.005  # ties go to the earlier trial
    assert summary.max_concurrent_trials == 2

    exp = tmp_path / "runs" / "grid"
    table = pq.read_table(exp / "results.parquet").to_pylist()
    assert [row["trainer.lr"] for row in table] == [0.0, 0.005, 0.02]
    assert [row["best"] for row in table] == [False, True, False]
    assert (exp / "objective_vs_trainer_lr.png").stat().st_size > 0
    assert "best *" in summary.table and (exp / "results.md").read_text().strip() == summary.table
    best = load_config(exp / "best.yaml")  # runnable: a plain run config
    assert best.trainer.lr == 0.005 and best.storage.run_name == "grid-best"
    for row in summary.rows:
        state = json.loads((Path(row["run_dir"]) / "state.json").read_text())
        assert state["completed"] == 2 and state["run_name"] == f"trial-{row['trial']}"
        assert Path(row["run_dir"]).parent == exp / "runs"

    parents = read_run_summary(f"sqlite:///{exp / 'mlflow.db'}", "grid")
    assert sorted(p["run_name"] for p in parents) == sorted(f"trial-{r['trial']}" for r in summary.rows)
    assert all(p["status"] == "FINISHED" and len(p["children"]) == 2 for p in parents)
    assert {p["params"]["trainer.lr"] for p in parents} == {"0.0", "0.005", "0.02"}
    assert [p["tags"]["pm_ray.tune.best"] for p in sorted(parents, key=lambda p: p["tags"]["pm_ray.tune.trial"])] == [
        "false",
        "true",
        "false",
    ]


def test_asha_stops_a_hopeless_trial_after_its_first_task(tmp_path, ray_session) -> None:
    # one trial at a time: the good trial records its task-1 score at ASHA's first rung before the bad one arrives
    path = write_tune_config(
        tmp_path,
        {
            "name": "asha",
            "space": {"trainer.lr": {"grid": [0.02, 0.0]}},
            "objective": "acc",
            "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
            "max_concurrent_trials": 1,
        },
    )
    summary = run_tune(load_tune_config(path), quiet=True)

    good, bad = summary.rows
    assert good["params"]["trainer.lr"] == 0.02 and good["status"] == "completed" and good["tasks"] == 2
    assert bad["params"]["trainer.lr"] == 0.0 and bad["status"] == "stopped" and bad["tasks"] == 1
    assert result_lines(tmp_path / "runs" / "asha" / f"trial-{bad['trial']}") == 1  # one report, then stopped
    assert summary.best is not None and summary.best["trial"] == good["trial"]


def _trial_status(exp: Path) -> dict[str, str]:
    files = sorted(glob.glob(str(exp / "experiment_state-*.json")))
    if not files:
        return {}
    try:
        data = json.loads(Path(files[-1]).read_text())
    except (ValueError, OSError):
        return {}
    out = {}
    for entry in data.get("trial_data", []):
        trial = json.loads(entry[0])
        out[trial["trial_id"]] = trial["status"]
    return out


def test_interrupted_tune_resumes_without_rerunning_finished_trials(tmp_path, ray_session) -> None:
    path = write_tune_config(
        tmp_path,
        {"name": "resume", "space": {"trainer.lr": {"grid": [0.02, 0.005]}}, "max_concurrent_trials": 1},
        trainer={"steps_per_task": 30},
    )
    exp = tmp_path / "runs" / "resume"
    env = dict(
        os.environ,
        RAY_ADDRESS=ray_session.get_runtime_context().gcs_address,
        RAY_AUTH_MODE="disabled",
        HF_HUB_OFFLINE="1",
        TUNE_GLOBAL_CHECKPOINT_S="1",
    )

    def cli() -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "pm_ray.cli", "tune", str(path), "--quiet"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    proc = cli()
    deadline = time.time() + 150
    while time.time() < deadline:
        status = _trial_status(exp)
        if any(t.endswith("_00000") and s == "TERMINATED" for t, s in status.items()):
            break
        assert proc.poll() is None, f"tune exited ({proc.returncode}) before trial 0 finished:\n{proc.stdout.read()}"
        time.sleep(0.2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("timed out waiting for trial 0 to finish")
    os.killpg(proc.pid, signal.SIGKILL)  # interrupt the experiment while trial 1 runs
    proc.wait()
    assert proc.returncode != 0

    first = next(t for t in _trial_status(exp) if t.endswith("_00000"))
    run_dir = exp / "runs" / f"trial-{first}"
    frozen = {
        p: (p.stat().st_mtime_ns, p.read_bytes()) for p in [run_dir / "state.json", *run_dir.glob("tasks/*/adapter/*")]
    }
    reports = result_lines(exp / f"trial-{first}")
    assert reports == 2 and json.loads((run_dir / "state.json").read_text())["completed"] == 2

    proc = cli()
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert "resuming" in out
    for p, (mtime, data) in frozen.items():
        assert p.stat().st_mtime_ns == mtime and p.read_bytes() == data, f"{p} was rewritten"
    assert result_lines(exp / f"trial-{first}") == reports  # Tune kept the finished trial: not run again
    rows = pq.read_table(exp / "results.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert [r["trainer.lr"] for r in rows] == [0.02, 0.005]
