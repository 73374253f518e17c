"""Studies in a storage: budgets, failures, settings checks, dead workers, two workers on one file."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest

from qsched.errors import QSchedError
from qsched.search import Evaluation, SearchSettings, StudyView, best_candidate, open_storage, open_study, run_worker
from qsched.search.study import (
    GRID_CHUNK,
    READY_ATTR,
    SETTINGS_ATTR,
    WORKER_ATTR,
    _enqueue_grid,
    settings_differences,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage")


def toy(params: dict[str, float]) -> Evaluation:
    return Evaluation(-(params["cx_start"] - 1.1) ** 2 - (params["ceps_start"] - 0.9) ** 2, {"tag": 1})


def start(tmp_path: Path, settings: SearchSettings, *, name: str = "s", resume: bool = False, stored=None):
    space = settings.space_for(2)
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    opened = open_study(storage, name=name, settings=stored or {"k": 1.0}, baseline=space.identity_params(), resume=resume)
    opened.study.sampler = settings.make_sampler(space, seed=0)
    return opened, space


def test_grid_runs_every_point_once_and_the_best_is_the_argmax(tmp_path: Path) -> None:
    settings = SearchSettings(strategy="grid", grid_points=3)
    opened, space = start(tmp_path, settings)
    report = run_worker(opened, space=space, evaluate=toy, budget=settings.budget(space), grid=settings.grid_params(space), progress=False)
    candidates = StudyView.of(opened.study).candidates()
    assert report.evaluated == 10 and [c.state for c in candidates] == ["COMPLETE"] * 10
    assert candidates[0].is_baseline and candidates[0].params == {"cx_start": 1.0, "ceps_start": 1.0}
    assert sorted((c.params["cx_start"], c.params["ceps_start"]) for c in candidates[1:]) == sorted(
        (x, y) for x in (0.8, 1.0, 1.2) for y in (0.8, 1.0, 1.2))
    assert best_candidate(candidates).params == {"cx_start": 1.2, "ceps_start": 0.8}


def test_the_grid_is_enqueued_a_chunk_at_a_time(tmp_path: Path) -> None:
    settings = SearchSettings(strategy="grid", grid_points=6)
    opened, space = start(tmp_path, settings)
    waiting = []

    def counting(params):
        waiting.append(len(opened.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))))
        return toy(params)

    report = run_worker(opened, space=space, evaluate=counting, budget=37, grid=settings.grid_params(space), progress=False)
    assert report.evaluated == 37 and max(waiting) == GRID_CHUNK - 1
    points = [(c.params["cx_start"], c.params["ceps_start"]) for c in StudyView.of(opened.study).candidates()[1:]]
    assert points == [(p["cx_start"], p["ceps_start"]) for p in settings.grid_params(space)]  # in grid order


def test_grid_points_enqueued_twice_by_racing_workers_run_once(tmp_path: Path) -> None:
    settings = SearchSettings(strategy="grid", grid_points=3)
    opened, space = start(tmp_path, settings)
    grid = settings.grid_params(space)
    _enqueue_grid(opened.study, grid, 0)  # two workers that found the queue empty at the same moment
    _enqueue_grid(opened.study, grid, 0)
    report = run_worker(opened, space=space, evaluate=toy, budget=10, grid=grid, progress=False)
    assert report.evaluated == 10 and report.surplus == 8
    candidates = StudyView.of(opened.study).candidates()
    assert len(candidates) == 10 and all(c.state == "COMPLETE" for c in candidates)
    assert len({(c.params["cx_start"], c.params["ceps_start"]) for c in candidates[1:]}) == 9


def test_a_study_of_the_earlier_layout_is_refused_on_resume(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    old = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    old.set_user_attr(SETTINGS_ATTR, {"k": 1.0})  # written before grids were enqueued lazily
    old.set_user_attr(READY_ATTR, True)
    with pytest.raises(QSchedError, match=r"settings differ.*study_format: stored '\(absent\)', given 2"):
        open_study(storage, name="s", settings={"k": 1.0}, baseline={"cx_start": 1.0}, resume=True)


@pytest.mark.parametrize("strategy", ["tpe", "cmaes", "random"])
def test_samplers_stop_at_the_budget_with_the_baseline_first(tmp_path: Path, strategy: str) -> None:
    settings = SearchSettings(strategy=strategy, trials=6)
    opened, space = start(tmp_path, settings)
    run_worker(opened, space=space, evaluate=toy, budget=6, progress=False)
    candidates = StudyView.of(opened.study).candidates()
    assert len(candidates) == 6 and candidates[0].is_baseline
    assert all(0.8 <= v <= 1.2 for c in candidates for v in c.params.values())


def test_a_failing_candidate_is_failed_with_its_error_never_scored(tmp_path: Path) -> None:
    def flaky(params):
        if params["cx_start"] == 0.8:
            raise RuntimeError("scorer exploded")
        return toy(params)

    settings = SearchSettings(strategy="grid", grid_points=3)
    opened, space = start(tmp_path, settings)
    report = run_worker(opened, space=space, evaluate=flaky, budget=10, grid=settings.grid_params(space), progress=False)
    failed = [c for c in StudyView.of(opened.study).candidates() if c.state == "FAIL"]
    assert report.failed == 3 and len(failed) == 3
    assert all(c.value is None and c.error == "RuntimeError: scorer exploded" for c in failed)


def test_existing_study_needs_resume_and_equal_settings(tmp_path: Path) -> None:
    settings = SearchSettings(strategy="grid", grid_points=2)
    start(tmp_path, settings, stored={"k": 1.0, "jaq": {"alignment": "clip"}})
    with pytest.raises(QSchedError, match="already exists.*pass --resume"):
        start(tmp_path, settings, stored={"k": 1.0, "jaq": {"alignment": "clip"}})
    with pytest.raises(QSchedError, match=r"settings differ.*jaq\.alignment: stored 'clip', given 'hps'; k: stored 1\.0, given 0\.5"):
        start(tmp_path, settings, resume=True, stored={"k": 0.5, "jaq": {"alignment": "hps"}})
    opened, _ = start(tmp_path, settings, resume=True, stored={"k": 1, "jaq": {"alignment": "clip"}})
    assert not opened.created
    assert settings_differences({"a": [1.0, 2]}, {"a": [1, 2.0]}) == []


def test_a_trial_left_running_by_a_dead_local_worker_is_rerun_once(tmp_path: Path) -> None:
    settings = SearchSettings(strategy="grid", grid_points=2)
    opened, space = start(tmp_path, settings)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = opened.study.ask()  # pops the baseline, as a worker would before dying
    orphan.set_user_attr(WORKER_ATTR, {"host": __import__("socket").gethostname(), "pid": dead.pid, "token": "x"})
    space.suggest(orphan)
    report = run_worker(opened, space=space, evaluate=toy, budget=5, grid=settings.grid_params(space), progress=False)
    candidates = StudyView.of(opened.study).candidates()
    assert report.reaped == [orphan.number]
    died = candidates[0]
    assert died.state == "FAIL" and died.retried_as is not None and "died" in died.error
    complete = [c for c in candidates if c.state == "COMPLETE"]
    assert len(complete) == 5 and sum(c.is_baseline for c in complete) == 1
    assert next(c for c in complete if c.is_baseline).retry_of == orphan.number


def test_bad_storage_urls_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(QSchedError, match="cannot open storage sqlite:////nonexistent-dir/x.db"):
        open_storage("sqlite:////nonexistent-dir/x.db")
    with pytest.raises(QSchedError, match="not a database URL"):
        open_storage(str(tmp_path / "study.db"))
    with pytest.raises(QSchedError, match=r"cannot open storage bogus://x"):
        open_storage("bogus://x")


WORKER = textwrap.dedent('''
    import sys, time, optuna
    from qsched.search import Evaluation, SearchSettings, open_storage, open_study, run_worker
    from qsched.search.samplers import worker_seed
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url, strategy = sys.argv[1], sys.argv[2]
    settings = SearchSettings(strategy=strategy, trials=None if strategy == "grid" else 14, grid_points=3)
    space = settings.space_for(2)
    opened = open_study(open_storage(url), name="shared", settings={"x": 1}, baseline=space.identity_params(), resume=True)
    import os
    opened.study.sampler = settings.make_sampler(space, seed=worker_seed(0, os.getpid()))
    def slow(p):
        time.sleep(0.15)
        return Evaluation(-(p["cx_start"] - 1.1) ** 2, {"pid": os.getpid()})
    report = run_worker(opened, space=space, evaluate=slow, budget=settings.budget(space), grid=settings.grid_params(space), progress=False, poll_interval=0.2)
    print(report.evaluated)
''')


@pytest.mark.parametrize("strategy, budget", [("grid", 10), ("tpe", 14)])
def test_two_workers_share_one_sqlite_study_without_losing_or_repeating(tmp_path: Path, strategy: str, budget: int) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    workers = [subprocess.Popen([sys.executable, str(script), url, strategy], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    evaluated = [int(w.communicate(timeout=120)[0].strip().splitlines()[-1]) for w in workers]
    assert all(w.returncode == 0 for w in workers)
    study = optuna.load_study(study_name="shared", storage=url)
    candidates = StudyView.of(study).candidates()
    complete = [c for c in candidates if c.state == "COMPLETE"]
    assert len(candidates) == len(complete) == budget == sum(evaluated)  # none lost, none counted twice
    assert min(evaluated) >= 1  # both workers took part
    assert len({c.number for c in complete}) == budget and sum(c.is_baseline for c in complete) == 1
    if strategy == "grid":
        assert len({(c.role, c.params["cx_start"], c.params["ceps_start"]) for c in complete}) == budget
