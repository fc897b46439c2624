"""Every use of a private Optuna attribute, in one place.

Optuna keeps a few things private that evoprune needs: the storage behind a study (to create a
RUNNING trial with fixed params in one call and to write user attributes by trial id), the
storage ids of studies and trials (unique across one database, unlike ``trial.number``), a
distribution's membership test, the exact hypervolume, and the SQLAlchemy models of the RDB
storage (evoprune's tables join Optuna's). Nothing else in evoprune touches ``optuna._*`` or a
``_``-attribute of an Optuna object; ``tests/storage/test_optuna_private.py`` fails loudly when an Optuna
release changes one of them.

>>> import optuna
>>> study = optuna.create_study()
>>> trial = study.ask()
>>> trial_id(trial) == trial_id(study.get_trials()[0])
True
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "compute_hypervolume",
    "distribution_contains",
    "rdb_models",
    "study_id",
    "study_storage",
    "trial_id",
]


def study_storage(study: Any) -> Any:
    """The :class:`~optuna.storages.BaseStorage` behind an :class:`optuna.Study`."""
    return study._storage


def study_id(study: Any) -> int:
    """The storage id of an :class:`optuna.Study` (``FrozenStudy`` too)."""
    return int(study._study_id)


def trial_id(trial: Any) -> int:
    """The storage id of a live :class:`optuna.Trial` or a :class:`~optuna.trial.FrozenTrial`:
    unique across every study of one storage (``trial.number`` is unique per study only)."""
    return int(trial._trial_id)


def distribution_contains(distribution: Any, value: Any) -> bool:
    """Is external ``value`` inside ``distribution`` (Optuna's own check, private ``_contains``)?"""
    return bool(distribution._contains(distribution.to_internal_repr(value)))


def compute_hypervolume(points: Any, reference: Any) -> float:
    """Optuna's exact (WFG) hypervolume of minimization ``points`` [n, m] bounded by ``reference``;
    ``points`` must be mutually non-dominated and strictly better than ``reference``."""
    from optuna._hypervolume import compute_hypervolume as _hv

    return float(_hv(points, reference, assume_pareto=True))


def rdb_models() -> Any:
    """``optuna.storages._rdb.models``: the SQLAlchemy models of Optuna's RDB storage
    (``StudyModel``, ``TrialModel``, ``TrialValueModel``, ``TrialUserAttributeModel``, ...)."""
    from optuna.storages._rdb import models

    return models


def trial_start_column() -> tuple[Any, bool]:
    """The ``trials.datetime_start`` column of Optuna's RDB models and whether it holds UTC
    (Optuna 5 stores UTC behind a ``datetime_start`` property; earlier versions the client's local time)."""
    tm = rdb_models().TrialModel
    utc = getattr(tm, "_datetime_start_utc", None)
    return (utc, True) if utc is not None else (tm.datetime_start, False)
