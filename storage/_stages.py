"""Stage results of a study's trials: one row per evaluator per stage reached, one per stage closed.

The methods of :class:`~evoprune.storage.StudyDatabase` that write and read ``evoprune_stage_results``
(an evaluator's value at a stage) and ``evoprune_stages`` (a stage's promotion objective and decision).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from .._optuna_private import rdb_models
from ._scope import StudyScope
from ._tables import StageResultRow, StageRow, utcnow
from ._values import StageOutcome, StageRecord, canonical_json, check_name, from_json, join_float, split_float

__all__ = ["StagesMixin"]


class StagesMixin(StudyScope):
    """The stage-result methods of :class:`~evoprune.storage.StudyDatabase`."""

    def record_stage(self, trial_id: int, stage: str, evaluator: str, tokens: int | None, value: float,
                     seconds: float, details: Mapping[str, Any] | None = None, *, direction: str | None = None
                     ) -> None:
        """Store one evaluator's result of one stage (one row; a repeat for the same trial/stage/evaluator
        is an error)."""
        st, ev = check_name(stage, "stage"), check_name(evaluator, "evaluator")
        if tokens is not None and (isinstance(tokens, bool) or int(tokens) != tokens or tokens < 0):
            raise ValueError(f"tokens must be a non-negative int or None, got {tokens!r}.")
        v, v_repr = split_float(value, "value")
        secs, _ = split_float(seconds, "seconds")
        if secs is None or secs < 0:
            raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}.")
        if direction not in (None, "minimize", "maximize"):
            raise ValueError(f"direction must be 'minimize', 'maximize' or None, got {direction!r}.")
        text = canonical_json(dict(details or {}), where="details")

        def run(conn: sa.Connection) -> None:
            self._running_trial(conn, trial_id, f"stage {st!r}")
            conn.execute(
                sa.insert(StageResultRow).values(
                    study_id=self.study_id, trial_id=int(trial_id), stage=st, evaluator=ev,
                    tokens=None if tokens is None else int(tokens), value=v, value_repr=v_repr, seconds=secs,
                    direction=direction, details_json=text, created_at=utcnow(),
                )
            )

        try:
            self._tx(run)
        except sa_exc.IntegrityError:
            raise ValueError(f"trial id {trial_id} already has a result of {ev!r} at stage {st!r}.") from None

    def record_stage_result(self, trial_id: int, stage: str, stage_index: int, objective: float,
                            promoted: bool | None, *, direction: str | None = None, seconds: float = 0.0) -> None:
        """Close a stage for a trial: its promotion objective and decision."""
        st = check_name(stage, "stage")
        if isinstance(stage_index, bool) or int(stage_index) != stage_index or stage_index < 0:
            raise ValueError(f"stage_index must be an int >= 0, got {stage_index!r}.")
        if promoted is not None and not isinstance(promoted, bool):
            raise TypeError(f"promoted must be True, False or None, got {promoted!r}.")
        if direction not in (None, "minimize", "maximize"):
            raise ValueError(f"direction must be 'minimize', 'maximize' or None, got {direction!r}.")
        o, o_repr = split_float(objective, "objective")

        def run(conn: sa.Connection) -> None:
            self._running_trial(conn, trial_id, f"stage {st!r}")
            conn.execute(
                sa.insert(StageRow).values(
                    study_id=self.study_id, trial_id=int(trial_id), stage=st, stage_index=int(stage_index),
                    objective=o, objective_repr=o_repr, direction=direction, promoted=promoted,
                    seconds=float(seconds), created_at=utcnow(),
                )
            )

        try:
            self._tx(run)
        except sa_exc.IntegrityError:
            raise ValueError(f"trial id {trial_id} already has a result for stage {st!r}.") from None

    def stage_history(self, stage: str) -> list[float]:
        """Objectives of every trial scored at ``stage`` so far (any worker), failed trials excluded."""
        from optuna.trial import TrialState

        tm = rdb_models().TrialModel
        rows = self._tx(
            lambda c: c.execute(
                sa.select(StageRow.objective, StageRow.objective_repr)
                .join(tm, tm.trial_id == StageRow.trial_id)
                .where(StageRow.study_id == self.study_id, StageRow.stage == stage, tm.state != TrialState.FAIL)
                .order_by(StageRow.id)
            ).all()
        )
        return [join_float(r.objective, r.objective_repr) for r in rows]

    def stage_records(self, trial_id: int | None = None) -> list[StageRecord]:
        q = sa.select(StageResultRow.__table__).where(StageResultRow.study_id == self.study_id)
        if trial_id is not None:
            q = q.where(StageResultRow.trial_id == int(trial_id))
        rows = self._tx(lambda c: c.execute(q.order_by(StageResultRow.id)).all())
        return [
            StageRecord(trial_id=r.trial_id, stage=r.stage, evaluator=r.evaluator, tokens=r.tokens,
                        value=join_float(r.value, r.value_repr), seconds=r.seconds, direction=r.direction,
                        details=from_json(r.details_json))
            for r in rows
        ]

    def stage_outcomes(self, trial_id: int | None = None) -> list[StageOutcome]:
        q = sa.select(StageRow.__table__).where(StageRow.study_id == self.study_id)
        if trial_id is not None:
            q = q.where(StageRow.trial_id == int(trial_id))
        rows = self._tx(lambda c: c.execute(q.order_by(StageRow.id)).all())
        return [
            StageOutcome(trial_id=r.trial_id, stage=r.stage, stage_index=r.stage_index,
                         objective=join_float(r.objective, r.objective_repr), direction=r.direction,
                         promoted=r.promoted, seconds=r.seconds)
            for r in rows
        ]
