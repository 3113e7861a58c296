"""Merge strategies behind one interface (base.py), one file per method, found by name."""

from pm_ray.core.strategies import dare, line, magmax, ties  # noqa: F401  (registers them)
from pm_ray.core.strategies import trm  # noqa: F401  (registers "trm"; after line: it subclasses pm)
from pm_ray.core.strategies.base import (
    STRATEGIES,
    MergeResult,
    MergeStrategy,
    TaskUpdate,
    available_strategies,
    build_strategy,
    register,
)

__all__ = [
    "STRATEGIES",
    "MergeResult",
    "MergeStrategy",
    "TaskUpdate",
    "available_strategies",
    "build_strategy",
    "register",
]
