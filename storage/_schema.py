"""evoprune's own tables, next to Optuna's in the same database, and their migrations.

Every table is prefixed ``evoprune_`` so it never collides with Optuna's
(``studies``, ``trials``, ...). ``evoprune_schema_version`` holds one row with
the schema version; :func:`migrate` brings any database (empty, Optuna-only or
an older evoprune) to :data:`SCHEMA_VERSION` by running the ordered
:data:`MIGRATIONS` it has not run yet, each in its own transaction.

>>> import sqlalchemy as sa
>>> engine = sa.create_engine("sqlite://")
>>> schema_version(engine) is None            # no evoprune tables yet
True
>>> migrate(engine)
1
>>> schema_version(engine) == SCHEMA_VERSION
True
>>> sorted(t for t in sa.inspect(engine).get_table_names() if t.startswith("evoprune_"))[:3]
['evoprune_artifacts', 'evoprune_claims', 'evoprune_fingerprints']
"""

from __future__ import annotations

import datetime as _dt
import random
import time
from collections.abc import Callable, Sequence

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .._logging import get_logger

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SchemaVersionError",
    "migrate",
    "schema_version",
]

_log = get_logger("storage.schema")

#: Version of the evoprune tables this code reads and writes.
SCHEMA_VERSION = 1

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
    """One row (id 1): the evoprune schema version of this database."""

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


# --------------------------------------------------------------------------- migrations


class SchemaVersionError(RuntimeError):
    """The database's evoprune schema is newer than this code, or a migration failed."""


Migration = Callable[[sa.Connection], None]

_V1_TABLES = (
    "evoprune_studies",
    "evoprune_fingerprints",
    "evoprune_workers",
    "evoprune_claims",
    "evoprune_trials",
    "evoprune_stages",
    "evoprune_stage_results",
    "evoprune_sampler_states",
    "evoprune_artifacts",
)


def _migrate_to_v1(conn: sa.Connection) -> None:
    """Version 1: create the study, fingerprint, worker, claim, trial, stage, sampler-state and artifact tables.

    (When a later version changes one of these tables, freeze its version-1 definition here so
    that this migration keeps creating exactly the version-1 layout.)
    """
    tables = [Base.metadata.tables[name] for name in _V1_TABLES]
    Base.metadata.create_all(conn, tables=tables, checkfirst=True)


#: Ordered migrations: ``MIGRATIONS[i]`` takes a database from version ``i`` to ``i + 1``.
MIGRATIONS: tuple[Migration, ...] = (_migrate_to_v1,)

assert len(MIGRATIONS) == SCHEMA_VERSION


def schema_version(engine: sa.Engine) -> int | None:
    """The evoprune schema version stored in ``engine``'s database, ``None`` if it has none."""
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table(SchemaVersionRow.__tablename__):
            return None
        row = conn.execute(sa.select(SchemaVersionRow.version).where(SchemaVersionRow.id == 1)).scalar()
        return None if row is None else int(row)


def _ensure_version_table(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        Base.metadata.create_all(conn, tables=[SchemaVersionRow.__table__], checkfirst=True)
        has = conn.execute(sa.select(SchemaVersionRow.version).where(SchemaVersionRow.id == 1)).first()
        if has is None:
            conn.execute(sa.insert(SchemaVersionRow).values(id=1, version=0, updated_at=utcnow()))


def _migrate_once(engine: sa.Engine, migrations: Sequence[Migration], target: int) -> int:
    _ensure_version_table(engine)
    while True:
        with engine.begin() as conn:
            # Row lock (PostgreSQL/MySQL) so concurrent processes migrate one at a time.
            stmt = sa.select(SchemaVersionRow.version).where(SchemaVersionRow.id == 1)
            if conn.dialect.name != "sqlite":
                stmt = stmt.with_for_update()
            else:  # take SQLite's write lock now instead of upgrading a read lock later
                conn.execute(sa.update(SchemaVersionRow).where(SchemaVersionRow.id == 1).values(id=1))
            current = int(conn.execute(stmt).scalar_one())
            if current > target:
                raise SchemaVersionError(
                    f"this database has evoprune schema version {current}, newer than the {target} this "
                    "evoprune understands; upgrade evoprune (pip install -U evoprune) to open it."
                )
            if current == target:
                return current
            _log.info("migrating evoprune tables", extra={"fields": {"from": current, "to": current + 1}})
            migrations[current](conn)
            conn.execute(
                sa.update(SchemaVersionRow)
                .where(SchemaVersionRow.id == 1, SchemaVersionRow.version == current)
                .values(version=current + 1, updated_at=utcnow())
            )


def migrate(engine: sa.Engine, *, migrations: Sequence[Migration] | None = None, attempts: int = 6) -> int:
    """Create or upgrade evoprune's tables in ``engine``'s database; return the resulting version.

    Safe to call from several processes at once: each migration runs in a transaction that holds
    the version row, and a process that loses a race to create a table retries (MySQL commits DDL
    implicitly, so its migrations are written to be re-runnable).

    Args:
        engine: a SQLAlchemy engine on the study database.
        migrations: the ordered migrations (default :data:`MIGRATIONS`); the target version is their count.
        attempts: how often to retry after a concurrent-creation conflict.

    Raises:
        SchemaVersionError: the database is newer than this code, or migrating kept failing.
    """
    migrations = tuple(MIGRATIONS if migrations is None else migrations)
    target = len(migrations)
    last: Exception | None = None
    for attempt in range(attempts):
        try:
            return _migrate_once(engine, migrations, target)
        except SchemaVersionError:
            raise
        except (sa_exc.OperationalError, sa_exc.ProgrammingError, sa_exc.IntegrityError) as exc:
            last = exc
            time.sleep(0.05 * (attempt + 1) + random.random() * 0.1)
    raise SchemaVersionError(f"could not migrate the evoprune tables after {attempts} attempts: {last}") from last
