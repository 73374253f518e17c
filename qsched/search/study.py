"""Search state in an optuna storage: create or join a study, run candidates, survive dead workers.

The study lives in an optuna RDB storage (a SQLite file by default, or any
database URL), so a killed run resumes and several processes share one search:

* **Creation.** The process that creates the study enqueues the baseline, stores
  the run's settings as the study user attribute ``qsched.settings`` and marks it
  ready. A process that joins waits until it is ready, then refuses to continue
  if its settings differ, naming each difference.
* **Claiming work.** ``study.ask()`` pops a waiting (enqueued) trial atomically,
  so two workers never run the same enqueued trial. A *fresh* trial (asked from
  the sampler) is kept only if fewer than ``budget`` candidates precede it; one
  created beyond the budget by a race between workers is marked surplus and
  closed as PRUNED without being evaluated, so the study never holds more than
  ``budget`` candidates.
* **The grid** is enqueued lazily: a worker that finds the queue empty enqueues
  the next :data:`GRID_CHUNK` points after the highest grid index in the study
  (each trial records its index in ``qsched.grid_index``). Holding thousands of
  waiting trials would make every ``ask()`` scan them all (optuna reads
  unfinished trials from the database each time; finished ones are cached), so
  a 50x50 grid cost ~1.5 s of bookkeeping per candidate. Two workers that find the
  queue empty together enqueue the same points; of the trials of one grid index,
  the one first enqueued (its retries included) runs and the others are surplus.
* **Dead workers.** Each running trial records its worker (host, pid, a
  per-process token) and a heartbeat (optuna's RDB heartbeat). A trial whose
  worker process is gone from this host, or whose heartbeat is older than the
  grace period (another host), is failed and re-enqueued with the same
  parameters (``retry_history`` as optuna's ``RetryHeartbeatStaleTrialCallback``
  keeps it), so it is run again exactly once and no finished candidate repeats.
* **Failures.** A candidate whose evaluation raises is told FAIL with its error
  in the user attribute ``qsched.error``; it never gets a value.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from qsched.dburl import normalize_url, redact
from qsched.errors import QSchedError
from qsched.search.space import SearchSpace

SETTINGS_ATTR = "qsched.settings"
READY_ATTR = "qsched.ready"
ROLE_ATTR = "qsched.role"
WORKER_ATTR = "qsched.worker"
ERROR_ATTR = "qsched.error"
SURPLUS_ATTR = "qsched.surplus"
GRID_INDEX_ATTR = "qsched.grid_index"
#: Grid points a worker enqueues when it finds the queue empty.
GRID_CHUNK = 8
#: Stored with a study's settings: studies of an earlier layout (the whole grid enqueued
#: up front, no grid indices) are refused on --resume instead of running points twice.
STUDY_FORMAT = 2
#: A trial requeued this many times (its worker died each time) is left failed.
MAX_RETRIES = 3


# --- storage --------------------------------------------------------------------------


def open_storage(url: str, *, heartbeat_interval: int | None = 10, grace_period: int | None = 60) -> Any:
    """An optuna ``RDBStorage`` for ``url`` with heartbeats; an unusable URL is a :class:`QSchedError`."""
    import optuna
    import sqlalchemy.exc

    if not isinstance(url, str) or "://" not in url:
        raise QSchedError(
            f"storage {url!r} is not a database URL; use e.g. sqlite:///path/study.db or "
            "postgresql://user@host/db"
        )
    url = normalize_url(url)
    engine_kwargs: dict[str, Any] = {}
    sqlite = url.startswith("sqlite")
    if sqlite:
        # Several workers write one file: wait for the lock instead of failing at once, and
        # let _serialize_sqlite_transactions issue BEGIN (pysqlite's own BEGIN comes too late).
        engine_kwargs["connect_args"] = {"timeout": 120, "isolation_level": None}
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=requeue,
                )
            if sqlite:
                _serialize_sqlite_transactions(storage.engine)
            return storage
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError) as err:
            # Workers starting together on a new database race to create its tables (and
            # its schema version row); the loser succeeds on a second try.
            racing = isinstance(err, sqlalchemy.exc.IntegrityError) or "already exists" in str(err) or "locked" in str(err)
            if racing and attempt < 4:
                time.sleep(0.2 * (attempt + 1))
                continue
            raise QSchedError(f"cannot open storage {redact(url)}: {_first_line(err)}") from None
        except (sqlalchemy.exc.SQLAlchemyError, ValueError, ImportError, OSError) as err:
            raise QSchedError(f"cannot open storage {redact(url)}: {_first_line(err)}") from None
    raise AssertionError("unreachable")


def _serialize_sqlite_transactions(engine: Any) -> None:
    """Start every SQLite transaction with ``BEGIN IMMEDIATE`` (SQLAlchemy's documented pysqlite recipe).

    optuna claims a waiting trial by reading its state and updating it to RUNNING in
    one transaction, relying on ``SELECT ... FOR UPDATE``, which SQLite ignores; and
    pysqlite only begins a transaction at the first write, so two workers can both
    read WAITING and both claim the trial. Taking the write lock at BEGIN makes that
    read-and-claim atomic between processes.
    """
    import sqlalchemy

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --- study creation and settings ---------------------------------------------------------


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b": value}`` (lists kept as values)."""
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def settings_differences(stored: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """Human-readable differences ``name: stored X, given Y`` between two settings dicts."""
    a, b = flatten(stored), flatten(given)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if _normal(a.get(key)) != _normal(b.get(key)):
            diffs.append(f"{key}: stored {a.get(key, '(absent)')!r}, given {b.get(key, '(absent)')!r}")
    return diffs


def _normal(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


@dataclass
class OpenedStudy:
    """A study ready for workers, and whether this process created it."""

    study: Any
    storage: Any
    created: bool


def open_study(
    storage: Any,
    *,
    name: str,
    settings: Mapping[str, Any],
    baseline: Mapping[str, float],
    resume: bool,
    init_timeout: float = 60.0,
) -> OpenedStudy:
    """Create the study ``name`` (enqueueing the ``baseline`` parameters first) or join it.

    An existing study is joined only with ``resume``, and only when its stored
    settings (with :data:`STUDY_FORMAT`) equal ``settings``.
    """
    import optuna

    exists = name in optuna.get_all_study_names(storage)
    if exists and not resume:
        raise QSchedError(
            f"study {name!r} already exists in the storage; pass --resume to continue it (or to add a "
            "worker to it), or choose another --study / --out"
        )
    created = False
    if not exists:
        try:
            study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            if not resume:
                raise QSchedError(
                    f"study {name!r} was just created by another process; pass --resume to join it"
                ) from None
    settings = {**settings, "study_format": STUDY_FORMAT}
    if created:
        study.enqueue_trial(dict(baseline), user_attrs={ROLE_ATTR: "baseline"})
        study.set_user_attr(SETTINGS_ATTR, settings)
        study.set_user_attr(READY_ATTR, True)
        return OpenedStudy(study, storage, created=True)

    study = optuna.load_study(study_name=name, storage=storage)
    deadline = time.monotonic() + init_timeout
    while not study.user_attrs.get(READY_ATTR):
        if time.monotonic() > deadline:
            raise QSchedError(
                f"study {name!r} was never fully set up (the process creating it stopped early); "
                "choose another --study, or --overwrite the output folder"
            )
        time.sleep(0.5)
    diffs = settings_differences(study.user_attrs.get(SETTINGS_ATTR, {}), settings)
    if diffs:
        raise QSchedError(
            f"cannot --resume study {name!r}: its settings differ from this run's ({'; '.join(diffs)}); "
            "rerun with the stored settings, or start a new --study / --out"
        )
    return OpenedStudy(study, storage, created=False)


# --- dead workers --------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerIdentity:
    """Who runs a trial: host, process id and a token unique to this process."""

    host: str
    pid: int
    token: str

    @classmethod
    def current(cls) -> WorkerIdentity:
        return cls(socket.gethostname(), os.getpid(), _PROCESS_TOKEN)

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "token": self.token}

    def owns_dead(self, owner: Any) -> bool:
        """True if ``owner`` (a trial's worker attr) is a process of this host that no longer runs."""
        if not isinstance(owner, Mapping) or owner.get("host") != self.host:
            return False
        pid = owner.get("pid")
        if not isinstance(pid, int):
            return False
        if pid == self.pid:
            return owner.get("token") != self.token  # an earlier process that had our pid
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


_PROCESS_TOKEN = uuid.uuid4().hex


def requeue(study: Any, trial: Any) -> None:
    """Re-enqueue a failed ``trial`` with its parameters (unless retried :data:`MAX_RETRIES` times).

    Used as the storage's heartbeat-stale callback and for trials of dead local workers.
    """
    import optuna
    from optuna.trial import TrialState

    history = list(trial.system_attrs.get("retry_history", [])) + [trial.number]
    if len(history) > MAX_RETRIES:
        return
    system_attrs = dict(trial.system_attrs)
    system_attrs["failed_trial"] = trial.system_attrs.get("failed_trial", trial.number)
    system_attrs["retry_history"] = history
    user_attrs = {k: v for k, v in trial.user_attrs.items() if k in (ROLE_ATTR, GRID_INDEX_ATTR)}
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs=user_attrs,
            system_attrs=system_attrs,
        )
    )


