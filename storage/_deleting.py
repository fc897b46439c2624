"""Deleting a study that workers may still be running: refuse, or ask them to stop first.

``delete-study`` refuses while a worker of the study is alive (a process on this host that still
runs, or a remote one whose heartbeat is younger than the grace period) and names it. With
``force`` it writes :data:`~evoprune.storage._liveness.DELETING_REASON` into the rows of the live
workers; each worker's heartbeat sees it, the worker stops at its next safe point (its trials
failed, its claims released, one line on stderr) and marks its row stopped, and the study is
deleted once every one of them has stopped (or after ``wait`` seconds; a worker that still runs
then finds its row gone at its next heartbeat and stops the same way).
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from .._logging import get_logger
from ._liveness import DELETING_REASON
from ._tables import StudyRow, WorkerRow

__all__ = ["StudyBusyError", "stop_workers_for_delete"]

_log = get_logger("storage.delete")


class StudyBusyError(ValueError):
    """A study cannot be deleted: workers are running it."""


def _live(db: Any, grace_period: float) -> list[dict[str, Any]]:
    rows = db.workers()
    alive = {owner for owner, ok in db.worker_liveness(grace_period, rows) if ok}
    return [w for w in rows if w["owner"] in alive]


def stop_workers_for_delete(engine: sa.Engine, optuna_study_id: int, study_name: str, *, force: bool,
                            grace_period: float, wait: float) -> list[str]:
    """Make sure no live worker runs the study before it is deleted (see the module docs); returns the
    workers that were asked to stop.

    Raises:
        StudyBusyError: live workers run the study and ``force`` is not set (nothing is changed).
    """
    from ._database import StudyDatabase

    with engine.connect() as conn:
        if not sa.inspect(conn).has_table(StudyRow.__tablename__) or conn.execute(
                sa.select(StudyRow.id).where(StudyRow.optuna_study_id == int(optuna_study_id))).first() is None:
            return []  # a plain Optuna study: no evoprune workers
    db = StudyDatabase.open(engine, optuna_study_id=optuna_study_id, study_name=study_name)
    live = _live(db, grace_period)
    if not live:
        return []
    names = ", ".join(f"`evoprune {w['command'] or 'worker'}` pid {w['pid']} on {w['host']}" for w in live)
    if not force:
        raise StudyBusyError(
            f"study {study_name!r} is being run by {len(live)} live worker(s): {names}; stop them first (Ctrl-C, "
            "or kill PID), or pass --force: the workers are asked to stop cleanly and the study is deleted once "
            "they have (it stops no process that does not heartbeat)."
        )
    owners = [w["owner"] for w in live]
    db._tx(lambda c: c.execute(sa.update(WorkerRow).where(WorkerRow.owner.in_(owners),
                                                          WorkerRow.stopped_at.is_(None))
                               .values(stop_reason=DELETING_REASON)))
    _log.warning("asked the study's live workers to stop before deleting it",
                 extra={"fields": {"study": study_name, "workers": owners}})
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not {w["owner"] for w in _live(db, grace_period)} & set(owners):
            break
        time.sleep(0.2)
    else:
        _log.warning("workers still run after %g s; deleting anyway (they stop at their next heartbeat)", wait,
                     extra={"fields": {"study": study_name}})
    return owners
