"""Alembic environment of evoprune's tables (``storage/migrations``).

Run only through :func:`evoprune.storage._schema.upgrade`, which passes the connection (inside
its transaction and migration lock) as ``config.attributes["connection"]``, and the models'
``target_metadata`` and the ``version_table`` (so this script imports nothing of evoprune's). The revisions are
tracked in ``evoprune_alembic_version``, never in Optuna's own ``alembic_version``, and only the
``evoprune_*`` tables are compared when autogenerating.

A new migration: copy ``versions/evoprune_v1.py`` to ``evoprune_v<N+1>.py`` (revision
``"evoprune_v<N+1>"``, down_revision the previous one), change the models in
``storage/_tables.py`` to match, and raise ``SCHEMA_VERSION`` in ``storage/_schema.py``;
``tests/storage/test_migrations.py`` checks that upgrading an empty database gives exactly the
models. Write the migration so that it can run again after a partial run (MySQL commits every
``CREATE``/``ALTER`` at once).
"""

from __future__ import annotations

from alembic import context


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """Only evoprune's tables; Optuna's (``studies``, ``trials``, ...) are Optuna's to migrate."""
    return type_ != "table" or bool(name and name.startswith("evoprune_"))


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError(
            "evoprune's migrations run through evoprune.storage._schema.upgrade(engine), which passes "
            "the connection; they are not run by the alembic command line."
        )
    context.configure(
        connection=connection,
        target_metadata=context.config.attributes["target_metadata"],
        version_table=context.config.attributes["version_table"],
        include_name=include_name,
    )
    with context.begin_transaction():  # the caller's transaction: nothing is begun or committed here
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("evoprune's migrations need a live connection (no offline SQL scripts).")
run_migrations_online()
