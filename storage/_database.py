"""Reads and writes of evoprune's tables for one study, each in one transaction.

:class:`StudyDatabase` is the SQL layer under :class:`~evoprune.storage.SQLRecorder`
and :class:`~evoprune.storage.EvoStudy`. Every write validates its input first
(JSON-able payloads, known trial of this study, trial still running) and runs in a
single transaction, so a row is never half-written; transient lock conflicts
(SQLite "database is locked", MySQL deadlocks) are retried.

It never holds tensors: candidates, configs, sampler states and details are JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from .._logging import get_logger
from ._owner import Owner
from ._schema import (
    SCHEMA_VERSION,
    ArtifactRow,
    ClaimRow,
    FingerprintRow,
    SamplerStateRow,
    StageResultRow,
    StageRow,
    StudyRow,
    TrialRow,
    WorkerRow,
    migrate,
    schema_version,
    utcnow,
)

__all__ = [
    "ConfigMismatchError",
    "FingerprintMismatchError",
    "StudyDatabase",
    "canonical_json",
    "from_json",
]

_log = get_logger("storage")
T = TypeVar("T")

DEFAULT_MAX_ATTEMPTS = 3


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


# --------------------------------------------------------------------------- JSON


def _plain(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool)):
                raise TypeError(f"{where}: dict key {k!r} is not a string.")
            out[str(k)] = _plain(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars, torch tensors
    if callable(tolist) and type(value).__module__.split(".")[0] in ("numpy", "torch"):
        return _plain(tolist(), where)
    raise TypeError(
        f"{where}: {type(value).__name__} is not JSON-able; store plain numbers, strings, lists and dicts."
    )


def canonical_json(value: Any, *, where: str = "value") -> str:
    """Canonical JSON text (sorted keys, no spaces) of ``value``; numpy/torch values become lists or
    numbers, non-finite floats are kept (``NaN``/``Infinity``, read back exactly by :func:`from_json`).

    >>> canonical_json({"b": [1, 2.5], "a": float("inf")})
    '{"a":Infinity,"b":[1,2.5]}'
    >>> canonical_json({"x": object()})
    Traceback (most recent call last):
    ...
    TypeError: value.x: object is not JSON-able; store plain numbers, strings, lists and dicts.
    """
    return json.dumps(_plain(value, where), sort_keys=True, separators=(",", ":"), allow_nan=True)


def from_json(text: str) -> Any:
    return json.loads(text)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _split_float(value: Any, what: str) -> tuple[float | None, str | None]:
    """A float column value and, for NaN/inf (which MySQL cannot store), its text."""
    if isinstance(value, bool) or value is None:
        raise TypeError(f"{what} must be a number, got {value!r}.")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, got {value!r}.") from None
    return (v, None) if math.isfinite(v) else (None, repr(v))


def _join_float(value: float | None, text: str | None) -> float:
    return float(text) if value is None and text else float(value if value is not None else math.nan)


def _name(value: Any, what: str, max_len: int = 128) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}.")
    if len(value) > max_len:
        raise ValueError(f"{what} is longer than {max_len} characters: {value[:40]!r}...")
    return value


# --------------------------------------------------------------------------- rows as values


@dataclasses.dataclass(frozen=True)
class StageRecord:
    """One evaluator result of one trial at one stage (as stored)."""

    trial_id: int
    stage: str
    evaluator: str
    tokens: int | None
    value: float
    seconds: float
    direction: str | None
    details: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class StageOutcome:
    """A trial's objective at a stage and whether it was promoted."""

    trial_id: int
    stage: str
    stage_index: int
    objective: float
    direction: str | None
    promoted: bool | None
    seconds: float


@dataclasses.dataclass(frozen=True)
class Artifact:
    """An exported checkpoint."""

    id: int
    trial_id: int
    trial_number: int
    path: str
    sha256: str
    candidate_key: str
    candidate: dict[str, Any]
    metrics: dict[str, Any]


# --------------------------------------------------------------------------- Optuna's tables

def _optuna_models() -> Any:
    # Optuna's table definitions (same database). Only read here, plus the heartbeat rows.
    from optuna.storages._rdb import models

    return models


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, sa_exc.IntegrityError):
        return False
    text = str(getattr(exc, "orig", exc)).lower()
    return any(
        s in text
        for s in ("database is locked", "deadlock", "lock wait timeout", "could not serialize", "busy")
    )


