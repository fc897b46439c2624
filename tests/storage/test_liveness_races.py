"""Liveness races found with several workers and a tight heartbeat (issue 11, B1-B3).

* B2: the reaper (a worker's own heartbeat thread, or another live worker's) must never fail a
  trial that a live process created and has not recorded yet;
* B1: a repeated candidate whose earlier trials failed and completed is recorded once, not twice;
* B3: claims without a trial of a worker that stopped (crashed) are released, and
  ``evoprune check`` reports claims stranded by a dead worker.
"""

from __future__ import annotations

import optuna
import pytest
import torch
from optuna.trial import TrialState
from helpers import tiny_study_config
from tiny_models import tiny_model

from evoprune._optuna_private import trial_id
from evoprune.evaluators import EvalContext, KLToDense, Pipeline, Stage, TopK
from evoprune.pruning import Pruner
from evoprune.search import EvolutionarySampler, Runtime, Searcher
from evoprune.study import create_study
from evoprune.search._searcher import SearchStats
from evoprune.space import Budget, Candidate, LayerConfig, SearchSpace
from evoprune.storage import StudyDatabase
from evoprune.storage.internal import SQLRecorder
from evoprune.storage._owner import Owner

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def runtime():
    model = tiny_model("llama", num_hidden_layers=4)
    ids = torch.randint(3, 97, (4000,), generator=torch.Generator().manual_seed(0))
    pruner = Pruner(model, ids[: 4 * 32].reshape(4, 32))
    space = SearchSpace.from_model(model.config, attention=None, mlp_step=16,
                                   budget=Budget(metric="params", max_ratio=0.8))
    stages = [Stage(name="s1", evaluators=[KLToDense(name="kl")], eval_tokens=64, seq_len=32, promote=TopK(2)),
              Stage(name="final", evaluators=[KLToDense(name="kl")], eval_tokens=128, seq_len=32)]
    ctx = EvalContext(eval_ids=ids, pruner=pruner, cost_model=space.cost_model, cache_dir=False, seed=0)
    return Runtime(model=model, space=space, pipeline=Pipeline(stages), context=ctx, objectives=["kl", "params"],
                   pruner=pruner)


class ReapingRecorder:
    """The study's SQL recorder, with a reaper run in the window between a trial's creation and the
    recording of its candidate -- the moment a heartbeat thread (this process' own, or another
    live worker's) may run one."""

    def __init__(self, inner: SQLRecorder, reapers) -> None:
        self.inner = inner
        self.reapers = reapers
        self.reaped = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def record_candidate(self, tid, candidate, *, source="sampler"):
        for reap in self.reapers:
            self.reaped.append(reap())
        return self.inner.record_candidate(tid, candidate, source=source)


def _other_worker(study, token: str) -> StudyDatabase:
    """A second live worker of the same study (this host, this live process: alive)."""
    owner = Owner(host=Owner.current().host, pid=Owner.current().pid, proc_start=Owner.current().proc_start,
                  token=token)
    db = StudyDatabase(study.storage.engine, study_id=study.db.study_id, optuna_study_id=study.db.optuna_study_id,
                       study_name=study.name, owner=owner)
    db.register_worker(command="worker")
    return db


@pytest.mark.parametrize("sampler", ["evolutionary", "tpe"])
@pytest.mark.parametrize("others", [False, True])
def test_reaper_never_fails_a_trial_its_live_creator_has_not_recorded_yet(storage_url, runtime, sampler, others):
    study = create_study(tiny_study_config(), storage=storage_url, study_name="race")
    study.db.register_worker(command="test")
    from evoprune.storage._liveness import reap

    # this process' own reaper with grace 0: every owner-less trial is "old" (before the fix it failed
    # the trial it had just created whenever no other worker was alive: B2)
    reapers = [lambda: reap(study.db, study.storage, grace_period=0.0)]
    if others:  # and another live worker's reaper
        other = _other_worker(study, "other")
        reapers.append(lambda: reap(other, study.storage, grace_period=60.0))
    rec = ReapingRecorder(study.recorder, reapers)
    if sampler == "evolutionary":
        s = Searcher(runtime, study.optuna_study, EvolutionarySampler(offspring=3, seed=0), rec, progress=False)
        s.run(n_generations=2)
    else:
        study.optuna_study.sampler = optuna.samplers.TPESampler(seed=0)
        Searcher(runtime, study.optuna_study, None, rec, progress=False).run(n_trials=4)
    assert rec.reaped and not any(r.failed_trials for r in rec.reaped)
    states = {t.state for t in study.trials()}
    assert TrialState.FAIL not in states and TrialState.RUNNING not in states
    assert study.check() == []
    study.close()


