"""A study whose space takes its levels from a level database: built once in the cache before any row,
reused by the next run, recorded with the study and named by ``evoprune show``; bad methods fail first."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml
from helpers import char_tokenizer, dump, tiny_text_config
from tiny_models import tiny_model

from evoprune import load_study
from evoprune._cli import main

WORDS = ["the", "king", "of", "a", "sword", "and", "crown", "night", "falls", "thou", "art"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("levels-study")
    model_dir = root / "model"
    tiny_model("llama").save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    rng = random.Random(0)
    for name in ("train", "valid"):
        (root / f"{name}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(1500)), encoding="utf-8")
    return root


def _config(world: Path, tmp_path: Path, **space) -> Path:
    cfg = tiny_text_config(world, model=str(world / "model"),
                           space={"attention": None, "mlp": False, "sparsity_levels": [0.0, 0.25, 0.5], **space},
                           budget={"metric": "nonzero_params", "max_ratio": 0.9}, cache_dir=str(tmp_path / "cache"),
                           stop={"n_trials": 2})
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_a_study_builds_its_level_database_once_and_shows_it(world, tmp_path, capsys):
    path = _config(world, tmp_path, sparsity_method="sparsegpt")
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert main(["search", str(path), "--storage", url, "--study", "lv"]) == 0
    (db,) = (tmp_path / "cache" / "levels").iterdir()
    files = sorted(p.name for p in db.iterdir() if p.suffix == ".safetensors")
    assert len(files) == 4
    mtimes = {p.name: p.stat().st_mtime_ns for p in db.iterdir()}
    study = load_study(storage=url, study_name="lv")
    info = study.level_database()
    assert info["path"] == str(db) and info["sparsity_method"] == "sparsegpt" and info["bytes"] > 0
    assert study.fingerprints()["levels"] == db.name
    assert main(["search", str(path), "--storage", url, "--study", "lv"]) == 0  # resume: the same database
    assert {p.name: p.stat().st_mtime_ns for p in db.iterdir()} == mtimes
    capsys.readouterr()
    assert main(["show", "--storage", url, "--study", "lv"]) == 0
    out = capsys.readouterr().out
    assert f"level database: {db} (sparsegpt sparsity" in out
    from evoprune.report import write_report

    page = Path(write_report(study, tmp_path / "report.html")).read_text(encoding="utf-8")
    assert f"{db.name} at {db} (sparsegpt sparsity" in page


@pytest.mark.parametrize("space,message", [
    ({"sparsity_method": "obs"}, "sparsity_method must be one of"),
    ({"sparsity_method": "wanda", "level_inputs": "sequential"}, "level_inputs 'sequential' needs sparsity_method"),
    ({"level_dtype": "int8"}, "level_dtype must be one of"),
])
def test_bad_level_options_fail_before_any_row(world, tmp_path, capsys, space, message):
    path = _config(world, tmp_path, **space)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    assert main(["search", str(path), "--storage", url, "--study", "bad"]) != 0
    err = capsys.readouterr().err
    assert message in err
    assert dump(url) is None  # not even the database file
    assert not (tmp_path / "cache" / "levels").exists()


def test_sparsegpt_is_the_default_and_a_study_stored_without_it_resumes_with_wanda_masks(world, tmp_path, capsys):
    from evoprune.search import StudyConfig
    from evoprune.storage import StudyDatabase

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    path = _config(world, tmp_path)  # no sparsity_method: the default
    assert StudyConfig.from_file(path).to_dict()["space"]["sparsity_method"] == "sparsegpt"
    assert main(["search", str(path), "--storage", url, "--study", "new"]) == 0
    assert load_study(storage=url, study_name="new").level_database()["sparsity_method"] == "sparsegpt"
    # a study whose stored config has no sparsity_method (made before sparsegpt was the default, or with null)
    legacy = _config(world, tmp_path, sparsity_method=None)
    assert "sparsity_method" not in StudyConfig.from_file(legacy).to_dict()["space"]
    assert main(["search", str(legacy), "--storage", url, "--study", "old"]) == 0
    old = load_study(storage=url, study_name="old")
    assert old.level_database() is None  # Wanda masks per candidate, no database
    stored = StudyConfig.from_stored(old.config.to_dict())
    assert stored.space["sparsity_method"] is None and stored.digest == old.config.digest
    assert main(["resume", "--storage", url, "--study", "old", "--n-trials", "1"]) == 0
    assert load_study(storage=url, study_name="old").level_database() is None
    assert main(["search", str(legacy), "--storage", url, "--study", "old"]) == 0  # null continues it
    capsys.readouterr()
    path = _config(world, tmp_path)  # (the same file name: written again without sparsity_method)
    assert main(["search", str(path), "--storage", url, "--study", "old"]) != 0  # the new default differs
    assert "already exists with a different config; continue it with `evoprune resume" in capsys.readouterr().err


def test_only_sparse_static_configs_get_the_sparsegpt_default_written():
    """Configs whose space has no sparsity genes keep their stored form (and digest) unchanged."""
    from evoprune.search import StudyConfig

    def space(**options):
        return StudyConfig(space=options).to_dict()["space"]

    assert space(mlp_step=16) == {"mlp_step": 16}
    assert space(mlp_step=16, sparsity_levels=[]) == {"mlp_step": 16, "sparsity_levels": []}
    assert space(sparsity_levels=[0, 0.5])["sparsity_method"] == "sparsegpt"
    assert space(pattern_2_4=True)["sparsity_method"] == "sparsegpt"
    assert space(sparsity_levels=[0, 0.5], sparsity_method="auto")["sparsity_method"] == "sparsegpt"
    assert space(sparsity_levels=[0, 0.5], sparsity_method="wanda")["sparsity_method"] == "wanda"
    assert "sparsity_method" not in space(sparsity_levels=[0, 0.5], sparsity_method=None)
    for options in ({"mlp_step": 16}, {"sparsity_levels": [0, 0.5]}, {"sparsity_levels": [0, 0.5], "sparsity_method": None}):
        assert StudyConfig.from_stored(StudyConfig(space=options).to_dict()) == StudyConfig(space=options)
    a = StudyConfig(space={"sparsity_levels": [0, 0.5], "sparsity_method": None})
    b = StudyConfig.from_stored(a.to_dict())
    assert b.space["sparsity_method"] is None and a.digest == b.digest
    assert StudyConfig.from_stored(StudyConfig(space={"sparsity_levels": [0, 0.5]}).to_dict()).space[
        "sparsity_method"] == "sparsegpt"
