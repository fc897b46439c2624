"""Issue 23 with real processes: a worker stalled past the grace period, deleting a study under a
live worker, many processes starting on one new database, a double signal followed by ``check``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa
from test_storage_backends import make_storage_url
from test_storage_resume import CONFIG, _counts

from evoprune.storage._engine import normalize_url

#: the resume tests' config with no convergence stop: the workers run until --timeout
LONG = CONFIG.replace("options: {offspring: 4}", "options: {offspring: 4, patience: null}")
ENV = dict(os.environ, EVOPRUNE_LOG_LEVEL=os.environ.get("DBG_LEVEL", "WARNING"), OMP_NUM_THREADS="1")


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "evoprune", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evoprune", *args], env=ENV, capture_output=True, text=True)


def _running_of(engine: sa.Engine, pid: int, beaten: bool = False) -> int:
    """RUNNING trials whose candidate the process ``pid`` recorded (``beaten``: with a heartbeat row)."""
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(
                "SELECT COUNT(*) FROM trials t JOIN evoprune_trials e ON e.trial_id = t.trial_id "
                "JOIN evoprune_workers w ON w.owner = e.owner WHERE t.state = 'RUNNING' AND w.pid = :p"
                + (" AND t.trial_id IN (SELECT trial_id FROM trial_heartbeats)" if beaten else "")),
                {"p": pid}).scalar())
    except sa.exc.DBAPIError:
        return 0


def _wait(pred, procs, limit: float = 300.0) -> None:
    deadline = time.monotonic() + limit
    while not pred():
        for p in procs:
            assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_search_stalled_past_the_grace_period_discards_its_failed_trials_and_both_finish(backend, tmp_path):
    """Point 1: SIGSTOP a search longer than --grace while another worker shares the study; the other
    worker fails its silent trials; after SIGCONT the stalled search warns, drops those results and
    goes on: both exit 0 and `check` is clean."""
    url, drop = make_storage_url(backend, tmp_path)
    cfg = tmp_path / "stall.yaml"
    cfg.write_text(LONG)
    engine = sa.create_engine(normalize_url(url))
    fast = ["--heartbeat", "0.2", "--grace", "1"]
    try:
        from evoprune import create_study

        create_study(cfg, storage=url, study_name="stall").close()  # both start at once
        a = _cli("search", str(cfg), "--storage", url, "--study", "stall", "--generations", "200",
                 "--timeout", "40", *fast)
        b = _cli("worker", "--storage", url, "--study", "stall", "--generations", "200",
                 "--timeout", "40", *fast)
        _wait(lambda: _running_of(engine, b.pid) >= 1, [a, b])
        for _ in range(3):  # freeze the search while one of its trials runs (and has beaten), past --grace
            _wait(lambda: _running_of(engine, a.pid, beaten=True) >= 1, [a, b])
            os.kill(a.pid, signal.SIGSTOP)
            try:
                time.sleep(3.5)  # on SQLite the frozen search may hold the write lock: the other waits
            finally:
                os.kill(a.pid, signal.SIGCONT)
            time.sleep(1.0)
        out_a, err_a = a.communicate(timeout=600)
        out_b, err_b = b.communicate(timeout=600)
        assert a.returncode == 0, err_a[-3000:]
        assert b.returncode == 0, err_b[-3000:]
        assert "Traceback" not in err_a + err_b
        # live trials were failed as silent (by whichever process woke first), and their owner went on
        with engine.connect() as conn:
            reasons = [r for (r,) in conn.execute(sa.text(
                "SELECT value_json FROM trial_system_attributes WHERE key = 'evoprune:fail_reason'"))]
        assert any("no heartbeat" in r for r in reasons), (reasons, err_a[-2000:], err_b[-2000:])
        assert "its result is discarded" in err_a + err_b, (err_a[-2000:], err_b[-2000:])
        check = _run("check", "--storage", url, "--study", "stall")
        assert check.returncode == 0, check.stdout + check.stderr
        assert _counts(engine).get("RUNNING", 0) == 0
    finally:
        engine.dispose()
        drop()
