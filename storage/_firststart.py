"""Many processes opening one new, empty database at the same moment (a fleet of workers started by a
scheduler): Optuna's table creation (``create_all``, then its version rows) is not safe under that --
PostgreSQL fails with ``duplicate key ... "pg_type_typname_nsp_index"``, MySQL/MariaDB with
``Table ... already exists``, SQLite with ``table ... already exists``. :func:`first_start_lock`
lets one process at a time create them: the migration lock of :mod:`evoprune.storage._schema` on
PostgreSQL and MySQL (a server-wide named lock), an exclusive ``flock`` on the SQLite file. A
database whose Optuna tables are complete (the ``alembic_version`` row, Optuna's last step) takes
no lock, so opening an existing study costs one query.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa

__all__ = ["first_start_lock"]


def _optuna_ready(engine: sa.Engine) -> bool:
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT version_num FROM alembic_version")).first() is not None
    except sa.exc.DBAPIError:
        return False  # no table yet (or no database: Optuna's own open reports that)


@contextlib.contextmanager
def first_start_lock(url: str, sqlite_path: str | None, engine_kwargs: dict[str, Any]) -> Iterator[None]:
    """Hold a lock while Optuna creates its tables in a database that lacks them (see the module docs)."""
    from ._schema import _migration_lock

    if url.startswith("sqlite"):
        if sqlite_path is None:  # in memory: one process only
            yield
            return
        fd = os.open(sqlite_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock
        return
    engine = sa.create_engine(url, **{k: v for k, v in engine_kwargs.items() if k != "pool_pre_ping"})
    try:
        if _optuna_ready(engine):
            yield
            return
        with _migration_lock(engine):
            yield
    finally:
        engine.dispose()
