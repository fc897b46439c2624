"""evoprune's own tables, next to Optuna's in the same database (SQLAlchemy models).

Every table is prefixed ``evoprune_`` so it never collides with Optuna's (``studies``,
``trials``, ...). These models are what the code reads and writes; the migrations in
``storage/migrations/versions`` create and change the tables in a database, and a test checks
that upgrading an empty database gives exactly these models.

>>> sorted(Base.metadata.tables)[:3]
['evoprune_artifacts', 'evoprune_claims', 'evoprune_fingerprints']
>>> all(name.startswith("evoprune_") for name in Base.metadata.tables)
True
"""

from __future__ import annotations

import datetime as _dt

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "ArtifactRow",
    "Base",
    "ClaimRow",
    "FingerprintRow",
    "JSONText",
    "SamplerStateRow",
    "SchemaVersionRow",
    "StageResultRow",
    "StageRow",
    "StudyRow",
    "TrialRow",
    "WorkerRow",
    "utcnow",
]

#: JSON documents are stored as text we serialize ourselves (canonical, NaN-free);
#: MySQL's TEXT stops at 64 KiB, so use LONGTEXT there.
JSONText = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


def utcnow() -> _dt.datetime:
    """Naive UTC timestamp (portable across SQLite, PostgreSQL and MySQL)."""
    return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    metadata = sa.MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class SchemaVersionRow(Base):
    """One row (id 1): the schema version of the evoprune tables, as an integer.

    The migrations themselves are tracked by alembic in ``evoprune_alembic_version``; this row
    (evoprune 0.1.0's own version marker) is kept equal to the number of the newest migration
    applied, so that an older evoprune refuses a database that is newer than it."""

    __tablename__ = "evoprune_schema_version"
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    updated_at: Mapped[_dt.datetime] = mapped_column(sa.DateTime, nullable=False, default=utcnow)


class StudyRow(Base):
    """An evoprune study: the Optuna study it extends and its full config."""

    __tablename__ = "evoprune_studies"
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    optuna_study_id: Mapped[int] = mapped_column(sa.Integer, nullable=False, unique=True)
    study_name: Mapped[str] = mapped_column(sa.String(512), nullable=False)
    config_json: Mapped[str] = mapped_column(JSONText, nullable=False)
    config_sha256: Mapped[str] = mapped_column(sa.String(64), nullable=False)
    evoprune_version: Mapped[str] = mapped_column(sa.String(32), nullable=False)
    created_at: Mapped[_dt.datetime] = mapped_column(sa.DateTime, nullable=False, default=utcnow)


class FingerprintRow(Base):
    """Model / data fingerprints a study was started with (one row per kind)."""

    __tablename__ = "evoprune_fingerprints"
    __table_args__ = (sa.UniqueConstraint("study_id", "kind"),)
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(sa.ForeignKey("evoprune_studies.id", ondelete="CASCADE"), nullable=False)
    kind: Mapped[str] = mapped_column(sa.String(64), nullable=False)
    value: Mapped[str] = mapped_column(sa.String(256), nullable=False)
    details_json: Mapped[str] = mapped_column(JSONText, nullable=False, default="{}")
    created_at: Mapped[_dt.datetime] = mapped_column(sa.DateTime, nullable=False, default=utcnow)


class WorkerRow(Base):
    """A process working on a study; ``last_seen`` is its heartbeat (database clock)."""

    __tablename__ = "evoprune_workers"
    __table_args__ = (sa.Index(None, "study_id"),)
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(sa.ForeignKey("evoprune_studies.id", ondelete="CASCADE"), nullable=False)
    owner: Mapped[str] = mapped_column(sa.String(255), nullable=False, unique=True)
    host: Mapped[str] = mapped_column(sa.String(255), nullable=False)
    pid: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    proc_start: Mapped[str] = mapped_column(sa.String(64), nullable=False, default="")
    command: Mapped[str] = mapped_column(sa.String(64), nullable=False, default="")
    started_at: Mapped[_dt.datetime] = mapped_column(sa.DateTime, nullable=False, server_default=sa.func.now())
    last_seen: Mapped[_dt.datetime] = mapped_column(sa.DateTime, nullable=False, server_default=sa.func.now())
    stopped_at: Mapped[_dt.datetime | None] = mapped_column(sa.DateTime, nullable=True)
    stop_reason: Mapped[str | None] = mapped_column(sa.String(255), nullable=True)


class ClaimRow(Base):
    """A reserved candidate. ``(study_id, candidate_key)`` is unique, so of two workers that
    claim the same candidate exactly one ``INSERT`` succeeds. A released claim may be taken
    again: ``attempts`` counts the evaluations that failed (plus the one in progress), at most
    ``max_attempts``; a claim released because its worker died gives its attempt back (a kill,
    a reboot or a lost machine is not the candidate's fault), so an interrupted search can be
    resumed any number of times."""

    __tablename__ = "evoprune_claims"
    __table_args__ = (sa.UniqueConstraint("study_id", "candidate_key"),)
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(sa.ForeignKey("evoprune_studies.id", ondelete="CASCADE"), nullable=False)
    candidate_key: Mapped[str] = mapped_column(sa.String(128), nullable=False)
    owner: Mapped[str] = mapped_column(sa.String(255), nullable=False)
    status: Mapped[str] = mapped_column(sa.String(16), nullable=False)  # "claimed" | "released"
    attempts: Mapped[int] = mapped_column(sa.Integer, nullable=False, default=1)
    trial_id: Mapped[int | None] = mapped_column(sa.Integer, nullable=True)
    claimed_at: Mapped[_dt.datetime] = mapped_column(sa.DateTime, nullable=False, default=utcnow)
    updated_at: Mapped[_dt.datetime] = mapped_column(sa.DateTime, nullable=False, default=utcnow)


