"""The integrity check of one study's rows (``evoprune check``, ``EvoStudy.check()``)."""

from __future__ import annotations

import collections
from typing import Any

import sqlalchemy as sa

from .._optuna_private import rdb_models
from ._schema import SCHEMA_VERSION, schema_version
from ._scope import StudyScope
from ._tables import ClaimRow, SamplerStateRow, StageResultRow, StageRow, TrialRow, WorkerRow
from ._values import DUPLICATE_OF_ATTR, INFEASIBLE_ATTR, RESAMPLED_ATTR, from_json, sha256_text

__all__ = ["CheckMixin"]


class CheckMixin(StudyScope):
    """The :meth:`integrity_problems` method of :class:`~evoprune.storage.StudyDatabase`."""

    def integrity_problems(self) -> list[str]:
        """Consistency checks of the study's rows; an empty list means the study is sound.

        Checks: schema version; every evoprune row refers to a trial of this study; no candidate
        is COMPLETE in two trials; every COMPLETE trial has its candidate and stage rows (except
        the driver's infeasible placeholders, duplicate copies and resampled proposals, which are
        told unevaluated);
        every stage row has evaluator rows; JSON parses; sampler-state checksums; claims point at
        trials that evaluate their candidate.
        """
        from optuna.trial import TrialState

        problems: list[str] = []
        om = rdb_models()
        tm, ua, tsa = om.TrialModel, om.TrialUserAttributeModel, om.TrialSystemAttributeModel
        version = schema_version(self.engine)
        if version != SCHEMA_VERSION:
            problems.append(f"schema version is {version}, expected {SCHEMA_VERSION}")

        def run(conn: sa.Connection) -> dict[str, Any]:
            trials = {
                r.trial_id: (r.number, r.state)
                for r in conn.execute(
                    sa.select(tm.trial_id, tm.number, tm.state).where(tm.study_id == self.optuna_study_id))
            }
            tr = conn.execute(sa.select(TrialRow.__table__).where(TrialRow.study_id == self.study_id)).all()
            stages = conn.execute(sa.select(StageRow.__table__).where(StageRow.study_id == self.study_id)).all()
            results = conn.execute(
                sa.select(StageResultRow.trial_id, StageResultRow.stage, StageResultRow.details_json)
                .where(StageResultRow.study_id == self.study_id)
            ).all()
            claims = conn.execute(sa.select(ClaimRow.__table__).where(ClaimRow.study_id == self.study_id)).all()
            states = conn.execute(
                sa.select(SamplerStateRow.__table__).where(SamplerStateRow.study_id == self.study_id)
            ).all()
            workers = {
                w.owner: w for w in conn.execute(
                    sa.select(WorkerRow.owner, WorkerRow.stopped_at, WorkerRow.stop_reason)
                    .where(WorkerRow.study_id == self.study_id))
            }
            # told without an evaluation by the driver: infeasible placeholders, copies of duplicates and
            # resampled proposals of Optuna samplers
            unevaluated = {
                r.trial_id
                for r in conn.execute(
                    sa.select(ua.trial_id).join(tm, tm.trial_id == ua.trial_id)
                    .where(tm.study_id == self.optuna_study_id,
                           ua.key.in_((INFEASIBLE_ATTR, DUPLICATE_OF_ATTR)))
                    .union(sa.select(tsa.trial_id).join(tm, tm.trial_id == tsa.trial_id)
                           .where(tm.study_id == self.optuna_study_id, tsa.key == RESAMPLED_ATTR))
                )
            }
            return dict(trials=trials, tr=tr, stages=stages, results=results, claims=claims, states=states,
                        unevaluated=unevaluated, workers=workers)

        d = self._tx(run)
        trials = d["trials"]
        by_trial = {}
        complete_keys: dict[str, list[int]] = {}
        for row in d["tr"]:
            by_trial[row.trial_id] = row
            if row.trial_id not in trials:
                problems.append(f"candidate row for trial id {row.trial_id}, which is not a trial of this study")
                continue
            try:
                from_json(row.candidate_json)
            except ValueError:
                problems.append(f"trial {row.trial_number}: candidate JSON does not parse")
            if trials[row.trial_id][1] == TrialState.COMPLETE and row.trial_id not in d["unevaluated"]:
                complete_keys.setdefault(row.candidate_key, []).append(row.trial_number)
        for key, numbers in complete_keys.items():
            if len(numbers) > 1:
                problems.append(f"candidate {key} completed in {len(numbers)} trials {sorted(numbers)} (duplicate)")
        stage_keys = {(s.trial_id, s.stage) for s in d["stages"]}
        result_keys = {(r.trial_id, r.stage) for r in d["results"]}
        for s in d["stages"]:
            if s.trial_id not in trials:
                problems.append(f"stage row for trial id {s.trial_id}, which is not a trial of this study")
            elif (s.trial_id, s.stage) not in result_keys:
                problems.append(f"trial {trials[s.trial_id][0]}: stage {s.stage!r} has no evaluator results")
        for r in d["results"]:
            if r.trial_id not in trials:
                problems.append(f"stage result for trial id {r.trial_id}, which is not a trial of this study")
            try:
                from_json(r.details_json)
            except ValueError:
                problems.append(f"trial id {r.trial_id}: details JSON of stage {r.stage!r} does not parse")
        for tid, (number, state) in trials.items():
            if state == TrialState.COMPLETE and tid not in d["unevaluated"]:
                if tid not in by_trial:
                    problems.append(f"trial {number} is COMPLETE but has no candidate row")
                if not any(k[0] == tid for k in stage_keys):
                    problems.append(f"trial {number} is COMPLETE but has no stage results")
        for c in d["claims"]:
            w = d["workers"].get(c.owner)
            # a claim is kept after its trial finished (it blocks repeats); one with no trial, or a
            # failed one, must be held by a worker that is still working
            open_claim = c.trial_id is None or trials.get(c.trial_id, (0, None))[1] == TrialState.FAIL
            if c.status == "claimed" and open_claim and (w is None or w.stopped_at is not None):
                why = "is not a worker of this study" if w is None else f"stopped ({w.stop_reason or 'no reason'})"
                problems.append(f"claim of {c.candidate_key} is stranded: its worker {c.owner} {why}; "
                                "`evoprune resume` (or any worker starting) releases it for retry")
            if c.trial_id is not None:
                row = by_trial.get(c.trial_id)
                if row is None or row.candidate_key != c.candidate_key:
                    problems.append(f"claim of {c.candidate_key} points at trial id {c.trial_id}, "
                                    "which does not evaluate it")
        for s in d["states"]:
            if sha256_text(s.state_json) != s.state_sha256:
                problems.append(f"sampler state of generation {s.generation}: checksum mismatch")
        return problems

    def held_by_dead_workers(self, grace_period: float) -> list[str]:
        """Warnings: RUNNING trials and open claims held by workers that are dead (their process is gone
        on this host, or silent longer than ``grace_period`` s) or stopped without releasing them -- a
        kill or a second signal leaves them; the next search, resume or worker that starts recovers them
        (its reaper fails the trials and releases the claims), or they wait for a live worker's reaper."""
        from optuna.trial import TrialState

        rows = self.workers()  # type: ignore[attr-defined]
        dead = {o for o, alive in self.worker_liveness(grace_period, rows) if not alive}  # type: ignore[attr-defined]
        gone = dead | self.stopped_workers(rows)  # type: ignore[attr-defined]
        out = []
        held: dict[str, list[int]] = {}
        for t in self.running_trials():  # type: ignore[attr-defined]
            who = t.owner or t.creator
            if who in gone:
                held.setdefault(who, []).append(t.number)
        for who, numbers in sorted(held.items()):
            out.append(f"{len(numbers)} RUNNING trial(s) {numbers[:10]} held by worker {who}, which is "
                       f"{'dead or silent' if who in dead else 'stopped'}")
        tm = rdb_models().TrialModel
        claims = self._tx(lambda c: c.execute(
            sa.select(ClaimRow.owner, ClaimRow.trial_id, tm.state)
            .outerjoin(tm, tm.trial_id == ClaimRow.trial_id)
            .where(ClaimRow.study_id == self.study_id, ClaimRow.status == "claimed",
                   ClaimRow.owner.in_(sorted(dead)))).all()) if dead else []
        open_claims = collections.Counter(c.owner for c in claims
                                          if c.trial_id is None or c.state in (TrialState.RUNNING, TrialState.FAIL))
        for who, n in sorted(open_claims.items()):
            out.append(f"{n} claim(s) held by worker {who}, which is dead or silent")
        if out:
            out.append("the next `evoprune search`, `resume` or `worker` on the study recovers them "
                       "(fails those trials, releases the claims for retry)")
        return out
