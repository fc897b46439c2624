"""`evoprune worker --device` / `--devices`: one worker process per device on one study database
(Optuna's multi-worker mode on PostgreSQL), tested with CPU devices (issue 28)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from helpers import make_storage_url, tiny_text_config


def _study(tmp_path, url):
    from evoprune.study import create_study

    text = "The quick brown fox jumps over the lazy dog. Shall I compare thee to a summer's day? " * 40
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "valid.txt").write_text(text)
    cfg = tiny_text_config(tmp_path, space={"attention": "kv_groups", "mlp_step": 16},
                           budget={"metric": "params", "max_ratio": 0.8},
                           sampler={"name": "evolutionary", "options": {"offspring": 4, "init": "random"}},
                           objectives=["kl"], cache_dir=str(tmp_path / "cache"))
    return create_study(cfg, storage=url, study_name="s")


def test_devices_start_one_worker_per_device_on_one_database(reference_tiny, tmp_path):
    url, drop = make_storage_url("postgresql", tmp_path)
    try:
        study = _study(tmp_path, url)
        proc = subprocess.run([sys.executable, "-m", "evoprune", "worker", "--storage", url, "--study", "s",
                               "--devices", "cpu,cpu", "--n-trials", "3", "--threads", "1"],
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "started 2 workers on study 's': cpu (pid" in proc.stdout
        assert proc.stdout.count("worker on cpu: exit 0") == 2
        workers = [w for w in study.db.workers() if w["command"] == "worker"]
        assert len(workers) == 2 and len({w["pid"] for w in workers}) == 2
        assert all(w["stopped_at"] is not None for w in workers)
        done = [t for t in study.trials() if t.state.name in ("COMPLETE", "PRUNED")]
        assert len(done) >= 6  # 3 trials each
        study.close()
    finally:
        drop()


def test_devices_that_do_not_exist_fail_before_any_worker_row(reference_tiny, tmp_path, capsys):
    from evoprune._cli import main

    if torch.cuda.is_available():  # pragma: no cover
        pytest.skip("needs a machine without cuda:7")
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = _study(tmp_path, url)
    capsys.readouterr()  # the setup's own log lines (Optuna's "A new study created")
    for argv in (["worker", "--devices", "0,7"], ["worker", "--device", "cuda:7"], ["resume", "--device", "cuda:7"],
                 ["worker", "--devices", "cpu", "--device", "cpu"]):
        assert main([*argv, "--storage", url, "--study", "s", "--n-trials", "1"]) in (1, 2)
        err = capsys.readouterr().err.strip()
        assert err.startswith("evoprune: error: ") and "\n" not in err
        assert "cuda" in err or "either --device" in err
    assert study.db.workers() == [] and study.trials() == []
    study.close()
