"""Coefficient schedules: the per-step numbers Q-Sched multiplies into the sampler.

Q-Sched preconditions every sampler step ``i`` with two scalars::

    x_t   <- c_x[i]   * x_t      (the sample handed to scheduler.step)
    eps_t <- c_eps[i] * eps_t    (the quantized model's prediction)

In the paper each vector is a linear ramp from a searched start value to 1.
Schedules here are plain values: pure functions that build per-step tuples, and
a frozen :class:`QSchedCoefficients` that holds one vector for ``c_x`` and one
for ``c_eps``. They never broadcast: a vector applies to exactly as many steps
as it has entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

from qsched.errors import QSchedError


def ramp(start: float, end: float, num_steps: int) -> tuple[float, ...]:
    """Linear ramp with ``num_steps`` entries from ``start`` (first step) to ``end`` (last).

    One step gives ``(start,)``: the first step is where the searched value acts.
    """
    _check_num_steps(num_steps)
    if num_steps == 1:
        return (float(start),)
    delta = (float(end) - float(start)) / (num_steps - 1)
    values = [float(start) + delta * i for i in range(num_steps - 1)]
    return (*values, float(end))


def constant(value: float, num_steps: int) -> tuple[float, ...]:
    """The same ``value`` for each of ``num_steps`` steps."""
    _check_num_steps(num_steps)
    return (float(value),) * num_steps


def _check_num_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise QSchedError(f"num_steps must be a positive integer, got {num_steps!r}")


def _as_vector(name: str, values: Iterable[float]) -> tuple[float, ...]:
    try:
        vector = tuple(float(v) for v in values)
    except (TypeError, ValueError) as err:
        raise QSchedError(f"{name} must be a sequence of numbers, got {values!r}") from err
    if not vector:
        raise QSchedError(f"{name} is empty; give one coefficient per sampling step")
    for i, v in enumerate(vector):
        if not math.isfinite(v) or v <= 0.0:
            raise QSchedError(
                f"{name}[{i}] = {v!r}; coefficients must be finite and positive "
                "(1.0 leaves a step unchanged)"
            )
    return vector


@dataclass(frozen=True)
class QSchedCoefficients:
    """Per-step preconditioning coefficients for the sample (``c_x``) and the prediction (``c_eps``).

    Both vectors have one entry per sampling step and the same length. Values must
    be finite and positive; all ones is the identity (the plain sampler).
    """

    c_x: tuple[float, ...]
    c_eps: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "c_x", _as_vector("c_x", self.c_x))
        object.__setattr__(self, "c_eps", _as_vector("c_eps", self.c_eps))
        if len(self.c_x) != len(self.c_eps):
            raise QSchedError(
                f"c_x has {len(self.c_x)} entries but c_eps has {len(self.c_eps)}; "
                "both need one entry per sampling step"
            )

    @property
    def num_steps(self) -> int:
        """Number of sampling steps these coefficients apply to."""
        return len(self.c_x)

    @property
    def is_identity(self) -> bool:
        """True when every coefficient is exactly 1 (the plain sampler)."""
        return all(v == 1.0 for v in self.c_x + self.c_eps)

    @classmethod
    def identity(cls, num_steps: int) -> QSchedCoefficients:
        """All ones: the uncorrected sampler."""
        ones = constant(1.0, num_steps)
        return cls(c_x=ones, c_eps=ones)

    @classmethod
    def from_ramps(
        cls,
        *,
        cx_start: float,
        ceps_start: float,
        num_steps: int,
        cx_end: float = 1.0,
        ceps_end: float = 1.0,
    ) -> QSchedCoefficients:
        """The paper's parametrisation: each vector ramps linearly from its start to its end (1.0)."""
        return cls(
            c_x=ramp(cx_start, cx_end, num_steps),
            c_eps=ramp(ceps_start, ceps_end, num_steps),
        )

    def check_steps(self, num_steps: int) -> None:
        """Raise if these coefficients are not for ``num_steps`` steps (no silent broadcasting)."""
        if num_steps != self.num_steps:
            raise QSchedError(
                f"the coefficients have {self.num_steps} steps but the sampler runs "
                f"{num_steps}; calibrate for {num_steps} steps or sample with "
                f"num_inference_steps={self.num_steps}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return {"c_x": list(self.c_x), "c_eps": list(self.c_eps)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QSchedCoefficients:
        """Inverse of :meth:`to_dict`, validating the values."""
        if not isinstance(data, dict) or set(data) != {"c_x", "c_eps"}:
            raise QSchedError(f"coefficients must be an object with keys c_x and c_eps, got {data!r}")
        return cls(c_x=data["c_x"], c_eps=data["c_eps"])
