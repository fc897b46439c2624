"""`evoprune status` / `EvoStudy.status()`: counts, rate and ETA by hand, read-only, the CLI."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
import types

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState
from helpers import build_study, make_storage_url, tiny_study_config

from evoprune import create_study, load_study
from evoprune._cli import main
from evoprune._optuna_private import trial_id
from evoprune.study import study_status
from evoprune.space import Candidate, LayerConfig
from evoprune.storage import StudyDatabase
from evoprune.storage._owner import Owner

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _dump(url: str) -> dict[str, list]:
    """Every row of every table (as text), to prove that status writes nothing."""
    engine = sa.create_engine(url)
    try:
        out = {}
        with engine.connect() as conn:
            for name in sorted(sa.inspect(conn).get_table_names()):
                rows = conn.execute(sa.text(f"SELECT * FROM {name}")).all()
                out[name] = sorted(repr(tuple(r)) for r in rows)
        return out
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- a real study, every backend


def test_status_counts_a_study_and_writes_nothing(storage_url):  # noqa: F811
    study = build_study(storage_url, stop={"n_trials": 10})
    study.db.register_worker(command="search")  # this process: alive
    remote = StudyDatabase.open(study.storage.engine, optuna_study_id=study.db.optuna_study_id, study_name="st",
                                owner=Owner(host="elsewhere.example", pid=4242, proc_start="", token="abc"))
    remote.register_worker(command="worker")  # another host: judged by its heartbeat
    study.close()

    before = _dump(storage_url)
    with load_study(storage=storage_url, study_name="st") as again:
        st = again.status()
    with load_study(storage=storage_url, study_name="st", grace_period=-1.0) as strict:
        st_strict = strict.status()  # every heartbeat is "too old": the remote worker is presumed dead
    assert _dump(storage_url) == before, "status must not write any row"

    assert st.trials == {"COMPLETE": 2, "PRUNED": 1, "RUNNING": 1}
    assert st.finished == 3
    assert [(s.stage, s.entered, s.promoted, s.tokens) for s in st.stages] == [
        ("s1", 3, 2, 1536), ("final", 2, None, 2048)]
    assert (st.best_value, st.best_trial, st.front_size) == (0.2, 2, 1)
    assert st.tokens == 3584
    assert st.generations is None
    assert st.evaluations_per_second is not None and st.evaluations_per_second > 0
    assert len(st.workers) == 2 and st.workers_alive == 2 and st.stopped_workers == 0
    assert all(0 <= w.heartbeat_age < 60 for w in st.workers)
    assert {w.owner.split(":")[0]: w.alive for w in st_strict.workers}["elsewhere.example"] is False
    [stop] = st.stops
    assert (stop.condition, stop.limit, stop.done) == ("n_trials", 10, 3)
    assert stop.eta_seconds is not None and stop.eta_seconds > 0

    text = "\n".join(st.lines())
    assert "trials: complete 2, pruned 1, running 1 (4 in all)" in text
    assert "s1 3 entered, 2 promoted (1,536 tokens); final 2 entered (2,048 tokens)" in text
    assert "best so far: kl 0.2 (trial 2)" in text
    assert "tokens spent: 3,584 forward tokens" in text
    assert "workers: 2 alive, 0 presumed dead, 0 stopped" in text
    assert "stop n_trials: 3 / 10 -> ETA" in text


# --------------------------------------------------------------------------- rate and ETA by hand


T0 = dt.datetime(2026, 1, 1, 12, 0, 0)


def _stub(stop: dict, *, finished: int = 10, generations: int | None = 2, alive: bool = False):
    """A duck-typed study: ``finished`` trials that started at T0 and completed at T0 + 10 s, 20 s, ...,
    each spending 100 tokens at stage s1; ``generations`` saved sampler generations."""
    config = tiny_study_config(stop=stop)
    trials = [types.SimpleNamespace(state=TrialState.COMPLETE, datetime_start=T0,
                                    datetime_complete=T0 + dt.timedelta(seconds=10 * (k + 1)))
              for k in range(finished)]
    records = [types.SimpleNamespace(stage="s1", tokens=100) for _ in range(finished)]
    outcomes = [types.SimpleNamespace(stage="s1", promoted=k % 2 == 0) for k in range(finished)]
    now = T0 + dt.timedelta(seconds=10 * finished)
    workers = [{"owner": "h:1:-:w", "host": "h", "pid": 1, "command": "search", "stopped_at": None,
                "db_now": now, "last_seen": now - dt.timedelta(seconds=3)}]
    db = types.SimpleNamespace(
        owner=types.SimpleNamespace(name="status-process"),
        sampler_generations=lambda: list(range(generations + 1)) if generations is not None else [],
        worker_liveness=lambda grace: [("h:1:-:w", alive)],
        workers=lambda: workers,
    )
    return types.SimpleNamespace(
        name="stub", url="sqlite:///stub.db", config=config, directions=["minimize", "minimize"], db=db,
        grace_period=60.0, trials=lambda: trials, stage_records=lambda: records, stage_outcomes=lambda: outcomes,
        pareto_front=lambda: [types.SimpleNamespace(number=0, values=(0.1, 0.5))],
    ), now


def test_rate_and_eta_are_hand_computed():
    stub, now = _stub({"n_trials": 30, "n_generations": 4, "max_tokens": 3000, "timeout": 500})
    st = study_status(stub, now=now)
    # 10 trials finished over the 100 s since the first one started: 0.1 trials/s
    assert st.evaluations_per_second == pytest.approx(0.1)
    assert st.window_seconds == pytest.approx(100.0)
    etas = {s.condition: (s.done, s.eta_seconds) for s in st.stops}
    assert etas["n_trials"] == (10, pytest.approx(200.0))           # 20 trials left / 0.1
    assert etas["n_generations"] == (2, pytest.approx(100.0))       # 2 generations x 5 trials / 0.1
    assert etas["max_tokens"] == (1000, pytest.approx(200.0))       # 2000 tokens / (0.1 x 100 tokens)
    assert etas["timeout"] == (100.0, pytest.approx(400.0))         # 500 s - 100 s (no worker alive)
    assert st.eta_seconds == pytest.approx(100.0)                   # the first condition met
    assert [(s.stage, s.entered, s.promoted, s.tokens) for s in st.stages] == [
        ("s1", 10, 5, 1000), ("final", 0, None, 0)]
    assert st.front_size == 1 and st.best_value is None             # two objectives: front size only
    assert [(w.alive, w.heartbeat_age) for w in st.workers] == [(False, 3.0)]
    text = "\n".join(st.lines())
    assert "ETA: 1 min 40 s (no worker alive: resume the study to get there)" in text
    assert "Pareto front: 1 trial (objectives kl, params" in text
    assert "workers: 0 alive, 1 presumed dead, 0 stopped" in text

    # a shorter window: trials finished at 50..100 s -> 6 trials / 50 s
    assert study_status(stub, window=50, now=now).evaluations_per_second == pytest.approx(0.12)


def test_reached_and_missing_stop_conditions():
    stub, now = _stub({"n_trials": 5}, alive=True)
    st = study_status(stub, now=now)
    [stop] = st.stops
    assert stop.reached and stop.eta_seconds == 0.0
    assert "  stop n_trials: 10 / 5 -> reached" in st.lines()
    stub, now = _stub({})
    st = study_status(stub, now=now)
    assert st.stops == () and st.eta_seconds is None
    assert any("no stop condition" in line for line in st.lines())
    stub, now = _stub({"n_trials": 5}, finished=0, generations=None)
    st = study_status(stub, now=now)
    assert st.evaluations_per_second is None and st.stops[0].eta_seconds is None
    assert "ETA unknown" in "\n".join(st.lines())
    with pytest.raises(ValueError, match="window must be > 0"):
        study_status(stub, window=0)


# --------------------------------------------------------------------------- the command line


def test_status_command(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'st.db'}"
    build_study(url).close()
    assert main(["status", "--storage", url, "--study", "st"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"study 'st' in {url}\n")
    assert "best so far: kl 0.2 (trial 2)" in out
    assert "ETA: no stop condition in the stored config" in out

    missing = tmp_path / "nothing.db"
    assert main(["status", "--storage", f"sqlite:///{missing}", "--study", "st"]) == 2
    [err] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("evoprune: error:")]
    assert "no study database at" in err and "--storage" in err
    assert not missing.exists(), "status must not create a database"
    assert main(["status", "--storage", url, "--study", "other"]) == 2
    assert "no study named 'other'" in capsys.readouterr().err
    assert main(["status", "--storage", url, "--study", "st", "--watch", "0"]) == 2
    assert "--watch needs a positive number" in capsys.readouterr().err


def test_status_never_prints_the_password(tmp_path, capsys):
    url, drop = make_storage_url("postgresql", tmp_path)
    try:
        build_study(url).close()
        secret = sa.engine.make_url(url).set(password="s3cret-pw").render_as_string(hide_password=False)
        assert main(["status", "--storage", secret, "--study", "st"]) == 0  # trust auth ignores the password
        captured = capsys.readouterr()
        assert "s3cret-pw" not in captured.out + captured.err
        assert "***" in captured.out
    finally:
        drop()


def test_status_watch_refreshes_until_ctrl_c(tmp_path):
    url = f"sqlite:///{tmp_path / 'st.db'}"
    build_study(url).close()
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from evoprune._cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, "status", "--storage", url, "--study", "st",
                             "--watch", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum("Ctrl-C stops" in s for s in seen) < 2:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
        assert sum("Ctrl-C stops" in s for s in seen) >= 2, "".join(seen) + proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:  # pragma: no cover
            proc.kill()
            proc.wait()
