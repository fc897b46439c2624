"""Every private Optuna attribute evoprune relies on (all used through ``evoprune._optuna_private``).

When an Optuna release renames or changes one of them, this test fails first, with the name.
"""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution

from evoprune import _optuna_private as op

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_storage_and_ids(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    study = optuna.create_study(storage=url, study_name="a")
    other = optuna.create_study(storage=url, study_name="b")
    storage = op.study_storage(study)
    assert isinstance(storage, optuna.storages.BaseStorage)
    assert op.study_id(study) != op.study_id(other)
    assert op.study_id(study) == storage.get_study_id_from_name("a")
    t0, t1 = study.ask(), other.ask()
    assert op.trial_id(t0) != op.trial_id(t1)  # unique across studies of one storage
    assert t0.number == t1.number == 0
    frozen = storage.get_trial(op.trial_id(t1))
    assert op.trial_id(frozen) == op.trial_id(t1) and frozen.number == 1 - 1
    assert storage.get_trial_id_from_study_id_trial_number(op.study_id(other), 0) == op.trial_id(t1)


def test_distribution_contains():
    assert op.distribution_contains(IntDistribution(0, 4), 2)
    assert not op.distribution_contains(IntDistribution(0, 4), 5)
    assert op.distribution_contains(FloatDistribution(0.0, 1.0), 0.5)
    assert not op.distribution_contains(FloatDistribution(0.0, 1.0), 1.5)


def test_compute_hypervolume():
    import numpy as np

    pts = np.array([[0.2, 0.5], [0.5, 0.2]])
    assert op.compute_hypervolume(pts, np.array([1.0, 1.0])) == pytest.approx(0.8 * 0.5 + 0.5 * 0.3)
    pts3 = np.array([[0.5, 0.5, 0.5]])
    assert op.compute_hypervolume(pts3, np.array([1.0, 1.0, 1.0])) == pytest.approx(0.125)


def test_rdb_models_have_what_storage_reads():
    m = op.rdb_models()
    for name, cols in {
        "StudyModel": ["study_id", "study_name"],
        "TrialModel": ["trial_id", "number", "study_id", "state", "datetime_start"],
        "TrialValueModel": ["trial_id", "objective", "value", "value_type"],
        "TrialUserAttributeModel": ["trial_id", "key", "value_json"],
        "TrialHeartbeatModel": ["trial_id", "heartbeat"],
    }.items():
        model = getattr(m, name)
        for col in cols:
            assert hasattr(model, col), f"optuna.storages._rdb.models.{name}.{col} is gone"
    vt = m.TrialValueModel.TrialValueType
    assert {vt.FINITE.name, vt.INF_POS.name, vt.INF_NEG.name} == {"FINITE", "INF_POS", "INF_NEG"}
