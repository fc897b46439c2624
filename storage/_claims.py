"""Candidate claims: exactly one worker of a study evaluates a candidate at a time.

A claim is an ``INSERT`` under the unique ``(study, candidate_key)`` constraint of
``evoprune_claims``, so of two workers that claim the same candidate in the same instant exactly
one succeeds, on every backend. A claim is released when its evaluation failed (the attempt
counts) or its worker died (the attempt is given back: a kill, a reboot or a lost machine is not
the candidate's fault, so an interrupted search can be resumed any number of times); a released
claim can be taken again while it has been tried fewer than ``max_attempts`` times.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from .._optuna_private import rdb_models
from ._scope import StudyScope
from ._tables import ClaimRow, TrialRow, utcnow
from ._values import check_name

__all__ = ["DEFAULT_MAX_ATTEMPTS", "ClaimsMixin"]

#: How often one candidate's evaluation may fail before it is no longer retried.
DEFAULT_MAX_ATTEMPTS = 3


class ClaimsMixin(StudyScope):
    """The claim methods of :class:`~evoprune.storage.StudyDatabase`."""

    def claim(self, candidate_key: str, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> bool:
        """Reserve ``candidate_key`` for this process: ``True`` for exactly one caller in the study.

        A claim that was released (its evaluation failed or its worker died) can be taken
        again until it has been taken ``max_attempts`` times.
        """
        key = check_name(candidate_key, "candidate_key")
        now = utcnow()
        try:
            self._tx(
                lambda c: c.execute(
                    sa.insert(ClaimRow).values(
                        study_id=self.study_id, candidate_key=key, owner=self.owner.name, status="claimed",
                        attempts=1, trial_id=None, claimed_at=now, updated_at=now,
                    )
                )
            )
            return True
        except sa_exc.IntegrityError:  # claimed before (by anyone): take it over if it was released
            pass
        res = self._tx(
            lambda c: c.execute(
                sa.update(ClaimRow)
                .where(
                    ClaimRow.study_id == self.study_id,
                    ClaimRow.candidate_key == key,
                    ClaimRow.status == "released",
                    ClaimRow.attempts < max_attempts,
                )
                .values(status="claimed", owner=self.owner.name, trial_id=None,
                        attempts=ClaimRow.attempts + 1, updated_at=utcnow())
            ).rowcount
        )
        return res == 1

    def release(self, candidate_key: str) -> bool:
        """Release this process' claim of ``candidate_key`` (so it may be retried); ``True`` if it held it."""
        key = check_name(candidate_key, "candidate_key")
        n = self._tx(
            lambda c: c.execute(
                sa.update(ClaimRow)
                .where(ClaimRow.study_id == self.study_id, ClaimRow.candidate_key == key,
                       ClaimRow.owner == self.owner.name, ClaimRow.status == "claimed")
                .values(status="released", updated_at=utcnow())
            ).rowcount
        )
        return n == 1

    def claims(self) -> dict[str, dict[str, Any]]:
        """Every claim of the study: candidate key -> ``{"owner", "status", "attempts", "trial_id"}``."""
        rows = self._tx(
            lambda c: c.execute(sa.select(ClaimRow.__table__).where(ClaimRow.study_id == self.study_id)).all()
        )
        return {
            r.candidate_key: {"owner": r.owner, "status": r.status, "attempts": r.attempts, "trial_id": r.trial_id}
            for r in rows
        }

    def retryable(self, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> list[tuple[str, str]]:
        """``(candidate_key, candidate_json)`` of released claims that may be tried again and whose
        candidate is known (from an earlier, failed trial), oldest first."""
        def run(conn: sa.Connection) -> list[Any]:
            latest = (
                sa.select(TrialRow.candidate_key, sa.func.max(TrialRow.trial_id).label("tid"))
                .where(TrialRow.study_id == self.study_id)
                .group_by(TrialRow.candidate_key)
                .subquery()
            )
            return conn.execute(
                sa.select(ClaimRow.candidate_key, TrialRow.candidate_json)
                .join(latest, latest.c.candidate_key == ClaimRow.candidate_key)
                .join(TrialRow, TrialRow.trial_id == latest.c.tid)
                .where(ClaimRow.study_id == self.study_id, ClaimRow.status == "released",
                       ClaimRow.attempts < max_attempts)
                .order_by(ClaimRow.updated_at, ClaimRow.id)
            ).all()

        return [(r.candidate_key, r.candidate_json) for r in self._tx(run)]

    def release_claims_of_failed_trials(self) -> int:
        """Release claims still held by a FAILED trial (its worker died: the driver itself releases
        the claim of an evaluation that failed), so the candidate can be retried; returns how many.
        A death is not the candidate's fault, so it gives the attempt back."""
        from optuna.trial import TrialState

        tm = rdb_models().TrialModel
        failed = sa.select(tm.trial_id).where(tm.study_id == self.optuna_study_id, tm.state == TrialState.FAIL)
        return self._tx(
            lambda c: c.execute(
                sa.update(ClaimRow)
                .where(ClaimRow.study_id == self.study_id, ClaimRow.status == "claimed",
                       ClaimRow.trial_id.in_(failed))
                .values(status="released", attempts=ClaimRow.attempts - 1, updated_at=utcnow())
            ).rowcount
        )

    def release_claims_of(self, owners: Iterable[str]) -> int:
        """Release claims held by ``owners`` that have no trial yet (the owner died before asking one);
        like :meth:`release_claims_of_failed_trials` this gives the attempt back."""
        owners = list(owners)
        if not owners:
            return 0
        return self._tx(
            lambda c: c.execute(
                sa.update(ClaimRow)
                .where(ClaimRow.study_id == self.study_id, ClaimRow.status == "claimed",
                       ClaimRow.owner.in_(owners), ClaimRow.trial_id.is_(None))
                .values(status="released", attempts=ClaimRow.attempts - 1, updated_at=utcnow())
            ).rowcount
        )
