"""The evoprune tables' schema and its alembic migrations, on every backend, and a database
written by evoprune 0.1.0 (``tests/fixtures/study_v0.1.0.db``) opened with the storage layer alone.

The fixture was written by the 0.1.0 release: ``create_study`` on ``reference:tiny`` (objectives
kl + params, stages s1 and final, evolutionary sampler with 4 offspring), then
``run(n_generations=2)``: 5 trials (3 complete, 2 pruned), 8 stage rows, 3 sampler states, its
own ``evoprune_schema_version`` row (1) and no ``evoprune_alembic_version`` table.
"""

from __future__ import annotations

import shutil
import textwrap
import threading
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState
from helpers import storage_engine

from evoprune._optuna_private import study_id, trial_id
from evoprune.storage import SchemaVersionError, StudyDatabase, list_studies, schema_version
from evoprune.storage.internal import open_rdb_storage
from evoprune.storage._schema import SCHEMA_VERSION, VERSION_TABLE, is_current, upgrade
from evoprune.storage._tables import Base

FIXTURE = Path(__file__).parents[1] / "fixtures" / "study_v0.1.0.db"
EVOPRUNE_TABLES = {"evoprune_schema_version", "evoprune_studies", "evoprune_trials", "evoprune_claims",
                   "evoprune_stages", "evoprune_stage_results", "evoprune_sampler_states", "evoprune_fingerprints",
                   "evoprune_artifacts", "evoprune_workers"}

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _revision(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()


def _legacy(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT version FROM evoprune_schema_version")).scalars().all()


def _v2(tmp_path: Path) -> Path:
    """A folder with a future migration: version 2 adds a column to the artifacts table."""
    folder = tmp_path / "v2"
    folder.mkdir()
    (folder / "evoprune_v2.py").write_text(textwrap.dedent('''
        import sqlalchemy as sa
        from alembic import op

        revision = "evoprune_v2"
        down_revision = "evoprune_v1"
        branch_labels = None
        depends_on = None


        def upgrade():
            op.add_column("evoprune_artifacts", sa.Column("note", sa.String(64), nullable=True))
    '''))
    return folder


def _same_type(context, inspected_column, metadata_column, inspected_type, metadata_type):
    """Alembic's type comparison, except that MySQL's reflected DOUBLE is the models' Float(53)."""
    if isinstance(inspected_type, sa.Float) and isinstance(metadata_type, sa.Float):
        return False
    return None


# --------------------------------------------------------------------------- every backend


def test_upgrade_creates_every_table_once(storage_url):
    engine = storage_engine(storage_url)
    try:
        assert schema_version(engine) is None and not is_current(engine)
        assert upgrade(engine) == SCHEMA_VERSION
        assert schema_version(engine) == SCHEMA_VERSION and is_current(engine)
        names = set(sa.inspect(engine).get_table_names())
        assert names == EVOPRUNE_TABLES | {VERSION_TABLE}, "evoprune creates its own tables only"
        assert upgrade(engine) == SCHEMA_VERSION  # idempotent
        assert _revision(engine) == [f"evoprune_v{SCHEMA_VERSION}"] and _legacy(engine) == [SCHEMA_VERSION]
    finally:
        engine.dispose()


def test_upgraded_database_matches_the_models(storage_url):
    """The migrations and the models in storage/_tables.py describe the same tables."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = storage_engine(storage_url)
    try:
        upgrade(engine)
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={
                "include_name": lambda name, type_, parents: type_ != "table" or name in Base.metadata.tables,
                "compare_type": _same_type,
            })
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_concurrent_first_upgrades(storage_url):
    engines = [storage_engine(storage_url) for _ in range(3)]
    results, errors = [], []

    def go(e):
        try:
            results.append(upgrade(e))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors and results == [SCHEMA_VERSION] * 3
        assert _revision(engines[0]) == [f"evoprune_v{SCHEMA_VERSION}"] and _legacy(engines[0]) == [SCHEMA_VERSION]
    finally:
        for e in engines:
            e.dispose()


def test_a_later_migration_runs_once_and_newer_databases_are_refused(storage_url, tmp_path):
    engine = storage_engine(storage_url)
    v2 = _v2(tmp_path)
    try:
        assert upgrade(engine) == 1
        assert upgrade(engine, version_locations=[v2]) == 2
        assert "note" in {c["name"] for c in sa.inspect(engine).get_columns("evoprune_artifacts")}
        assert schema_version(engine) == 2 and _legacy(engine) == [2] and not is_current(engine)
        assert upgrade(engine, version_locations=[v2]) == 2  # not run twice (the column exists)
        with pytest.raises(SchemaVersionError, match="schema version 2, newer than the 1.*upgrade evoprune"):
            upgrade(engine)  # this code knows version 1 only
        with pytest.raises(SchemaVersionError, match="upgrade evoprune"):
            StudyDatabase.open(engine, optuna_study_id=1, study_name="s")
        # evoprune 0.1.0's marker alone says so too (no alembic table)
        with engine.begin() as conn:
            conn.execute(sa.text(f"DELETE FROM {VERSION_TABLE}"))
        assert schema_version(engine) == 2
        with pytest.raises(SchemaVersionError, match="schema version 2, newer"):
            upgrade(engine)
    finally:
        engine.dispose()


def test_a_0_1_0_database_is_stamped_not_recreated(storage_url):
    """Tables that evoprune 0.1.0 created (its own ``create_all``, its version row 1) keep their rows:
    the database is stamped with revision evoprune_v1 and nothing is run."""
    engine = storage_engine(storage_url)
    try:
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO evoprune_schema_version (id, version, updated_at) "
                                 "VALUES (1, 1, CURRENT_TIMESTAMP)"))
            conn.execute(sa.text("INSERT INTO evoprune_studies (optuna_study_id, study_name, config_json, "
                                 "config_sha256, evoprune_version, created_at) "
                                 "VALUES (7, 'old', '{}', 'x', '0.1.0', CURRENT_TIMESTAMP)"))
        assert schema_version(engine) == 1 and not is_current(engine)
        assert upgrade(engine) == SCHEMA_VERSION
        assert _revision(engine) == [f"evoprune_v{SCHEMA_VERSION}"]
        db = StudyDatabase.open(engine, optuna_study_id=7, study_name="old")
        assert db.config() == {}
    finally:
        engine.dispose()


def test_a_half_migrated_0_1_0_database_is_completed(storage_url):
    """evoprune 0.1.0 wrote version 0 before creating its tables; on MySQL (which commits every
    CREATE TABLE) a crash could leave some of them: the first migration creates the rest."""
    engine = storage_engine(storage_url)
    try:
        tables = Base.metadata.tables
        Base.metadata.create_all(engine, tables=[tables["evoprune_schema_version"], tables["evoprune_studies"]])
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO evoprune_schema_version (id, version, updated_at) "
                                 "VALUES (1, 0, CURRENT_TIMESTAMP)"))
        assert schema_version(engine) == 0
        assert upgrade(engine) == SCHEMA_VERSION
        assert set(sa.inspect(engine).get_table_names()) == EVOPRUNE_TABLES | {VERSION_TABLE}
        assert _legacy(engine) == [SCHEMA_VERSION]
    finally:
        engine.dispose()


def test_a_plain_optuna_database_gets_the_evoprune_tables(storage_url):
    """Optuna's tables and its own ``alembic_version`` are left as they were; Optuna still opens it."""
    rdb = open_rdb_storage(storage_url)
    try:
        plain = optuna.create_study(storage=rdb, study_name="plain")
        with rdb.engine.connect() as conn:
            optuna_revision = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
        assert schema_version(rdb.engine) is None
        with pytest.raises(LookupError, match="plain Optuna study"):
            StudyDatabase.open(rdb.engine, optuna_study_id=study_id(plain), study_name="plain")
        evo = optuna.create_study(storage=rdb, study_name="evo")
        db = StudyDatabase.create_or_open(rdb.engine, optuna_study_id=study_id(evo), study_name="evo",
                                          config={"seed": 1})
        assert schema_version(rdb.engine) == SCHEMA_VERSION and db.config() == {"seed": 1}
        with rdb.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == optuna_revision
        with pytest.raises(LookupError, match="no evoprune config"):
            StudyDatabase.open(rdb.engine, optuna_study_id=study_id(plain), study_name="plain")
        assert {s["name"]: s["evoprune"] for s in list_studies(storage_url)} == {"plain": False, "evo": True}
        assert {s.study_name for s in optuna.get_all_study_summaries(storage_url)} == {"plain", "evo"}
    finally:
        rdb.engine.dispose()


# --------------------------------------------------------------------------- the 0.1.0 fixture


def test_v010_fixture_opens_upgrades_and_works(tmp_path):
    path = tmp_path / "v010.db"
    shutil.copy(FIXTURE, path)
    url = f"sqlite:///{path}"
    rdb = open_rdb_storage(url)
    try:
        assert schema_version(rdb.engine) == 1 and not is_current(rdb.engine)  # 0.1.0's marker, no alembic
        study = optuna.load_study(study_name="v010", storage=rdb)
        db = StudyDatabase.open(rdb.engine, optuna_study_id=study_id(study), study_name="v010")
        assert is_current(rdb.engine) and _revision(rdb.engine) == ["evoprune_v1"] and _legacy(rdb.engine) == [1]
        with rdb.engine.connect() as conn:  # Optuna's own revision is Optuna's
            assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == "v3.2.0.a"

        config = db.config()
        assert config["model"] == "reference:tiny" and config["objectives"] == ["kl", "params"]
        assert [s["name"] for s in config["stages"]] == ["s1", "final"] and config["seed"] == 1
        assert set(db.fingerprints()) == {"model", "data", "space"}
        db.check_fingerprints(db.fingerprints())

        rows = db.trial_candidates()
        assert [r["trial_number"] for r in rows] == [0, 1, 2, 3, 4]
        assert sorted(r["state"] for r in rows) == ["COMPLETE"] * 3 + ["PRUNED"] * 2
        key, text = db.candidate_of(rows[0]["trial_id"])
        assert key == rows[0]["candidate_key"] and '"layers"' in text

        outcomes = db.stage_outcomes()
        assert len(outcomes) == 8 and {o.stage for o in outcomes} == {"s1", "final"}
        assert sum(o.stage == "final" for o in outcomes) == 3
        assert len(db.stage_records()) == 8 and all(r.evaluator == "kl" for r in db.stage_records())
        assert len(db.stage_history("s1")) == 5
        assert db.finished_trial(rows[4]["candidate_key"])["number"] == 4

        generation, state = db.load_sampler_state()
        assert generation == 2 and db.sampler_generations() == [0, 1, 2] and state["kind"] == "evolutionary"
        values = db.complete_values(2)
        assert [number for number, *_ in values] == [0, 2, 4] and all(len(v) == 2 for _, _, v, _ in values)
        assert db.integrity_problems() == []

        # ... and it keeps working: a new trial is claimed, recorded and staged as today's code does it
        assert db.claim(rows[0]["candidate_key"]) is False and db.claim("new-key") is True
        trial = study.ask()
        db.record_candidate(trial_id(trial), "new-key", text, source="evolution")
        db.record_stage(trial_id(trial), "s1", "kl", 512, 0.5, 0.1, {}, direction="minimize")
        db.record_stage_result(trial_id(trial), "s1", 0, 0.5, False, direction="minimize")
        study.tell(trial, state=TrialState.PRUNED)
        db.save_sampler_state(3, {"kind": "evolutionary", "generation": 3})
        assert db.load_sampler_state()[0] == 3 and len(db.stage_history("s1")) == 6
        assert db.integrity_problems() == []
    finally:
        rdb.engine.dispose()
