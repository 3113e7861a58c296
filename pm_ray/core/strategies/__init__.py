"""Merge strategies behind one interface (base.py), one file per method, named in registry.py."""

from pm_ray.core.strategies.base import MergeResult, MergeStrategy, TaskUpdate
from pm_ray.core.strategies.options import StrategyOptionError, StrategyOptions
from pm_ray.core.strategies.registry import (
    STRATEGIES,
    available_strategies,
    build_strategy,
    check_options,
    strategy_class,
)

__all__ = [
    "STRATEGIES",
    "MergeResult",
    "MergeStrategy",
    "StrategyOptionError",
    "StrategyOptions",
    "TaskUpdate",
    "available_strategies",
    "build_strategy",
    "check_options",
    "strategy_class",
]
