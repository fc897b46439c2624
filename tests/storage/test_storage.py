"""Study database: recorder round trip, claims, fingerprints, stale trials, Optuna compatibility, CLI.

Runs against every backend (see storage/test_backends.py and helpers.py); no model is loaded here.
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time

import numpy as np
import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState
from helpers import tiny_study_config

from evoprune._optuna_private import trial_id
from evoprune.study import StudyNotFoundError, create_study, load_study
from evoprune.space import Candidate, LayerConfig
from evoprune.storage import ConfigMismatchError, FingerprintMismatchError, StudyDatabase
from evoprune.storage.internal import Heartbeat, SQLRecorder
from evoprune.storage._owner import Owner

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _candidate(i: int) -> Candidate:
    layer = LayerConfig(num_kv_heads=2, q_per_kv=2, mlp_channels=16 * (i + 1))
    return Candidate(layers=(layer,) * 4)


def _dispose(*studies):
    for s in studies:
        s.storage.engine.dispose()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_recorder_round_trip(storage_url):
    study = create_study(tiny_study_config(), storage=storage_url, study_name="rt")
    rec = study.recorder
    from evoprune.search import Recorder

    assert isinstance(rec, Recorder) and isinstance(rec, SQLRecorder)
    cand = _candidate(1)
    assert rec.claim(cand.key)
    trial = study.optuna_study.ask()
    rec.record_candidate(trial_id(trial), cand, source="evolution")
    rec.record_stage(trial_id(trial), "s1", "kl", 512, 0.25, 0.5, {"per_token": [0.1, 0.2], "note": "x"})
    rec.record_stage(trial_id(trial), "s1", "finetune", 1000, float("nan"), 1.5, {})
    rec.record_stage(trial_id(trial), "s1", "latency", None, float("inf"), 0.0, {"np": np.float32(2.5)})
    rec.record_stage_result(trial_id(trial), "s1", 0, 0.25, True)
    rec.save_sampler_state(0, {"generation": 0, "rng": {"s": "123456789012345678901234567890"}})
    rec.save_sampler_state(1, {"generation": 1, "population": [{"fitness": 0.25}], "x": float("inf")})
    study.optuna_study.tell(trial, [0.25, 0.8])

    again = load_study(storage=storage_url, study_name="rt")
    assert again.config == study.config
    assert again.candidate(trial.number) == cand
    records = {r.evaluator: r for r in again.stage_records(trial.number)}
    assert records["kl"].value == 0.25 and records["kl"].tokens == 512
    assert records["kl"].details == {"per_token": [0.1, 0.2], "note": "x"}
    assert math.isnan(records["finetune"].value) and records["latency"].value == math.inf
    assert records["latency"].tokens is None and records["latency"].details == {"np": 2.5}
    [outcome] = again.stage_outcomes(trial.number)
    assert (outcome.stage, outcome.stage_index, outcome.objective, outcome.promoted) == ("s1", 0, 0.25, True)
    assert again.recorder.stage_history("s1") == [0.25]
    assert again.recorder.load_sampler_state() == (1, {"generation": 1, "population": [{"fitness": 0.25}],
                                                      "x": math.inf})
    assert again.db.load_sampler_state(0)[1]["rng"]["s"] == "123456789012345678901234567890"
    assert [p.number for p in again.pareto_front()] == [trial.number]
    assert again.pareto_front()[0].candidate_key == cand.key
    assert again.recorder.finished_trial(cand.key) == {
        "trial_id": trial_id(trial), "number": trial.number, "state": "COMPLETE", "stages": {"s1": 0.25}}
    assert again.recorder.finished_trial("unknown") is None
    assert again.check() == []
    # the candidate key is visible to Optuna (and optuna-dashboard) as a user attribute
    assert again.trials()[0].user_attrs["evoprune:candidate_key"] == cand.key
    _dispose(study, again)


def test_writes_are_validated_and_atomic(storage_url):
    study = create_study(tiny_study_config(), storage=storage_url, study_name="v")
    other = create_study(tiny_study_config(seed=2), storage=storage_url, study_name="other")
    db = study.db
    trial = study.optuna_study.ask()
    tid = trial_id(trial)
    with pytest.raises(TypeError, match="not JSON-able"):
        db.record_stage(tid, "s1", "kl", 10, 0.1, 0.1, {"bad": object()})
    with pytest.raises(ValueError, match="tokens"):
        db.record_stage(tid, "s1", "kl", -1, 0.1, 0.1, {})
    with pytest.raises(TypeError, match="value must be a number"):
        db.record_stage(tid, "s1", "kl", 1, "high", 0.1, {})
    with pytest.raises(ValueError, match="not a trial of study"):
        other.db.record_stage(tid, "s1", "kl", 1, 0.1, 0.1, {})
    with pytest.raises(TypeError, match="sampler state"):
        db.save_sampler_state(0, {"rng": object()})
    assert db.stage_records() == [] and db.load_sampler_state() is None  # nothing half-written
    db.record_stage(tid, "s1", "kl", 1, 0.1, 0.1, {})
    with pytest.raises(ValueError, match="already has a result"):
        db.record_stage(tid, "s1", "kl", 1, 0.2, 0.1, {})
    study.optuna_study.tell(trial, state=TrialState.PRUNED)
    with pytest.raises(RuntimeError, match="not RUNNING"):
        db.record_stage(tid, "s2", "kl", 1, 0.1, 0.1, {})
    with pytest.raises(ConfigMismatchError, match="evoprune resume"):
        create_study(tiny_study_config(seed=99), storage=storage_url, study_name="v")
    with pytest.raises(StudyNotFoundError, match="studies there"):
        load_study(storage=storage_url, study_name="nope")
    _dispose(study, other)


def test_duplicate_claim_rejected_across_connections(storage_url):
    a = create_study(tiny_study_config(), storage=storage_url, study_name="claims")
    b = load_study(storage=storage_url, study_name="claims")  # its own engine and connections
    assert a.storage.engine is not b.storage.engine
    assert a.recorder.claim("k0") is True
    assert b.recorder.claim("k0") is False
    assert a.recorder.claim("k0") is False  # not even the same worker twice
    # race: two workers, 4 threads each, 15 keys -> every key won exactly once
    keys = [f"race{i}" for i in range(15)]
    won: list[tuple[str, str]] = []
    lock = threading.Lock()

    def grab(study, who):
        for k in keys:
            if study.recorder.claim(k):
                with lock:
                    won.append((k, who))

    threads = [threading.Thread(target=grab, args=(s, f"{n}{i}")) for n, s in (("a", a), ("b", b)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(k for k, _ in won) == sorted(keys)
    # a released claim (failed evaluation) can be taken again, at most max_attempts times in all
    b.recorder.release("k0")  # not b's claim: no effect
    assert a.recorder.claim("k0") is False
    a.recorder.release("k0")
    assert b.recorder.claim("k0") is True
    b.recorder.release("k0")
    assert a.recorder.claim("k0") is True  # third attempt
    a.recorder.release("k0")
    assert b.recorder.claim("k0") is False  # max_attempts=3 reached
    _dispose(a, b)


def test_fingerprint_mismatch_names_what_changed(storage_url):
    study = create_study(tiny_study_config(), storage=storage_url, study_name="fp")
    study.verify_fingerprints({"model": "m1", "data": "d1", "space": "s1", "config": "ignored"})
    study.verify_fingerprints({"model": "m1", "data": "d1", "space": "s1"})  # same: fine
    again = load_study(storage=storage_url, study_name="fp")
    with pytest.raises(FingerprintMismatchError) as info:
        again.verify_fingerprints({"model": "m1", "data": "d2", "space": "s1"})
    assert set(info.value.changed) == {"data"}
    msg = str(info.value)
    assert "data fingerprint changed (stored d1, now d2)" in msg and "model fingerprint" not in msg
    with pytest.raises(FingerprintMismatchError, match="model fingerprint changed.*data fingerprint changed"):
        again.verify_fingerprints({"model": "m2", "data": "d2"})
    assert again.fingerprints() == {"model": "m1", "data": "d1", "space": "s1"}
    _dispose(study, again)


def test_stale_running_trial_failed_and_retried(storage_url):
    live = create_study(tiny_study_config(), storage=storage_url, study_name="stale", grace_period=1)
    live.db.register_worker(command="test")

    def worker_as(owner: Owner) -> StudyDatabase:
        db = StudyDatabase(live.storage.engine, study_id=live.db.study_id, optuna_study_id=live.db.optuna_study_id,
                           study_name="stale", owner=owner)
        db.register_worker(command="worker")
        return db

    # 1) a worker on this host whose process is gone; 2) a worker on another host that stopped beating;
    # 3) a worker on another host that keeps beating (must survive)
    dead_local = worker_as(Owner(host=Owner.current().host, pid=_dead_pid(), proc_start="1", token="dead"))
    silent_remote = worker_as(Owner(host="elsewhere.invalid", pid=1, proc_start="", token="silent"))
    busy_remote = worker_as(Owner(host="busy.invalid", pid=1, proc_start="", token="busy"))
    trials = {}
    for name, db, i in (("dead", dead_local, 0), ("silent", silent_remote, 1), ("busy", busy_remote, 2)):
        cand = _candidate(i)
        rec = SQLRecorder(db, live.storage)
        assert rec.claim(cand.key)
        trial = live.optuna_study.ask()
        rec.record_candidate(trial_id(trial), cand, source="evolution")
        trials[name] = (trial, cand)
    orphan = live.optuna_study.ask()  # asked, then its process died before recording a candidate
    unstarted = _candidate(3)  # claimed, then its worker died before asking a trial for it
    assert SQLRecorder(dead_local, live.storage).claim(unstarted.key)
    with Heartbeat(busy_remote, live.storage, interval=0.3):
        time.sleep(2.5)  # > grace period for the silent one (database clocks have 1 s resolution)
        report = live.reap()
    state = {t.number: t.state for t in live.trials()}
    assert state[trials["dead"][0].number] == TrialState.FAIL
    assert state[trials["silent"][0].number] == TrialState.FAIL
    assert state[trials["busy"][0].number] == TrialState.RUNNING
    assert state[orphan.number] == TrialState.RUNNING  # a live worker might still record it
    assert sorted(report.failed_trials) == sorted([trials["dead"][0].number, trials["silent"][0].number])
    reasons = {t.number: t.system_attrs.get("evoprune:fail_reason") for t in live.trials()}
    assert "died" in reasons[trials["dead"][0].number]
    assert live.db.stage_history("s1") == []
    # retried, not lost: the released candidates can be claimed again and are listed for retry
    retry = dict(live.db.retryable())
    assert set(retry) == {trials["dead"][1].key, trials["silent"][1].key}
    assert Candidate.from_json(retry[trials["dead"][1].key]) == trials["dead"][1]
    claims = live.db.claims()
    # a death is not the candidate's fault: the attempt is given back (resume any number of times)
    assert claims[trials["dead"][1].key] == {**claims[trials["dead"][1].key], "status": "released", "attempts": 0}
    assert claims[unstarted.key]["status"] == "released" and claims[unstarted.key]["attempts"] == 0
    assert claims[trials["busy"][1].key]["attempts"] == 1
    assert live.recorder.claim(trials["dead"][1].key) is True
    assert live.recorder.claim(trials["busy"][1].key) is False
    # once no other worker is alive, orphaned RUNNING trials are failed as well
    busy_remote.stop_worker("done")
    live.reap()
    assert live.storage.get_trial(trial_id(orphan)).state == TrialState.FAIL
    assert live.storage.get_trial(trial_id(trials["busy"][0])).state == TrialState.RUNNING  # beat recently
    for i in range(4):  # killed more often than max_attempts (3): still claimed and evaluated again
        ghost = worker_as(Owner(host=Owner.current().host, pid=_dead_pid(), proc_start="1", token=f"ghost{i}"))
        rec = SQLRecorder(ghost, live.storage)
        assert rec.claim(unstarted.key)
        tr = live.optuna_study.ask()
        rec.record_candidate(trial_id(tr), unstarted, source="evolution")
        live.reap()
        assert live.storage.get_trial(trial_id(tr)).state == TrialState.FAIL
        assert live.db.claims()[unstarted.key] | {"owner": None, "trial_id": None} == {
            "owner": None, "status": "released", "attempts": 0, "trial_id": None}
    _dispose(live)


def test_optuna_load_study_opens_the_database(storage_url):
    study = create_study(tiny_study_config(), storage=storage_url, study_name="compat")
    for i, values in enumerate([(0.3, 0.7), (0.2, 0.8), (0.4, 0.75)]):
        t = study.optuna_study.ask()
        study.recorder.record_candidate(trial_id(t), _candidate(i), source="initial")
        study.recorder.record_stage(trial_id(t), "final", "kl", 1024, values[0], 0.1, {})
        study.recorder.record_stage_result(trial_id(t), "final", 1, values[0], None)
        study.optuna_study.tell(t, list(values))
    plain = optuna.load_study(study_name="compat", storage=study.storage.url)
    assert [t.values for t in plain.trials] == [[0.3, 0.7], [0.2, 0.8], [0.4, 0.75]]
    assert sorted(t.number for t in plain.best_trials) == sorted(p.number for p in study.pareto_front()) == [0, 1]
    _dispose(study)


def test_cli_studies_show_check(storage_url, capsys):
    from evoprune._cli import main

    study = create_study(tiny_study_config(), storage=storage_url, study_name="cli")
    t = study.optuna_study.ask()
    study.recorder.record_candidate(trial_id(t), _candidate(0), source="initial")
    study.recorder.record_stage(trial_id(t), "final", "kl", 1024, 0.5, 0.1, {})
    study.recorder.record_stage_result(trial_id(t), "final", 1, 0.5, None)
    study.optuna_study.tell(t, [0.5, 0.7])
    url = study.storage.url
    assert main(["studies", "--storage", url]) == 0
    assert "cli" in capsys.readouterr().out
    assert main(["show", "--storage", url, "--study", "cli"]) == 0
    out = capsys.readouterr().out
    assert "Pareto front (1 trials" in out and _candidate(0).key in out
    assert main(["check", "--storage", url, "--study", "cli"]) == 0
    assert main(["show", "--storage", url, "--study", "missing"]) == 2
    assert "no study named 'missing'" in capsys.readouterr().err
    assert main(["export", "--storage", url, "--study", "cli", "--trial", "7", "--out", "x"]) != 0
    # an integrity problem is found and reported with exit code 1
    with study.storage.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM evoprune_stages"))
    assert main(["check", "--storage", url, "--study", "cli"]) == 1
    assert "no stage results" in capsys.readouterr().out
    _dispose(study)


def test_fixed_trials_are_created_atomically_across_workers(storage_url):
    """Two workers create trials with fixed params at the same moment (as the search driver does):
    each gets its own params, in one storage call, and a WAITING trial (enqueued by anyone) is never
    taken by them; reaping leaves it alone (no worker runs it)."""
    from evoprune.search._searcher import fixed_trial

    a = create_study(tiny_study_config(), storage=storage_url, study_name="ask")
    b = load_study(storage=storage_url, study_name="ask")
    dist = {"x": optuna.distributions.IntDistribution(0, 100)}
    waiting = a.storage.create_new_trial(a.db.optuna_study_id, template_trial=optuna.trial.create_trial(
        state=TrialState.WAITING, params={"x": 99}, distributions=dist))
    got: dict[str, list[int]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def drive(study, name, values):
        try:
            for v in values:
                trial = fixed_trial(study.optuna_study, {"x": v}, dist, user_attrs={"evoprune:source": "evolution"})
                assert study.storage.get_trial(trial_id(trial)).state == TrialState.RUNNING
                got[name].append(trial.params["x"])
                study.optuna_study.tell(trial, [0.0, 0.0])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=drive, args=(a, "a", list(range(1, 9)))),
               threading.Thread(target=drive, args=(b, "b", list(range(11, 19))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert got == {"a": list(range(1, 9)), "b": list(range(11, 19))}
    states = {t.params["x"]: t.state for t in a.trials()}
    assert states[99] == TrialState.WAITING and sum(s == TrialState.COMPLETE for s in states.values()) == 16
    with pytest.raises(ValueError, match="outside its distribution"):
        fixed_trial(a.optuna_study, {"x": 101}, dist)
    with pytest.raises(ValueError, match="no distribution"):
        fixed_trial(a.optuna_study, {"y": 1}, dist)
    a.reap()
    assert a.storage.get_trial(waiting).state == TrialState.WAITING
    a.close()
    b.close()


def test_cli_resume_stops_when_a_fingerprint_changed(tmp_path, capsys, monkeypatch):
    """`evoprune resume` exits with code 3 and names what changed (the runtime is faked: no model)."""
    from evoprune._cli import main
    from evoprune.study import EvoStudy

    url = f"sqlite:///{tmp_path / 'fp.db'}"
    study = create_study(tiny_study_config(), storage=url, study_name="fp")
    study.verify_fingerprints({"model": "m1", "data": "d1", "space": "s1"})
    study.close()
    monkeypatch.setattr(EvoStudy, "build_runtime",
                        lambda self: self.verify_fingerprints({"model": "m2", "data": "d1", "space": "s1"}))
    assert main(["resume", "--storage", url, "--study", "fp", "--generations", "1"]) == 3
    err = capsys.readouterr().err
    assert "model fingerprint changed (stored m1, now m2)" in err and "data fingerprint" not in err
