"""Text data a user points at: files, folders (every *.txt below) and glob patterns; the resolved
file list and its sha256 are stored with the study, and a resume on other files fails."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import optuna
import pytest
from helpers import char_tokenizer as _char_tokenizer
from tiny_models import tiny_model

from evoprune import create_study, load_study
from evoprune._fingerprint import files_sha256
from evoprune.data import resolve_text_files, text_files
from evoprune.search import StudyConfig
from evoprune.storage import FingerprintMismatchError

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def _names(found):
    return [name for name, _ in found]


def test_folders_patterns_and_files_resolve_sorted(tmp_path):
    _tree(tmp_path, {"docs/b.txt": "b", "docs/a.txt": "a", "docs/sub/c.txt": "c", "docs/sub/deeper/d.txt": "d",
                     "docs/notes.md": "m", "docs/sub/e.md": "e", "one.txt": "1"})
    docs = tmp_path / "docs"
    # a folder: every *.txt below it, recursively, sorted by path; names relative to the folder
    assert _names(resolve_text_files([str(docs)])) == ["a.txt", "b.txt", "sub/c.txt", "sub/deeper/d.txt"]
    # a pattern: names relative to its fixed leading folders
    assert _names(resolve_text_files([f"{docs}/**/*.md"])) == ["notes.md", "sub/e.md"]
    assert _names(resolve_text_files([f"{docs}/*.txt"])) == ["a.txt", "b.txt"]
    assert _names(resolve_text_files([f"{docs}/s?b/*.txt"])) == ["sub/c.txt"]
    # entries keep their order; a file matched twice is read once
    found = resolve_text_files([str(tmp_path / "one.txt"), f"{docs}/**/*.txt", str(docs / "a.txt")])
    assert _names(found) == ["one.txt", "a.txt", "b.txt", "sub/c.txt", "sub/deeper/d.txt"]
    assert all(p.is_file() for _, p in found)


def test_relative_patterns_start_in_the_current_directory(tmp_path, monkeypatch):
    _tree(tmp_path, {"docs/x/1.txt": "1", "docs/y/2.txt": "2"})
    monkeypatch.chdir(tmp_path)
    found = resolve_text_files(["docs/**/*.txt"])
    assert [(n, p.as_posix()) for n, p in found] == [("x/1.txt", "docs/x/1.txt"), ("y/2.txt", "docs/y/2.txt")]
    assert _names(resolve_text_files(["./docs"])) == ["x/1.txt", "y/2.txt"]


def test_empty_matches_and_missing_files_are_one_line_errors(tmp_path):
    _tree(tmp_path, {"empty/readme.md": "no text files here"})
    with pytest.raises(ValueError) as info:
        resolve_text_files([f"{tmp_path}/docs/**/*.txt"], what="StudyConfig.data.train")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("StudyConfig.data.train: the pattern")
    assert f"'{tmp_path}/docs/**/*.txt' matches no file" in msg
    with pytest.raises(ValueError, match=r"the folder '.*empty' holds no \*\.txt file"):
        resolve_text_files([str(tmp_path / "empty")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_text_files([str(tmp_path / "nope.txt")])
    with pytest.raises(ValueError, match="empty entry"):
        StudyConfig.from_dict({"data": {"source": "text", "train": [""], "validation": ["v.txt"]}})


def test_config_takes_folders_and_patterns():
    cfg = StudyConfig.from_dict({"data": {"source": "text", "train": "docs/train", "validation": ["docs/**/valid*.txt"]}})
    assert cfg.data.train == ("docs/train",) and cfg.data.validation == ("docs/**/valid*.txt",)
    assert StudyConfig.from_dict(cfg.to_dict()) == cfg


def test_file_list_sha256_follows_the_files_not_the_folder(tmp_path):
    _tree(tmp_path / "a", {"train/1.txt": "one", "train/sub/2.txt": "two", "valid/v.txt": "vee"})
    cfg = StudyConfig.from_dict({"data": {"source": "text", "train": [str(tmp_path / "a/train")],
                                          "validation": [str(tmp_path / "a/valid/*.txt")]}})
    tf = text_files(cfg.data)
    train = tmp_path / "a/train"
    assert tf.files == {"train": (f"{train}/1.txt", f"{train}/sub/2.txt"),
                        "validation": (f"{tmp_path}/a/valid/v.txt",),
                        "calibration": (f"{train}/1.txt", f"{train}/sub/2.txt")}  # calibration defaults to train
    # sha256 over split/name, size and bytes, by hand
    expected = files_sha256([("train/1.txt", train / "1.txt"), ("train/sub/2.txt", train / "sub/2.txt"),
                             ("validation/v.txt", tmp_path / "a/valid/v.txt"),
                             ("calibration/1.txt", train / "1.txt"), ("calibration/sub/2.txt", train / "sub/2.txt")])
    assert tf.sha256 == expected
    assert tf.to_dict() == {"sha256": expected, "files": {k: list(v) for k, v in tf.files.items()}}

    shutil.copytree(tmp_path / "a", tmp_path / "moved")  # the same files elsewhere: the same digest
    moved = StudyConfig.from_dict({"data": {"source": "text", "train": [str(tmp_path / "moved/train")],
                                            "validation": [str(tmp_path / "moved/valid/*.txt")]}})
    assert text_files(moved.data).sha256 == tf.sha256
    (train / "3.txt").write_text("three")  # added
    added = text_files(cfg.data).sha256
    assert added != tf.sha256
    os.rename(train / "3.txt", train / "4.txt")  # renamed
    renamed = text_files(cfg.data).sha256
    assert renamed not in (added, tf.sha256)
    (train / "4.txt").write_text("FOUR")  # edited
    assert text_files(cfg.data).sha256 not in (renamed, added, tf.sha256)
    limited = StudyConfig.from_dict({"data": {**cfg.data.to_dict(), "max_documents": 1}})
    assert text_files(limited.data).files["train"] == (f"{train}/1.txt",)


def _config(root: Path) -> StudyConfig:
    return StudyConfig.from_dict({
        "model": "tiny-llama-in-memory",
        "data": {"source": "text", "train": [str(root / "docs/train")], "validation": [str(root / "docs/valid/**/*.txt")]},
        "calibration": {"num_sequences": 2, "seq_len": 32},
        "space": {"attention": "kv_groups", "mlp_step": 16},
        "stages": [{"name": "final", "evaluators": ["kl"], "eval_tokens": 64, "seq_len": 32}],
        "sampler": {"name": "evolutionary", "options": {"offspring": 2}},
        "objectives": ["kl"],
        "cache_dir": str(root / "cache"),
    })


def test_study_stores_the_file_list_and_resume_refuses_other_files(tmp_path):
    words = "the king of a sword and crown night falls thou art ".split()
    text = " ".join(words[i % len(words)] for i in range(600))
    _tree(tmp_path, {"docs/train/a.txt": text, "docs/train/more/b.txt": text[::-1], "docs/valid/x/v.txt": text[5:]})
    url = f"sqlite:///{tmp_path / 'g.db'}"
    cfg = _config(tmp_path)

    def runtime(study):
        return study.build_runtime(model=tiny_model("llama"), tokenizer=_char_tokenizer())

    with create_study(cfg, storage=url, study_name="g") as study:
        rt = runtime(study)
        tf = text_files(cfg.data)
        assert rt.fingerprints["data_files"] == tf.sha256
        assert study.fingerprints()["data_files"] == tf.sha256
        assert study.db.fingerprint_details()["data_files"] == tf.to_dict()
        assert study.db.fingerprint_details()["data_files"]["files"]["train"] == [
            f"{tmp_path}/docs/train/a.txt", f"{tmp_path}/docs/train/more/b.txt"]

    with load_study(storage=url, study_name="g") as again:  # the same files: resumes
        runtime(again)

    # a renamed file: same tokens, another file set -> the data_files fingerprint names it
    os.rename(tmp_path / "docs/train/more/b.txt", tmp_path / "docs/train/more/c.txt")
    with load_study(storage=url, study_name="g") as again, pytest.raises(FingerprintMismatchError) as info:
        runtime(again)
    assert set(info.value.changed) == {"data_files"}
    assert "the data_files fingerprint changed" in str(info.value)
    assert "start a new study (--study NEW_NAME)" in str(info.value)

    # an added file: other tokens and another file set
    os.rename(tmp_path / "docs/train/more/c.txt", tmp_path / "docs/train/more/b.txt")
    (tmp_path / "docs/valid/x/w.txt").write_text(text[7:])
    with load_study(storage=url, study_name="g") as again, pytest.raises(FingerprintMismatchError) as info:
        runtime(again)
    assert set(info.value.changed) == {"data", "data_files"}

    # a pattern that now matches nothing: one line naming it
    shutil.rmtree(tmp_path / "docs/valid")
    with load_study(storage=url, study_name="g") as again, pytest.raises(ValueError, match="matches no file") as err:
        runtime(again)
    assert "docs/valid/**/*.txt" in str(err.value)
