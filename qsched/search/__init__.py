"""Search over Q-Sched coefficients with optuna ask/tell, in a resumable, shareable storage.

* :mod:`qsched.search.space`: search spaces (``ramp``, ``ramp-end``, ``per-step``) mapping
  trial parameters to :class:`~qsched.schedule.QSchedCoefficients`;
* :mod:`qsched.search.samplers`: strategies (``grid``, ``tpe``, ``cmaes``, ``random``) and the
  candidate budget (:class:`SearchSettings`);
* :mod:`qsched.search.study`: storage, study creation/joining with a settings check, the worker
  loop (dead workers re-run, failures recorded), and the candidates of a study.
"""

from __future__ import annotations

from qsched.search.samplers import STRATEGIES, SearchSettings
from qsched.search.space import SPACES, SearchSpace
from qsched.search.study import (
    Candidate,
    Evaluation,
    OpenedStudy,
    StudyView,
    best_candidate,
    open_storage,
    open_study,
    run_worker,
)

__all__ = [
    "Candidate",
    "Evaluation",
    "OpenedStudy",
    "SPACES",
    "STRATEGIES",
    "SearchSettings",
    "SearchSpace",
    "StudyView",
    "best_candidate",
    "open_storage",
    "open_study",
    "run_worker",
]
