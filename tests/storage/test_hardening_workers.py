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
from helpers import RESUME_CONFIG as CONFIG
from helpers import make_storage_url
from helpers import trial_state_counts as _counts

from evoprune.storage._engine import normalize_url

#: the resume tests' config with no convergence stop: the workers run until --timeout
# no convergence stop and a space too large to exhaust while the test stalls and signals the processes
LONG = CONFIG.replace("options: {offspring: 4}", "options: {offspring: 4, patience: null}").replace(
    "mlp_step: 16", "mlp_step: 4")
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


@pytest.mark.parametrize("backend", ["postgresql", "mysql"])
def test_delete_study_refuses_a_live_worker_and_force_stops_it_cleanly(backend, tmp_path):
    """Point 2: `delete-study --yes` with a live worker is refused (exit 1, names it, nothing deleted);
    `--force` asks it to stop: the worker exits with one line, the study is gone from `studies`."""
    url, drop = make_storage_url(backend, tmp_path)
    cfg = tmp_path / "wdel.yaml"
    cfg.write_text(LONG)
    engine = sa.create_engine(normalize_url(url))
    try:
        from evoprune import create_study

        create_study(cfg, storage=url, study_name="wdel").close()
        w = _cli("worker", "--storage", url, "--study", "wdel", "--generations", "200", "--timeout", "300",
                 "--heartbeat", "0.2", "--grace", "5")
        _wait(lambda: _counts(engine).get("COMPLETE", 0) >= 2, [w])
        refused = _run("delete-study", "--storage", url, "--study", "wdel", "--yes")
        assert refused.returncode == 1, refused.stdout + refused.stderr
        (line,) = refused.stderr.strip().splitlines()
        assert f"pid {w.pid}" in line and "--force" in line, line
        assert w.poll() is None and _counts(engine).get("COMPLETE", 0) >= 2  # nothing deleted, still working
        forced = _run("delete-study", "--storage", url, "--study", "wdel", "--yes", "--force")
        assert forced.returncode == 0, forced.stdout + forced.stderr
        assert "deleted study 'wdel'" in forced.stdout
        _, err = w.communicate(timeout=300)
        assert w.returncode == 1, err[-3000:]
        lines = [ln for ln in err.strip().splitlines() if ln.startswith("evoprune: error")]
        assert lines == [f"evoprune: error: study 'wdel' was deleted (delete-study --force) while this worker "
                         "ran; it stopped"], err[-3000:]
        assert "Traceback" not in err
        listed = _run("studies", "--storage", url)
        assert listed.returncode == 0 and "wdel" not in listed.stdout, listed.stdout
        assert _counts(engine) == {}
    finally:
        engine.dispose()
        drop()


_FIRST_START = r'''
import sys, time
from evoprune import create_study
from evoprune.search import StudyConfig
url, name, at, config = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
time.sleep(max(0.0, at - time.time()))  # every process opens the database at the same moment
create_study(StudyConfig.from_file(config), storage=url, study_name=name).close()
'''


def first_starts(url: str, config: str, processes: int = 4) -> list[str]:
    """``processes`` real processes create one study each (different names) on the new, empty database
    ``url`` at the same moment; returns the last stderr line of each that failed (bench/faults.py too)."""
    at = time.time() + 8.0  # after every interpreter has imported evoprune
    procs = [subprocess.Popen([sys.executable, "-c", _FIRST_START, url, f"first{i}", str(at), config], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(processes)]
    errors = []
    for p in procs:
        _, err = p.communicate(timeout=300)
        if p.returncode != 0:
            errors.append((err.strip().splitlines() or [f"exit {p.returncode}"])[-1])
    return errors


@pytest.mark.parametrize("backend", ["sqlite", "postgresql", "mysql"])
def test_processes_starting_at_once_on_a_new_database_all_succeed(backend, tmp_path):
    """Point 3: 4 processes open one new, empty database at the same moment (a fleet started by a
    scheduler) and each creates its study; 3 rounds per backend here, 10 in bench/faults.py."""
    cfg = tmp_path / "first.yaml"
    cfg.write_text(CONFIG)
    for r in range(3):
        (tmp_path / str(r)).mkdir()
        url, drop = make_storage_url(backend, tmp_path / str(r))
        try:
            assert first_starts(url, str(cfg)) == [], f"round {r}"
            from evoprune.storage import list_studies

            assert sorted(s["name"] for s in list_studies(url)) == [f"first{i}" for i in range(4)]
        finally:
            drop()


def _freeze_while_running(proc: subprocess.Popen, engine: sa.Engine) -> None:
    """Leave ``proc`` SIGSTOP-ed at a moment one of its trials is RUNNING."""
    while True:
        _wait(lambda: _counts(engine).get("COMPLETE", 0) >= 1 and _running_of(engine, proc.pid) >= 1, [proc])
        os.kill(proc.pid, signal.SIGSTOP)
        if _running_of(engine, proc.pid) >= 1:
            return
        os.kill(proc.pid, signal.SIGCONT)


def _fail_reasons(engine: sa.Engine) -> dict[int, str | None]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text(
            "SELECT t.number, a.value_json FROM trials t LEFT JOIN trial_system_attributes a "
            "ON a.trial_id = t.trial_id AND a.key = 'evoprune:fail_reason' WHERE t.state = 'FAIL'")).all())


