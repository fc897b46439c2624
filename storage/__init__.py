"""evoprune.storage: the study database -- Optuna's RDB storage plus evoprune's own tables.

Persistence only: this package imports nothing from ``evoprune.search``, ``pruning`` or
``evaluators`` and holds no tensors. The study object users call (``create_study``,
``load_study``) lives in :mod:`evoprune.study`, which drives this package.

Everything a study needs to continue lives in one SQL database (SQLite file in WAL
mode by default, PostgreSQL or MySQL for many workers): Optuna's tables hold the
trials (so ``optuna.load_study`` and ``optuna-dashboard URL`` open it as is), and
``evoprune_*`` tables hold the full config, model and data fingerprints, each
trial's candidate, every stage result, the sampler state per generation, worker
heartbeats and candidate claims, and exported artifacts. No tensors. Alembic migrations
(``storage/migrations``, tracked in ``evoprune_alembic_version``) create and upgrade the
``evoprune_*`` tables when a study is opened; a database newer than this evoprune is refused
with :class:`SchemaVersionError`.

::

    from evoprune.storage import list_studies
    list_studies("sqlite:///studies/tiny.db")   # [{"name", "directions", "trials", "evoprune"}, ...]

Command line: ``evoprune search CONFIG``, ``evoprune resume``, ``evoprune worker`` (any
number, one database), ``evoprune export``, ``evoprune studies``, ``evoprune show``,
``evoprune check``, ``evoprune delete-study``. Commands that only read check the URL with
:func:`check_storage` first, so they never create a file, a folder or a table.

Public names (what a user calls): :class:`StudyDatabase` (evoprune's tables of one study),
:func:`list_studies`, :func:`check_storage`, :func:`normalize_url`, :func:`redact_url` (the one rule
that hides passwords), :func:`schema_version`, the records :class:`Artifact`, :class:`StageRecord`,
:class:`StageOutcome`, :class:`ReapReport`, and the errors. What only evoprune's own rooms need to run
a study (the ``"evoprune:*"`` attribute names, heartbeats and reaping, the recorder, opening an Optuna
RDB storage) is in :mod:`evoprune.storage.internal`, internal but shared.
"""

from ._catalog import list_studies
from ._database import ConfigMismatchError, FingerprintMismatchError, StudyDatabase
from ._engine import StorageError, StorageNotFoundError, check_storage, normalize_url, redact_url
from ._liveness import ReapReport
from ._schema import SchemaVersionError, schema_version
from ._values import Artifact, StageOutcome, StageRecord

__all__ = [
    "Artifact",
    "ConfigMismatchError",
    "FingerprintMismatchError",
    "ReapReport",
    "SchemaVersionError",
    "StageOutcome",
    "StageRecord",
    "StorageError",
    "StorageNotFoundError",
    "StudyDatabase",
    "check_storage",
    "list_studies",
    "normalize_url",
    "redact_url",
    "schema_version",
]