def reap_dead(study: Any, storage: Any, worker: WorkerIdentity) -> list[int]:
    """Fail and re-enqueue trials left RUNNING by dead workers.

    Trials of other hosts go by optuna's heartbeat (stale after the storage's grace
    period); trials of this host whose process is gone are reaped at once. Returns
    the numbers of the trials reaped here by the second rule.
    """
    import optuna
    from optuna.trial import TrialState

    reaped = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # other hosts: heartbeat older than the grace period
    study_id = storage.get_study_id_from_name(study.study_name)
    grace = getattr(storage, "grace_period", None) or 2 * (getattr(storage, "heartbeat_interval", None) or 30)
    now = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(WORKER_ATTR)
        # A worker killed between ask() and recording itself leaves a trial with no owner
        # and no heartbeat: it is orphaned once it is older than the grace period.
        orphan = owner is None and t.datetime_start is not None and (now - t.datetime_start).total_seconds() > grace
        if not (orphan or worker.owns_dead(owner)):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        try:
            storage.set_trial_user_attr(trial_id, ERROR_ATTR, "its worker process died; re-enqueued")
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker reaped it first
        requeue(study, storage.get_trial(trial_id))
        reaped.append(t.number)
    return reaped


class _Heartbeat:
    """Records the heartbeat of one trial every ``interval`` seconds in a daemon thread."""

    def __init__(self, storage: Any, trial_id: int) -> None:
        interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
        self._storage, self._trial_id, self._interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _Heartbeat:
        if self._interval:
            self._storage.record_heartbeat(self._trial_id)
            self._thread = threading.Thread(target=self._run, daemon=True, name="qsched-heartbeat")
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._storage.record_heartbeat(self._trial_id)
            except Exception:  # noqa: BLE001 - a missed beat must not kill the worker; the next one retries
                continue

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# --- candidates ------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One candidate of a study (a trial that is not surplus)."""

    number: int
    state: str
    params: dict[str, float]
    value: float | None
    user_attrs: dict[str, Any]
    role: str
    retried_as: int | None = None
    retry_of: int | None = None

    @property
    def error(self) -> str | None:
        return self.user_attrs.get(ERROR_ATTR)

    @property
    def is_baseline(self) -> bool:
        return self.role == "baseline"


