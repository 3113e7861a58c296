"""The driver's live progress line, read from the rank-0 worker's progress.json."""

from __future__ import annotations

import sys
import threading
from typing import Any

from pm_ray.rundir import RunDir, read_json


class ProgressPrinter(threading.Thread):
    """A live progress line from the rank-0 worker's progress.json (task i/T, step, loss, ETA)."""

    def __init__(self, run: RunDir, stream: Any = sys.stderr, every_s: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.stream, self.every_s = run, stream, every_s
        self.stop = threading.Event()
        self.last = ""

    def line(self) -> str | None:
        path = self.run_dir.path / "progress.json"
        if not path.is_file():
            return None
        try:
            p = read_json(path)
        except (ValueError, OSError):
            return None
        per_step = p["task_elapsed_s"] / max(p["step"], 1)
        eta = per_step * (p["steps"] - p["step"]) + per_step * p["steps"] * (p["num_tasks"] - p["task"])
        return (f"[pm-ray] task {p['task']}/{p['num_tasks']} ({p['name']}) step {p['step']}/{p['steps']} "
                f"loss {p['loss']:.4f} | training ETA {eta / 60:.1f} min (+ merge/eval)")

    def run(self) -> None:  # type: ignore[override]
        while not self.stop.wait(self.every_s):
            text = self.line()
            if text and text != self.last:
                self.last = text
                if self.stream.isatty():
                    self.stream.write("\r" + text.ljust(100))
                else:
                    self.stream.write(text + "\n")
                self.stream.flush()

    def close(self) -> None:
        self.stop.set()
        self.join(timeout=5)
        if self.last and self.stream.isatty():
            self.stream.write("\n")
