"""Rules that used to have two homes, pinned: the config digest and the study's own Optuna sampler."""

from __future__ import annotations

import optuna
import pytest
from helpers import tiny_study_config

from evoprune.evaluators import Pipeline
from evoprune.search import Runtime, build_pipeline, study_sampler
from evoprune.storage import ConfigMismatchError, StudyDatabase
from evoprune.study import create_study, load_study

optuna.logging.set_verbosity(optuna.logging.WARNING)

def test_a_config_differing_only_in_threads_resumes(tmp_path):
    url = f"sqlite:///{tmp_path / 'threads.db'}"
    cfg = tiny_study_config(seed=3)
    threaded = cfg.replace(threads=3)
    assert threaded.digest == cfg.digest and threaded.fingerprint == cfg.fingerprint
    assert cfg.digest == StudyDatabase.config_digest(cfg.to_dict())  # no threads: the stored digest of old studies
    study = create_study(cfg, storage=url, study_name="s")
    study.db.register_worker(command="search")  # the study has started: a changed config is refused
    study.close()
    again = create_study(threaded, storage=url, study_name="s")  # same study, other machine setting
    assert again.db.optuna_study_id == study.db.optuna_study_id
    again.close()
    with pytest.raises(ConfigMismatchError, match="different config"):
        create_study(cfg.replace(seed=4), storage=url, study_name="s")


@pytest.mark.parametrize("sampler", [{"name": "evolutionary", "options": {"offspring": 4}}, {"name": "tpe"},
                                     {"name": "random", "options": {"seed": 11}}])
def test_a_study_gets_the_same_sampler_by_either_path(tmp_path, sampler):
    cfg = tiny_study_config(sampler=sampler, seed=3)
    url = f"sqlite:///{tmp_path / 'sampler.db'}"
    facade = create_study(cfg, storage=url, study_name="s").optuna_study
    loaded = load_study(storage=url, study_name="s").optuna_study
    pipeline = build_pipeline(cfg.stages)
    assert isinstance(pipeline, Pipeline)
    runtime = Runtime(model=None, space=None, pipeline=pipeline, context=None, objectives=cfg.objectives, config=cfg)
    by_hand = runtime.create_study()  # in memory, as `Runtime.create_study` documents
    expected = type(study_sampler(cfg))
    if sampler["name"] == "evolutionary":  # trials get fixed params; the study's own sampler never reads history
        assert expected is optuna.samplers.RandomSampler
    assert {type(s.sampler) for s in (facade, loaded, by_hand)} == {expected}

    def first_draw(study: optuna.Study) -> int:
        return study.ask().suggest_int("x", 0, 10**9)

    # seeded alike: the first suggestion of each path is the same number
    assert first_draw(facade) == first_draw(by_hand)
    fresh = load_study(storage=url, study_name="s").optuna_study
    assert first_draw(fresh) == first_draw(optuna.create_study(sampler=study_sampler(cfg)))


def test_study_report_is_the_report_rooms_verb(tmp_path):
    """`study.report(...)` works with only the study room imported; the study room never imports the report
    room (the verb is provided by it: evoprune.STUDY_VERBS / register_study_verb)."""
    import json
    import os
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'rep.db'}"
    create_study(tiny_study_config(), storage=url, study_name="s").close()
    code = (
        "import json, sys\n"
        "from evoprune.study import load_study\n"
        "before = 'evoprune.report' in sys.modules\n"
        f"path = load_study(storage={url!r}, study_name='s').report({str(tmp_path / 'r.html')!r})\n"
        "print(json.dumps({'before': before, 'path': str(path)}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=os.environ)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["before"] is False
    assert out["path"] == str(tmp_path / "r.html") and "<html" in (tmp_path / "r.html").read_text().lower()


def test_moved_names_still_import_from_search_with_a_warning():
    import evoprune.baselines
    import evoprune.search
    import evoprune.study

    for name, home in (("create_study", evoprune.study), ("pareto_front", evoprune.study), ("sleb", evoprune.baselines)):
        with pytest.warns(DeprecationWarning, match=f"evoprune.search.{name} moved to {home.__name__}.{name}"):
            assert getattr(evoprune.search, name) is getattr(home, name)
    with pytest.raises(AttributeError):
        evoprune.search.no_such_name  # noqa: B018
