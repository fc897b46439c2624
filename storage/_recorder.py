"""The SQL implementation of the search driver's :class:`~evoprune.search.Recorder` protocol."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._database import DEFAULT_MAX_ATTEMPTS, StudyDatabase
from ._values import CANDIDATE_KEY_ATTR

__all__ = ["SQLRecorder"]

#: Sampler states kept per study (the newest generations); each holds every key seen so far.
DEFAULT_KEEP_SAMPLER_STATES = 32


class SQLRecorder:
    """A :class:`~evoprune.search.Recorder` writing evoprune's tables of a study database.

    Args:
        db: the study's :class:`StudyDatabase`.
        storage: the study's Optuna RDB storage (for trial heartbeats and the candidate-key
            user attribute that optuna-dashboard shows); optional.
        max_attempts: how often one candidate's evaluation may fail in all (a released claim can be
            taken again until then; a claim released because its worker died does not count).
        keep_sampler_states: keep the sampler states of this many newest generations
            (``None``: all of them).
        directions: stage name -> ``{evaluator name: direction, "objective": promotion direction}``,
            stored with every stage record and outcome (the study facade passes its pipeline's).

    ``claim`` is an ``INSERT`` under a unique ``(study, candidate_key)`` constraint: exactly one
    worker of the whole study wins it. ``record_candidate`` links the claim to the trial and
    writes the trial's first heartbeat; ``stage_history`` excludes failed trials so a retried
    candidate is not counted twice. Usually obtained as ``EvoStudy.recorder``::

        study = evoprune.create_study("study.yaml")
        rec = study.recorder
        rec.claim(candidate.key)                              # True (first in the study)
        rec.record_candidate(trial_id(trial), candidate, source="evolution")   # evoprune._optuna_private.trial_id
        rec.record_stage(trial_id(trial), "s1", "kl", 2048, 0.31, 1.2, {})
        rec.record_stage_result(trial_id(trial), "s1", 0, 0.31, True)
    """

    def __init__(self, db: StudyDatabase, storage: Any = None, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                 keep_sampler_states: int | None = DEFAULT_KEEP_SAMPLER_STATES,
                 directions: Mapping[str, Mapping[str, str]] | None = None) -> None:
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts must be an int >= 1, got {max_attempts!r}.")
        self.db = db
        self.storage = storage
        self.max_attempts = max_attempts
        self.keep_sampler_states = keep_sampler_states
        self.directions = {k: dict(v) for k, v in (directions or {}).items()}

    def __repr__(self) -> str:
        return f"SQLRecorder(study={self.db.study_name!r})"

    @property
    def owner(self) -> str:
        """This process' worker name: the driver stamps it on every trial it creates."""
        return self.db.owner.name

    # -- trials ------------------------------------------------------------------------------
    def record_candidate(self, trial_id: int, candidate: Any, *, source: str = "sampler") -> None:
        self.db.record_candidate(trial_id, candidate.key, candidate.to_json(), source=source)
        if self.storage is not None:
            self.storage.record_heartbeat(trial_id)
            self.storage.set_trial_user_attr(trial_id, CANDIDATE_KEY_ATTR, candidate.key)

    def record_stage(self, trial_id: int, stage: str, evaluator: str, tokens: int | None, value: float,
                     seconds: float, details: Mapping[str, Any]) -> None:
        self.db.record_stage(trial_id, stage, evaluator, tokens, value, seconds, details,
                             direction=self.directions.get(stage, {}).get(evaluator))

    def record_stage_result(self, trial_id: int, stage: str, stage_index: int, objective: float,
                            promoted: bool | None) -> None:
        self.db.record_stage_result(trial_id, stage, stage_index, objective, promoted,
                                    direction=self.directions.get(stage, {}).get("objective"))

    def stage_history(self, stage: str) -> list[float]:
        return self.db.stage_history(stage)

    def finished_trial(self, candidate_key: str) -> dict[str, Any] | None:
        """The first finished (COMPLETE/PRUNED) trial of ``candidate_key`` with its stage objectives
        (see :meth:`StudyDatabase.finished_trial`)."""
        return self.db.finished_trial(candidate_key)

    # -- sampler state -------------------------------------------------------------------------
    def save_sampler_state(self, generation: int, state: Mapping[str, Any]) -> None:
        self.db.save_sampler_state(generation, state, keep_last=self.keep_sampler_states)

    def load_sampler_state(self) -> tuple[int, dict[str, Any]] | None:
        return self.db.load_sampler_state()

    # -- duplicates ------------------------------------------------------------------------------
    def claim(self, candidate_key: str) -> bool:
        return self.db.claim(candidate_key, max_attempts=self.max_attempts)

    def release(self, candidate_key: str) -> None:
        self.db.release(candidate_key)