def run_transaction(engine: sa.Engine, fn: Callable[[sa.Connection], T], *, attempts: int = 8) -> T:
    """Run ``fn(conn)`` in one transaction (all or nothing), retrying transient lock conflicts."""
    for attempt in range(attempts):
        try:
            with engine.begin() as conn:
                return fn(conn)
        except sa_exc.DBAPIError as exc:
            if attempt + 1 >= attempts or not _is_transient(exc):
                raise
            time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")  # pragma: no cover


class StudyDatabase:
    """evoprune's rows for one study (plus read access to its Optuna trials).

    Args:
        engine: engine on the study database (the Optuna storage's engine).
        study_id: the ``evoprune_studies.id`` of the study.
        optuna_study_id: the Optuna ``studies.study_id``.
        study_name: for messages.
        owner: the identity of this process (claims, workers, trials it runs).

    Use :meth:`create_or_open` / :meth:`open` to get one. Example::

        db = StudyDatabase.create_or_open(engine, optuna_study_id=1, study_name="s", config={"seed": 0})
        db.record_fingerprints({"model": "ab12", "data": "cd34"})
        db.claim("key1")           # True
        db.claim("key1")           # False, in any process
    """

    def __init__(self, engine: sa.Engine, *, study_id: int, optuna_study_id: int, study_name: str,
                 owner: Owner | None = None) -> None:
        self.engine = engine
        self.study_id = int(study_id)
        self.optuna_study_id = int(optuna_study_id)
        self.study_name = study_name
        self.owner = owner or Owner.current()
        self._om = _optuna_models()

    # ------------------------------------------------------------------ plumbing
    def _tx(self, fn: Callable[[sa.Connection], T], *, attempts: int = 8) -> T:
        return run_transaction(self.engine, fn, attempts=attempts)

    def _read(self, fn: Callable[[sa.Connection], T]) -> T:
        return self._tx(fn)

    @staticmethod
    def _ensure_schema(engine: sa.Engine) -> None:
        version = schema_version(engine)
        if version != SCHEMA_VERSION:
            migrate(engine)

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
        allow_config_change: bool = False,
    ) -> StudyDatabase:
        """The study's row, created with ``config`` if missing.

        Raises:
            ConfigMismatchError: the study exists with a different config (unless
                ``allow_config_change``).
        """
        cls._ensure_schema(engine)
        text = canonical_json(config, where="config")
        digest = _sha256(text)

        def run(conn: sa.Connection) -> int:
            row = conn.execute(
                sa.select(StudyRow.id, StudyRow.config_sha256).where(StudyRow.optuna_study_id == optuna_study_id)
            ).first()
            if row is not None:
                if row.config_sha256 != digest and not allow_config_change:
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

        for attempt in range(3):
            try:
                sid = run_transaction(engine, run)
                break
            except sa_exc.IntegrityError:  # another process created it at the same moment
                if attempt == 2:
                    raise
        return cls(engine, study_id=sid, optuna_study_id=optuna_study_id, study_name=study_name, owner=owner)

    @classmethod
    def open(cls, engine: sa.Engine, *, optuna_study_id: int, study_name: str, owner: Owner | None = None
             ) -> StudyDatabase:
        """The study's row; ``LookupError`` if the study has no evoprune data (a plain Optuna study)."""
        version = schema_version(engine)
        if version is None:
            raise LookupError(f"study {study_name!r} is a plain Optuna study (no evoprune tables in this database).")
        if version != SCHEMA_VERSION:
            migrate(engine)
        with engine.connect() as conn:
            sid = conn.execute(
                sa.select(StudyRow.id).where(StudyRow.optuna_study_id == optuna_study_id)
            ).scalar()
        if sid is None:
            raise LookupError(
                f"study {study_name!r} has no evoprune config (created by plain Optuna?); create it with "
                "evoprune.create_study(config, ...) or `evoprune search CONFIG`."
            )
        return cls(engine, study_id=sid, optuna_study_id=optuna_study_id, study_name=study_name, owner=owner)

    def config(self) -> dict[str, Any]:
        """The study's full config, as stored."""
        text = self._read(
            lambda c: c.execute(sa.select(StudyRow.config_json).where(StudyRow.id == self.study_id)).scalar_one()
        )
        return from_json(text)

    # ------------------------------------------------------------------ fingerprints
    def fingerprints(self) -> dict[str, str]:
        rows = self._read(
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

    def record_fingerprints(self, current: Mapping[str, str], *, details: Mapping[str, Any] | None = None) -> None:
        """Store fingerprints not stored yet; raise :class:`FingerprintMismatchError` if a stored one differs."""
        values = {_name(k, "fingerprint kind", 64): _name(str(v), f"{k} fingerprint", 256) for k, v in current.items()}
        detail_text = {k: canonical_json((details or {}).get(k, {}), where=f"{k} details") for k in values}

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
                            study_id=self.study_id, kind=k, value=v, details_json=detail_text[k], created_at=utcnow()
                        )
                    )
            return {}

        try:
            changed = self._tx(run)
        except sa_exc.IntegrityError:  # a concurrent writer stored them first: compare with theirs
            self.check_fingerprints(values)
            return
        if changed:
            raise FingerprintMismatchError(self.study_name, changed)

    # ------------------------------------------------------------------ trials (Optuna's rows)
    def _trial_row(self, conn: sa.Connection, trial_id: int) -> Any:
        tm = self._om.TrialModel
        row = conn.execute(
            sa.select(tm.study_id, tm.number, tm.state).where(tm.trial_id == int(trial_id))
        ).first()
        if row is None or row.study_id != self.optuna_study_id:
            raise ValueError(f"trial id {trial_id} is not a trial of study {self.study_name!r}.")
        return row

    def _running_trial(self, conn: sa.Connection, trial_id: int, what: str) -> Any:
        from optuna.trial import TrialState

        row = self._trial_row(conn, trial_id)
        if row.state != TrialState.RUNNING:
            raise RuntimeError(
                f"cannot record {what} for trial {row.number} of study {self.study_name!r}: it is "
                f"{row.state.name}, not RUNNING (a trial whose worker was presumed dead is failed and retried "
                "elsewhere; its late results are not kept)."
            )
        return row

    # ------------------------------------------------------------------ workers
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

        tm = self._om.TrialModel

        def run(conn: sa.Connection) -> list[int]:
            conn.execute(sa.update(WorkerRow).where(WorkerRow.owner == self.owner.name).values(last_seen=sa.func.now()))
            rows = conn.execute(
                sa.select(TrialRow.trial_id)
                .join(tm, tm.trial_id == TrialRow.trial_id)
                .where(TrialRow.owner == self.owner.name, tm.state == TrialState.RUNNING)
            ).all()
            return [int(r.trial_id) for r in rows]

        return self._tx(run)

    def stop_worker(self, reason: str = "finished") -> None:
        self._tx(
            lambda c: c.execute(
                sa.update(WorkerRow)
                .where(WorkerRow.owner == self.owner.name, WorkerRow.stopped_at.is_(None))
                .values(stopped_at=sa.func.now(), stop_reason=reason[:255])
            )
        )

    def workers(self) -> list[dict[str, Any]]:
        """All workers of the study with their liveness (``alive``: True/False/None=unknown)."""

        def run(conn: sa.Connection) -> tuple[Any, list[Any]]:
            now = conn.execute(sa.select(sa.func.now())).scalar()
            rows = conn.execute(sa.select(WorkerRow.__table__).where(WorkerRow.study_id == self.study_id)).all()
            return now, [dict(r._mapping) for r in rows]

        now, rows = self._read(run)
        for r in rows:
            r["db_now"] = now
        return rows

    def dead_workers(self, grace_period: float) -> list[str]:
        """Owners (not stopped) that are dead: gone on this host, or silent for ``grace_period`` seconds."""
        dead = []
        for w in self.workers():
            if w["stopped_at"] is not None or w["owner"] == self.owner.name:
                continue
            owner = Owner(host=w["host"], pid=w["pid"], proc_start=w["proc_start"], token="")
            alive = owner.is_alive()
            if alive is None:
                now = _naive(w["db_now"])
                alive = (now - _naive(w["last_seen"])).total_seconds() <= grace_period
            if not alive:
                dead.append(w["owner"])
        return dead

    def live_workers(self, grace_period: float) -> list[str]:
        dead = set(self.dead_workers(grace_period))
        return [w["owner"] for w in self.workers()
                if w["stopped_at"] is None and w["owner"] not in dead and w["owner"] != self.owner.name]

    def mark_workers_dead(self, owners: Iterable[str], reason: str) -> None:
        owners = list(owners)
        if owners:
            self._tx(
                lambda c: c.execute(
                    sa.update(WorkerRow)
                    .where(WorkerRow.owner.in_(owners), WorkerRow.stopped_at.is_(None))
                    .values(stopped_at=sa.func.now(), stop_reason=reason[:255])
                )
            )

    # ------------------------------------------------------------------ claims
    def claim(self, candidate_key: str, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> bool:
        """Reserve ``candidate_key`` for this process: ``True`` for exactly one caller in the study.

        A claim that was released (its evaluation failed or its worker died) can be taken
        again until it has been taken ``max_attempts`` times.
        """
        key = _name(candidate_key, "candidate_key")
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
        except sa_exc.IntegrityError:
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
        key = _name(candidate_key, "candidate_key")
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
        rows = self._read(
            lambda c: c.execute(sa.select(ClaimRow.__table__).where(ClaimRow.study_id == self.study_id)).all()
        )
        return {
            r.candidate_key: {"owner": r.owner, "status": r.status, "attempts": r.attempts, "trial_id": r.trial_id}
            for r in rows
        }

    # ------------------------------------------------------------------ candidates of trials
    def record_candidate(self, trial_id: int, candidate_key: str, candidate_json: str, *, source: str) -> None:
        """Store the candidate trial ``trial_id`` evaluates (and link this process' claim to it)."""
        key = _name(candidate_key, "candidate_key")
        src = _name(source, "source", 32)
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
        row = self._read(
            lambda c: c.execute(
                sa.select(TrialRow.candidate_key, TrialRow.candidate_json).where(
                    TrialRow.study_id == self.study_id, TrialRow.trial_id == int(trial_id)
                )
            ).first()
        )
        return None if row is None else (row.candidate_key, row.candidate_json)

    def trial_candidates(self) -> list[dict[str, Any]]:
        """Every trial's candidate row joined with the trial's state (ordered by trial number)."""
        tm = self._om.TrialModel

        def run(conn: sa.Connection) -> list[Any]:
            return conn.execute(
                sa.select(TrialRow.trial_id, TrialRow.trial_number, TrialRow.candidate_key, TrialRow.candidate_json,
                          TrialRow.source, TrialRow.owner, tm.state)
                .join(tm, tm.trial_id == TrialRow.trial_id)
                .where(TrialRow.study_id == self.study_id)
                .order_by(TrialRow.trial_number)
            ).all()

        return [dict(r._mapping) | {"state": r.state.name} for r in self._read(run)]

    def finished_trial(self, candidate_key: str) -> dict[str, Any] | None:
        """The first COMPLETE or PRUNED trial that evaluated ``candidate_key``: ``{"trial_id", "number",
        "state", "stages": {stage: objective}}``, or ``None`` (e.g. for a driver that replays an
        interrupted generation and must reuse, not re-evaluate, what already finished)."""
        from optuna.trial import TrialState

        tm = self._om.TrialModel

        def run(conn: sa.Connection) -> Any:
            row = conn.execute(
                sa.select(TrialRow.trial_id, TrialRow.trial_number, tm.state)
                .join(tm, tm.trial_id == TrialRow.trial_id)
                .where(TrialRow.study_id == self.study_id, TrialRow.candidate_key == candidate_key,
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
                    "stages": {s.stage: _join_float(s.objective, s.objective_repr) for s in stages}}

        return self._read(run)

    # ------------------------------------------------------------------ stage results
    def record_stage(self, trial_id: int, stage: str, evaluator: str, tokens: int | None, value: float,
                     seconds: float, details: Mapping[str, Any] | None = None, *, direction: str | None = None
                     ) -> None:
        """Store one evaluator's result of one stage (one row; a repeat for the same trial/stage/evaluator
        is an error)."""
        st, ev = _name(stage, "stage"), _name(evaluator, "evaluator")
        if tokens is not None and (isinstance(tokens, bool) or int(tokens) != tokens or tokens < 0):
            raise ValueError(f"tokens must be a non-negative int or None, got {tokens!r}.")
        v, v_repr = _split_float(value, "value")
        secs, _ = _split_float(seconds, "seconds")
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
        st = _name(stage, "stage")
        if isinstance(stage_index, bool) or int(stage_index) != stage_index or stage_index < 0:
            raise ValueError(f"stage_index must be an int >= 0, got {stage_index!r}.")
        if promoted is not None and not isinstance(promoted, bool):
            raise TypeError(f"promoted must be True, False or None, got {promoted!r}.")
        if direction not in (None, "minimize", "maximize"):
            raise ValueError(f"direction must be 'minimize', 'maximize' or None, got {direction!r}.")
        o, o_repr = _split_float(objective, "objective")

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

        tm = self._om.TrialModel
        rows = self._read(
            lambda c: c.execute(
                sa.select(StageRow.objective, StageRow.objective_repr)
                .join(tm, tm.trial_id == StageRow.trial_id)
                .where(StageRow.study_id == self.study_id, StageRow.stage == stage, tm.state != TrialState.FAIL)
                .order_by(StageRow.id)
            ).all()
        )
        return [_join_float(r.objective, r.objective_repr) for r in rows]

    def stage_records(self, trial_id: int | None = None) -> list[StageRecord]:
        q = sa.select(StageResultRow.__table__).where(StageResultRow.study_id == self.study_id)
        if trial_id is not None:
            q = q.where(StageResultRow.trial_id == int(trial_id))
        rows = self._read(lambda c: c.execute(q.order_by(StageResultRow.id)).all())
        return [
            StageRecord(trial_id=r.trial_id, stage=r.stage, evaluator=r.evaluator, tokens=r.tokens,
                        value=_join_float(r.value, r.value_repr), seconds=r.seconds, direction=r.direction,
                        details=from_json(r.details_json))
            for r in rows
        ]

    def stage_outcomes(self, trial_id: int | None = None) -> list[StageOutcome]:
        q = sa.select(StageRow.__table__).where(StageRow.study_id == self.study_id)
        if trial_id is not None:
            q = q.where(StageRow.trial_id == int(trial_id))
        rows = self._read(lambda c: c.execute(q.order_by(StageRow.id)).all())
        return [
            StageOutcome(trial_id=r.trial_id, stage=r.stage, stage_index=r.stage_index,
                         objective=_join_float(r.objective, r.objective_repr), direction=r.direction,
                         promoted=r.promoted, seconds=r.seconds)
            for r in rows
        ]

    # ------------------------------------------------------------------ sampler state
    def save_sampler_state(self, generation: int, state: Mapping[str, Any], *, sampler: str = "",
                           keep_last: int | None = None) -> None:
        """Store the sampler state of ``generation`` (a repeat for the same generation replaces it).

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
        digest = _sha256(text)
        name = str(sampler or state.get("sampler") or state.get("class") or "")[:255]

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

        try:
            self._tx(run)
        except sa_exc.IntegrityError:  # inserted concurrently: replace
            self._tx(run)

    def load_sampler_state(self, generation: int | None = None) -> tuple[int, dict[str, Any]] | None:
        """The state of ``generation`` (default: the latest), or ``None``."""
        q = sa.select(SamplerStateRow.generation, SamplerStateRow.state_json, SamplerStateRow.state_sha256).where(
            SamplerStateRow.study_id == self.study_id
        )
        if generation is not None:
            q = q.where(SamplerStateRow.generation == int(generation))
        row = self._read(lambda c: c.execute(q.order_by(SamplerStateRow.generation.desc()).limit(1)).first())
        if row is None:
            return None
        if _sha256(row.state_json) != row.state_sha256:
            raise RuntimeError(
                f"study {self.study_name!r}: the stored sampler state of generation {row.generation} is "
                "corrupt (checksum mismatch); run `evoprune check` and restore the database from a backup."
            )
        return int(row.generation), from_json(row.state_json)

    def sampler_generations(self) -> list[int]:
        rows = self._read(
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
        path = _name(str(path), "path", 4096)
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
        rows = self._read(
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

    # ------------------------------------------------------------------ maintenance
    def release_claims_of_failed_trials(self) -> int:
        """Release claims still held by a FAILED trial (its worker died: the driver itself releases
        the claim of an evaluation that failed), so the candidate can be retried; returns how many.
        A death is not the candidate's fault, so it gives the attempt back."""
        from optuna.trial import TrialState

        tm = self._om.TrialModel
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

        return [(r.candidate_key, r.candidate_json) for r in self._read(run)]

    def integrity_problems(self) -> list[str]:
        """Consistency checks of the study's rows; an empty list means the study is sound.

        Checks: schema version; every evoprune row refers to a trial of this study; no candidate
        is COMPLETE in two trials; every COMPLETE trial has its candidate and stage rows (except
        the driver's infeasible placeholders and duplicate copies, which are told unevaluated);
        every stage row has evaluator rows; JSON parses; sampler-state checksums; claims point at
        trials that evaluate their candidate.
        """
        from optuna.trial import TrialState

        problems: list[str] = []
        tm = self._om.TrialModel
        version = schema_version(self.engine)
        if version != SCHEMA_VERSION:
            problems.append(f"schema version is {version}, expected {SCHEMA_VERSION}")

        def run(conn: sa.Connection) -> dict[str, Any]:
            trials = {
                r.trial_id: (r.number, r.state)
                for r in conn.execute(sa.select(tm.trial_id, tm.number, tm.state).where(tm.study_id == self.optuna_study_id))
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
            ua = self._om.TrialUserAttributeModel
            # told without an evaluation by the driver: infeasible placeholders and copies of duplicates
            unevaluated = {
                r.trial_id
                for r in conn.execute(
                    sa.select(ua.trial_id).join(tm, tm.trial_id == ua.trial_id)
                    .where(tm.study_id == self.optuna_study_id,
                           ua.key.in_(("evoprune:infeasible", "evoprune:duplicate_of")))
                )
            }
            return dict(trials=trials, tr=tr, stages=stages, results=results, claims=claims, states=states,
                        unevaluated=unevaluated)

        d = self._read(run)
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
            if trials[row.trial_id][1] == TrialState.COMPLETE:
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
            if c.trial_id is not None:
                row = by_trial.get(c.trial_id)
                if row is None or row.candidate_key != c.candidate_key:
                    problems.append(f"claim of {c.candidate_key} points at trial id {c.trial_id}, "
                                    "which does not evaluate it")
        for s in d["states"]:
            if _sha256(s.state_json) != s.state_sha256:
                problems.append(f"sampler state of generation {s.generation}: checksum mismatch")
        return problems


def _naive(ts: Any) -> Any:
    return ts.replace(tzinfo=None) if getattr(ts, "tzinfo", None) is not None else ts


def pareto_mask(values: Sequence[Sequence[float]], directions: Sequence[str]) -> list[bool]:
    """Which rows of ``values`` are non-dominated (``directions``: "minimize"/"maximize" per column).

    O(n log n + n * front) by sweeping points in lexicographic order: a point can only be
    dominated by a point before it, and if it is dominated at all, a front member dominates it.

    >>> pareto_mask([[1, 5], [2, 2], [3, 3], [1, 5]], ["minimize", "minimize"])
    [True, True, False, True]
    """
    import numpy as np

    if len(values) == 0:
        return []
    arr = np.asarray(values, dtype=np.float64)
    sign = np.array([1.0 if d == "minimize" else -1.0 for d in directions])
    arr = arr * sign
    arr = np.where(np.isnan(arr), np.inf, arr)
    order = np.lexsort(arr.T[::-1])
    front_idx: list[int] = []
    front = np.empty((0, arr.shape[1]))
    mask = np.zeros(len(arr), dtype=bool)
    for i in order:
        p = arr[i]
        if len(front_idx):
            dominated = np.any(np.all(front <= p, axis=1) & np.any(front < p, axis=1))
            if dominated:
                continue
        front_idx.append(int(i))
        front = np.vstack([front, p])
        mask[i] = True
    return mask.tolist()