class TrialRow(Base):
    """The candidate a trial evaluates (JSON and key), where it came from and who ran it."""

    __tablename__ = "evoprune_trials"
    __table_args__ = (sa.Index(None, "study_id", "candidate_key"),)
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(sa.ForeignKey("evoprune_studies.id", ondelete="CASCADE"), nullable=False)
    trial_id: Mapped[int] = mapped_column(sa.Integer, nullable=False, unique=True)
    trial_number: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    candidate_key: Mapped[str] = mapped_column(sa.String(128), nullable=False)
    candidate_json: Mapped[str] = mapped_column(JSONText, nullable=False)
    source: Mapped[str] = mapped_column(sa.String(32), nullable=False)
    owner: Mapped[str] = mapped_column(sa.String(255), nullable=False, default="")
    created_at: Mapped[_dt.datetime] = mapped_column(sa.DateTime, nullable=False, default=utcnow)


class StageRow(Base):
    """A trial's outcome at one stage: the objective the promotion ranks and the decision."""

    __tablename__ = "evoprune_stages"
    __table_args__ = (sa.UniqueConstraint("trial_id", "stage"), sa.Index(None, "study_id", "stage"))
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(sa.ForeignKey("evoprune_studies.id", ondelete="CASCADE"), nullable=False)
    trial_id: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    stage: Mapped[str] = mapped_column(sa.String(128), nullable=False)
    stage_index: Mapped[int] = mapped_column(sa.Integer, nullable=False, default=0)
    objective: Mapped[float | None] = mapped_column(sa.Float(precision=53), nullable=True)
    objective_repr: Mapped[str | None] = mapped_column(sa.String(16), nullable=True)
    direction: Mapped[str | None] = mapped_column(sa.String(16), nullable=True)
    promoted: Mapped[bool | None] = mapped_column(sa.Boolean, nullable=True)
    seconds: Mapped[float] = mapped_column(sa.Float(precision=53), nullable=False, default=0.0)
    created_at: Mapped[_dt.datetime] = mapped_column(sa.DateTime, nullable=False, default=utcnow)


class StageResultRow(Base):
    """One evaluator's result for one trial at one stage."""

    __tablename__ = "evoprune_stage_results"
    __table_args__ = (sa.UniqueConstraint("trial_id", "stage", "evaluator"), sa.Index(None, "study_id", "stage"))
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(sa.ForeignKey("evoprune_studies.id", ondelete="CASCADE"), nullable=False)
    trial_id: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    stage: Mapped[str] = mapped_column(sa.String(128), nullable=False)
    evaluator: Mapped[str] = mapped_column(sa.String(128), nullable=False)
    tokens: Mapped[int | None] = mapped_column(sa.BigInteger, nullable=True)
    value: Mapped[float | None] = mapped_column(sa.Float(precision=53), nullable=True)
    value_repr: Mapped[str | None] = mapped_column(sa.String(16), nullable=True)
    seconds: Mapped[float] = mapped_column(sa.Float(precision=53), nullable=False, default=0.0)
    direction: Mapped[str | None] = mapped_column(sa.String(16), nullable=True)
    details_json: Mapped[str] = mapped_column(JSONText, nullable=False, default="{}")
    created_at: Mapped[_dt.datetime] = mapped_column(sa.DateTime, nullable=False, default=utcnow)


class SamplerStateRow(Base):
    """The sampler's state at the start of a generation (first writer wins)."""

    __tablename__ = "evoprune_sampler_states"
    __table_args__ = (sa.UniqueConstraint("study_id", "generation"),)
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(sa.ForeignKey("evoprune_studies.id", ondelete="CASCADE"), nullable=False)
    generation: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    sampler: Mapped[str] = mapped_column(sa.String(255), nullable=False)
    state_json: Mapped[str] = mapped_column(JSONText, nullable=False)
    state_sha256: Mapped[str] = mapped_column(sa.String(64), nullable=False)
    created_at: Mapped[_dt.datetime] = mapped_column(sa.DateTime, nullable=False, default=utcnow)


class ArtifactRow(Base):
    """An exported checkpoint: where, its content digest, the candidate and its metrics."""

    __tablename__ = "evoprune_artifacts"
    __table_args__ = (sa.Index(None, "study_id", "trial_id"),)
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(sa.ForeignKey("evoprune_studies.id", ondelete="CASCADE"), nullable=False)
    trial_id: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    trial_number: Mapped[int] = mapped_column(sa.Integer, nullable=False)
    path: Mapped[str] = mapped_column(sa.Text, nullable=False)
    sha256: Mapped[str] = mapped_column(sa.String(64), nullable=False)
    candidate_key: Mapped[str] = mapped_column(sa.String(128), nullable=False)
    candidate_json: Mapped[str] = mapped_column(JSONText, nullable=False)
    metrics_json: Mapped[str] = mapped_column(JSONText, nullable=False, default="{}")
    created_at: Mapped[_dt.datetime] = mapped_column(sa.DateTime, nullable=False, default=utcnow)
