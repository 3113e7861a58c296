"""The strategies by name: one explicit table, built here and nowhere else.

Adding a strategy is one file (a :class:`~pm_ray.core.strategies.base.MergeStrategy` subclass with
its ``Options`` and flags) and one line in ``STRATEGIES``.
"""

from __future__ import annotations

import difflib
from typing import Any

from pm_ray.core.strategies.base import MergeStrategy
from pm_ray.core.strategies.dare import Dare
from pm_ray.core.strategies.elementwise import FisherElementwise
from pm_ray.core.strategies.line import Average, Fixed, OLoRA, PerturbAndMerge, Sequential
from pm_ray.core.strategies.magmax import MagMax
from pm_ray.core.strategies.options import StrategyOptions, validate_options
from pm_ray.core.strategies.ties import Ties
from pm_ray.core.strategies.trm import TrajectoryRegularisedMerge

STRATEGIES: dict[str, type[MergeStrategy]] = {
    "sequential": Sequential,
    "olora": OLoRA,
    "average": Average,
    "fixed": Fixed,
    "pm": PerturbAndMerge,
    "fisher_elementwise": FisherElementwise,
    "trm": TrajectoryRegularisedMerge,
    "magmax": MagMax,
    "ties": Ties,
    "dare": Dare,
}
assert all(name == cls.name for name, cls in STRATEGIES.items())


def available_strategies() -> list[str]:
    return sorted(STRATEGIES)


def strategy_class(name: str) -> type[MergeStrategy]:
    """The registered class; unknown names suggest the closest one."""
    if name not in STRATEGIES:
        close = difflib.get_close_matches(name, STRATEGIES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown merge strategy {name!r}{hint}; expected one of {available_strategies()}")
    return STRATEGIES[name]


def check_options(name: str, options: dict[str, Any]) -> StrategyOptions:
    """Validate ``merge.options`` for strategy ``name`` (StrategyOptionError names each bad key)."""
    cls = strategy_class(name)
    return validate_options(name, cls.Options, options)


def build_strategy(name: str, **options: Any) -> MergeStrategy:
    """Instantiate a registered strategy; unknown names or options suggest the closest valid one."""
    return strategy_class(name)(**options)
