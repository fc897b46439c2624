"""Crash and resume on the tiny reference model: a search process is killed with SIGKILL mid-search,
then resumed from the database alone. No finished trial is lost or duplicated, the trials it was
running are failed and their candidates released for retry, and the sampler state continues.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState
from helpers import RESUME_CONFIG as CONFIG
from helpers import make_storage_url
from helpers import trial_state_counts as _counts

from evoprune import load_study

@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    u, drop = make_storage_url(request.param, tmp_path)
    yield u
    drop()


def _snapshot(study) -> dict[int, tuple]:
    out = {}
    for t in study.trials():
        key = t.user_attrs.get("evoprune:candidate_key")
        out[t.number] = (t.state, tuple(t.values) if t.values else None, key)
    return out


def test_sigkill_mid_search_then_resume(url, tmp_path):
    from evoprune._cli import main

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(CONFIG)
    env = dict(os.environ, EVOPRUNE_LOG_LEVEL="WARNING")
    proc = subprocess.Popen(
        [sys.executable, "-m", "evoprune", "search", str(cfg), "--storage", url, "--study", "crash",
         "--generations", "4", "--heartbeat", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    from evoprune.storage._engine import normalize_url

    watcher = sa.create_engine(normalize_url(url))
    try:
        deadline = time.monotonic() + 300
        def ready() -> bool:
            c = _counts(watcher)
            return c.get("RUNNING", 0) >= 1 and c.get("COMPLETE", 0) + c.get("PRUNED", 0) >= 2

        while True:  # kill once some trials finished and others are being evaluated
            assert proc.poll() is None, f"search ended before it could be killed: {proc.stderr.read().decode()[-3000:]}"
            assert time.monotonic() < deadline, "search made no progress in 300 s"
            if ready():
                # freeze it, then look again: the state it is killed in is the state checked
                os.kill(proc.pid, signal.SIGSTOP)
                if ready():
                    break
                os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:  # pragma: no cover
            proc.kill()
            proc.wait()
        watcher.dispose()

    before = load_study(storage=url, study_name="crash")
    snap = _snapshot(before)
    running = {n for n, (s, _, _) in snap.items() if s == TrialState.RUNNING}
    finished = {n: v for n, v in snap.items() if v[0] in (TrialState.COMPLETE, TrialState.PRUNED)}
    assert running and finished
    saved = before.db.load_sampler_state()
    before.storage.engine.dispose()

    assert main(["resume", "--storage", url, "--study", "crash", "--generations", "1"]) == 0

    after = load_study(storage=url, study_name="crash")
    snap2 = _snapshot(after)
    # nothing finished before the crash is lost or changed
    for n, v in finished.items():
        assert snap2[n] == v
    # the trials the dead process was running were failed (with the reason) and their candidates released
    trials = {t.number: t for t in after.trials()}
    for n in running:
        assert trials[n].state == TrialState.FAIL
        # "worker ... died" for a trial it was evaluating; "orphaned" for one it had asked but
        # not yet started when it was killed: both are reaped because their process is gone
        reason = trials[n].system_attrs["evoprune:fail_reason"]
        assert "died" in reason or "orphaned" in reason, reason
    claims = after.db.claims()
    for n in running:
        key = snap[n][2]
        if key is not None:  # recorded before the kill: released, or retried by a later trial
            retried = [m for m, v in snap2.items() if v[2] == key and m != n]
            assert claims[key]["status"] == "released" or retried
    assert after.db.retryable() == []  # every released candidate was evaluated again (retry pass)
    # no candidate was finished twice; every row is consistent
    keys = [v[2] for v in snap2.values() if v[0] in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(keys) == len(set(keys))
    assert after.check() == []
    # the sampler continued from its stored state: one more generation than before
    resumed = after.db.load_sampler_state()
    assert resumed[0] == (saved[0] if saved else 0) + 1
    assert not any(t.state == TrialState.RUNNING for t in after.trials())
    after.storage.engine.dispose()