def test_kill_and_double_signal_leave_a_state_check_reports_and_resume_recovers(tmp_path):
    """Point 4: after SIGKILL, `check` warns (exit 1) about the dead worker's RUNNING trials and claims
    instead of saying OK; a double SIGTERM cleans up within its bound (one line, exit 143) and `check`
    agrees with what is left; every trial failed by a signal says why; resume recovers both."""
    url = f"sqlite:///{tmp_path / 'sig.db'}"
    cfg = tmp_path / "sig.yaml"
    cfg.write_text(LONG)
    engine = sa.create_engine(normalize_url(url))
    slow = ["--generations", "200", "--heartbeat", "30", "--grace", "600"]  # nobody recovers on their own
    try:
        p = _cli("search", str(cfg), "--storage", url, "--study", "kill", *slow)
        _freeze_while_running(p, engine)
        p.kill()
        p.communicate()
        check = _run("check", "--storage", url, "--study", "kill", "--grace", "600")
        assert check.returncode == 1, check.stdout + check.stderr
        assert "RUNNING trial(s)" in check.stdout and "dead or silent" in check.stdout, check.stdout
        assert "warning(s)" in check.stdout.strip().splitlines()[-1]

        seconds = []
        for delay in (0.03, 0.3):  # the second SIGTERM 30 ms (often merged with the first) or 300 ms later
            study = f"twice{delay:g}"
            p = _cli("search", str(cfg), "--storage", url, "--study", study, *slow)
            _freeze_while_running(p, engine)
            os.kill(p.pid, signal.SIGTERM)
            os.kill(p.pid, signal.SIGCONT)
            time.sleep(delay)
            os.kill(p.pid, signal.SIGTERM)
            _, err = p.communicate(timeout=120)
            assert p.returncode in (128 + signal.SIGTERM, -signal.SIGTERM), err[-3000:]
            assert "Traceback" not in err, err[-3000:]
            errors = [ln for ln in err.splitlines() if ln.startswith("evoprune: error")]
            assert errors and "SIGTERM" in errors[-1], err[-3000:]
            seconds += ["second" in errors[-1]]
            check = _run("check", "--storage", url, "--study", study, "--grace", "600")
            left = _running_of(engine, p.pid)
            assert (check.returncode == 0) == (left == 0), (left, check.stdout)
            assert left == 0 or "RUNNING trial(s)" in check.stdout, check.stdout
            print("double signal:", delay, left, "left RUNNING;", errors[-1], check.stdout)

        p = _cli("search", str(cfg), "--storage", url, "--study", "once", *slow)
        _freeze_while_running(p, engine)
        os.kill(p.pid, signal.SIGTERM)
        os.kill(p.pid, signal.SIGCONT)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
        reasons = _fail_reasons(engine)
        assert reasons and all(r for r in reasons.values()), reasons  # every trial failed by a signal says why

        for study in ("kill", "twice0.03", "twice0.3", "once"):
            assert _run("resume", "--storage", url, "--study", study, "--generations", "1").returncode == 0
            check = _run("check", "--storage", url, "--study", study, "--grace", "600")
            assert check.returncode == 0 and "warning" not in check.stdout, check.stdout
    finally:
        engine.dispose()


def test_a_signal_outside_a_search_says_so_without_the_search_message(tmp_path):
    """Point 5: SIGTERM during `export` (healing) stops it with one line that does not claim running
    trials were failed or ask for `evoprune resume`; exit 143; no half-written folder."""
    url = f"sqlite:///{tmp_path / 'exp.db'}"
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(CONFIG)
    assert _run("search", str(cfg), "--storage", url, "--study", "exp", "--generations", "1").returncode == 0
    out = tmp_path / "healed"
    p = _cli("export", "--storage", url, "--study", "exp", "--trial", "0", "--out", str(out),
             "--finetune-tokens", "2000000")
    import threading

    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: p.stderr.read(64), "")), daemon=True)
    reader.start()
    _wait(lambda: "Loading weights" in "".join(chunks), [p])  # the command runs (its handlers are in place)
    time.sleep(2.0)  # healing
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=120)
    reader.join(timeout=10)
    err = "".join(chunks)
    assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("evoprune: error")]
    assert errors == ["evoprune: error: stopped by SIGTERM."], err[-3000:]
    assert not out.exists()
