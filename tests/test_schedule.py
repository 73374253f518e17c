from __future__ import annotations

import math

import pytest

from qsched.errors import QSchedError
from qsched.schedule import QSchedCoefficients, constant, ramp


def test_ramp_endpoints_and_linearity():
    values = ramp(1.2, 1.0, 5)
    assert values == pytest.approx((1.2, 1.15, 1.1, 1.05, 1.0))
    assert values[-1] == 1.0  # exact end, no rounding drift
    assert ramp(0.9, 1.0, 1) == (0.9,)


def test_constant():
    assert constant(1.0, 3) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("steps", [0, -1, 2.0, True, "4"])
def test_bad_step_counts(steps):
    with pytest.raises(QSchedError, match="num_steps"):
        ramp(1.0, 1.0, steps)


def test_from_ramps_matches_paper_parametrisation():
    c = QSchedCoefficients.from_ramps(cx_start=1.1, ceps_start=0.8, num_steps=4)
    assert c.c_x == pytest.approx((1.1, 1.1 - 0.1 / 3, 1.1 - 0.2 / 3, 1.0))
    assert c.c_eps == pytest.approx((0.8, 0.8 + 0.2 / 3, 0.8 + 0.4 / 3, 1.0))
    assert c.num_steps == 4 and not c.is_identity


def test_identity():
    c = QSchedCoefficients.identity(3)
    assert c.is_identity and c.c_x == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, 0.0, -1.0])
def test_rejects_non_finite_or_non_positive(bad):
    with pytest.raises(QSchedError, match=r"c_eps\[1\]"):
        QSchedCoefficients(c_x=(1.0, 1.0), c_eps=(1.0, bad))


def test_rejects_mismatched_lengths_and_empty():
    with pytest.raises(QSchedError, match="c_x has 2 entries but c_eps has 3"):
        QSchedCoefficients(c_x=(1.0, 1.0), c_eps=(1.0, 1.0, 1.0))
    with pytest.raises(QSchedError, match="empty"):
        QSchedCoefficients(c_x=(), c_eps=())
    with pytest.raises(QSchedError, match="sequence of numbers"):
        QSchedCoefficients(c_x=("a",), c_eps=(1.0,))


def test_check_steps_never_broadcasts():
    c = QSchedCoefficients.identity(4)
    c.check_steps(4)
    with pytest.raises(QSchedError, match="4 steps but the sampler runs 2"):
        c.check_steps(2)


def test_values_are_frozen_tuples_and_round_trip():
    c = QSchedCoefficients(c_x=[1.1, 1.0], c_eps=[0.9, 1.0])
    assert isinstance(c.c_x, tuple)
    with pytest.raises(AttributeError):
        c.c_x = (1.0, 1.0)  # type: ignore[misc]
    assert QSchedCoefficients.from_dict(c.to_dict()) == c
    with pytest.raises(QSchedError, match="keys c_x and c_eps"):
        QSchedCoefficients.from_dict({"c_x": [1.0]})