def test_trial_of_a_dead_creator_is_failed_without_waiting_for_live_workers(storage_url):
    study = create_study(tiny_study_config(), storage=storage_url, study_name="orphan", grace_period=60)
    study.db.register_worker(command="test")
    _other_worker(study, "busy")  # alive: before, owner-less trials waited for it to stop
    dead = Owner(host=Owner.current().host, pid=2 ** 22 + 12345, proc_start="1", token="dead")
    StudyDatabase(study.storage.engine, study_id=study.db.study_id, optuna_study_id=study.db.optuna_study_id,
                  study_name=study.name, owner=dead).register_worker(command="worker")
    from evoprune.search._searcher import fixed_trial
    from evoprune.storage._values import CREATOR_ATTR

    dist = {"x": optuna.distributions.IntDistribution(0, 9)}
    orphan = fixed_trial(study.optuna_study, {"x": 1}, dist, system_attrs={CREATOR_ATTR: dead.name})
    mine = fixed_trial(study.optuna_study, {"x": 2}, dist, system_attrs={CREATOR_ATTR: study.db.owner.name})
    report = study.reap()
    assert report.failed_trials == [orphan.number]
    assert study.storage.get_trial(trial_id(mine)).state == TrialState.RUNNING
    study.close()


def test_repeated_candidate_after_failed_and_complete_trials_is_recorded_once(storage_url, runtime):
    study = create_study(tiny_study_config(), storage=storage_url, study_name="dup")
    s = Searcher(runtime, study.optuna_study, EvolutionarySampler(offspring=3, seed=0), study.recorder,
                 progress=False)
    cand = runtime.space.random(3)
    params = runtime.space.params_of(cand)
    from evoprune.search._trials import fixed_trial, tell_duplicate

    dists = runtime.space.optuna_distributions()
    failed = fixed_trial(study.optuna_study, params, dists)
    study.recorder.claim(cand.key)
    study.recorder.record_candidate(trial_id(failed), cand, source="evolution")
    study.optuna_study.tell(failed, state=TrialState.FAIL)
    study.recorder.release(cand.key)
    assert study.recorder.claim(cand.key)
    done = fixed_trial(study.optuna_study, params, dists)
    study.recorder.record_candidate(trial_id(done), cand, source="evolution")
    study.recorder.record_stage(trial_id(done), "final", "kl", 128, 0.25, 0.1, {})
    study.recorder.record_stage_result(trial_id(done), "final", 1, 0.25, None)
    study.optuna_study.tell(done, [0.25, 0.7])
    repeat = fixed_trial(study.optuna_study, params, dists)
    stats = SearchStats()
    tell_duplicate(s, repeat, cand, stats)  # crashed with "already has a candidate recorded" before
    t = study.storage.get_trial(trial_id(repeat))
    # a resampled suggestion (issue 16): told PRUNED without values, no candidate row, not a trial
    assert t.state == TrialState.PRUNED and t.system_attrs["evoprune:resampled"] == "duplicate"
    assert t.user_attrs["evoprune:duplicate_of"] == done.number
    assert study.db.candidate_of(trial_id(repeat)) is None and stats.duplicates == 1
    assert study.check() == []  # a told repeat is not a "candidate completed twice" problem
    study.close()


