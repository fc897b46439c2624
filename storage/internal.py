"""The seam between the study database and evoprune's own rooms above it (``study``, ``search``,
``report``, the CLI): internal but shared, so not a user API -- names here may change in any release.

Users need only :mod:`evoprune.storage` (the database object, the catalog, errors and the records its
reads return). What lives here is what the study facade and the search driver need to run a study:

* the one home of every ``"evoprune:*"`` Optuna attribute name (``*_ATTR``, :func:`is_resampled`);
* opening and naming storages (:func:`open_rdb_storage`, :func:`default_storage_url`,
  :func:`stored_study`), worker liveness (:class:`Heartbeat`, :func:`reap`, :func:`stop_own` and their
  defaults) and the recorder the driver writes through (:class:`SQLRecorder`);
* :func:`naive` (database timestamps as naive local time);
* what a worker needs when another process acts on its study: :class:`TrialNotRunningError` (a trial
  finished elsewhere) and :func:`stop_workers_for_delete` (``delete-study --force``).
"""

from ._catalog import stored_study
from ._deleting import stop_workers_for_delete
from ._engine import DEFAULT_GRACE_PERIOD, DEFAULT_HEARTBEAT_INTERVAL, default_storage_url, open_rdb_storage
from ._liveness import Heartbeat, reap, stop_own
from ._recorder import SQLRecorder
from ._scope import TrialNotRunningError
from ._values import (
    ATTR_PREFIX,
    CANDIDATE_ATTR,
    CANDIDATE_KEY_ATTR,
    CLOSE_CALL_ATTR,
    CREATOR_ATTR,
    DUPLICATE_OF_ATTR,
    FAIL_REASON_ATTR,
    GROUP_ATTR,
    INFEASIBLE_ATTR,
    OBJECTIVE_ATTR,
    PROMOTED_ATTR,
    REPAIRED_ATTR,
    RESAMPLED_ATTR,
    RESAMPLED_REASONS,
    SAMPLER_STATE_ATTR,
    SOURCE_ATTR,
    STAGE_ATTR,
    STAGE_INDEX_ATTR,
    STAGE_REACHED_ATTR,
    is_resampled,
    naive,
)

__all__ = [
    "TrialNotRunningError",
    "stop_workers_for_delete",
    "ATTR_PREFIX",
    "CANDIDATE_ATTR",
    "CANDIDATE_KEY_ATTR",
    "CLOSE_CALL_ATTR",
    "CREATOR_ATTR",
    "DEFAULT_GRACE_PERIOD",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DUPLICATE_OF_ATTR",
    "FAIL_REASON_ATTR",
    "GROUP_ATTR",
    "INFEASIBLE_ATTR",
    "OBJECTIVE_ATTR",
    "PROMOTED_ATTR",
    "REPAIRED_ATTR",
    "RESAMPLED_ATTR",
    "RESAMPLED_REASONS",
    "SAMPLER_STATE_ATTR",
    "SOURCE_ATTR",
    "STAGE_ATTR",
    "STAGE_INDEX_ATTR",
    "STAGE_REACHED_ATTR",
    "Heartbeat",
    "SQLRecorder",
    "default_storage_url",
    "is_resampled",
    "naive",
    "open_rdb_storage",
    "reap",
    "stop_own",
    "stored_study",
]
