"""Heartbeats and the reaper: a dead worker's trials are failed and their candidates released.

Optuna's own heartbeat runs only inside ``Study.optimize``; evoprune drives trials by
ask/tell, so each worker runs a :class:`Heartbeat` thread that, every
``interval`` seconds, refreshes the worker's row and writes Optuna's
``trial_heartbeats`` row of every RUNNING trial it owns.

:func:`reap` (run when a search, resume or worker starts, and between
generations) then decides who is dead:

* a worker on this host whose process is gone (or a zombie) -- immediately;
* a worker anywhere whose heartbeat is older than ``grace_period`` seconds;
* a RUNNING trial whose Optuna heartbeat is older than ``grace_period``;
* a RUNNING trial that no worker ever recorded (it was asked, then its process
  died before recording a candidate), once no other worker is alive; likewise a
  WAITING trial tagged by the search driver (evoprune 0.1 enqueued fixed params
  and asked for them; the driver now creates its trials RUNNING in one call).

Their trials become FAIL (Optuna state, with the system attribute
``evoprune:fail_reason``) and their claims are released, so the candidates are
claimed and evaluated again -- retried, not lost.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from .._logging import get_logger
from ._database import StudyDatabase, _naive
from ._schema import TrialRow

__all__ = ["Heartbeat", "ReapReport", "reap"]

_log = get_logger("storage.liveness")

FAIL_REASON_ATTR = "evoprune:fail_reason"
SOURCE_ATTR = "evoprune:source"  # set by the search driver on the trials it creates


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

    def beat(self) -> list[int]:
        """One heartbeat now; returns the trial ids it refreshed."""
        trial_ids = self.db.beat()
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
    import optuna
    from optuna.trial import TrialState

    om = db._om
    tm, hb = om.TrialModel, om.TrialHeartbeatModel
    report = ReapReport()
    dead = set(db.dead_workers(grace_period))
    others_alive = bool(db.live_workers(grace_period))

    def running(conn: sa.Connection) -> tuple[Any, list[Any]]:
        now = conn.execute(sa.select(sa.func.now())).scalar()
        rows = conn.execute(
            sa.select(tm.trial_id, tm.number, TrialRow.owner, hb.heartbeat)
            .outerjoin(TrialRow, TrialRow.trial_id == tm.trial_id)
            .outerjoin(hb, hb.trial_id == tm.trial_id)
            .where(tm.study_id == db.optuna_study_id, tm.state == TrialState.RUNNING)
        ).all()
        return now, rows

    now, rows = db._read(running)
    now = _naive(now)
    to_fail: list[tuple[int, int, str]] = []
    for r in rows:
        if r.owner == db.owner.name:
            continue
        if r.owner is not None and r.owner in dead:
            to_fail.append((r.trial_id, r.number, f"worker {r.owner} died"))
        elif r.heartbeat is not None and (now - _naive(r.heartbeat)).total_seconds() > grace_period:
            to_fail.append((r.trial_id, r.number, f"no heartbeat for more than {grace_period:g} s"))
        elif r.owner is None and not others_alive:
            to_fail.append((r.trial_id, r.number, "orphaned: asked by a process that is gone"))
    if not others_alive:
        # Enqueued by an older search driver (tagged evoprune:source) and never asked: the process
        # died between enqueue and ask. The next ask of an Optuna sampler would pop it.
        ua = om.TrialUserAttributeModel

        def waiting(conn: sa.Connection) -> list[Any]:
            return conn.execute(
                sa.select(tm.trial_id, tm.number)
                .join(ua, ua.trial_id == tm.trial_id)
                .where(tm.study_id == db.optuna_study_id, tm.state == TrialState.WAITING,
                       ua.key == SOURCE_ATTR)
            ).all()

        for r in db._read(waiting):
            to_fail.append((r.trial_id, r.number, "enqueued by a process that is gone, never started"))
    for trial_id, number, reason in to_fail:
        try:
            # Optuna refuses attributes on finished trials, so the reason goes first.
            storage.set_trial_system_attr(trial_id, FAIL_REASON_ATTR, reason)
            if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                report.failed_trials.append(number)
                _log.warning("failed stale trial %d: %s", number, reason, extra={"fields": {"study": db.study_name}})
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # finished or failed by someone else meanwhile
    db.mark_workers_dead(dead, "presumed dead (no heartbeat or process gone)")
    report.dead_workers = sorted(dead)
    report.released_claims = db.release_claims_of_failed_trials() + db.release_claims_of(dead)
    return report