def test_crashed_workers_claims_are_released_and_check_reports_stranded_ones(storage_url):
    study = create_study(tiny_study_config(), storage=storage_url, study_name="stranded", grace_period=60)
    study.db.register_worker(command="test")
    crashed = _other_worker(study, "crashed")
    rec = SQLRecorder(crashed, study.storage)
    keys = [Candidate(layers=(LayerConfig(num_kv_heads=2, q_per_kv=2, mlp_channels=16 * i),)).key for i in (1, 2)]
    assert all(rec.claim(k) for k in keys)
    # a worker that dies without cleaning up (marked stopped by someone else, claims still held)
    crashed.mark_workers_dead([crashed.owner.name], "crashed")
    problems = study.check()
    assert any("stranded" in p and keys[0] in p for p in problems), problems
    report = study.reap()
    assert report.released_claims == 2
    assert {k: c["status"] for k, c in study.db.claims().items()} == {k: "released" for k in keys}
    assert study.recorder.claim(keys[0])  # claimable again
    assert study.check() == []
    # a worker that stops by itself releases what it holds at once
    quitter = _other_worker(study, "quitter")
    assert SQLRecorder(quitter, study.storage).claim(keys[1])
    quitter.stop_worker("crashed")
    assert study.db.claims()[keys[1]]["status"] == "released"
    study.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sigterm_stops_cleanly_and_a_second_signal_aborts(backend, tmp_path):
    """B8: SIGTERM mid-evaluation fails the running trials, releases every claim and marks the worker
    stopped at once (no grace period to wait out), exit 143 with one line; resume continues."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import sqlalchemy as sa
    from helpers import RESUME_CONFIG as CONFIG
    from helpers import make_storage_url
    from helpers import trial_state_counts as _counts

    from evoprune import load_study
    from evoprune.storage._engine import normalize_url

    url, drop = make_storage_url(backend, tmp_path)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(CONFIG)
    env = dict(os.environ, EVOPRUNE_LOG_LEVEL="WARNING", OMP_NUM_THREADS="1")
    watcher = sa.create_engine(normalize_url(url))
    try:
        for name, signals in (("term", [signal.SIGTERM]), ("twice", [signal.SIGTERM, signal.SIGTERM])):
            watcher.dispose()  # a fresh connection per phase (SQLite: no stale read snapshot)
            watcher = sa.create_engine(normalize_url(url))
            proc = subprocess.Popen(
                [sys.executable, "-m", "evoprune", "search", str(cfg), "--storage", url, "--study", name,
                 "--generations", "50", "--heartbeat", "30", "--grace", "600"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 300
            while True:  # freeze it while a trial is RUNNING, then signal: the state signalled is the state seen
                assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
                assert time.monotonic() < deadline, "no trial started in 300 s"
                if _counts(watcher).get("COMPLETE", 0) >= 1:
                    os.kill(proc.pid, signal.SIGSTOP)
                    if _counts(watcher).get("RUNNING", 0) >= 1:
                        break
                    os.kill(proc.pid, signal.SIGCONT)
                time.sleep(0.02)
            for sig in signals:
                os.kill(proc.pid, sig)
                if len(signals) > 1:
                    os.kill(proc.pid, signal.SIGCONT)
                    time.sleep(0.05)
            os.kill(proc.pid, signal.SIGCONT)
            _, err = proc.communicate(timeout=120)
            err = err.decode()
            # the second signal exits at once (143 from our handler, or -15 once the handlers are gone)
            assert proc.returncode in ((128 + signal.SIGTERM,) if len(signals) == 1
                                       else (128 + signal.SIGTERM, -signal.SIGTERM)), err[-3000:]
            if len(signals) == 1:
                assert "Traceback" not in err and "stopped by SIGTERM" in err, err[-3000:]
                study = load_study(storage=url, study_name=name)
                assert _counts(watcher).get("RUNNING", 0) == 0  # failed at once, not after --grace 600
                assert not [c for c in study.db.claims().values() if c["status"] == "claimed"
                            and (c["trial_id"] is None or study.storage.get_trial(c["trial_id"]).state
                                 == TrialState.FAIL)]
                (w,) = study.db.workers()
                assert w["stopped_at"] is not None and "SIGTERM" in w["stop_reason"]
                assert study.check() == []
                study.close()
        # the second signal aborted without cleaning up: the next start recovers (process gone)
        from evoprune._cli import main

        assert main(["resume", "--storage", url, "--study", "twice", "--generations", "1"]) == 0
        study = load_study(storage=url, study_name="twice")
        assert _counts(watcher).get("RUNNING", 0) == 0 and study.check() == []
        study.close()
    finally:
        watcher.dispose()
        drop()


class _CrashingRecorder(ReapingRecorder):
    """The study's recorder, raising (a bug, a lost database) on the n-th candidate it records."""

    def __init__(self, inner, n):
        super().__init__(inner, [])
        self.n = n

    def record_candidate(self, tid, candidate, *, source="sampler"):
        self.n -= 1
        if self.n == 0:
            raise RuntimeError("injected crash while starting a generation's trials")
        return self.inner.record_candidate(tid, candidate, source=source)


