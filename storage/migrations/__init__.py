"""Alembic migrations of evoprune's tables (run by :func:`evoprune.storage._schema.upgrade`, never imported)."""
