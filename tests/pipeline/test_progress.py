"""The driver's live progress bar, read from the rank-0 worker's progress.json and state.json."""

from __future__ import annotations

import io
import json
import time

import pytest

from pm_ray.config import config_from_dict
from pm_ray.progress import ProgressPrinter, estimate
from pm_ray.rundir import RunDir
from pm_ray.train.checkpoints import TaskProgress, fisher_batch_count, write_progress
from tinyconfig import tiny_config


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def wait_for_text(stream: io.StringIO, text: str) -> None:
    deadline = time.time() + 5
    while text not in stream.getvalue() and time.time() < deadline:
        time.sleep(0.05)


def test_progress_line_is_printed_from_progress_json(tmp_path) -> None:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    stream = io.StringIO()
    printer = ProgressPrinter(run, stream=stream, every_s=0.05)
    printer.start()
    write_progress(
        run, task=2, num_tasks=5, name="arithmetic", step=10, steps=30, loss=1.25, t_start=time.time() - 20.0
    )
    wait_for_text(stream, "training 10/30")
    printer.close()
    assert not printer.is_alive()
    line = stream.getvalue().strip().splitlines()[-1]
    assert line.startswith("[pm-ray] task 2/5 (arithmetic) training 10/30 loss 1.2500")
    # no steady-state step yet and no committed task: 2 s/step (warm-up included) for 20 steps of
    # this task (40 s) + 3 more tasks of 30 steps (180 s) = 3.7 min, flagged as a warm-up estimate
    assert "training ETA 3.7 min (warm-up) (+ fisher/merge/eval)" in line


def test_steady_state_eta_leaves_out_the_warmup_step(tmp_path) -> None:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    # 60 s elapsed, of which the 9 steps after warm-up took 9 s: the first step cost 51 s
    write_progress(
        run,
        task=1,
        num_tasks=3,
        name="a",
        step=10,
        steps=30,
        loss=1.0,
        t_start=time.time() - 60.0,
        steady_s=9.0,
        steady_steps=9,
    )
    p = json.loads((run.path / "progress.json").read_text())
    est = estimate(p, [])
    assert est["step_s"] == pytest.approx(1.0)
    assert est["training_eta_s"] == pytest.approx(20 + 2 * 30)  # not 6 s/step x 80 steps
    assert est["run_eta_s"] is None and not est["warmup"]


def test_run_eta_adds_fisher_merge_and_growing_evaluation_from_committed_tasks() -> None:
    # task 1 committed: 30 steps at 1 s steady + 5 s overhead, Fisher 4 s, merge 2 s, eval 3 s (1 task)
    diagnostics = [
        {"task": 1, "train_s": 35.0, "step_s": 1.0, "fisher_s": 4.0, "merge_s": 2.0, "eval_s": 3.0, "task_s": 44.0}
    ]
    p = {
        "task": 2,
        "num_tasks": 4,
        "name": "b",
        "phase": "training",
        "step": 10,
        "steps": 30,
        "done": 10,
        "total": 30,
        "loss": 1.0,
        "task_elapsed_s": 20.0,
        "steady_s": 18.0,
        "steady_steps": 9,
    }
    est = estimate(p, diagnostics)
    step_s = 2.0  # this task's steady-state step, not the committed one
    this_task = 20 * step_s + 4 + 2 + 2 * 3
    later = sum(5 + 30 * step_s + 4 + 2 + k * 3 for k in (3, 4))
    assert est["run_eta_s"] == pytest.approx(this_task + later)
    # half-way through evaluating task 2's two seen tasks: half of 2 x 3 s left, then tasks 3 and 4
    p.update(phase="evaluation", step=30, done=1, total=2)
    est = estimate(p, diagnostics)
    assert est["phase_eta_s"] == pytest.approx(3.0)
    assert est["run_eta_s"] == pytest.approx(3.0 + sum(5 + 30 * 2.0 + 4 + 2 + k * 3 for k in (3, 4)))