def test_crash_while_starting_a_generation_strands_nothing_and_replay_reruns_it(storage_url, caplog):
    """B3 + replay: a worker that crashes (an exception, not a kill) after claiming a generation but
    before creating all its trials fails the trials it made and releases every claim when it stops; the
    resumed search replays the generation and evaluates all of it -- nothing is left unclaimable (the
    reuse of finished trials in a replay is tested in test_search_driver)."""
    import logging

    from evoprune import load_study

    cfg = tiny_study_config(sampler={"name": "evolutionary", "options": {"offspring": 6}})
    study = create_study(cfg, storage=storage_url, study_name="crash")
    runtime = study.build_runtime()
    study.run(n_generations=1, runtime=runtime)
    study.recorder = _CrashingRecorder(study.recorder, n=4)
    with pytest.raises(RuntimeError, match="injected crash"):
        study.run(n_generations=1, runtime=runtime, retry_failed=False)
    claims = study.db.claims()
    assert not [k for k, c in claims.items() if c["status"] == "claimed" and c["trial_id"] is None]
    assert study.check() == []
    (w,) = study.db.workers()
    assert w["stopped_at"] is not None and w["stop_reason"] == "crashed"
    study.close()

    again = load_study(storage=storage_url, study_name="crash")
    with caplog.at_level(logging.INFO, logger="evoprune"):
        stats = again.run(n_generations=1, runtime=runtime)
    replay = [r for r in caplog.records if r.getMessage().startswith("replaying an interrupted generation")]
    assert replay and replay[0].fields["not_claimable"] == 0, [r.fields for r in replay]
    assert stats.generations == 1
    states = {t.state for t in again.trials()}
    assert TrialState.RUNNING not in states
    assert again.check() == []
    again.close()


def test_out_of_memory_fails_that_candidate_and_the_search_goes_on(runtime):
    """A candidate whose evaluation runs out of memory fails (reason recorded, claim released for a
    retry) and the worker keeps searching instead of crashing."""
    from evoprune.search import OptunaRecorder

    class OOMOnce:
        name = "kl"
        direction = "minimize"

        def __init__(self):
            self.inner, self.calls = KLToDense(name="kl"), 0

        def prepare(self, model, context):
            if hasattr(self.inner, "prepare"):
                self.inner.prepare(model, context)

        def evaluate(self, model, candidate, context):
            self.calls += 1
            if self.calls == 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return self.inner.evaluate(model, candidate, context)

    rt = Runtime(model=runtime.model, space=runtime.space,
                 pipeline=Pipeline([Stage(name="final", evaluators=[OOMOnce()], eval_tokens=128, seq_len=32)]),
                 context=runtime.context, objectives=["kl"], pruner=runtime.pruner)
    study = optuna.create_study(directions=rt.directions, sampler=optuna.samplers.RandomSampler(seed=0))
    rec = OptunaRecorder(study)
    stats = Searcher(rt, study, recorder=rec, progress=False).run(n_trials=4)
    states = [t.state for t in study.trials]
    assert stats.failed == 1 and states.count(TrialState.FAIL) == 1 and states.count(TrialState.COMPLETE) == 3
    (failed,) = [t for t in study.trials if t.state == TrialState.FAIL]
    assert failed.system_attrs["evoprune:fail_reason"] == "out of memory while evaluating"
    assert rec.claim(failed.user_attrs["evoprune:candidate_key"])  # released: may be retried
    assert not rt.pruner.is_applied
