"""Task streams: schema, readers, tokenisation, built-in suites, Ray Data path."""

from __future__ import annotations

from pm_ray.data.readers import load_task, make_task, read_table
from pm_ray.data.schema import Task, TaskDataError, TaskKind

__all__ = ["Task", "TaskDataError", "TaskKind", "load_task", "make_task", "read_table"]
