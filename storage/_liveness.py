"""Who is alive: worker rows, heartbeats and the reaper that fails a dead worker's trials.

Optuna's own heartbeat runs only inside ``Study.optimize``; evoprune drives trials by
ask/tell, so each worker registers a row in ``evoprune_workers`` and runs a :class:`Heartbeat`
thread that, every ``interval`` seconds, refreshes that row and writes Optuna's
``trial_heartbeats`` row of every RUNNING trial it owns.

:func:`reap` (run when a search, resume or worker starts, and between
generations) then decides who is dead:

* a worker on this host whose process is gone (or a zombie) -- immediately
  (:class:`~evoprune.storage._owner.Owner` tells);
* a worker anywhere whose heartbeat is older than ``grace_period`` seconds;
* a RUNNING trial whose Optuna heartbeat is older than ``grace_period``;
* a RUNNING trial whose candidate was never recorded (it was created, then its process died
  before recording one): by its creator (the ``evoprune:creator`` system attribute written with
  the trial) when that worker is dead; a trial without a known creator (created by another
  Optuna client) once no other worker is alive and it is older than ``grace_period``.

A trial that this process or a live worker created is never failed, recorded or not.

Their trials become FAIL (Optuna state, with the system attribute
``evoprune:fail_reason``) and their claims are released, so the candidates are
claimed and evaluated again -- retried, not lost. All ages are measured on the database's
clock, so workers on machines whose clocks disagree judge each other alike.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import orm

from .._logging import get_logger
from .._optuna_private import rdb_models, trial_start_column
from ._owner import Owner
from ._scope import StudyScope
from ._tables import TrialRow, WorkerRow
from ._values import CREATOR_ATTR, FAIL_REASON_ATTR, naive

if TYPE_CHECKING:
    from ._database import StudyDatabase

__all__ = ["Heartbeat", "ReapReport", "RunningTrial", "WorkersMixin", "reap", "stop_own"]

_log = get_logger("storage.liveness")

#: ``stop_reason`` of a worker the reaper found dead (its heartbeat row beating again revives it)
PRESUMED_DEAD = "presumed dead"
#: ``stop_reason`` that ``delete-study --force`` writes into the rows of live workers: they stop
DELETING_REASON = "stopping: the study is being deleted (delete-study --force)"


@dataclasses.dataclass(frozen=True)
class RunningTrial:
    """A RUNNING trial of the study, as the reaper sees it."""

    trial_id: int
    number: int
    owner: str | None  # the worker that recorded its candidate; None: nobody did
    heartbeat_age: float | None  # seconds since its last Optuna heartbeat (database clock); None: never beat
    creator: str | None = None  # the worker that created the trial (CREATOR_ATTR); None: not stamped
    age: float | None = None  # seconds since the trial started (its creator's clock, as Optuna stores it)


class WorkersMixin(StudyScope):
    """The worker and heartbeat methods of :class:`~evoprune.storage.StudyDatabase`."""

    def register_worker(self, *, command: str = "") -> None:
        """Record this process as working on the study (its heartbeat row)."""
        o = self.owner

        def run(conn: sa.Connection) -> None:
            exists = conn.execute(sa.select(WorkerRow.id).where(WorkerRow.owner == o.name)).first()
            if exists is None:
                conn.execute(
                    sa.insert(WorkerRow).values(
                        study_id=self.study_id, owner=o.name, host=o.host[:255], pid=o.pid,
                        proc_start=o.proc_start, command=command[:64],
                    )
                )
            else:
                conn.execute(
                    sa.update(WorkerRow).where(WorkerRow.owner == o.name)
                    .values(last_seen=sa.func.now(), stopped_at=None, stop_reason=None)
                )

        self._tx(run)

    def beat(self) -> list[int]:
        """Heartbeat: refresh this worker's ``last_seen`` and return the ids of the RUNNING trials it owns."""
        from optuna.trial import TrialState

        tm = rdb_models().TrialModel

        def run(conn: sa.Connection) -> list[int]:
            me = conn.execute(sa.select(WorkerRow.stopped_at, WorkerRow.stop_reason)
                              .where(WorkerRow.owner == self.owner.name)).first()
            values: dict[str, Any] = {"last_seen": sa.func.now()}
            revived = me is not None and me.stopped_at is not None and (me.stop_reason or "").startswith(PRESUMED_DEAD)
            if revived:  # a stall past the grace period: another worker presumed it dead; it lives again
                values.update(stopped_at=None, stop_reason=None)
            conn.execute(sa.update(WorkerRow).where(WorkerRow.owner == self.owner.name).values(**values))
            # its row gone (the study was deleted) or marked by `delete-study --force`: stop at the next safe point
            self.deleting = (me.stop_reason == DELETING_REASON) if me is not None else getattr(self, "_had_row", False)
            self._had_row = me is not None or getattr(self, "_had_row", False)
            self.revived = revived
            rows = conn.execute(
                sa.select(TrialRow.trial_id)
                .join(tm, tm.trial_id == TrialRow.trial_id)
                .where(TrialRow.owner == self.owner.name, tm.state == TrialState.RUNNING)
            ).all()
            return [int(r.trial_id) for r in rows]

        return self._tx(run)

    def stop_worker(self, reason: str = "finished") -> None:
        """Mark this process' worker row stopped (it no longer counts as alive or dead) and release
        its claims that have no trial yet (a stopped worker holds nothing; the attempt is given back)."""
        self.mark_workers_dead([self.owner.name], reason)
        self.release_claims_of([self.owner.name])

    def mark_workers_dead(self, owners: Iterable[str], reason: str) -> None:
        """Mark the rows of ``owners`` stopped with ``reason`` (rows already stopped keep theirs)."""
        owners = list(owners)
        if owners:
            self._tx(
                lambda c: c.execute(
                    sa.update(WorkerRow)
                    .where(WorkerRow.owner.in_(owners), WorkerRow.stopped_at.is_(None))
                    .values(stopped_at=sa.func.now(), stop_reason=reason[:255])
                )
            )

    def workers(self) -> list[dict[str, Any]]:
        """All workers of the study: their rows, plus ``db_now`` (the database clock when read)."""

        def run(conn: sa.Connection) -> tuple[Any, list[Any]]:
            now = conn.execute(sa.select(sa.func.now())).scalar()
            rows = conn.execute(sa.select(WorkerRow.__table__).where(WorkerRow.study_id == self.study_id)).all()
            return now, [dict(r._mapping) for r in rows]

        now, rows = self._tx(run)
        for r in rows:
            r["db_now"] = now
        return rows

    def worker_liveness(self, grace_period: float, rows: list[dict[str, Any]] | None = None
                        ) -> list[tuple[str, bool]]:
        """``(owner, alive)`` of every other worker not stopped: a local one is alive while its process
        is; a remote one while its heartbeat is at most ``grace_period`` seconds old (``rows``: the
        :meth:`workers` already read)."""
        out = []
        for w in self.workers() if rows is None else rows:
            if w["stopped_at"] is not None or w["owner"] == self.owner.name:
                continue
            alive = Owner(host=w["host"], pid=w["pid"], proc_start=w["proc_start"], token="").is_alive()
            if alive is None:
                alive = (naive(w["db_now"]) - naive(w["last_seen"])).total_seconds() <= grace_period
            out.append((w["owner"], alive))
        return out

    def dead_workers(self, grace_period: float) -> list[str]:
        """Other workers (not stopped) that are dead: gone on this host, or silent for ``grace_period`` s."""
        return [owner for owner, alive in self.worker_liveness(grace_period) if not alive]

    def stopped_workers(self, rows: list[dict[str, Any]] | None = None) -> set[str]:
        """Workers of the study whose row says they stopped (finished, interrupted, crashed or presumed
        dead); this process never counts (``rows``: the :meth:`workers` already read)."""
        return {w["owner"] for w in (self.workers() if rows is None else rows)
                if w["stopped_at"] is not None and w["owner"] != self.owner.name}

    def live_workers(self, grace_period: float) -> list[str]:
        """Other workers (not stopped) that are alive."""
        return [owner for owner, alive in self.worker_liveness(grace_period) if alive]

    def running_trials(self) -> list[RunningTrial]:
        """Every RUNNING trial of the study with its worker and the age of its Optuna heartbeat."""
        from optuna.trial import TrialState

        om = rdb_models()
        tm, hb, sa_ = om.TrialModel, om.TrialHeartbeatModel, om.TrialSystemAttributeModel
        creator = orm.aliased(sa_)
        started, started_utc = trial_start_column()

        def run(conn: sa.Connection) -> tuple[Any, list[Any]]:
            now = conn.execute(sa.select(sa.func.now())).scalar()
            rows = conn.execute(
                sa.select(tm.trial_id, tm.number, started.label("started"), TrialRow.owner, hb.heartbeat,
                          creator.value_json.label("creator"))
                .outerjoin(TrialRow, TrialRow.trial_id == tm.trial_id)
                .outerjoin(hb, hb.trial_id == tm.trial_id)
                .outerjoin(creator, sa.and_(creator.trial_id == tm.trial_id, creator.key == CREATOR_ATTR))
                .where(tm.study_id == self.optuna_study_id, tm.state == TrialState.RUNNING)
                .order_by(tm.number)
            ).all()
            return now, rows

        now, rows = self._tx(run)
        # datetime_start is stamped by the trial's creator's clock (UTC in Optuna 5)
        local_now = naive(datetime.datetime.now(datetime.timezone.utc)) if started_utc else datetime.datetime.now()
        out = []
        for r in rows:
            try:
                made_by = json.loads(r.creator) if r.creator is not None else None
            except ValueError:
                made_by = None
            out.append(RunningTrial(
                trial_id=int(r.trial_id), number=int(r.number), owner=r.owner,
                heartbeat_age=None if r.heartbeat is None else (naive(now) - naive(r.heartbeat)).total_seconds(),
                creator=made_by if isinstance(made_by, str) else None,
                age=None if r.started is None else (local_now - naive(r.started)).total_seconds(),
            ))
        return out


