"""The storage backends themselves (the ``storage_url`` fixture, in ``tests/conftest.py``, runs a
test once per backend: sqlite, postgresql, mysql; the helpers are in ``tests/helpers.py``)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from helpers import storage_engine


# --------------------------------------------------------------------------- the backends themselves


def test_each_backend_starts_empty(storage_url):
    engine = storage_engine(storage_url)
    try:
        assert sa.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


def test_run_transaction_retries_lock_conflicts_only(storage_url):
    """One retry helper for every transaction: a lock conflict runs the whole unit again (its first
    run rolled back); a unique-constraint conflict does not, unless the caller says it may."""
    from evoprune.storage._engine import run_transaction

    engine = storage_engine(storage_url)
    meta = sa.MetaData()
    table = sa.Table("t", meta, sa.Column("k", sa.String(16), primary_key=True))
    meta.create_all(engine)
    calls = []

    def insert_then_locked(conn):
        calls.append(1)
        conn.execute(sa.insert(table).values(k=f"k{len(calls)}"))
        if len(calls) == 1:
            raise sa.exc.OperationalError("INSERT", {}, Exception("database is locked"))
        return len(calls)

    def create_unless_exists(conn):
        calls.append(1)
        if conn.execute(sa.select(table.c.k).where(table.c.k == "x")).first() is None:
            conn.execute(sa.insert(table).values(k="x"))
            if len(calls) == 1:  # as if another process inserted "x" at the same moment
                conn.execute(sa.insert(table).values(k="x"))
        return "ok"

    try:
        assert run_transaction(engine, insert_then_locked) == 2
        with engine.connect() as conn:
            assert conn.execute(sa.select(table.c.k)).scalars().all() == ["k2"]
        calls.clear()
        with pytest.raises(sa.exc.IntegrityError):
            run_transaction(engine, create_unless_exists)
        assert len(calls) == 1
        calls.clear()
        assert run_transaction(engine, create_unless_exists, retry_conflicts=True) == "ok" and len(calls) == 2
    finally:
        engine.dispose()
