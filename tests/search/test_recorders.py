"""The two recorders (Optuna user attributes, evoprune's SQL tables) answer the driver alike:
failed trials leave the stage history, repeats and failures are not "finished" candidates."""

from __future__ import annotations

import optuna
import pytest

import evoprune
from evoprune._optuna_private import trial_id
from evoprune.search import OptunaRecorder, Recorder
from evoprune.space import Candidate, LayerConfig
from evoprune.storage._values import DUPLICATE_OF_ATTR

optuna.logging.set_verbosity(optuna.logging.WARNING)

CONFIG = {
    "model": "reference:tiny",
    "calibration": {"num_sequences": 4, "seq_len": 32},
    "stages": [{"name": "s1", "evaluators": ["kl"], "eval_tokens": 256, "seq_len": 32, "promote": {"top_k": 1}},
               {"name": "final", "evaluators": ["kl"], "eval_tokens": 512, "seq_len": 32}],
    "objectives": ["kl"],
}


def _cand(width: int) -> Candidate:
    return Candidate(layers=(LayerConfig(num_kv_heads=2, q_per_kv=2, mlp_channels=width),))


@pytest.fixture(params=["optuna", "sql"])
def study_and_recorder(request, tmp_path):
    if request.param == "optuna":
        study = optuna.create_study()
        yield study, OptunaRecorder(study)
    else:
        evo = evoprune.create_study(CONFIG, storage=f"sqlite:///{tmp_path / 'r.db'}", study_name="r")
        yield evo.optuna_study, evo.recorder
        evo.close()


def test_recorders_agree_on_history_and_finished_trials(study_and_recorder):
    study, rec = study_and_recorder
    assert isinstance(rec, Recorder)
    a, b = _cand(64), _cand(32)

    def trial_with(cand, objective, *, source="evolution"):
        t = study.ask()
        assert source == "duplicate" or rec.claim(cand.key)
        rec.record_candidate(trial_id(t), cand, source=source)
        if objective is not None:
            rec.record_stage(trial_id(t), "s1", "kl", 256, objective, 0.1, {})
            rec.record_stage_result(trial_id(t), "s1", 0, objective, True)
        return t

    t0 = trial_with(a, 0.25)
    study.tell(t0, 0.25)
    t1 = trial_with(b, 0.5)
    rec.release(b.key)
    study.tell(t1, state=optuna.trial.TrialState.FAIL)
    t2 = study.ask()
    t2.set_user_attr(DUPLICATE_OF_ATTR, t0.number)
    rec.record_candidate(trial_id(t2), a, source="duplicate")
    study.tell(t2, 0.25)

    assert rec.stage_history("s1") == [0.25]  # the failed trial's 0.5 is not counted
    done = rec.finished_trial(a.key)
    assert done["number"] == t0.number and done["state"] == "COMPLETE" and done["stages"] == {"s1": 0.25}
    assert rec.finished_trial(b.key) is None  # failed: to be evaluated again
    assert rec.claim(b.key)  # released after the failure
