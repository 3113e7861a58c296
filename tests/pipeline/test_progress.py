"""The driver's live progress line, read from the rank-0 worker's progress.json."""

from __future__ import annotations

import io
import time

from pm_ray.progress import ProgressPrinter
from pm_ray.rundir import RunDir
from pm_ray.train.checkpoints import write_progress


def test_progress_line_is_printed_from_progress_json(tmp_path) -> None:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    stream = io.StringIO()
    printer = ProgressPrinter(run, stream=stream, every_s=0.05)
    printer.start()
    write_progress(run, task=2, num_tasks=5, name="arithmetic", step=10, steps=30, loss=1.25, t_start=time.time() - 20.0)
    deadline = time.time() + 5
    while "step 10/30" not in stream.getvalue() and time.time() < deadline:
        time.sleep(0.05)
    printer.close()
    assert not printer.is_alive()
    line = stream.getvalue().strip().splitlines()[-1]
    assert line.startswith("[pm-ray] task 2/5 (arithmetic) step 10/30 loss 1.2500")
    # 2 s/step: 20 steps left of this task (40 s) + 3 more tasks of 30 steps (180 s) = 3.7 min
    assert "training ETA 3.7 min" in line
