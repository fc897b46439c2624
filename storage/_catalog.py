"""The studies of a database as a whole: which exist (read without writing), whether one has started,
and removing a study's evoprune rows -- also the rows a plain ``optuna delete-study`` left behind."""

from __future__ import annotations

import os
from typing import Any

import sqlalchemy as sa

from .._logging import get_logger
from .._optuna_private import rdb_models, study_id
from ._engine import _is_sqlite, _sqlite_file, check_storage, open_rdb_storage, sqlite_readonly_uri
from ._tables import Base, StudyRow

__all__ = ["list_studies", "stored_study"]


def _started(conn: sa.Connection, sid: int, optuna_study_id: int) -> bool:
    """Has evoprune study ``sid`` ever started: any Optuna trial, or any row of its own (fingerprints,
    workers, claims, sampler states, ...)?"""
    tm = rdb_models().TrialModel
    if conn.execute(sa.select(tm.trial_id).where(tm.study_id == int(optuna_study_id)).limit(1)).first():
        return True
    for model in Base.metadata.sorted_tables:
        if model.name != StudyRow.__tablename__ and "study_id" in model.c:
            if conn.execute(sa.select(model.c.id).where(model.c.study_id == sid).limit(1)).first():
                return True
    return False


def _delete_study_rows(conn: sa.Connection, sid: int) -> None:
    """Every row of evoprune study ``sid``, children first (SQLite does not cascade by default)."""
    for model in Base.metadata.sorted_tables[::-1]:
        if model.name != StudyRow.__tablename__ and "study_id" in model.c:
            conn.execute(sa.delete(model).where(model.c.study_id == sid))
    conn.execute(sa.delete(StudyRow).where(StudyRow.id == sid))


def _purge_orphans(conn: sa.Connection, optuna_study_id: int | None = None, upto: int | None = None) -> int:
    """Delete the rows of evoprune studies whose Optuna study is gone (deleted with plain Optuna): rows
    without an Optuna study of that id *and name*, and -- ``optuna_study_id`` just created -- its rows
    up to ``upto`` (a deleted study of the same name whose id was reused). Their candidates would
    otherwise clash with the new trials that reuse their trial ids. Returns how many studies went."""
    sm = rdb_models().StudyModel
    alive = sa.select(sm.study_id).where(sm.study_id == StudyRow.optuna_study_id,
                                         sm.study_name == StudyRow.study_name).exists()
    cond = ~alive
    if optuna_study_id is not None and upto is not None:
        cond = sa.or_(cond, sa.and_(StudyRow.optuna_study_id == int(optuna_study_id), StudyRow.id <= int(upto)))
    gone = conn.execute(sa.select(StudyRow.id, StudyRow.study_name, StudyRow.optuna_study_id).where(cond)).all()
    for row in gone:
        get_logger("storage.database").warning(
            "removing evoprune rows of a study deleted with plain Optuna",
            extra={"fields": {"study": row.study_name, "optuna_study_id": row.optuna_study_id}})
        _delete_study_rows(conn, row.id)
    return len(gone)


def stored_study(url: str, study_name: str) -> dict[str, Any] | None:
    """What the database at ``url`` holds under ``study_name``, read without writing anything (no
    table, file or folder is created): ``None`` if there is no such Optuna study (or no database
    yet), else ``{"directions": [...], "evoprune": bool, "config_sha256": str | None, "started": bool}``
    (``started``: see ``replace_unstarted`` of :meth:`StudyDatabase.create_or_open`). Lets
    ``create_study`` refuse a conflicting study before it writes a row."""
    url = check_storage(url, existing=False)
    if _is_sqlite(url):
        path = _sqlite_file(url)
        if path is None or not os.path.exists(path):
            return None
        engine = sa.create_engine(f"sqlite:///{sqlite_readonly_uri(path)}&uri=true", poolclass=sa.pool.NullPool)
    else:
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    om = rdb_models()
    try:
        with engine.connect() as conn:
            insp = sa.inspect(conn)
            if not insp.has_table(om.StudyModel.__tablename__):
                return None
            sid = conn.execute(sa.select(om.StudyModel.study_id)
                               .where(om.StudyModel.study_name == study_name)).scalar()
            if sid is None:
                return None
            dirs = conn.execute(sa.select(om.StudyDirectionModel.direction)
                                .where(om.StudyDirectionModel.study_id == sid)
                                .order_by(om.StudyDirectionModel.objective)).scalars().all()
            row = None
            if insp.has_table(StudyRow.__tablename__):
                row = conn.execute(sa.select(StudyRow.id, StudyRow.config_sha256)
                                   .where(StudyRow.optuna_study_id == sid, StudyRow.study_name == study_name)).first()
            started = True if row is None else _started(conn, row.id, sid)
    finally:
        engine.dispose()
    return {"directions": [d.name.lower() for d in dirs], "evoprune": row is not None,
            "config_sha256": None if row is None else row.config_sha256, "started": started}


def list_studies(storage: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every study in the database: name, directions, trial counts by state, whether it is an evoprune study.

    Reads only: a database that does not exist (or has no Optuna tables) is an error, not created."""
    rdb = open_rdb_storage(check_storage(storage, existing=True))
    om = rdb_models()
    evo_ids: set[tuple[int, str]] = set()
    try:
        with rdb.engine.connect() as conn:
            if sa.inspect(conn).has_table(StudyRow.__tablename__):
                evo_ids = {tuple(r) for r in conn.execute(sa.select(StudyRow.optuna_study_id, StudyRow.study_name))}
            counts = conn.execute(
                sa.select(om.TrialModel.study_id, om.TrialModel.state, sa.func.count())
                .group_by(om.TrialModel.study_id, om.TrialModel.state)
            ).all()
        by_study: dict[int, dict[str, int]] = {}
        for sid, state, n in counts:
            by_study.setdefault(sid, {})[state.name] = int(n)
        return [
            {
                "name": s.study_name,
                "study_id": study_id(s),
                "directions": [d.name.lower() for d in s.directions],
                "trials": by_study.get(study_id(s), {}),
                "evoprune": (study_id(s), s.study_name) in evo_ids,
            }
            for s in rdb.get_all_studies()
        ]
    finally:
        rdb.engine.dispose()
