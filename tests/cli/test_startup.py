"""The verbs that only read a study database start without importing torch or transformers.

Each verb runs in a fresh interpreter against a real SQLite study (created through the study facade,
with recorded candidates, stages and values); after it returns, ``sys.modules`` must hold neither
torch nor transformers. ``dashboard`` serves until stopped: a thread asks the server for its studies,
then reports the modules and ends the process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState
from helpers import tiny_study_config

from evoprune import create_study
from evoprune._optuna_private import trial_id
from evoprune.space import Candidate, LayerConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)

HEAVY = ("torch", "transformers")


@pytest.fixture(scope="module")
def study_url(tmp_path_factory):
    """A real evoprune study: two complete trials and one pruned, with candidates and stage rows."""
    url = f"sqlite:///{tmp_path_factory.mktemp('startup') / 'startup.db'}"
    study = create_study(tiny_study_config(stop={"n_trials": 10}), storage=url, study_name="st")
    rec = study.recorder
    for i, final in enumerate((0.4, None, 0.2)):
        t = study.optuna_study.ask()
        tid = trial_id(t)
        rec.record_candidate(tid, Candidate(layers=(LayerConfig(num_kv_heads=2, q_per_kv=2,
                                                                mlp_channels=16 * (i + 1)),) * 4), source="initial")
        rec.record_stage(tid, "s1", "kl", 512, 0.5 + i, 0.1, {})
        rec.record_stage_result(tid, "s1", 0, 0.5 + i, final is not None)
        if final is None:
            study.optuna_study.tell(t, state=TrialState.PRUNED)
            continue
        rec.record_stage(tid, "final", "kl", 1024, final, 0.2, {})
        rec.record_stage_result(tid, "final", 1, final, None)
        study.optuna_study.tell(t, [final, 0.5 + 0.1 * i])
    study.close()
    return url


def _run(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert last.startswith("{"), f"no result line (rc {proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
    return json.loads(last)


def _verb(argv: list[str]) -> dict:
    return _run(
        "import json, sys\n"
        "from evoprune._cli import main\n"
        f"rc = main({argv!r})\n"
        f"print(json.dumps({{'rc': rc, 'loaded': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )


@pytest.mark.parametrize("verb", ["studies", "show", "status", "check", "delete-study"])
def test_read_only_verbs_do_not_import_torch(study_url, verb, tmp_path):
    url = study_url
    if verb == "delete-study":  # on a copy: the other verbs read the original
        copy = tmp_path / "copy.db"
        copy.write_bytes(open(url.removeprefix("sqlite:///"), "rb").read())
        url = f"sqlite:///{copy}"
    argv = {
        "studies": ["studies", "--storage", url],
        "show": ["show", "--storage", url, "--study", "st"],
        "status": ["status", "--storage", url, "--study", "st"],
        "check": ["check", "--storage", url, "--study", "st"],
        "delete-study": ["delete-study", "--storage", url, "--study", "st", "--yes"],
    }[verb]
    result = _verb(argv)
    assert result["rc"] == 0
    assert result["loaded"] == [], f"`evoprune {verb}` imported {result['loaded']}"
    if verb == "delete-study":
        assert optuna.get_all_study_names(url) == []


def test_dashboard_does_not_import_torch(study_url):
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed (pip install optuna-dashboard)")
    result = _run(
        "import json, os, socket, sys, threading, time, urllib.request\n"
        "from evoprune._cli import main\n"
        "with socket.socket() as s:\n"
        "    s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]\n"
        "def probe():\n"
        "    body = ''\n"
        "    for _ in range(600):\n"
        "        try:\n"
        "            with urllib.request.urlopen(f'http://127.0.0.1:{port}/api/studies', timeout=5) as r:\n"
        "                body = r.read().decode(); break\n"
        "        except OSError:\n"
        "            time.sleep(0.1)\n"
        f"    print(json.dumps({{'served': 'st' in body, 'loaded': [m for m in {HEAVY!r} if m in sys.modules]}}),"
        " flush=True)\n"
        "    os._exit(0)\n"
        "threading.Thread(target=probe, daemon=True).start()\n"
        f"main(['dashboard', '--storage', {study_url!r}, '--port', str(port)])\n"
    )
    assert result["served"], "the dashboard did not list the study"
    assert result["loaded"] == [], f"`evoprune dashboard` imported {result['loaded']}"