@dataclass
class StudyView:
    """Candidates of a study at one moment, with what the budget logic needs."""

    trials: list[Any]
    superseded: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for t in self.trials:
            for old in t.system_attrs.get("retry_history", []):
                self.superseded[int(old)] = t.number

    @classmethod
    def of(cls, study: Any) -> StudyView:
        return cls(list(study.get_trials(deepcopy=False)))

    def _counts(self, t: Any) -> bool:
        return t.number not in self.superseded and not t.user_attrs.get(SURPLUS_ATTR)

    def count(self) -> int:
        """Candidates claimed so far (any state), retried attempts and surplus trials excluded."""
        return sum(1 for t in self.trials if self._counts(t))

    def rank(self, number: int) -> int:
        """Non-superseded trials numbered below ``number`` (surplus ones included, see module doc)."""
        return sum(1 for t in self.trials if t.number < number and t.number not in self.superseded)

    def states(self, *names: str) -> list[Any]:
        return [t for t in self.trials if t.state.name in names and self._counts(t)]

    def next_grid_index(self) -> int:
        """One past the highest grid index enqueued so far (0 before any)."""
        indices = [t.user_attrs[GRID_INDEX_ATTR] for t in self.trials if GRID_INDEX_ATTR in t.user_attrs]
        return max(indices) + 1 if indices else 0

    def is_duplicate(self, trial: Any) -> bool:
        """True if another live trial of ``trial``'s grid index was enqueued before it (see module doc)."""
        index = trial.user_attrs.get(GRID_INDEX_ATTR)
        if index is None:
            return False
        return any(
            t.number != trial.number and t.user_attrs.get(GRID_INDEX_ATTR) == index and self._counts(t)
            and _root(t) < _root(trial)
            for t in self.trials
        )

    def finished(self) -> int:
        return len([t for t in self.states("COMPLETE", "FAIL")])

    def best_value(self) -> float | None:
        values = [t.value for t in self.states("COMPLETE") if t.value is not None]
        return max(values) if values else None

    def candidates(self) -> list[Candidate]:
        """Every trial but surplus ones, in number order (retried attempts included, marked)."""
        out = []
        for t in sorted(self.trials, key=lambda t: t.number):
            if t.user_attrs.get(SURPLUS_ATTR):
                continue
            history = t.system_attrs.get("retry_history", [])
            out.append(Candidate(
                number=t.number,
                state=t.state.name,
                params={k: float(v) for k, v in t.params.items()},
                value=None if t.value is None else float(t.value),
                user_attrs=dict(t.user_attrs),
                role=str(t.user_attrs.get(ROLE_ATTR, "search")),
                retried_as=self.superseded.get(t.number),
                retry_of=int(history[-1]) if history else None,
            ))
        return out


