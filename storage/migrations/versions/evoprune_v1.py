"""Schema version 1 (evoprune 0.1.0): the study, fingerprint, worker, claim, trial, stage,
stage-result, sampler-state and artifact tables, and the integer schema-version row table.

The layout is frozen here, not imported from ``storage/_tables.py``, so this migration keeps
creating exactly the version-1 tables when later versions change the models; its constraints
are listed in the order evoprune 0.1.0 wrote them, so a new SQLite database has exactly the DDL
of a 0.1.0 one. A table that
already exists is left alone: a run that stopped half-way (MySQL commits each ``CREATE TABLE``)
can simply run again. A database that evoprune 0.1.0 created is stamped with this revision
without running it.

Revision ID: evoprune_v1
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "evoprune_v1"
down_revision = None
branch_labels = None
depends_on = None

JSONText = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
Float53 = sa.Float(precision=53)


def _id(table: str) -> tuple[sa.Column, sa.PrimaryKeyConstraint]:
    return sa.Column("id", sa.Integer, nullable=False, autoincrement=True), sa.PrimaryKeyConstraint(
        "id", name=f"pk_{table}")


def _study_id() -> sa.Column:
    return sa.Column("study_id", sa.Integer, nullable=False)


def _study_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["study_id"], ["evoprune_studies.id"], name=f"fk_{table}_study_id",
                                   ondelete="CASCADE")


def _created() -> sa.Column:
    return sa.Column("created_at", sa.DateTime, nullable=False)


def _create(name: str, *items: object, indexes: tuple[tuple[str, ...], ...] = ()) -> None:
    if sa.inspect(op.get_bind()).has_table(name):
        return
    op.create_table(name, *items)
    for columns in indexes:
        op.create_index(f"ix_{name}_{'_'.join(columns)}", name, list(columns))


def upgrade() -> None:
    _create(
        "evoprune_schema_version",
        sa.Column("id", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_evoprune_schema_version"),
    )
    _create(
        "evoprune_studies",
        *_id("evoprune_studies"),
        sa.Column("optuna_study_id", sa.Integer, nullable=False),
        sa.Column("study_name", sa.String(512), nullable=False),
        sa.Column("config_json", JSONText, nullable=False),
        sa.Column("config_sha256", sa.String(64), nullable=False),
        sa.Column("evoprune_version", sa.String(32), nullable=False),
        _created(),
        sa.UniqueConstraint("optuna_study_id", name="uq_evoprune_studies_optuna_study_id"),
    )
    _create(
        "evoprune_fingerprints",
        *_id("evoprune_fingerprints"),
        _study_id(),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("value", sa.String(256), nullable=False),
        sa.Column("details_json", JSONText, nullable=False),
        _created(),
        sa.UniqueConstraint("study_id", "kind", name="uq_evoprune_fingerprints_study_id_kind"),
        _study_fk("evoprune_fingerprints"),
    )
    _create(
        "evoprune_workers",
        *_id("evoprune_workers"),
        _study_id(),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("proc_start", sa.String(64), nullable=False),
        sa.Column("command", sa.String(64), nullable=False),
        sa.Column("started_at", sa.DateTime, nullable=False, server_default=sa.func.now()),
        sa.Column("last_seen", sa.DateTime, nullable=False, server_default=sa.func.now()),
        sa.Column("stopped_at", sa.DateTime, nullable=True),
        sa.Column("stop_reason", sa.String(255), nullable=True),
        _study_fk("evoprune_workers"),
        sa.UniqueConstraint("owner", name="uq_evoprune_workers_owner"),
        indexes=(("study_id",),),
    )
    _create(
        "evoprune_claims",
        *_id("evoprune_claims"),
        _study_id(),
        sa.Column("candidate_key", sa.String(128), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("trial_id", sa.Integer, nullable=True),
        sa.Column("claimed_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.UniqueConstraint("study_id", "candidate_key", name="uq_evoprune_claims_study_id_candidate_key"),
        _study_fk("evoprune_claims"),
    )
    _create(
        "evoprune_trials",
        *_id("evoprune_trials"),
        _study_id(),
        sa.Column("trial_id", sa.Integer, nullable=False),
        sa.Column("trial_number", sa.Integer, nullable=False),
        sa.Column("candidate_key", sa.String(128), nullable=False),
        sa.Column("candidate_json", JSONText, nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("owner", sa.String(255), nullable=False),
        _created(),
        _study_fk("evoprune_trials"),
        sa.UniqueConstraint("trial_id", name="uq_evoprune_trials_trial_id"),
        indexes=(("study_id", "candidate_key"),),
    )
    _create(
        "evoprune_stages",
        *_id("evoprune_stages"),
        _study_id(),
        sa.Column("trial_id", sa.Integer, nullable=False),
        sa.Column("stage", sa.String(128), nullable=False),
        sa.Column("stage_index", sa.Integer, nullable=False),
        sa.Column("objective", Float53, nullable=True),
        sa.Column("objective_repr", sa.String(16), nullable=True),
        sa.Column("direction", sa.String(16), nullable=True),
        sa.Column("promoted", sa.Boolean, nullable=True),
        sa.Column("seconds", Float53, nullable=False),
        _created(),
        sa.UniqueConstraint("trial_id", "stage", name="uq_evoprune_stages_trial_id_stage"),
        _study_fk("evoprune_stages"),
        indexes=(("study_id", "stage"),),
    )
    _create(
        "evoprune_stage_results",
        *_id("evoprune_stage_results"),
        _study_id(),
        sa.Column("trial_id", sa.Integer, nullable=False),
        sa.Column("stage", sa.String(128), nullable=False),
        sa.Column("evaluator", sa.String(128), nullable=False),
        sa.Column("tokens", sa.BigInteger, nullable=True),
        sa.Column("value", Float53, nullable=True),
        sa.Column("value_repr", sa.String(16), nullable=True),
        sa.Column("seconds", Float53, nullable=False),
        sa.Column("direction", sa.String(16), nullable=True),
        sa.Column("details_json", JSONText, nullable=False),
        _created(),
        sa.UniqueConstraint("trial_id", "stage", "evaluator",
                            name="uq_evoprune_stage_results_trial_id_stage_evaluator"),
        _study_fk("evoprune_stage_results"),
        indexes=(("study_id", "stage"),),
    )
    _create(
        "evoprune_sampler_states",
        *_id("evoprune_sampler_states"),
        _study_id(),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("sampler", sa.String(255), nullable=False),
        sa.Column("state_json", JSONText, nullable=False),
        sa.Column("state_sha256", sa.String(64), nullable=False),
        _created(),
        sa.UniqueConstraint("study_id", "generation", name="uq_evoprune_sampler_states_study_id_generation"),
        _study_fk("evoprune_sampler_states"),
    )
    _create(
        "evoprune_artifacts",
        *_id("evoprune_artifacts"),
        _study_id(),
        sa.Column("trial_id", sa.Integer, nullable=False),
        sa.Column("trial_number", sa.Integer, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("candidate_key", sa.String(128), nullable=False),
        sa.Column("candidate_json", JSONText, nullable=False),
        sa.Column("metrics_json", JSONText, nullable=False),
        _created(),
        _study_fk("evoprune_artifacts"),
        indexes=(("study_id", "trial_id"),),
    )


def downgrade() -> None:
    raise NotImplementedError("evoprune's migrations only go forward; restore a backup to go back.")
