"""Serialize trial creation among workers: the ask lock.

The search driver gives a generation's candidates fixed params by
``study.enqueue_trial(params)`` followed by ``study.ask()``. Optuna's ``ask`` pops the
*oldest* WAITING trial of the study, whoever enqueued it, so two workers that enqueue at
the same moment can swap (or fail) each other's trials. :class:`AskLock` is a
cross-process mutex per study -- a PostgreSQL advisory lock, a MySQL ``GET_LOCK``, or a
file lock next to a SQLite database -- and :func:`coordinated_study` returns an
:class:`optuna.Study` whose ``enqueue_trial`` takes the lock and whose next ``ask``
releases it, so every enqueue/ask pair is atomic across workers.

Holding the lock also makes orphans recognizable: a WAITING trial that the driver enqueued
(tagged ``evoprune:source``) and that is still waiting when the lock is free was left by a
process that died between enqueue and ask (the lock died with it); it is failed before the
next enqueue, so it can never be popped by the wrong worker.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from .._logging import get_logger

__all__ = ["AskLock", "coordinated_study"]

_log = get_logger("storage.coordination")

SOURCE_ATTR = "evoprune:source"


class AskLock:
    """A cross-process mutex for one study of one database (re-entrant within its owner)."""

    def __init__(self, url: str, study_id: int) -> None:
        self.url = url
        self.study_id = int(study_id)
        self._dialect = sa.engine.make_url(url).get_backend_name()
        self._engine: sa.Engine | None = None
        self._conn: sa.Connection | None = None
        self._fh: Any = None
        self._depth = 0
        digest = hashlib.sha256(f"evoprune-ask|{sa.engine.make_url(url).database}|{study_id}".encode()).digest()
        self._key = int.from_bytes(digest[:8], "big", signed=True)
        self._name = "evoprune_ask_" + digest[:12].hex()

    def _connection(self) -> sa.Connection:
        if self._conn is None or self._conn.closed:
            if self._engine is None:
                self._engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool)
            self._conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        return self._conn

    def acquire(self) -> bool:
        """Take the lock; ``True`` if this call took it (``False``: this object already holds it)."""
        self._depth += 1
        if self._depth > 1:
            return False
        try:
            if self._dialect == "postgresql":
                self._connection().execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": self._key})
            elif self._dialect in ("mysql", "mariadb"):
                got = self._connection().execute(sa.text("SELECT GET_LOCK(:n, 600)"), {"n": self._name}).scalar()
                if got != 1:
                    raise TimeoutError("could not take the study's ask lock within 600 s")
            elif self._dialect == "sqlite":
                import fcntl

                db = sa.engine.make_url(self.url).database
                if db and db != ":memory:" and not db.startswith("file:"):
                    self._fh = open(Path(db).with_name(Path(db).name + f".ask-{self.study_id}.lock"), "a+")
                    fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX)
        except BaseException:
            self._depth = 0
            raise
        return True

    def release(self) -> None:
        """Give the lock back entirely."""
        if self._depth == 0:
            return
        self._depth = 0
        if self._dialect == "postgresql":
            self._connection().execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
        elif self._dialect in ("mysql", "mariadb"):
            self._connection().execute(sa.text("SELECT RELEASE_LOCK(:n)"), {"n": self._name})
        elif self._fh is not None:
            import fcntl

            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    @property
    def held(self) -> bool:
        return self._depth > 0

    def close(self) -> None:
        self.release()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


def _fail_orphaned_waiting(storage: Any, study_id: int) -> list[int]:
    """Fail WAITING trials the driver enqueued and nobody asked (call while holding the lock)."""
    from optuna.storages._rdb import models as om
    from optuna.trial import TrialState

    tm, ua = om.TrialModel, om.TrialUserAttributeModel
    with storage.engine.connect() as conn:
        rows = conn.execute(
            sa.select(tm.trial_id, tm.number).join(ua, ua.trial_id == tm.trial_id)
            .where(tm.study_id == study_id, tm.state == TrialState.WAITING, ua.key == SOURCE_ATTR)
        ).all()
    failed = []
    for r in rows:
        try:
            storage.set_trial_system_attr(r.trial_id, "evoprune:fail_reason",
                                          "enqueued by a process that died before asking it")
            if storage.set_trial_state_values(r.trial_id, state=TrialState.FAIL):
                failed.append(r.number)
        except Exception:  # finished meanwhile
            continue
    if failed:
        _log.warning("failed orphaned enqueued trials %s", failed)
    return failed


def coordinated_study(study_name: str, storage: Any, sampler: Any, url: str) -> Any:
    """An :class:`optuna.Study` on ``storage`` whose enqueue/ask pairs are atomic across processes."""
    import optuna

    class CoordinatedStudy(optuna.Study):
        """``optuna.Study`` with the study's :class:`AskLock` held from ``enqueue_trial`` to the next ``ask``
        (an ``enqueue_trial`` never followed by ``ask`` keeps other workers waiting until :meth:`close`)."""

        def __init__(self) -> None:
            super().__init__(study_name=study_name, storage=storage, sampler=sampler)
            self._ask_lock = AskLock(url, self._study_id)
            self._rdb = storage

        def _take(self) -> None:
            if self._ask_lock.acquire():
                _fail_orphaned_waiting(self._rdb, self._study_id)

        def enqueue_trial(self, params: Any, user_attrs: Any = None, skip_if_exists: bool = False) -> None:
            self._take()  # held until the next ask
            try:
                super().enqueue_trial(params, user_attrs=user_attrs, skip_if_exists=skip_if_exists)
            except BaseException:
                self._ask_lock.release()
                raise

        def ask(self, fixed_distributions: Any = None) -> Any:
            self._take()
            try:
                return super().ask(fixed_distributions)
            finally:
                self._ask_lock.release()

        def close(self) -> None:
            self._ask_lock.close()

        def _pop_waiting_trial_id(self) -> int | None:
            # Optuna's version lists the WAITING trials through its trial cache, whose first fill reads
            # every trial of the study (seconds for a study of 10,000 trials); ask the database directly.
            from optuna.exceptions import UpdateFinishedTrialError
            from optuna.storages._rdb import models as om
            from optuna.trial import TrialState

            tm = om.TrialModel
            with self._rdb.engine.connect() as conn:
                ids = conn.execute(
                    sa.select(tm.trial_id).where(tm.study_id == self._study_id, tm.state == TrialState.WAITING)
                    .order_by(tm.number)
                ).scalars().all()
            for trial_id in ids:
                try:
                    if self._storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                        return trial_id
                except UpdateFinishedTrialError:
                    continue
            return None

    return CoordinatedStudy()