def _root(trial: Any) -> int:
    """The number of the trial a retried trial repeats (its own number otherwise)."""
    return int(trial.system_attrs.get("failed_trial", trial.number))


def best_candidate(candidates: Sequence[Candidate]) -> Candidate | None:
    """The COMPLETE candidate with the highest JAQ (the lowest number among ties: the baseline first)."""
    complete = [c for c in candidates if c.state == "COMPLETE" and c.value is not None and math.isfinite(c.value)]
    if not complete:
        return None
    return max(complete, key=lambda c: (c.value, -c.number))


# --- the worker loop ----------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """The result of one candidate: its JAQ and JSON-safe attributes to store on the trial."""

    value: float
    attrs: Mapping[str, Any]


@dataclass
class WorkerReport:
    """What this worker did."""

    evaluated: int = 0
    failed: int = 0
    reaped: list[int] = field(default_factory=list)
    surplus: int = 0


def run_worker(
    opened: OpenedStudy,
    *,
    space: SearchSpace,
    evaluate: Callable[[dict[str, float]], Evaluation],
    budget: int,
    grid: Sequence[Mapping[str, float]] | None = None,
    progress: bool = True,
    poll_interval: float = 1.0,
    description: str = "calibrate",
) -> WorkerReport:
    """Evaluate candidates until the study holds ``budget`` finished ones.

    With ``grid`` (the grid strategy) the candidates are its points, enqueued a
    chunk at a time; without it they are asked from the study's sampler. The
    worker waits for candidates other workers are running, so that when it
    returns the study is complete (or another worker died and its trial was re-run
    here).
    """
    import optuna
    from optuna.trial import TrialState
    from tqdm.auto import tqdm

    study, storage = opened.study, opened.storage
    worker = WorkerIdentity.current()
    study_id = storage.get_study_id_from_name(study.study_name)
    report = WorkerReport()
    bar = tqdm(total=budget, desc=description, unit="cand", disable=not progress, dynamic_ncols=True)
    try:
        while True:
            report.reaped += reap_dead(study, storage, worker)
            view = StudyView.of(study)
            _update_bar(bar, view)
            waiting = bool(view.states("WAITING"))
            if grid is not None and not waiting:
                start = view.next_grid_index()
                if start < len(grid):
                    _enqueue_grid(study, grid, start)
                    continue
            if waiting or (grid is None and view.count() < budget):
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Heartbeat of storage")
                    trial = study.ask()
                trial.set_user_attr(WORKER_ATTR, worker.to_dict())  # first, so a dead worker's trial is found
                trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
                frozen = storage.get_trial(trial_id)
                fresh = "fixed_params" not in frozen.system_attrs and "failed_trial" not in frozen.system_attrs
                view = StudyView.of(study)
                if view.is_duplicate(frozen) or (fresh and (grid is not None or view.rank(trial.number) >= budget)):
                    trial.set_user_attr(SURPLUS_ATTR, True)
                    study.tell(trial, state=TrialState.PRUNED)
                    report.surplus += 1
                    continue
                with _Heartbeat(storage, trial_id):
                    _run_trial(study, storage, trial, trial_id, space, evaluate, report)
            elif view.states("RUNNING"):
                time.sleep(poll_interval)  # others are running the last candidates; a dead one is re-run here
            else:
                break
        _update_bar(bar, StudyView.of(study))
    finally:
        bar.close()
    return report


