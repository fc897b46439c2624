"""optuna-dashboard serves an evoprune study database as is (loopback only)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from helpers import tiny_study_config

from evoprune import create_study
from evoprune._optuna_private import trial_id
from evoprune.space import Candidate, LayerConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dashboard_command() -> list[str]:
    exe = Path(sys.executable).with_name("optuna-dashboard")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("optuna-dashboard")
    if found:
        return [found]
    pytest.skip("optuna-dashboard is not installed (pip install optuna-dashboard)")


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def test_optuna_dashboard_serves_the_study(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path / 'dash.db'}"
    study = create_study(tiny_study_config(), storage=url, study_name="dash")
    for i, values in enumerate([(0.3, 0.7), (0.2, 0.8)]):
        cand = Candidate(layers=(LayerConfig(num_kv_heads=2, q_per_kv=2, mlp_channels=16 * (i + 1)),) * 4)
        t = study.optuna_study.ask()
        study.recorder.record_candidate(trial_id(t), cand, source="initial")
        study.optuna_study.tell(t, list(values))
    study.storage.engine.dispose()
    port = _free_port()
    proc = subprocess.Popen(
        [*_dashboard_command(), url, "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        summaries = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"optuna-dashboard exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                summaries = _get(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
                break
            except OSError:
                time.sleep(0.3)
        assert summaries is not None, "optuna-dashboard did not answer within 60 s"
        [summary] = [s for s in summaries if s["study_name"] == "dash"]
        detail = _get(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}?after=0")
        trials = detail["trials"]
        assert [t["state"] for t in trials] == ["Complete", "Complete"]
        assert [t["values"] for t in trials] == [[0.3, 0.7], [0.2, 0.8]]
        attrs = {a["key"]: a["value"] for a in trials[0]["user_attrs"]}
        assert "evoprune:candidate_key" in attrs
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            proc.wait()