class Heartbeat:
    """A daemon thread that keeps this worker and its RUNNING trials alive in the database
    (and, with ``reap``/``reap_every``, periodically fails the trials of workers that died).

    >>> hb = Heartbeat(db, storage, interval=10)   # doctest: +SKIP
    >>> with hb:                                   # doctest: +SKIP
    ...     run_the_search()
    """

    def __init__(self, db: StudyDatabase, storage: Any, *, interval: float = 10.0,
                 reap: Callable[[], Any] | None = None, reap_every: float | None = None) -> None:
        if interval <= 0:
            raise ValueError(f"heartbeat interval must be > 0 seconds, got {interval!r}.")
        self.db = db
        self.storage = storage
        self.interval = float(interval)
        self.reap = reap
        self.reap_every = float(reap_every) if reap_every else None
        self._last_reap = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.beats = 0
        self.deleting = False

    def beat(self) -> list[int]:
        """One heartbeat now; returns the trial ids it refreshed."""
        trial_ids = self.db.beat()
        if getattr(self.db, "revived", False):
            _log.warning("this worker was presumed dead by another (it stalled longer than the grace period); "
                         "its trials then were failed and retried elsewhere, it goes on with new ones")
        if getattr(self.db, "deleting", False) and not self.deleting:
            self.deleting = True
            from .. import _stop

            _stop.abandon(f"study {self.db.study_name!r} was deleted (delete-study --force) while this worker ran; "
                          "it stopped")
        for tid in trial_ids:
            try:
                self.storage.record_heartbeat(tid)
            except Exception as exc:  # pragma: no cover - the trial finished meanwhile
                _log.debug("heartbeat of trial %s skipped: %s", tid, exc)
        self.beats += 1
        return trial_ids

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
                if self.reap is not None and self.reap_every and time.monotonic() - self._last_reap >= self.reap_every:
                    self._last_reap = time.monotonic()
                    self.reap()
            except Exception as exc:  # keep beating through transient database errors
                _log.warning("heartbeat failed: %s", exc)

    def start(self) -> Heartbeat:
        if self._thread is None:
            from .. import _stop

            _stop.clear_abandoned()  # a new run: an earlier run's deleted study is not this one's
            self.beat()
            self._thread = threading.Thread(target=self._run, name="evoprune-heartbeat", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
            self._thread = None

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@dataclasses.dataclass
class ReapReport:
    """What :func:`reap` did."""

    dead_workers: list[str] = dataclasses.field(default_factory=list)
    failed_trials: list[int] = dataclasses.field(default_factory=list)  # trial numbers
    released_claims: int = 0

    def __bool__(self) -> bool:
        return bool(self.dead_workers or self.failed_trials or self.released_claims)


def reap(db: StudyDatabase, storage: Any, *, grace_period: float) -> ReapReport:
    """Fail the RUNNING trials of dead workers and release their claims (see module docs)."""
    report = ReapReport()
    rows = db.workers()  # one read of the worker table for both views
    workers = db.worker_liveness(grace_period, rows)
    dead = {owner for owner, alive in workers if not alive}
    alive = {owner for owner, ok in workers if ok} | {db.owner.name}
    stopped = db.stopped_workers(rows)
    # a worker whose own row beats again (it woke from a stall) keeps its trials: their heartbeats follow
    fresh = {w["owner"] for w in rows if w["stopped_at"] is None
             and (naive(w["db_now"]) - naive(w["last_seen"])).total_seconds() <= grace_period}
    to_fail: list[tuple[int, int, str]] = []
    for t in db.running_trials():
        who = t.owner or t.creator
        if who == db.owner.name:
            continue
        if who is not None and who in dead:
            to_fail.append((t.trial_id, t.number, f"worker {who} died"))
        elif who is not None and who in stopped and (t.heartbeat_age is None or t.heartbeat_age > grace_period):
            to_fail.append((t.trial_id, t.number, f"worker {who} stopped without finishing it"))
        elif t.heartbeat_age is not None and t.heartbeat_age > grace_period and who not in fresh:
            to_fail.append((t.trial_id, t.number, f"no heartbeat for more than {grace_period:g} s"))
        elif who is None and alive == {db.owner.name} and (t.age is None or t.age > grace_period):
            to_fail.append((t.trial_id, t.number, "orphaned: asked by a process that is gone"))
    report.failed_trials = _fail_trials(storage, to_fail, db.study_name)
    db.mark_workers_dead(dead, f"{PRESUMED_DEAD} (no heartbeat or process gone)")
    report.dead_workers = sorted(dead)
    # a stopped worker (finished, interrupted or crashed) holds nothing: its claims without a trial go too
    report.released_claims = db.release_claims_of_failed_trials() + db.release_claims_of(dead | stopped)
    return report


def stop_own(db: StudyDatabase, storage: Any, reason: str) -> list[int]:
    """This process stops working on the study: fail the RUNNING trials it created or owns (an
    interrupted evaluation), release their claims and the ones it holds without a trial, mark its
    worker row stopped with ``reason``. Returns the numbers of the trials it failed."""
    mine = [(t.trial_id, t.number, f"its worker stopped: {reason}") for t in db.running_trials()
            if (t.owner or t.creator) == db.owner.name]
    failed = _fail_trials(storage, mine, db.study_name)
    db.release_claims_of_failed_trials()
    db.stop_worker(reason)
    return failed


def _fail_trials(storage: Any, to_fail: list[tuple[int, int, str]], study_name: str) -> list[int]:
    import optuna
    from optuna.trial import TrialState

    failed = []
    for trial_id, number, reason in to_fail:
        try:
            # Optuna refuses attributes on finished trials, so the reason goes first.
            storage.set_trial_system_attr(trial_id, FAIL_REASON_ATTR, reason)
            if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                failed.append(number)
                _log.warning("failed stale trial %d: %s", number, reason, extra={"fields": {"study": study_name}})
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # finished or failed by someone else meanwhile
    return failed