def _enqueue_grid(study: Any, grid: Sequence[Mapping[str, float]], start: int) -> None:
    for index in range(start, min(start + GRID_CHUNK, len(grid))):
        study.enqueue_trial(dict(grid[index]), user_attrs={ROLE_ATTR: "grid", GRID_INDEX_ATTR: index})


def _run_trial(
    study: Any,
    storage: Any,
    trial: Any,
    trial_id: int,
    space: SearchSpace,
    evaluate: Callable[[dict[str, float]], Evaluation],
    report: WorkerReport,
) -> None:
    from optuna.trial import TrialState

    try:
        params = space.suggest(trial)
        result = evaluate(params)
        if not math.isfinite(result.value):
            raise QSchedError(f"the objective is {result.value} (not finite)")
    except (KeyboardInterrupt, SystemExit):
        trial.set_user_attr(ERROR_ATTR, "interrupted; re-enqueued")
        study.tell(trial, state=TrialState.FAIL)
        requeue(study, storage.get_trial(trial_id))
        raise
    except Exception as err:  # noqa: BLE001 - any failure fails this candidate, never scores it 0
        trial.set_user_attr(ERROR_ATTR, f"{type(err).__name__}: {err}")
        study.tell(trial, state=TrialState.FAIL)
        report.failed += 1
        return
    for key, value in result.attrs.items():
        trial.set_user_attr(key, value)
    study.tell(trial, result.value)
    report.evaluated += 1


def _update_bar(bar: Any, view: StudyView) -> None:
    done = view.finished()
    bar.n = min(done, bar.total) if bar.total else done
    best = view.best_value()
    bar.set_postfix_str("best JAQ " + ("-" if best is None else f"{best:.4f}"), refresh=False)
    bar.refresh()
