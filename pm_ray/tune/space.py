"""The ``search`` section's schema: its dimensions (grid / choice / uniform / loguniform / randint),
scheduler, trial resources and algorithm.

Validated at load time without Ray; :meth:`Distribution.to_tune` builds Ray Tune's own domain
(``tune.grid_search``, ``tune.choice``, ``tune.uniform``, ``tune.loguniform``, ``tune.randint``)
when the experiment starts, and :meth:`Distribution.probe_values` are the values the config's
validation is run on (every grid/choice value, the ends and middle of a range).
"""

from __future__ import annotations

import difflib
import importlib.util
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DISTRIBUTIONS: tuple[str, ...] = ("grid", "choice", "uniform", "loguniform", "randint")


class Distribution(BaseModel):
    """One dimension of the search space: exactly one of grid / choice / uniform / loguniform / randint."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["grid", "choice", "uniform", "loguniform", "randint"]
    args: tuple[Any, ...]

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, Distribution):
            return value
        if isinstance(value, dict) and set(value) == {"kind", "args"}:
            return value
        if isinstance(value, list):  # shorthand: a bare list is a grid
            value = {"grid": value}
        if not isinstance(value, dict) or len(value) != 1:
            raise ValueError(
                f"expected one distribution such as {{grid: [0, 0.5]}} or {{loguniform: [1e-4, 1e-2]}} "
                f"(one of {', '.join(DISTRIBUTIONS)}), got {value!r}"
            )
        ((kind, args),) = value.items()
        if kind not in DISTRIBUTIONS:
            close = difflib.get_close_matches(str(kind), DISTRIBUTIONS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown distribution {kind!r}{hint}; expected one of {', '.join(DISTRIBUTIONS)}")
        if not isinstance(args, list):
            raise ValueError(f"{kind}: expected a list, got {args!r}")
        if kind in ("grid", "choice"):
            if not args:
                raise ValueError(f"{kind}: expected at least one value, got []")
            return {"kind": kind, "args": tuple(args)}
        if len(args) != 2:
            raise ValueError(f"{kind}: expected [low, high], got {args!r}")
        low, high = args
        numbers = (int,) if kind == "randint" else (int, float)
        if any(isinstance(v, bool) or not isinstance(v, numbers) for v in (low, high)):
            what = "integers" if kind == "randint" else "numbers"
            raise ValueError(f"{kind}: low and high must be {what}, got {args!r}")
        if not all(math.isfinite(v) for v in (low, high)):
            raise ValueError(f"{kind}: low and high must be finite, got {args!r}")
        if kind == "randint" and low > high or kind != "randint" and low >= high:
            raise ValueError(f"{kind}: low must be {'<=' if kind == 'randint' else '<'} high, got {args!r}")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"loguniform: low must be > 0, got {args!r}")
        return {"kind": kind, "args": (low, high) if kind == "randint" else (float(low), float(high))}

    @property
    def discrete(self) -> bool:
        return self.kind in ("grid", "choice")

    def probe_values(self) -> list[Any]:
        """Values checked against the config: all grid/choice values, the ends of a range (a float
        range's high end is exclusive, so its largest float below is checked)."""
        if self.discrete:
            return list(self.args)
        low, high = self.args
        if self.kind == "randint":
            return [low, high]
        return [low, (low + high) / 2, math.nextafter(high, low)]

    def to_tune(self, algorithm: str) -> Any:
        """The Ray Tune domain. A grid stays an exhaustive grid only for algorithm=grid; random and
        optuna sample it as a categorical choice."""
        from ray import tune

        if self.kind == "grid" and algorithm == "grid":
            return tune.grid_search(list(self.args))
        if self.discrete:
            return tune.choice(list(self.args))
        low, high = self.args
        if self.kind == "uniform":
            return tune.uniform(low, high)
        if self.kind == "loguniform":
            return tune.loguniform(low, high)
        return tune.randint(low, high + 1)  # inclusive here, exclusive in Tune

    def describe(self) -> str:
        return f"{self.kind} {list(self.args)}"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SchedulerSection(_Section):
    type: Literal["fifo", "asha"] = "fifo"
    grace_period: int = Field(1, ge=1)  # tasks every trial runs before ASHA may stop it
    reduction_factor: float = Field(2.0, gt=1)
    max_t: int | None = Field(None, ge=1)  # default: the number of tasks in the stream

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value


class TrialResources(_Section):
    # engine=single (the whole run inside the trial process): CPUs of one trial.
    cpu: float | None = Field(None, gt=0)  # default trainer.cpus_per_worker
    # engines ddp/deepspeed: the trial process only drives a TorchTrainer whose workers get their
    # own placement group (trainer.num_workers x trainer.cpus_per_worker).
    driver_cpu: float | None = Field(None, ge=0)  # default ray.driver_cpus


class SearchSection(_Section):
    name: str | None = None  # the Tune experiment directory under storage.path (default tune-<stem>)
    space: dict[str, Distribution]
    objective: Literal["acc", "aaa"] = "acc"
    num_samples: int = Field(1, ge=1)
    algorithm: Literal["grid", "random", "optuna"] = "grid"
    scheduler: SchedulerSection = SchedulerSection()
    max_concurrent_trials: int | None = Field(None, ge=1)
    trial_resources: TrialResources = TrialResources()
    seed: int = 0

    @field_validator("space")
    @classmethod
    def _non_empty(cls, value: dict[str, Distribution]) -> dict[str, Distribution]:
        if not value:
            raise ValueError(
                "the search space is empty; give at least one dotted config key, "
                "e.g. perturbation.epsilon: {grid: [0, 0.25, 0.5]}"
            )
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and (not value or "/" in value or value.startswith(".")):
            raise ValueError(f"search.name {value!r} must be a plain directory name")
        return value

    @model_validator(mode="after")
    def _algorithm(self) -> SearchSection:
        if self.algorithm == "optuna" and importlib.util.find_spec("optuna") is None:
            raise ValueError(
                "algorithm 'optuna' needs the optuna package (pip install optuna); or use algorithm: grid | random"
            )
        return self
