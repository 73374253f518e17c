"""Search strategies: which optuna sampler proposes candidates, and how many candidates to run.

* ``grid``: the paper's procedure, ``grid_points`` values per parameter (bounds
  included), every combination once, in a fixed order. Workers enqueue the points
  a few at a time as the queue runs dry (see :mod:`qsched.search.study`), so a
  2,500-point grid costs no more per candidate than a 25-point one, and any
  number of workers share it (no point is run twice, none lost).
* ``tpe``, ``cmaes``, ``random``: optuna's TPE, CMA-ES (needs ``cmaes``) and random
  samplers, for ``trials`` candidates in total.

The uncorrected sampler (all ones) is always candidate 0, the baseline, and
counts towards ``trials``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from qsched.errors import QSchedError
from qsched.search.space import DEFAULT_BOUNDS, SPACES, SearchSpace

STRATEGIES: tuple[str, ...] = ("grid", "tpe", "cmaes", "random")
DEFAULT_TRIALS = 30
DEFAULT_GRID_POINTS = 5
#: Largest grid qsched runs (a 50x50 ramp grid, the reference code's, is 2,500).
MAX_GRID = 10_000


@dataclass(frozen=True)
class SearchSettings:
    """How to search: strategy, space and bounds, candidate budget, grid size, seeds.

    ``seed`` fixes the calibration noise (image ``i`` gets ``(seed, i)``) and, unless
    ``sampler_seed`` is given, the sampler's randomness too. ``sampler_seed`` repeats a
    tpe/cmaes/random search with other proposals on the same noise, so its JAQ values
    compare with another run's (equal to ``seed`` it is the same as None).
    """

    strategy: str = "grid"
    space: str = "ramp"
    low: float = DEFAULT_BOUNDS[0]
    high: float = DEFAULT_BOUNDS[1]
    trials: int | None = None
    grid_points: int = DEFAULT_GRID_POINTS
    seed: int = 0
    sampler_seed: int | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise QSchedError(f"unknown search strategy {self.strategy!r}; allowed: {', '.join(STRATEGIES)}")
        if self.space not in SPACES:
            raise QSchedError(f"unknown search space {self.space!r}; allowed: {', '.join(SPACES)}")
        SearchSpace(self.space, 1, self.low, self.high)  # validates the bounds
        object.__setattr__(self, "low", float(self.low))
        object.__setattr__(self, "high", float(self.high))
        if self.trials is not None and (isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1):
            raise QSchedError(f"trials must be a positive integer (the baseline counts as one), got {self.trials!r}")
        if isinstance(self.grid_points, bool) or not isinstance(self.grid_points, int) or self.grid_points < 2:
            raise QSchedError(f"grid points per axis must be an integer >= 2, got {self.grid_points!r}")
        if self.strategy == "grid" and self.trials is not None:
            raise QSchedError(
                "--trials does not apply to the grid search: it runs grid_points ** parameters points "
                "plus the baseline; choose the grid size with --grid-points, or use tpe/cmaes/random"
            )
        for name in ("seed", "sampler_seed"):
            value = getattr(self, name)
            if value is None and name == "sampler_seed":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise QSchedError(f"{name.replace('_', ' ')} must be a non-negative integer, got {value!r}")
        if self.sampler_seed == self.seed:
            object.__setattr__(self, "sampler_seed", None)  # one spelling per search, for the settings check

    @property
    def proposal_seed(self) -> int:
        """The seed of the sampler's proposals: ``sampler_seed``, else ``seed``."""
        return self.seed if self.sampler_seed is None else self.sampler_seed

    def space_for(self, num_steps: int) -> SearchSpace:
        """The search space for a sampler of ``num_steps`` steps (checks the grid size)."""
        space = SearchSpace(self.space, num_steps, self.low, self.high)
        if self.strategy == "grid" and space.grid_size(self.grid_points) > MAX_GRID:
            raise QSchedError(
                f"a {self.grid_points}-point grid over the {len(space.param_names)} parameters of space "
                f"{self.space!r} has {space.grid_size(self.grid_points):,} points (limit {MAX_GRID:,}); "
                "use fewer --grid-points, the ramp space, or --search tpe/cmaes"
            )
        return space

    def budget(self, space: SearchSpace) -> int:
        """Candidates in total, the baseline included."""
        if self.strategy == "grid":
            return space.grid_size(self.grid_points) + 1
        return DEFAULT_TRIALS if self.trials is None else self.trials

    def grid_params(self, space: SearchSpace) -> list[dict[str, float]] | None:
        """Every point of the grid in a fixed order (the grid strategy), or None (sampler strategies)."""
        if self.strategy != "grid":
            return None
        grid = space.grid(self.grid_points)
        names = list(space.param_names)
        return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]

    def make_sampler(self, space: SearchSpace, *, seed: int) -> Any:
        """A fresh optuna sampler for this strategy."""
        import optuna

        if self.strategy == "grid":
            return _QueuedGridSampler(space.grid(self.grid_points), seed=seed)
        if self.strategy == "tpe":
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(1, self.budget(space) // 3)))
        if self.strategy == "cmaes":
            try:
                import cmaes  # noqa: F401
            except ImportError:
                raise QSchedError("--search cmaes needs the cmaes package (pip install cmaes)") from None
            # CMA-ES starts at the centre of the box with sigma = range / 6 (optuna's defaults).
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
        return optuna.samplers.RandomSampler(seed=seed)

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "space": self.space, "low": self.low, "high": self.high,
                "trials": self.trials, "grid_points": self.grid_points if self.strategy == "grid" else None,
                "seed": self.seed, **({"sampler_seed": self.sampler_seed} if self.sampler_seed is not None else {})}


def worker_seed(seed: int, *salt: int) -> int:
    """A sampler seed from the run's seed and a per-worker salt (0 for the worker that created the study)."""
    return int(np.random.SeedSequence([seed, *salt]).generate_state(1)[0])


def _make_queued_grid_sampler() -> type:
    import optuna

    class QueuedGridSampler(optuna.samplers.GridSampler):
        """optuna's GridSampler for a study whose grid points qsched enqueues itself.

        Its own bookkeeping (which grid points are left, ``study.stop()`` when none are)
        is for ``study.optimize``; qsched tracks the grid itself, so ``after_trial`` does nothing.
        """

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            return None

    return QueuedGridSampler


def _QueuedGridSampler(search_space: dict[str, list[float]], *, seed: int) -> Any:
    return _make_queued_grid_sampler()(search_space, seed=seed)
