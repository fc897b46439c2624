"""The one Pareto front equals Optuna's ``Study.best_trials`` (ties kept, any directions, 3 objectives),
and the study facade's front equals ``best_trials`` of the stored study."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from evoprune.study import hypervolume, pareto_front

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize("dirs", [["minimize", "minimize"], ["minimize", "maximize"],
                                  ["maximize", "minimize", "minimize"]])
def test_front_equals_optuna_best_trials(dirs):
    rng = np.random.default_rng(len(dirs))
    values = rng.random((200, len(dirs))).round(2)
    values = np.vstack([values, values[::3]])  # exact copies: ties on and off the front
    study = optuna.create_study(directions=dirs)
    for v in values:
        study.add_trial(optuna.trial.create_trial(values=list(v)))
    expected = sorted(t.number for t in study.best_trials)
    assert pareto_front(values, dirs) == expected
    assert len(expected) > len({tuple(values[i]) for i in expected})  # the case with ties is exercised


def test_nan_is_worst_and_empty():
    assert pareto_front([[np.nan, 0.0], [1.0, 1.0]]) == [0, 1]
    assert pareto_front([[np.nan, 2.0], [1.0, 1.0]]) == [1]
    assert pareto_front([]) == []


def test_hypervolume_ignores_ties_and_points_outside_reference():
    pts = [(0.2, 0.5), (0.2, 0.5), (0.5, 0.2), (2.0, 0.1)]
    assert hypervolume(pts, (1.0, 1.0)) == pytest.approx(0.8 * 0.5 + 0.5 * 0.3)
