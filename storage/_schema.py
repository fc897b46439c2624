"""The schema version of evoprune's tables and their migrations (alembic, like Optuna's own).

The migrations live in ``storage/migrations/versions`` (one file per schema version N, revision
``"evoprune_v<N>"``); :func:`upgrade` runs the ones a database has not run yet with
``alembic.command.upgrade`` on a programmatic config, the way Optuna upgrades its own tables.
Alembic records them in ``evoprune_alembic_version``, a table of its own, so evoprune's revisions
never mix with Optuna's ``alembic_version``. The integer row of ``evoprune_schema_version``
(evoprune 0.1.0's version marker) is kept equal to the schema version, so an older evoprune
refuses a database newer than itself, and a database written by evoprune 0.1.0 (that row, no
alembic table) is stamped with its revision and then upgraded like any other.

>>> import sqlalchemy as sa
>>> engine = sa.create_engine("sqlite://")
>>> schema_version(engine) is None            # no evoprune tables yet
True
>>> upgrade(engine) == SCHEMA_VERSION == schema_version(engine)
True
>>> sorted(t for t in sa.inspect(engine).get_table_names() if t.startswith("evoprune_"))[:3]
['evoprune_alembic_version', 'evoprune_artifacts', 'evoprune_claims']
"""

from __future__ import annotations

import contextlib
import logging
import os
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa

from .._logging import get_logger
from ._engine import run_transaction
from ._tables import Base, SchemaVersionRow, utcnow

__all__ = ["SCHEMA_VERSION", "VERSION_TABLE", "SchemaVersionError", "schema_version", "upgrade"]

_log = get_logger("storage.schema")

#: Version of the evoprune tables this code reads and writes: the number of its newest migration.
SCHEMA_VERSION = 1
#: Alembic's version table for evoprune's migrations (Optuna's own is ``alembic_version``).
VERSION_TABLE = "evoprune_alembic_version"

MIGRATIONS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations")
_REVISION_PREFIX = "evoprune_v"
_LOCK_NAME = "evoprune_migrate"
_LOCK_TIMEOUT_S = 600


class SchemaVersionError(RuntimeError):
    """The database's evoprune tables are newer than this evoprune understands, or migrating them failed."""


def _revision(version: int) -> str:
    return f"{_REVISION_PREFIX}{version}"


def _number(revision: str) -> int | None:
    """The schema version of an evoprune revision id, ``None`` for one not named ``evoprune_v<N>``."""
    tail = revision[len(_REVISION_PREFIX):] if revision.startswith(_REVISION_PREFIX) else ""
    return int(tail) if tail.isdigit() else None


def _newer_error(found: str, target: int) -> SchemaVersionError:
    return SchemaVersionError(
        f"this database has evoprune schema version {found}, newer than the {target} this evoprune "
        "understands; upgrade evoprune (pip install -U evoprune) to open it."
    )


def _alembic_config(connection: sa.Connection, version_locations: Sequence[str] = ()) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", MIGRATIONS_DIR.replace("%", "%%"))
    if version_locations:
        locations = [os.path.join(MIGRATIONS_DIR, "versions"), *map(os.fspath, version_locations)]
        config.set_main_option("path_separator", "os")  # alembic < 1.16 splits on spaces
        config.set_main_option("version_locations", os.pathsep.join(locations).replace("%", "%%"))
    config.attributes["connection"] = connection
    # what migrations/env.py needs, handed over here so that it imports nothing of evoprune's
    config.attributes["target_metadata"] = Base.metadata
    config.attributes["version_table"] = VERSION_TABLE
    return config


def _current_revision(connection: sa.Connection) -> str | None:
    from alembic.migration import MigrationContext

    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def _legacy_version(connection: sa.Connection) -> int | None:
    """The integer of ``evoprune_schema_version`` (all an evoprune 0.1.0 database has), or ``None``."""
    if not sa.inspect(connection).has_table(SchemaVersionRow.__tablename__):
        return None
    row = connection.execute(sa.select(SchemaVersionRow.version).where(SchemaVersionRow.id == 1)).scalar()
    return None if row is None else int(row)


def schema_version(engine: sa.Engine) -> int | None:
    """The evoprune schema version of ``engine``'s database, ``None`` if it has no evoprune tables."""
    with engine.connect() as conn:
        revision = _current_revision(conn)
        number = None if revision is None else _number(revision)
        return number if number is not None else _legacy_version(conn)


