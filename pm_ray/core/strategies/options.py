"""Typed per-strategy options (as mergekit declares each method's parameters).

Every strategy declares ``Options``, a pydantic model with its option names, types, defaults and
bounds. ``merge.options`` in the run config is validated against it at load time, so a misspelt
option or an out-of-range value is a one-line error before anything is written, and a tuning
search over ``merge.options.<key>`` is checked against the same bounds.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

_BOUNDS = {
    "greater_than": (">", "gt"),
    "greater_than_equal": (">=", "ge"),
    "less_than": ("<", "lt"),
    "less_than_equal": ("<=", "le"),
}


class StrategyOptions(BaseModel):
    """Base of every strategy's options: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StrategyOptionError(ValueError):
    """Bad ``merge.options``: ``problems`` holds (option key or None, one-line reason) pairs."""

    def __init__(self, strategy: str, problems: list[tuple[str | None, str]]) -> None:
        self.strategy, self.problems = strategy, problems
        super().__init__("; ".join(text for _, text in problems))


def option_names(options: type[StrategyOptions]) -> list[str]:
    return list(options.model_fields)


def _problem(strategy: str, options: type[StrategyOptions], error: Any) -> tuple[str | None, str]:
    key = ".".join(str(p) for p in error["loc"]) or None
    names = option_names(options)
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        listed = ", ".join(names) if names else "none"
        return key, f"merge strategy {strategy!r} has no option {key!r}{hint} (its options: {listed})"
    value = error.get("input")
    if error["type"] in _BOUNDS:
        op, ctx_key = _BOUNDS[error["type"]]
        field = options.model_fields.get(str(key))
        kind = "an int " if field is not None and field.annotation is int else ""
        return key, f"{strategy}: {key}={value!r} must be {kind}{op} {error['ctx'][ctx_key]}"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error":
        return key, f"{strategy}: {message}"
    return key, f"{strategy}: {key}={value!r}: {message}"


def validate_options(strategy: str, options: type[StrategyOptions], values: dict[str, Any]) -> StrategyOptions:
    """The typed options of ``strategy`` from a plain mapping; :class:`StrategyOptionError` if bad."""
    if not isinstance(values, dict):
        raise StrategyOptionError(
            strategy, [(None, f"merge options must be a mapping of option: value, got {values!r}")]
        )
    try:
        return options.model_validate(values)
    except ValidationError as err:
        raise StrategyOptionError(strategy, [_problem(strategy, options, e) for e in err.errors()]) from None
