"""What every part of :class:`~evoprune.storage.StudyDatabase` shares: which study, which process,
one transaction helper, and the checks that a trial id belongs to the study (and still runs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy as sa

from .._optuna_private import rdb_models
from ._engine import run_transaction
from ._owner import Owner

__all__ = ["StudyScope", "TrialNotRunningError"]

T = TypeVar("T")


class TrialNotRunningError(RuntimeError):
    """A result arrived for a trial that is no longer RUNNING: another process finished it (a reaper
    that presumed its worker dead during a stall, or a deleted study). The driver discards it."""


class StudyScope:
    """One study of one database, seen by one process.

    Args:
        engine: engine on the study database (the Optuna storage's engine).
        study_id: the ``evoprune_studies.id`` of the study.
        optuna_study_id: the Optuna ``studies.study_id``.
        study_name: for messages.
        owner: the identity of this process (claims, workers, trials it runs); default: a fresh one.
    """

    def __init__(self, engine: sa.Engine, *, study_id: int, optuna_study_id: int, study_name: str,
                 owner: Owner | None = None) -> None:
        self.engine = engine
        self.study_id = int(study_id)
        self.optuna_study_id = int(optuna_study_id)
        self.study_name = study_name
        self.owner = owner or Owner.current()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(study={self.study_name!r}, owner={self.owner.name!r})"

    def _tx(self, fn: Callable[[sa.Connection], T], *, retry_conflicts: bool = False) -> T:
        """``fn(conn)`` in one transaction, retried on transient conflicts (:func:`run_transaction`)."""
        return run_transaction(self.engine, fn, retry_conflicts=retry_conflicts)

    def _trial_row(self, conn: sa.Connection, trial_id: int) -> Any:
        """Optuna's row (study id, number, state) of ``trial_id``; ``ValueError`` if not of this study."""
        tm = rdb_models().TrialModel
        row = conn.execute(
            sa.select(tm.study_id, tm.number, tm.state).where(tm.trial_id == int(trial_id))
        ).first()
        if row is None or row.study_id != self.optuna_study_id:
            raise ValueError(f"trial id {trial_id} is not a trial of study {self.study_name!r}.")
        return row

    def _running_trial(self, conn: sa.Connection, trial_id: int, what: str) -> Any:
        """Like :meth:`_trial_row`, and ``RuntimeError`` unless the trial is RUNNING."""
        from optuna.trial import TrialState

        row = self._trial_row(conn, trial_id)
        if row.state != TrialState.RUNNING:
            raise TrialNotRunningError(
                f"cannot record {what} for trial {row.number} of study {self.study_name!r}: it is "
                f"{row.state.name}, not RUNNING (a trial whose worker was presumed dead is failed and retried "
                "elsewhere; its late results are not kept)."
            )
        return row
