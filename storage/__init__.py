"""evoprune.storage: the study database -- Optuna's RDB storage plus evoprune's own tables.

Everything a study needs to continue lives in one SQL database (SQLite file in WAL
mode by default, PostgreSQL or MySQL for many workers): Optuna's tables hold the
trials (so ``optuna.load_study`` and ``optuna-dashboard URL`` open it as is), and
``evoprune_*`` tables hold the full config, model and data fingerprints, each
trial's candidate, every stage result, the sampler state per generation, worker
heartbeats and candidate claims, and exported artifacts. No tensors.

::

    import evoprune.storage as st
    study = st.create_study("studies/tiny.yaml", storage="postgresql://me@db/evo", study_name="tiny")
    study.run(n_generations=10)                      # or: evoprune search studies/tiny.yaml ...
    again = st.load_study(storage="postgresql://me@db/evo", study_name="tiny")
    again.run(n_generations=10)                      # resumes: stored config and sampler state
    again.pareto_front()                             # [ParetoPoint(number, trial_id, values, candidate_key)]
    again.export(again.pareto_front()[0].number, "out/best")

Command line: ``evoprune search CONFIG``, ``evoprune resume``, ``evoprune worker`` (any
number, one database), ``evoprune export``, ``evoprune studies``, ``evoprune show``,
``evoprune check``.
"""

from ._database import (
    Artifact,
    ConfigMismatchError,
    FingerprintMismatchError,
    StageOutcome,
    StageRecord,
    StudyDatabase,
    canonical_json,
    pareto_mask,
)
from ._engine import DEFAULT_GRACE_PERIOD, DEFAULT_HEARTBEAT_INTERVAL, default_storage_url, normalize_url, open_rdb_storage
from ._liveness import Heartbeat, ReapReport, reap
from ._owner import Owner
from ._recorder import SQLRecorder
from ._schema import MIGRATIONS, SCHEMA_VERSION, SchemaVersionError, migrate, schema_version
from ._study import (
    EvoStudy,
    ParetoPoint,
    StudyNotFoundError,
    create_study,
    directory_sha256,
    list_studies,
    load_study,
    study_directions,
)

__all__ = [
    "Artifact",
    "ConfigMismatchError",
    "DEFAULT_GRACE_PERIOD",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "EvoStudy",
    "FingerprintMismatchError",
    "Heartbeat",
    "MIGRATIONS",
    "Owner",
    "ParetoPoint",
    "ReapReport",
    "SCHEMA_VERSION",
    "SQLRecorder",
    "SchemaVersionError",
    "StageOutcome",
    "StageRecord",
    "StudyDatabase",
    "StudyNotFoundError",
    "canonical_json",
    "create_study",
    "default_storage_url",
    "directory_sha256",
    "list_studies",
    "load_study",
    "migrate",
    "normalize_url",
    "open_rdb_storage",
    "pareto_mask",
    "reap",
    "schema_version",
    "study_directions",
]
