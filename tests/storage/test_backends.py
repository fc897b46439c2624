"""Storage backends for the storage tests (fixtures imported by the other test_storage*.py files).

Every test that takes ``storage_url`` runs once per backend, like Optuna's own storage tests:

* ``sqlite``: a fresh file in ``tmp_path``;
* ``postgresql``: a uniquely named database on 127.0.0.1:5432 (``$EVOPRUNE_TEST_POSTGRES``),
  dropped afterwards;
* ``mysql``: the same on 127.0.0.1:3306 (``$EVOPRUNE_TEST_MYSQL``).

A server backend is skipped (with the reason) only when no server answers.
"""

from __future__ import annotations

import os
import uuid

import pytest
import sqlalchemy as sa

SERVERS = {
    "postgresql": os.environ.get("EVOPRUNE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    "mysql": os.environ.get("EVOPRUNE_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/test"),
}
BACKENDS = ("sqlite", "postgresql", "mysql")
_unreachable: dict[str, str] = {}


def _admin_engine(kind: str) -> sa.Engine:
    url = SERVERS[kind]
    if kind == "postgresql":
        return sa.create_engine(url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    return sa.create_engine(url, pool_pre_ping=True)


def _server_database(kind: str) -> tuple[str, callable]:
    """A new empty database on the ``kind`` server: (url, drop)."""
    if kind in _unreachable:
        pytest.skip(_unreachable[kind])
    admin = _admin_engine(kind)
    name = f"evoprune_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name}"))
            if kind == "mysql":
                conn.commit()
    except sa.exc.OperationalError as exc:
        admin.dispose()
        _unreachable[kind] = f"no {kind} server answers at {sa.engine.make_url(SERVERS[kind]).render_as_string()}: " \
                             f"{str(exc.orig).splitlines()[0]}"
        pytest.skip(_unreachable[kind])
    url = sa.engine.make_url(SERVERS[kind]).set(database=name).render_as_string(hide_password=False)

    def drop() -> None:
        with admin.connect() as conn:
            if kind == "postgresql":
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            else:
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
                conn.commit()
        admin.dispose()

    return url, drop


def make_storage_url(kind: str, tmp_path) -> tuple[str, callable]:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}", lambda: None
    return _server_database(kind)


@pytest.fixture(params=BACKENDS)
def storage_url(request, tmp_path):
    """A fresh, empty study database URL on each backend."""
    url, drop = make_storage_url(request.param, tmp_path)
    yield url
    drop()


def tiny_study_config(**changes):
    """A small StudyConfig (nothing is loaded until a runtime is built)."""
    from evoprune.search import StudyConfig

    data = dict(
        model="reference:tiny",
        calibration={"num_sequences": 8, "seq_len": 64},
        space={"attention": None, "mlp_step": 16},
        budget={"metric": "params", "max_ratio": 0.8},
        stages=[
            {"name": "s1", "evaluators": ["kl"], "eval_tokens": 512, "seq_len": 64, "promote": {"top_k": 2}},
            {"name": "final", "evaluators": ["kl"], "eval_tokens": 1024, "seq_len": 64},
        ],
        sampler={"name": "evolutionary", "options": {"offspring": 4}},
        objectives=["kl", "params"],
        seed=1,
    )
    data.update(changes)
    return StudyConfig.from_dict(data)


def storage_engine(url: str) -> sa.Engine:
    """An engine on ``url`` configured as evoprune configures its own (SQLite: WAL, ``BEGIN IMMEDIATE``)."""
    from evoprune.storage._engine import configure_sqlite_engine, normalize_url

    engine = sa.create_engine(normalize_url(url))
    configure_sqlite_engine(engine)
    return engine


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
