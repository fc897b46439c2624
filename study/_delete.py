"""Deleting a study: evoprune's rows and then the Optuna study, refused while live workers run it."""

from __future__ import annotations

import os

import optuna

from .._logging import get_logger
from .._optuna_private import study_id
from ..storage import StudyDatabase, check_storage, redact_url
from ..storage.internal import DEFAULT_GRACE_PERIOD, open_rdb_storage, stop_workers_for_delete
from ._study import _load_optuna

__all__ = ["delete_study"]

_log = get_logger("study")


def delete_study(*, storage: str | os.PathLike[str], study_name: str, force: bool = False) -> int:
    """Delete a study: evoprune's rows (config, fingerprints, candidates, stages, sampler states,
    workers, claims, artifact records) and then the Optuna study with its trials. Exported
    checkpoint folders on disk are kept. Works for plain Optuna studies too. Returns the number
    of trials the study had.

    A study that live workers run is refused (``ValueError`` naming them); with ``force`` they are
    asked to stop cleanly first (:func:`evoprune.storage.internal.stop_workers_for_delete`).

    Raises:
        StudyNotFoundError: no such study (nothing is deleted).
    """
    url = check_storage(storage, existing=True)
    rdb = open_rdb_storage(url)
    try:
        study = _load_optuna(rdb, study_name, url)
        stop_workers_for_delete(rdb.engine, study_id(study), study_name, force=force,
                                grace_period=DEFAULT_GRACE_PERIOD, wait=DEFAULT_GRACE_PERIOD)
        n = len(study.get_trials(deepcopy=False))
        StudyDatabase.delete_rows(rdb.engine, study_id(study))
        optuna.delete_study(study_name=study_name, storage=rdb)
    finally:
        rdb.engine.dispose()
    _log.info("study deleted", extra={"fields": {"study": study_name, "storage": redact_url(url), "trials": n}})
    return n
