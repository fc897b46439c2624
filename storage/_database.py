"""Reads and writes of evoprune's tables for one study, each in one transaction.

:class:`StudyDatabase` is the SQL layer under :class:`~evoprune.storage.SQLRecorder` and the
study object of :mod:`evoprune.search`. Every write validates its input first (JSON-able
payloads, known trial of this study, trial still running) and runs in a single transaction
(:func:`~evoprune.storage._engine.run_transaction`), so a row is never half-written; transient
lock conflicts (SQLite "database is locked", MySQL deadlocks) are retried.

It never holds tensors: candidates, configs, sampler states and details are JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from .._optuna_private import rdb_models
from ._catalog import _delete_study_rows, _purge_orphans, _started
from ._check import CheckMixin
from ._claims import DEFAULT_MAX_ATTEMPTS, ClaimsMixin
from ._engine import run_transaction
from ._liveness import WorkersMixin
from ._owner import Owner
from ._schema import is_current, schema_version, upgrade
from ._stages import StagesMixin
from ._tables import (
    ArtifactRow,
    ClaimRow,
    FingerprintRow,
    SamplerStateRow,
    StageRow,
    StudyRow,
    TrialRow,
    utcnow,
)
from ._values import (
    INFEASIBLE_ATTR,
    RESAMPLED_ATTR,
    Artifact,
    canonical_json,
    check_name,
    from_json,
    join_float,
    sha256_text,
)

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "ConfigMismatchError",
    "FingerprintMismatchError",
    "StudyDatabase",
]


class FingerprintMismatchError(RuntimeError):
    """The model or data a study is resumed with is not what it was started with.

    ``changed`` maps each kind that changed (``"model"``, ``"data"``, ...) to
    ``(stored, current)``.
    """

    def __init__(self, study_name: str, changed: Mapping[str, tuple[str, str]]) -> None:
        self.study_name = study_name
        self.changed = dict(changed)
        parts = [f"the {kind} fingerprint changed (stored {old}, now {new})" for kind, (old, new) in changed.items()]
        kinds = " and ".join(f"{k}" for k in changed)
        super().__init__(
            f"study {study_name!r}: " + "; ".join(parts) + f". The {kinds} is not what this study was "
            f"started with, so its results would not be comparable. Point the config back at the original "
            f"{kinds}, or start a new study (--study NEW_NAME) for the new one."
        )


class ConfigMismatchError(RuntimeError):
    """A study of that name exists with a different config."""


class StudyDatabase(ClaimsMixin, WorkersMixin, CheckMixin, StagesMixin):
    """evoprune's rows for one study (plus read access to its Optuna trials).

    Args:
        engine: engine on the study database (the Optuna storage's engine).
        study_id: the ``evoprune_studies.id`` of the study.
        optuna_study_id: the Optuna ``studies.study_id``.
        study_name: for messages.
        owner: the identity of this process (claims, workers, trials it runs).

    The methods come in groups, each in its own module: study rows, config, fingerprints,
    candidates, stages, sampler states, artifacts and trial values here; claims
    (:mod:`._claims`); workers and heartbeats (:mod:`._liveness`); the integrity check
    (:mod:`._check`); stage results (:mod:`._stages`). Each method is one transaction, retried on
    transient lock conflicts.

    Use :meth:`create_or_open` / :meth:`open` to get one:

    >>> import optuna
    >>> from evoprune._optuna_private import study_id
    >>> storage = optuna.storages.RDBStorage("sqlite://")
    >>> study = optuna.create_study(storage=storage, study_name="s")
    >>> db = StudyDatabase.create_or_open(storage.engine, optuna_study_id=study_id(study), study_name="s",
    ...                                   config={"seed": 0})
    >>> db.config()
    {'seed': 0}
    >>> db.record_fingerprints({"model": "ab12", "data": "cd34"})
    >>> db.register_worker(command="doc")      # this process works on the study (its heartbeat row)
    >>> db.claim("key1"), db.claim("key1")      # in any process: exactly one True
    (True, False)
    >>> db.integrity_problems()
    []
    """

    # ------------------------------------------------------------------ studies
    @classmethod
    def create_or_open(
        cls,
        engine: sa.Engine,
        *,
        optuna_study_id: int,
        study_name: str,
        config: Mapping[str, Any],
        evoprune_version: str = "",
        owner: Owner | None = None,
        orphans_upto: int | None = None,
        replace_unstarted: bool = False,
        config_digest: str | None = None,
    ) -> StudyDatabase:
        """The study's row, created with ``config`` if missing (creating or upgrading the evoprune
        tables first if needed).

        ``config_digest``: what the stored config is compared with (a config with the same digest
        continues the study); default :meth:`config_digest` of all of ``config``. The study facade
        passes ``StudyConfig.digest``, which leaves out machine settings such as ``threads``.

        ``orphans_upto``: pass :meth:`row_mark` read *before* this process created the Optuna study
        (only when it did create it). Rows of that Optuna study id up to the mark belong to a study
        deleted with plain Optuna whose id the database reused: they are purged (with the rows of
        any other study Optuna no longer has), so a new study never picks up an old one's sampler
        state, trials or claims. Rows written after the mark are another process creating the same
        study at the same moment, and are kept.

        ``replace_unstarted``: a study that exists with another config but never started (no trial,
        fingerprint, worker, claim or sampler state: its first run failed before it began, e.g. on
        a model folder that does not exist) takes ``config`` instead of raising.

        Raises:
            ConfigMismatchError: the study exists with a different config.
            SchemaVersionError: the database is newer than this evoprune.
        """
        if not is_current(engine):
            upgrade(engine)
        text = canonical_json(config, where="config")
        digest = config_digest or StudyDatabase.config_digest(config)

        def run(conn: sa.Connection) -> int:
            if orphans_upto is not None:
                _purge_orphans(conn, optuna_study_id, orphans_upto)
            row = conn.execute(
                sa.select(StudyRow.id, StudyRow.config_sha256).where(StudyRow.optuna_study_id == optuna_study_id)
            ).first()
            if row is not None:
                if row.config_sha256 != digest and replace_unstarted and not _started(conn, row.id, optuna_study_id):
                    conn.execute(sa.update(StudyRow).where(StudyRow.id == row.id).values(
                        config_json=text, config_sha256=digest, evoprune_version=evoprune_version))
                    return int(row.id)
                if row.config_sha256 != digest:
                    raise ConfigMismatchError(
                        f"study {study_name!r} already exists with a different config; continue it with "
                        f"`evoprune resume --study {study_name} --storage URL` (which uses the stored config), "
                        "or choose a new --study name for the new config."
                    )
                return int(row.id)
            res = conn.execute(
                sa.insert(StudyRow).values(
                    optuna_study_id=optuna_study_id,
                    study_name=study_name,
                    config_json=text,
                    config_sha256=digest,
                    evoprune_version=evoprune_version,
                    created_at=utcnow(),
                )
            )
            return int(res.inserted_primary_key[0])

        # another process may create it at the same moment: then the next run reads theirs
        sid = run_transaction(engine, run, retry_conflicts=True)
        return cls(engine, study_id=sid, optuna_study_id=optuna_study_id, study_name=study_name, owner=owner)

    @staticmethod
    def config_digest(config: Mapping[str, Any]) -> str:
        """The digest a study's config is stored and compared with."""
        return sha256_text(canonical_json(config, where="config"))

    @staticmethod
    def row_mark(engine: sa.Engine) -> int:
        """The highest ``evoprune_studies.id`` so far (0 without evoprune tables); reads only. See
        ``orphans_upto`` of :meth:`create_or_open`."""
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(StudyRow.__tablename__):
                return 0
            return int(conn.execute(sa.select(sa.func.max(StudyRow.id))).scalar() or 0)

    @staticmethod
    def delete_rows(engine: sa.Engine, optuna_study_id: int) -> int:
        """Delete every evoprune row of the Optuna study ``optuna_study_id`` in one transaction (the
        Optuna study itself is left to ``optuna.delete_study``); returns how many study rows went
        (0 for a plain Optuna study)."""
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(StudyRow.__tablename__):
                return 0

        def run(conn: sa.Connection) -> int:
            ids = [r[0] for r in conn.execute(
                sa.select(StudyRow.id).where(StudyRow.optuna_study_id == int(optuna_study_id)))]
            for sid in ids:
                _delete_study_rows(conn, sid)
            return len(ids)

        return run_transaction(engine, run)

    def purge_orphans(self) -> int:
        """Delete the rows of evoprune studies deleted with plain Optuna (``optuna delete-study``) in
        one transaction, so trials that reuse their ids start clean (a search runs it on start);
        returns how many studies' rows went."""
        return self._tx(_purge_orphans)

    @classmethod
    def open(cls, engine: sa.Engine, *, optuna_study_id: int, study_name: str, owner: Owner | None = None
             ) -> StudyDatabase:
        """The study's row (upgrading the evoprune tables first if needed).

        Raises:
            LookupError: the study has no evoprune data (a plain Optuna study).
            SchemaVersionError: the database is newer than this evoprune.
        """
        if not is_current(engine):
            if schema_version(engine) is None:
                raise LookupError(
                    f"study {study_name!r} is a plain Optuna study (no evoprune tables in this database).")
            upgrade(engine)
        with engine.connect() as conn:
            row = conn.execute(
                sa.select(StudyRow.id, StudyRow.study_name).where(StudyRow.optuna_study_id == optuna_study_id)
            ).first()
        # a row of another name is left over from a study deleted with plain Optuna whose id was reused
        sid = row.id if row is not None and row.study_name == study_name else None
        if sid is None:
            raise LookupError(
                f"study {study_name!r} has no evoprune config (created by plain Optuna?); create it with "
                "evoprune.create_study(config, ...) or `evoprune search CONFIG`."
            )
        return cls(engine, study_id=sid, optuna_study_id=optuna_study_id, study_name=study_name, owner=owner)

    def config(self) -> dict[str, Any]:
        """The study's full config, as stored."""
        text = self._tx(
            lambda c: c.execute(sa.select(StudyRow.config_json).where(StudyRow.id == self.study_id)).scalar_one()
        )
        return from_json(text)

    # ------------------------------------------------------------------ fingerprints
    def fingerprints(self) -> dict[str, str]:
        rows = self._tx(
            lambda c: c.execute(
                sa.select(FingerprintRow.kind, FingerprintRow.value).where(FingerprintRow.study_id == self.study_id)
            ).all()
        )
        return {r.kind: r.value for r in rows}

    def check_fingerprints(self, current: Mapping[str, str]) -> None:
        """Raise :class:`FingerprintMismatchError` naming every kind whose stored value differs."""
        stored = self.fingerprints()
        changed = {k: (stored[k], str(v)) for k, v in current.items() if k in stored and stored[k] != str(v)}
        if changed:
            raise FingerprintMismatchError(self.study_name, changed)

    def fingerprint_details(self) -> dict[str, Any]:
        """``{kind: details}`` stored with the fingerprints (e.g. ``data_files``: the resolved file list)."""
        rows = self._tx(lambda c: c.execute(sa.select(FingerprintRow.kind, FingerprintRow.details_json)
                                            .where(FingerprintRow.study_id == self.study_id)).all())
        return {r.kind: from_json(r.details_json) for r in rows}

    def record_fingerprints(self, current: Mapping[str, str], details: Mapping[str, Any] | None = None) -> None:
        """Store fingerprints not stored yet (with ``details[kind]``, JSON, if given); raise
        :class:`FingerprintMismatchError` if a stored one differs."""
        values = {check_name(k, "fingerprint kind", 64): check_name(str(v), f"{k} fingerprint", 256)
                  for k, v in current.items()}
        texts = {k: canonical_json((details or {}).get(k, {}), where=f"{k} fingerprint details") for k in values}

        def run(conn: sa.Connection) -> dict[str, tuple[str, str]]:
            stored = {
                r.kind: r.value
                for r in conn.execute(
                    sa.select(FingerprintRow.kind, FingerprintRow.value).where(FingerprintRow.study_id == self.study_id)
                )
            }
            changed = {k: (stored[k], v) for k, v in values.items() if k in stored and stored[k] != v}
            if changed:
                return changed
            for k, v in values.items():
                if k not in stored:
                    conn.execute(
                        sa.insert(FingerprintRow).values(
                            study_id=self.study_id, kind=k, value=v, details_json=texts[k], created_at=utcnow()
                        )
                    )
            return {}

        changed = self._tx(run, retry_conflicts=True)  # a concurrent writer stored them first: compare with theirs
        if changed:
            raise FingerprintMismatchError(self.study_name, changed)

    # ------------------------------------------------------------------ candidates of trials
    def record_candidate(self, trial_id: int, candidate_key: str, candidate_json: str, *, source: str) -> None:
        """Store the candidate trial ``trial_id`` evaluates (and link this process' claim to it)."""
        key = check_name(candidate_key, "candidate_key")
        src = check_name(source, "source", 32)
        if not isinstance(candidate_json, str):
            raise TypeError("candidate_json must be the candidate's JSON text (Candidate.to_json()).")
        try:
            from_json(candidate_json)
        except ValueError as exc:
            raise ValueError(f"candidate_json is not valid JSON: {exc}") from None

        def run(conn: sa.Connection) -> None:
            trial = self._running_trial(conn, trial_id, "a candidate")
            conn.execute(
                sa.insert(TrialRow).values(
                    study_id=self.study_id, trial_id=int(trial_id), trial_number=int(trial.number),
                    candidate_key=key, candidate_json=candidate_json, source=src, owner=self.owner.name,
                    created_at=utcnow(),
                )
            )
            conn.execute(
                sa.update(ClaimRow)
                .where(ClaimRow.study_id == self.study_id, ClaimRow.candidate_key == key,
                       ClaimRow.owner == self.owner.name, ClaimRow.status == "claimed")
                .values(trial_id=int(trial_id), updated_at=utcnow())
            )

        try:
            self._tx(run)
        except sa_exc.IntegrityError:
            raise ValueError(f"trial id {trial_id} already has a candidate recorded.") from None

    def candidate_of(self, trial_id: int) -> tuple[str, str] | None:
        """``(candidate_key, candidate_json)`` of a trial, or ``None``."""
        row = self._tx(
            lambda c: c.execute(
                sa.select(TrialRow.candidate_key, TrialRow.candidate_json).where(
                    TrialRow.study_id == self.study_id, TrialRow.trial_id == int(trial_id)
                )
            ).first()
        )
        return None if row is None else (row.candidate_key, row.candidate_json)

    def trial_candidates(self) -> list[dict[str, Any]]:
        """Every trial's candidate row joined with the trial's state (ordered by trial number)."""
        tm = rdb_models().TrialModel

        def run(conn: sa.Connection) -> list[Any]:
            return conn.execute(
                sa.select(TrialRow.trial_id, TrialRow.trial_number, TrialRow.candidate_key, TrialRow.candidate_json,
                          TrialRow.source, TrialRow.owner, tm.state)
                .join(tm, tm.trial_id == TrialRow.trial_id)
                .where(TrialRow.study_id == self.study_id)
                .order_by(TrialRow.trial_number)
            ).all()

        return [dict(r._mapping) | {"state": r.state.name} for r in self._tx(run)]

    def finished_trial(self, candidate_key: str) -> dict[str, Any] | None:
        """The first COMPLETE or PRUNED trial that evaluated ``candidate_key``: ``{"trial_id", "number",
        "state", "stages": {stage: objective}}``, or ``None`` (e.g. for a driver that replays an
        interrupted generation and must reuse, not re-evaluate, what already finished)."""
        from optuna.trial import TrialState

        tm = rdb_models().TrialModel

        def run(conn: sa.Connection) -> Any:
            row = conn.execute(
                sa.select(TrialRow.trial_id, TrialRow.trial_number, tm.state)
                .join(tm, tm.trial_id == TrialRow.trial_id)
                .where(TrialRow.study_id == self.study_id, TrialRow.candidate_key == candidate_key,
                       TrialRow.source != "duplicate",  # a repeat told another trial's values
                       tm.state.in_((TrialState.COMPLETE, TrialState.PRUNED)))
                .order_by(TrialRow.trial_number).limit(1)
            ).first()
            if row is None:
                return None
            stages = conn.execute(
                sa.select(StageRow.stage, StageRow.objective, StageRow.objective_repr)
                .where(StageRow.trial_id == row.trial_id).order_by(StageRow.stage_index)
            ).all()
            return {"trial_id": row.trial_id, "number": row.trial_number, "state": row.state.name,
                    "stages": {s.stage: join_float(s.objective, s.objective_repr) for s in stages}}

        return self._tx(run)

    # ------------------------------------------------------------------ sampler state
    def save_sampler_state(self, generation: int, state: Mapping[str, Any], *, keep_last: int | None = None
                           ) -> None:
        """Store the sampler state of ``generation`` (a repeat for the same generation replaces it); the
        ``sampler`` column gets the state's ``"kind"`` (e.g. ``"evolutionary"``).

        ``keep_last``: keep only the states of the last that many generations (a state holds every
        candidate key seen so far, so keeping all of them grows quadratically); ``None`` keeps all.
        """
        if keep_last is not None and (isinstance(keep_last, bool) or int(keep_last) < 1):
            raise ValueError(f"keep_last must be an int >= 1 or None, got {keep_last!r}.")
        if isinstance(generation, bool) or int(generation) != generation or generation < 0:
            raise ValueError(f"generation must be an int >= 0, got {generation!r}.")
        if not isinstance(state, Mapping):
            raise TypeError(f"sampler state must be a dict, got {type(state).__name__}.")
        text = canonical_json(dict(state), where="sampler state")
        digest = sha256_text(text)
        name = str(state.get("kind") or "")[:255]

        def run(conn: sa.Connection) -> None:
            n = conn.execute(
                sa.update(SamplerStateRow)
                .where(SamplerStateRow.study_id == self.study_id, SamplerStateRow.generation == int(generation))
                .values(state_json=text, state_sha256=digest, sampler=name, created_at=utcnow())
            ).rowcount
            if n == 0:
                conn.execute(
                    sa.insert(SamplerStateRow).values(
                        study_id=self.study_id, generation=int(generation), sampler=name, state_json=text,
                        state_sha256=digest, created_at=utcnow(),
                    )
                )
            if keep_last is not None:
                conn.execute(
                    sa.delete(SamplerStateRow).where(
                        SamplerStateRow.study_id == self.study_id,
                        SamplerStateRow.generation <= int(generation) - int(keep_last),
                    )
                )

        self._tx(run, retry_conflicts=True)  # inserted concurrently: the next run replaces it

    def load_sampler_state(self, generation: int | None = None) -> tuple[int, dict[str, Any]] | None:
        """The state of ``generation`` (default: the latest), or ``None``."""
        q = sa.select(SamplerStateRow.generation, SamplerStateRow.state_json, SamplerStateRow.state_sha256).where(
            SamplerStateRow.study_id == self.study_id
        )
        if generation is not None:
            q = q.where(SamplerStateRow.generation == int(generation))
        row = self._tx(lambda c: c.execute(q.order_by(SamplerStateRow.generation.desc()).limit(1)).first())
        if row is None:
            return None
        if sha256_text(row.state_json) != row.state_sha256:
            raise RuntimeError(
                f"study {self.study_name!r}: the stored sampler state of generation {row.generation} is "
                "corrupt (checksum mismatch); run `evoprune check` and restore the database from a backup."
            )
        return int(row.generation), from_json(row.state_json)

    def sampler_generations(self) -> list[int]:
        rows = self._tx(
            lambda c: c.execute(
                sa.select(SamplerStateRow.generation).where(SamplerStateRow.study_id == self.study_id)
                .order_by(SamplerStateRow.generation)
            ).all()
        )
        return [int(r.generation) for r in rows]

    # ------------------------------------------------------------------ artifacts
    def record_artifact(self, trial_id: int, *, path: str, sha256: str, metrics: Mapping[str, Any] | None = None
                        ) -> int:
        """Record an exported checkpoint of trial ``trial_id`` (which must have a candidate)."""
        if not isinstance(sha256, str) or len(sha256) != 64 or any(ch not in "0123456789abcdef" for ch in sha256):
            raise ValueError(f"sha256 must be 64 lowercase hex characters, got {sha256!r}.")
        path = check_name(str(path), "path", 4096)
        metrics_text = canonical_json(dict(metrics or {}), where="metrics")

        def run(conn: sa.Connection) -> int:
            trial = self._trial_row(conn, trial_id)
            cand = conn.execute(
                sa.select(TrialRow.candidate_key, TrialRow.candidate_json).where(TrialRow.trial_id == int(trial_id))
            ).first()
            if cand is None:
                raise ValueError(f"trial {trial.number} has no recorded candidate; nothing to export.")
            res = conn.execute(
                sa.insert(ArtifactRow).values(
                    study_id=self.study_id, trial_id=int(trial_id), trial_number=int(trial.number), path=path,
                    sha256=sha256, candidate_key=cand.candidate_key, candidate_json=cand.candidate_json,
                    metrics_json=metrics_text, created_at=utcnow(),
                )
            )
            return int(res.inserted_primary_key[0])

        return self._tx(run)

    def artifacts(self) -> list[Artifact]:
        rows = self._tx(
            lambda c: c.execute(
                sa.select(ArtifactRow.__table__).where(ArtifactRow.study_id == self.study_id).order_by(ArtifactRow.id)
            ).all()
        )
        return [
            Artifact(id=r.id, trial_id=r.trial_id, trial_number=r.trial_number, path=r.path, sha256=r.sha256,
                     candidate_key=r.candidate_key, candidate=from_json(r.candidate_json),
                     metrics=from_json(r.metrics_json))
            for r in rows
        ]

    def complete_values(self, n_objectives: int) -> list[tuple[int, int, tuple[float, ...], str | None]]:
        """``(number, trial_id, values, candidate_key)`` of every feasible COMPLETE trial, by number: one
        query over Optuna's value rows (no ``FrozenTrial`` objects), fast for tens of thousands of trials.
        Trials told placeholder values because they were outside the budget (user attribute
        ``evoprune:infeasible``) are left out, as ``optuna.Study.best_trials`` leaves them out, and so
        are an Optuna sampler's resampled suggestions (system attribute ``evoprune:resampled``: e.g.
        a repeat told the earlier trial's value)."""
        from optuna.trial import TrialState

        om = rdb_models()
        tm, tv, ua = om.TrialModel, om.TrialValueModel, om.TrialUserAttributeModel
        infeasible = sa.select(ua.trial_id).where(ua.key == INFEASIBLE_ATTR, ua.value_json == "true")
        resampled = sa.select(om.TrialSystemAttributeModel.trial_id).where(
            om.TrialSystemAttributeModel.key == RESAMPLED_ATTR)

        def run(conn: sa.Connection) -> list[Any]:
            return conn.execute(
                sa.select(tm.trial_id, tm.number, tv.objective, tv.value, tv.value_type, TrialRow.candidate_key)
                .join(tv, tv.trial_id == tm.trial_id)
                .outerjoin(TrialRow, TrialRow.trial_id == tm.trial_id)
                .where(tm.study_id == self.optuna_study_id, tm.state == TrialState.COMPLETE,
                       tm.trial_id.not_in(infeasible), tm.trial_id.not_in(resampled))
                .order_by(tm.number, tv.objective)
            ).all()

        vt = tv.TrialValueType
        trials: dict[int, list[Any]] = {}
        for r in self._tx(run):
            entry = trials.setdefault(r.number, [r.trial_id, [float("nan")] * n_objectives, r.candidate_key])
            if r.value_type == vt.INF_POS:
                value = float("inf")
            elif r.value_type == vt.INF_NEG:
                value = float("-inf")
            else:
                value = float(r.value)
            entry[1][r.objective] = value
        return [(n, trials[n][0], tuple(trials[n][1]), trials[n][2]) for n in sorted(trials)]
