"""Search spaces and strategies: parameters to coefficients, grids, budgets, validation."""

from __future__ import annotations

import pytest

from qsched.errors import QSchedError
from qsched.schedule import QSchedCoefficients
from qsched.search import SearchSettings, SearchSpace


def test_ramp_is_the_papers_parametrisation() -> None:
    space = SearchSpace("ramp", 3)
    assert space.param_names == ("cx_start", "ceps_start")
    c = space.coefficients({"cx_start": 1.2, "ceps_start": 0.8})
    assert c == QSchedCoefficients.from_ramps(cx_start=1.2, ceps_start=0.8, num_steps=3)
    assert c.c_x == pytest.approx((1.2, 1.1, 1.0)) and c.c_eps == pytest.approx((0.8, 0.9, 1.0))
    assert space.coefficients(space.identity_params()).is_identity


def test_ramp_end_and_per_step_spaces() -> None:
    c = SearchSpace("ramp-end", 3).coefficients({"cx_start": 1.2, "ceps_start": 0.8, "cx_end": 1.0, "ceps_end": 1.1})
    assert c.c_eps == pytest.approx((0.8, 0.95, 1.1))
    per = SearchSpace("per-step", 2)
    assert per.param_names == ("c_x_0", "c_x_1", "c_eps_0", "c_eps_1") and per.plane == ("c_x_0", "c_eps_0")
    c = per.coefficients({"c_x_0": 1.1, "c_x_1": 0.9, "c_eps_0": 1.0, "c_eps_1": 0.95})
    assert (c.c_x, c.c_eps) == ((1.1, 0.9), (1.0, 0.95))
    with pytest.raises(QSchedError, match="missing"):
        per.coefficients({"c_x_0": 1.0})


def test_grid_includes_both_bounds() -> None:
    assert SearchSpace("ramp", 4).grid(5)["cx_start"] == pytest.approx([0.8, 0.9, 1.0, 1.1, 1.2])
    assert SearchSpace("ramp", 4, 0.9, 1.1).grid(2)["ceps_start"] == [0.9, 1.1]


@pytest.mark.parametrize("low, high, message", [
    (1.2, 0.8, "need low < high"),
    (1.0, 1.0, "need low < high"),
    (-0.5, 1.2, "finite positive"),
    (0.0, 1.2, "finite positive"),
    (1.05, 1.2, "must contain 1.0"),
])
def test_bad_bounds_are_refused(low, high, message) -> None:
    with pytest.raises(QSchedError, match=message):
        SearchSettings(low=low, high=high)


def test_grid_has_exactly_n_squared_points_and_the_baseline_counts_in_the_budget() -> None:
    settings = SearchSettings(strategy="grid", grid_points=4)
    space = settings.space_for(4)
    grid = settings.grid_params(space)
    assert settings.budget(space) == 17 and len(grid) == 16
    assert len({tuple(p.values()) for p in grid}) == 16
    assert space.identity_params() == {"cx_start": 1.0, "ceps_start": 1.0}
    assert SearchSettings(strategy="tpe").grid_params(space) is None


@pytest.mark.parametrize("kwargs, message", [
    ({"strategy": "anneal"}, "unknown search strategy 'anneal'; allowed: grid, tpe, cmaes, random"),
    ({"space": "spline"}, "unknown search space 'spline'; allowed: ramp, ramp-end, per-step"),
    ({"strategy": "tpe", "trials": 0}, "trials must be a positive integer"),
    ({"strategy": "grid", "trials": 10}, "--trials does not apply to the grid"),
    ({"grid_points": 1}, "grid points per axis must be an integer >= 2"),
])
def test_bad_search_settings_are_refused(kwargs, message) -> None:
    with pytest.raises(QSchedError, match=message):
        SearchSettings(**kwargs)


def test_oversized_grids_are_refused_with_the_count() -> None:
    with pytest.raises(QSchedError, match="has 43,046,721 points"):
        SearchSettings(space="per-step", grid_points=9).space_for(4)


@pytest.mark.parametrize("strategy", ["tpe", "cmaes", "random", "grid"])
def test_every_strategy_makes_a_sampler(strategy) -> None:
    settings = SearchSettings(strategy=strategy, trials=None if strategy == "grid" else 5)
    assert settings.make_sampler(settings.space_for(2), seed=0) is not None


def test_sampler_seed_defaults_to_the_seed_and_has_one_spelling() -> None:
    assert SearchSettings(seed=3).proposal_seed == 3
    assert SearchSettings(seed=3, sampler_seed=7).proposal_seed == 7
    assert SearchSettings(seed=3, sampler_seed=3) == SearchSettings(seed=3)  # the stored settings match on resume
    assert "sampler_seed" not in SearchSettings(seed=3).to_dict()
    assert SearchSettings(sampler_seed=7).to_dict()["sampler_seed"] == 7
    with pytest.raises(QSchedError, match="sampler seed must be a non-negative integer, got -1"):
        SearchSettings(sampler_seed=-1)