def is_current(engine: sa.Engine) -> bool:
    """Is the database at exactly this code's schema version (nothing to migrate)? A cheap check
    that opening a study makes before it takes the migration lock."""
    with engine.connect() as conn:
        return _current_revision(conn) == _revision(SCHEMA_VERSION)


@contextlib.contextmanager
def _migration_lock(engine: sa.Engine) -> Iterator[None]:
    """Let one process at a time migrate: a server-wide named lock held on a connection of its own
    (PostgreSQL advisory lock, MySQL ``GET_LOCK``), named after the database. SQLite needs none: on
    an engine of :func:`~evoprune.storage.open_rdb_storage` the migration's transaction starts with
    ``BEGIN IMMEDIATE``, which already excludes every other writer."""
    dialect = engine.dialect.name
    if dialect not in ("postgresql", "mysql", "mariadb"):
        yield
        return
    name = f"{_LOCK_NAME}:{engine.url.database or ''}"[:64]  # MySQL's limit for lock names
    key = zlib.crc32(name.encode())
    with engine.connect() as conn:
        if dialect == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        else:
            got = conn.execute(sa.text("SELECT GET_LOCK(:n, :t)"), {"n": name, "t": _LOCK_TIMEOUT_S}).scalar()
            if got != 1:
                raise SchemaVersionError(
                    f"waited {_LOCK_TIMEOUT_S} s for another process migrating the evoprune tables; try again."
                )
        conn.commit()
        try:
            yield
        finally:
            if dialect == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            else:
                conn.execute(sa.text("SELECT RELEASE_LOCK(:n)"), {"n": name})
            conn.commit()


def _upgrade_in(connection: sa.Connection, version_locations: Sequence[str]) -> int:
    from alembic import command
    from alembic.script import ScriptDirectory

    logging.getLogger("alembic").setLevel(logging.WARNING)  # as Optuna does: no INFO lines per run
    config = _alembic_config(connection, version_locations)
    script = ScriptDirectory.from_config(config)
    head = script.get_current_head()
    target = _number(head or "")
    if target is None:
        raise SchemaVersionError(f"evoprune's newest migration is {head!r}, not named {_REVISION_PREFIX}<N>.")
    known = {rev.revision for rev in script.walk_revisions()}
    current = _current_revision(connection)
    if current is None:
        legacy = _legacy_version(connection)
        if legacy is not None and legacy > target:
            raise _newer_error(str(legacy), target)
        if legacy:  # evoprune 0.1.0 migrated it to `legacy` itself: record that, run what follows
            _log.info("stamping evoprune tables of an older release",
                      extra={"fields": {"schema_version": legacy, "revision": _revision(legacy)}})
            command.stamp(config, _revision(legacy))
            current = _revision(legacy)
    elif current not in known:
        number = _number(current)
        raise _newer_error(str(number) if number is not None else repr(current), target)
    if current != head:
        _log.info("migrating evoprune tables", extra={"fields": {"from": current, "to": head}})
        command.upgrade(config, "head")
    values = {"version": target, "updated_at": utcnow()}
    if connection.execute(sa.update(SchemaVersionRow).where(SchemaVersionRow.id == 1).values(**values)).rowcount == 0:
        connection.execute(sa.insert(SchemaVersionRow).values(id=1, **values))
    return target


def upgrade(engine: sa.Engine, *, version_locations: Sequence[str] = ()) -> int:
    """Create or upgrade evoprune's tables in ``engine``'s database; return the resulting schema version.

    Runs the migrations the database has not run yet, in one transaction (on MySQL, which commits
    each ``CREATE``/``ALTER`` at once, a migration that stopped half-way is written to run again)
    under a lock that lets one process at a time migrate, so any number of workers may open a new
    database at the same moment. An empty or Optuna-only database gets every table; a database of
    evoprune 0.1.0 keeps its rows.

    Args:
        engine: a SQLAlchemy engine on the study database.
        version_locations: extra folders of revision files (tests add a future version with it).

    Raises:
        SchemaVersionError: the database is newer than this evoprune.
    """
    with _migration_lock(engine):
        return run_transaction(engine, lambda conn: _upgrade_in(conn, version_locations))
