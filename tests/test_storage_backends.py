"""Storage backends for the storage tests (fixtures imported by the other test_storage*.py files)
plus the schema tests: create, version, migrate.

Every test that takes ``storage_url`` runs once per backend, like Optuna's own storage tests:

* ``sqlite``: a fresh file in ``tmp_path``;
* ``postgresql``: a uniquely named database on 127.0.0.1:5432 (``$EVOPRUNE_TEST_POSTGRES``),
  dropped afterwards;
* ``mysql``: the same on 127.0.0.1:3306 (``$EVOPRUNE_TEST_MYSQL``).

A server backend is skipped (with the reason) only when no server answers.
"""

from __future__ import annotations

import os
import threading
import uuid

import pytest
import sqlalchemy as sa

from evoprune.storage import SCHEMA_VERSION, SchemaVersionError, migrate, schema_version
from evoprune.storage._schema import MIGRATIONS

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


# --------------------------------------------------------------------------- schema


def _engine(url: str) -> sa.Engine:
    from evoprune.storage._engine import configure_sqlite_engine, normalize_url

    engine = sa.create_engine(normalize_url(url))
    configure_sqlite_engine(engine)
    return engine


def test_schema_create_version_and_idempotent_migrate(storage_url):
    engine = _engine(storage_url)
    try:
        assert schema_version(engine) is None
        assert migrate(engine) == SCHEMA_VERSION
        assert schema_version(engine) == SCHEMA_VERSION
        names = set(sa.inspect(engine).get_table_names())
        for table in ("evoprune_schema_version", "evoprune_studies", "evoprune_trials", "evoprune_claims",
                      "evoprune_stages", "evoprune_stage_results", "evoprune_sampler_states",
                      "evoprune_fingerprints", "evoprune_artifacts", "evoprune_workers"):
            assert table in names
        assert not any(n in names for n in ("trials", "studies")), "evoprune must not create Optuna's tables"
        assert migrate(engine) == SCHEMA_VERSION  # idempotent
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT COUNT(*) FROM evoprune_schema_version")).scalar() == 1
    finally:
        engine.dispose()


def test_concurrent_first_migration(storage_url):
    engines = [_engine(storage_url) for _ in range(3)]
    results, errors = [], []

    def go(e):
        try:
            results.append(migrate(e))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e in engines:
        e.dispose()
    assert not errors and results == [SCHEMA_VERSION] * 3


def test_migration_path_runs_in_order_and_refuses_newer_databases(storage_url):
    engine = _engine(storage_url)
    calls = []

    def to_v2(conn):
        calls.append(2)
        conn.execute(sa.text("ALTER TABLE evoprune_artifacts ADD COLUMN note VARCHAR(64)"))

    try:
        assert migrate(engine, migrations=MIGRATIONS[:1]) == 1
        assert migrate(engine, migrations=(*MIGRATIONS[:1], to_v2)) == 2
        assert calls == [2]
        assert "note" in {c["name"] for c in sa.inspect(engine).get_columns("evoprune_artifacts")}
        assert migrate(engine, migrations=(*MIGRATIONS[:1], to_v2)) == 2 and calls == [2]  # not run twice
        with pytest.raises(SchemaVersionError, match="newer.*upgrade evoprune"):
            migrate(engine)  # this code knows version 1 only
    finally:
        engine.dispose()


def test_migration_adds_evoprune_tables_to_a_plain_optuna_database(storage_url):
    import optuna

    from evoprune import create_study

    optuna.create_study(storage=storage_url, study_name="plain")
    study = create_study(tiny_study_config(), storage=storage_url, study_name="evo")
    assert schema_version(study.storage.engine) == SCHEMA_VERSION
    assert {s.study_name for s in optuna.get_all_study_summaries(storage_url)} == {"plain", "evo"}
    study.storage.engine.dispose()
