"""Search spaces: how an optuna trial's parameters become :class:`QSchedCoefficients`.

* ``ramp`` (the paper): ``cx_start`` and ``ceps_start`` in ``[low, high]``; each
  vector ramps linearly from its start to 1 over the steps.
* ``ramp-end``: also ``cx_end`` and ``ceps_end`` in ``[low, high]``.
* ``per-step``: a free value per step, ``c_x_0 .. c_x_{n-1}`` and ``c_eps_0 ..``.

Every space contains the uncorrected sampler (all ones), which is the baseline
candidate, so ``low <= 1 <= high`` is required.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from qsched.errors import QSchedError
from qsched.schedule import QSchedCoefficients

SPACES: tuple[str, ...] = ("ramp", "ramp-end", "per-step")
DEFAULT_BOUNDS: tuple[float, float] = (0.8, 1.2)


@dataclass(frozen=True)
class SearchSpace:
    """One of :data:`SPACES` for ``num_steps`` sampling steps, each parameter in ``[low, high]``."""

    kind: str = "ramp"
    num_steps: int = 4
    low: float = DEFAULT_BOUNDS[0]
    high: float = DEFAULT_BOUNDS[1]

    def __post_init__(self) -> None:
        if self.kind not in SPACES:
            raise QSchedError(f"unknown search space {self.kind!r}; allowed: {', '.join(SPACES)}")
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise QSchedError(f"num_steps must be a positive integer, got {self.num_steps!r}")
        for name in ("low", "high"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise QSchedError(f"search bound {name}={value!r} must be a finite positive number")
            object.__setattr__(self, name, float(value))
        if self.low >= self.high:
            raise QSchedError(f"search bounds need low < high, got low={self.low:g}, high={self.high:g}")
        if not self.low <= 1.0 <= self.high:
            raise QSchedError(
                f"search bounds [{self.low:g}, {self.high:g}] must contain 1.0: the uncorrected sampler "
                "(all ones) is the baseline every search starts from"
            )

    @property
    def param_names(self) -> tuple[str, ...]:
        """The optuna parameter names, in a fixed order."""
        if self.kind == "ramp":
            return ("cx_start", "ceps_start")
        if self.kind == "ramp-end":
            return ("cx_start", "ceps_start", "cx_end", "ceps_end")
        n = self.num_steps
        return tuple(f"c_x_{i}" for i in range(n)) + tuple(f"c_eps_{i}" for i in range(n))

    @property
    def plane(self) -> tuple[str, str]:
        """The two parameters plotted in the landscape: the first step's ``c_x`` and ``c_eps``."""
        return ("c_x_0", "c_eps_0") if self.kind == "per-step" else ("cx_start", "ceps_start")

    def distributions(self) -> dict[str, Any]:
        """``{name: optuna FloatDistribution(low, high)}``."""
        from optuna.distributions import FloatDistribution

        return {name: FloatDistribution(self.low, self.high) for name in self.param_names}

    def suggest(self, trial: Any) -> dict[str, float]:
        """Ask ``trial`` for every parameter (enqueued values are returned as they are)."""
        return {name: float(trial.suggest_float(name, self.low, self.high)) for name in self.param_names}

    def identity_params(self) -> dict[str, float]:
        """The parameters of the uncorrected sampler (all ones)."""
        return {name: 1.0 for name in self.param_names}

    def coefficients(self, params: Mapping[str, float]) -> QSchedCoefficients:
        """The coefficients of a parameter dict of this space."""
        missing = [name for name in self.param_names if name not in params]
        if missing:
            raise QSchedError(f"parameters {missing} missing for search space {self.kind!r}")
        p = {name: float(params[name]) for name in self.param_names}
        n = self.num_steps
        if self.kind == "ramp":
            return QSchedCoefficients.from_ramps(cx_start=p["cx_start"], ceps_start=p["ceps_start"], num_steps=n)
        if self.kind == "ramp-end":
            return QSchedCoefficients.from_ramps(
                cx_start=p["cx_start"], ceps_start=p["ceps_start"], num_steps=n, cx_end=p["cx_end"], ceps_end=p["ceps_end"]
            )
        return QSchedCoefficients(c_x=[p[f"c_x_{i}"] for i in range(n)], c_eps=[p[f"c_eps_{i}"] for i in range(n)])

    def grid(self, points: int) -> dict[str, list[float]]:
        """``points`` evenly spaced values per parameter, both bounds included."""
        if isinstance(points, bool) or not isinstance(points, int) or points < 2:
            raise QSchedError(f"grid points per axis must be an integer >= 2, got {points!r}")
        step = (self.high - self.low) / (points - 1)
        values = [round(self.low + step * i, 12) for i in range(points - 1)] + [self.high]
        return {name: list(values) for name in self.param_names}

    def grid_size(self, points: int) -> int:
        return points ** len(self.param_names)

    def to_dict(self) -> dict[str, Any]:
        return {"space": self.kind, "num_steps": self.num_steps, "low": self.low, "high": self.high,
                "params": list(self.param_names)}