def test_task_progress_writes_every_phase_and_its_timings(tmp_path) -> None:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    seen = []

    def phase_now() -> tuple[str, int, int]:
        p = json.loads((run.path / "progress.json").read_text())
        return p["phase"], p["done"], p["total"]

    progress = TaskProgress(run, 1, 2, "a", steps=3)
    for step in (1, 2, 3):
        time.sleep(0.02)
        progress.step(step, 0.5, write=True)
        seen.append(phase_now())
    p = json.loads((run.path / "progress.json").read_text())
    assert p["steady_steps"] == 2 and 0.03 < p["steady_s"] < 1.0
    for _ in progress.iterate("fisher", iter(range(2)), total=2):
        seen.append(phase_now())
    progress.phase("merge")
    seen.append(phase_now())
    for _ in progress.iterate("evaluation", range(1), total=1):
        time.sleep(0.02)
        seen.append(phase_now())
    timings = progress.finish()
    assert seen == [
        ("training", 1, 3),
        ("training", 2, 3),
        ("training", 3, 3),
        ("fisher", 0, 2),
        ("fisher", 1, 2),
        ("merge", 0, 1),
        ("evaluation", 0, 1),
    ]
    assert set(timings) == {"step_s", "fisher_s", "merge_s", "eval_s"}
    assert 0.015 < timings["step_s"] < 0.5 and timings["eval_s"] >= 0.02
    with pytest.raises(ValueError, match="unknown phase 'saving'"):
        progress.phase("saving")
    disabled = RunDir(tmp_path / "other")
    disabled.path.mkdir()
    TaskProgress(disabled, 1, 1, "a", steps=1, enabled=False).step(1, 0.1, write=True)
    assert not (disabled.path / "progress.json").exists()


def test_fisher_batch_count_is_rank_zeros_share() -> None:
    assert fisher_batch_count(num_rows=100, num_samples=9, batch_size=4, world_size=2) == 2  # 5 rows
    assert fisher_batch_count(num_rows=3, num_samples=9, batch_size=4, world_size=1) == 1
    assert fisher_batch_count(num_rows=100, num_samples=16, batch_size=4, world_size=1) == 4


def test_progress_bar_on_a_terminal_is_tqdm(tmp_path) -> None:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    stream = Terminal()
    printer = ProgressPrinter(run, stream=stream, every_s=0.05)
    printer.start()
    write_progress(
        run,
        task=1,
        num_tasks=2,
        name="a",
        step=5,
        steps=20,
        loss=0.5,
        t_start=time.time() - 5.0,
        steady_s=4.0,
        steady_steps=4,
    )
    wait_for_text(stream, "5/20")
    write_progress(
        run,
        task=1,
        num_tasks=2,
        name="a",
        step=20,
        steps=20,
        loss=0.5,
        t_start=time.time() - 5.0,
        phase="fisher",
        done=1,
        total=4,
        steady_s=4.0,
        steady_steps=4,
    )
    wait_for_text(stream, "1/4")
    printer.close()
    out = stream.getvalue()
    assert "\r" in out  # redrawn in place
    assert "[pm-ray] task 1/2 (a) training:  25%|" in out and "5/20, loss 0.5000" in out
    assert "[pm-ray] task 1/2 (a) fisher:  25%|" in out and "1/4" in out


@pytest.mark.integration
@pytest.mark.slow
def test_a_run_records_the_phase_timings_the_eta_uses(tmp_path) -> None:
    from pm_ray.pipeline import run_continual

    cfg = tiny_config(tmp_path / "runs", tasks={"suite": "cit5", "variant": "quick", "limit": 2})
    summary = run_continual(config_from_dict(cfg), config_stem="timings", quiet=True)
    for d in summary.state.diagnostics:
        assert {"step_s", "fisher_s", "merge_s", "eval_s"} <= set(d)
        assert d["train_s"] + d["fisher_s"] + d["merge_s"] + d["eval_s"] <= d["task_s"] + 1e-6
        assert 0 < d["step_s"] * 5 < d["train_s"]  # 5 steady steps of 6
    p = json.loads((summary.run_dir / "progress.json").read_text())
    assert p["phase"] == "evaluation" and p["task"] == 2 and p["total"] == 2
