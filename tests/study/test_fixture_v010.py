"""A study database written by evoprune 0.1.0 (before the storage/search restructuring) still opens,
resumes and exports with this version.

``tests/fixtures/study_v0.1.0.db`` was written by the 0.1.0 release: ``create_study`` on
``reference:tiny`` (objectives kl + params, evolutionary sampler, 4 offspring), then
``run(n_generations=2)``: 5 trials, 3 complete, 2 pruned, Pareto front = trial 4.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

import evoprune

FIXTURE = Path(__file__).parents[1] / "fixtures" / "study_v0.1.0.db"


def test_v010_database_opens_resumes_and_exports(reference_tiny, tmp_path):
    db = tmp_path / "old.db"
    shutil.copy(FIXTURE, db)
    url = f"sqlite:///{db}"
    study = evoprune.load_study(storage=url, study_name="v010")
    try:
        assert study.config.model == "reference:tiny" and list(study.config.objectives) == ["kl", "params"]
        assert study.check() == []
        states = [t.state for t in study.trials()]
        assert states.count(TrialState.COMPLETE) == 3 and states.count(TrialState.PRUNED) == 2
        front = study.pareto_front()
        assert [p.number for p in front] == [4]
        assert sorted(t.number for t in optuna.load_study(study_name="v010", storage=url).best_trials) == [4]
        assert study.sampler_state()[0] == 2
        before = study.candidate(4)

        # the restructured code scores the stored candidates as 0.1.0 did (bit for bit on the machine
        # that wrote the fixture; a small tolerance for other CPUs)
        from evoprune.search._runtime import build_runtime
        from evoprune.storage import FingerprintMismatchError
        from evoprune.storage._tables import FingerprintRow

        runtime = build_runtime(study.config)
        stored_fp = study.fingerprints()["model"]
        if runtime.fingerprints["model"] != stored_fp:
            # This CPU trains reference:tiny to other floats (its vector units round differently), so the
            # rebuilt model is, rightly, not the fixture's: resuming must refuse it, naming the model.
            with pytest.raises(FingerprintMismatchError, match="model fingerprint changed"):
                study.verify_fingerprints(runtime.fingerprints)
            # Re-scoring needs the fixture's exact weights; go on with the resume and export as if this
            # build were the original (the stored fingerprint rewritten in the copy of the database).
            with study.storage.engine.begin() as conn:
                conn.execute(sa.update(FingerprintRow).where(FingerprintRow.kind == "model")
                             .values(value=runtime.fingerprints["model"]))
        else:
            runtime.pipeline.prepare(runtime.model, runtime.context)
            checked = 0
            for n in range(5):
                stored = {r.stage: r.value for r in study.stage_records(n) if r.evaluator == "kl"}
                for st in runtime.pipeline.stages:
                    if st.name in stored:
                        value = runtime.pipeline.run_stage(st, runtime.model, study.candidate(n),
                                                           runtime.context).objective
                        assert value == pytest.approx(stored[st.name], rel=1e-5, abs=1e-9), (n, st.name)
                        checked += 1
            assert checked == 8

        stats = study.run(n_generations=1, runtime=runtime)  # fingerprints of the rebuilt reference model must match
        assert stats.generations == 1 and stats.trials >= 1
        assert study.sampler_state()[0] == 3
        assert study.check() == []
        assert study.candidate(4) == before

        best = study.pareto_front()[0].number
        art = study.export(best, tmp_path / "best")
        assert (Path(art.path) / "config.json").is_file()
        assert [a.trial_number for a in study.artifacts()] == [best]
    finally:
        study.close()
