"""Searcher: staged evaluation, trial states, recording, resume, Optuna samplers, multi-objective, stops."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
import torch

from tiny_models import tiny_model

from evoprune.evaluators import EvalContext, KLToDense, Pipeline, Stage, TopK
from evoprune.pruning import Pruner
from evoprune.baselines import shortgpt, uniform
from evoprune.search import (
    BudgetSweep,
    EvolutionarySampler,
    OptunaRecorder,
    Recorder,
    Runtime,
    Searcher,
    trial_candidate,
)
from evoprune.storage.internal import ATTR_PREFIX
from evoprune.study import pareto_front, study_front
from evoprune.space import Budget, SearchSpace

optuna.logging.set_verbosity(optuna.logging.WARNING)
STATE = optuna.trial.TrialState


@pytest.fixture(scope="module")
def base():
    model = tiny_model("llama", num_hidden_layers=6)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (6000,), generator=gen)
    pruner = Pruner(model, ids[: 4 * 32].reshape(4, 32))
    return model, ids, pruner


def make_runtime(base, space_kw, *, objectives=("kl",), stages=None):
    model, ids, pruner = base
    space = SearchSpace.from_model(model.config, **space_kw)
    if stages is None:
        stages = [
            Stage(name="s1", evaluators=[KLToDense(name="kl")], eval_tokens=128, seq_len=32, promote=TopK(2)),
            Stage(name="final", evaluators=[KLToDense(name="kl")], eval_tokens=512, seq_len=32),
        ]
    ctx = EvalContext(eval_ids=ids, pruner=pruner, cost_model=space.cost_model, cache_dir=False, seed=0)
    return Runtime(model=model, space=space, pipeline=Pipeline(stages), context=ctx, objectives=list(objectives),
                   pruner=pruner)


DEPTH = dict(attention=None, mlp=False, drop_blocks=True, budget=Budget(metric="params", max_ratio=0.7))
WIDTH = dict(mlp_step=16, frozen_layers=(0,), budget=Budget(metric="params", max_ratio=0.6))


def _keys(study):
    return [t.user_attrs.get(ATTR_PREFIX + "candidate_key") for t in study.get_trials(deepcopy=False)]


def test_evolution_records_stages_and_states(base):
    rt = make_runtime(base, WIDTH)
    study = optuna.create_study(directions=rt.directions)
    stats = Searcher(rt, study, EvolutionarySampler(offspring=5, seed=0), progress=False).run(n_generations=3)
    trials = study.get_trials()
    assert stats.generations == 3 and stats.trials == len(trials) == 1 + 5 + 5
    keys = _keys(study)
    assert len(keys) == len(set(keys))  # duplicates rejected
    for t in trials:
        reached = t.user_attrs[ATTR_PREFIX + "stage_reached"]
        assert ATTR_PREFIX + "stage:s1" in t.user_attrs
        assert (t.state == STATE.COMPLETE) == (reached == "final")
        if t.state == STATE.PRUNED:
            assert t.user_attrs[ATTR_PREFIX + "promoted:s1"] is False and t.intermediate_values
        cand = rt.space.candidate_from_params(t.params)
        assert cand.key == t.user_attrs[ATTR_PREFIX + "candidate_key"]
        assert rt.space.satisfies_budget(cand) and all(v <= 0 for v in t.constraints.values())
    # 2 promoted per generation of 5 offspring, plus the initial parent
    assert sum(t.state == STATE.COMPLETE for t in trials) == 1 + 2 + 2
    assert stats.tokens == 11 * 128 + 5 * 512
    # the best trial was scored on the last stage's token set
    assert study.best_trial.user_attrs[ATTR_PREFIX + "stage_reached"] == "final"
    assert not rt.pruner.is_applied


def test_resume_continues_exactly(base):
    rt = make_runtime(base, DEPTH)
    one = optuna.create_study(directions=rt.directions)
    Searcher(rt, one, EvolutionarySampler(offspring=4, seed=3), progress=False).run(n_generations=4)
    two = optuna.create_study(directions=rt.directions)
    Searcher(rt, two, EvolutionarySampler(offspring=4, seed=3), progress=False).run(n_generations=2)
    saved = OptunaRecorder(two).load_sampler_state()
    assert saved is not None and saved[0] == 2
    json.dumps(saved[1])
    # a fresh process would rebuild the sampler from the config; the state comes from the study
    Searcher(rt, two, EvolutionarySampler(offspring=4, seed=3), progress=False).run(n_generations=2)
    assert _keys(one) == _keys(two)
    assert [t.values for t in one.trials] == [t.values for t in two.trials]


class _Interrupting(KLToDense):
    """KL that raises KeyboardInterrupt (as Ctrl-C would) at given calls, counted over all runs."""

    def __init__(self, at, **kw):
        super().__init__(**kw)
        self.at, self.calls = set(at), 0

    def evaluate(self, *args, **kwargs):
        self.calls += 1
        if self.calls in self.at:
            raise KeyboardInterrupt
        return super().evaluate(*args, **kwargs)


def _results(study):
    return sorted((t.user_attrs[ATTR_PREFIX + "candidate_key"], t.state.name, tuple(t.values or ()))
                  for t in study.trials if t.state in (STATE.COMPLETE, STATE.PRUNED))


@pytest.mark.parametrize("kind", ["evolution", "sweep"])
def test_interrupted_generation_is_replayed_exactly(base, kind):
    """Interrupted mid-generation (s1 of some candidates done, others pruned or complete), resumed from
    the study alone: the generation is replayed with the same candidates, finished trials are reused
    (not evaluated or told again), and the end result equals an uninterrupted run's."""
    objectives = ("kl", "params") if kind == "sweep" else ("kl",)

    def sampler():
        if kind == "sweep":
            return BudgetSweep(levels=(0.8, 0.6), offspring=4, seed=5)
        return EvolutionarySampler(offspring=4, seed=5)

    def stages(kl):
        return [Stage(name="s1", evaluators=[kl], eval_tokens=128, seq_len=32, promote=TopK(2)),
                Stage(name="final", evaluators=[kl], eval_tokens=512, seq_len=32)]

    rt = make_runtime(base, WIDTH, objectives=objectives, stages=stages(KLToDense(name="kl")))
    ref = optuna.create_study(directions=rt.directions)
    Searcher(rt, ref, sampler(), progress=False).run(n_generations=5)

    kl = _Interrupting(at=(3, 9, 10, 16), name="kl")
    rt2 = make_runtime(base, WIDTH, objectives=objectives, stages=stages(kl))
    study = optuna.create_study(directions=rt2.directions)
    rec = OptunaRecorder(study)
    interrupts, replayed = 0, 0
    while True:
        saved = rec.load_sampler_state()
        done = saved[0] if saved else 0
        if done >= 5:
            break
        searcher = Searcher(rt2, study, sampler(), rec, progress=False)
        try:
            searcher.run(n_generations=5 - done)
        except KeyboardInterrupt:
            interrupts += 1
            assert not rt2.pruner.is_applied
            # the state was saved right after the ask: it holds the interrupted generation
            assert searcher.sampler.pending and rec.load_sampler_state()[0] == searcher.sampler.generation
        finally:
            replayed += searcher.stats.replayed
    assert interrupts == 4
    assert replayed > 0  # some finished trials of interrupted generations were reused
    assert _results(study) == _results(ref)
    keys = [k for k, _, _ in _results(study)]
    assert len(keys) == len(set(keys))  # reused, not evaluated twice
    if kind == "sweep":
        assert {t.number for t in ref.best_trials} and sorted(
            (t.user_attrs[ATTR_PREFIX + "candidate_key"], tuple(t.values)) for t in study.best_trials
        ) == sorted((t.user_attrs[ATTR_PREFIX + "candidate_key"], tuple(t.values)) for t in ref.best_trials)
    else:
        assert study.best_value == ref.best_value


def test_worker_joining_mid_generation_leaves_other_workers_candidates_alone(base):
    """A second worker that loads a state saved mid-generation by a live worker (whose candidates are
    claimed) neither evaluates them nor fails: it reuses what finished and draws its own otherwise."""
    rt = make_runtime(base, WIDTH)
    study = optuna.create_study(directions=rt.directions)
    rec = OptunaRecorder(study)  # one claim table for both "workers"
    first = EvolutionarySampler(offspring=4, seed=2)
    first.setup(rt.space)
    taken = [p.candidate.key for p in first.ask_generation(rec.claim)]  # worker 1 asked generation 0 ...
    rec.save_sampler_state(first.generation, first.state_dict())  # ... and is evaluating it now
    second = Searcher(rt, study, EvolutionarySampler(offspring=4, seed=2), rec, progress=False)
    stats = second.run(n_generations=2)
    assert stats.generations == 2 and stats.replayed == 0
    evaluated = [t.user_attrs[ATTR_PREFIX + "candidate_key"] for t in study.trials]
    assert evaluated and not set(evaluated) & set(taken)
    assert all(t.state in (STATE.COMPLETE, STATE.PRUNED) for t in study.trials)


def test_same_seed_same_trials(base):
    rt = make_runtime(base, WIDTH)

    def run(seed, sampler_cls):
        study = optuna.create_study(directions=rt.directions, sampler=optuna.samplers.TPESampler(seed=seed)
                                    if sampler_cls == "tpe" else None)
        sampler = EvolutionarySampler(offspring=3, seed=seed) if sampler_cls == "evo" else None
        Searcher(rt, study, sampler, progress=False).run(n_trials=7)
        return [(t.params, t.state, t.values) for t in study.trials]

    assert run(1, "evo") == run(1, "evo")
    assert run(1, "tpe") == run(1, "tpe")


@pytest.mark.parametrize("name", ["tpe", "nsgaii", "random", "gp", "qmc"])
def test_optuna_samplers_drive_the_space(base, name):
    import warnings

    rt = make_runtime(base, WIDTH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = {
            "tpe": lambda: optuna.samplers.TPESampler(seed=0, n_startup_trials=4),
            "nsgaii": lambda: optuna.samplers.NSGAIISampler(seed=0, population_size=4),
            "random": lambda: optuna.samplers.RandomSampler(seed=0),
            "gp": lambda: optuna.samplers.GPSampler(seed=0, n_startup_trials=4),
            "qmc": lambda: optuna.samplers.QMCSampler(seed=0),
        }[name]()
    study = optuna.create_study(directions=rt.directions)
    searcher = Searcher(rt, study, sampler, progress=False)
    assert study.sampler is sampler
    assert searcher.budget_mode == ("constrain" if name in ("tpe", "nsgaii") else "repair")
    stats = searcher.run(n_trials=10)
    from evoprune.search._searcher import is_resampled

    # suggestions over budget / already seen are resampled: Optuna rows, not trials
    assert stats.trials == 10 == len([t for t in study.trials if not is_resampled(t)])
    assert stats.proposals == len(study.trials) == stats.trials + stats.resampled
    for t in study.trials:
        if searcher.budget_mode == "constrain":
            assert set(t.constraints) == {"params_max"} or t.state == STATE.FAIL
            feasible = all(v <= 0 for v in t.constraints.values())
            assert feasible != bool(t.user_attrs.get(ATTR_PREFIX + "infeasible"))
            if not feasible:
                assert ATTR_PREFIX + "stage:s1" not in t.user_attrs  # never evaluated
        if ATTR_PREFIX + "candidate" in t.user_attrs:
            from evoprune.space import Candidate

            assert rt.space.satisfies_budget(Candidate.from_dict(t.user_attrs[ATTR_PREFIX + "candidate"]))
    assert stats.evaluated >= 1


def test_enqueued_baseline_seed_is_evaluated_first(base):
    rt = make_runtime(base, dict(DEPTH))
    study = optuna.create_study(directions=rt.directions, sampler=optuna.samplers.RandomSampler(seed=0))
    seed = shortgpt(rt.space, rt.pruner)
    study.enqueue_trial(rt.space.params_of(seed))
    Searcher(rt, study, progress=False).run(n_trials=1)
    assert study.trials[0].user_attrs[ATTR_PREFIX + "candidate_key"] == seed.key


def test_multi_objective_nsgaii_and_budget_sweep_give_non_dominated_fronts(base):
    one_stage = [Stage(name="final", evaluators=[KLToDense(name="kl")], eval_tokens=256, seq_len=32)]
    rt = make_runtime(base, dict(mlp_step=16, frozen_layers=(0,)), objectives=("kl", "params"), stages=one_stage)
    assert rt.directions == ["minimize", "minimize"]
    for sampler in (optuna.samplers.NSGAIISampler(seed=0, population_size=4),
                    BudgetSweep(levels=(0.9, 0.7, 0.5), offspring=3, seed=0)):
        study = optuna.create_study(directions=rt.directions)
        Searcher(rt, study, sampler, progress=False).run(n_trials=12)
        front = study_front(study)
        assert len(front) >= 2 and len({tuple(t.values) for t in front}) == len(front)
        pts = [t.values for t in front]
        assert sorted(pareto_front(pts)) == list(range(len(pts)))
        for t in front:
            cand = trial_candidate(t, rt.space)
            assert cand == rt.space.candidate_from_params(t.params)
            assert t.values[1] == pytest.approx(rt.space.ratio(cand, "params"))
        if isinstance(sampler, BudgetSweep):
            groups = {t.user_attrs.get(ATTR_PREFIX + "group") for t in study.trials}
            assert groups == {"params<=0.9", "params<=0.7", "params<=0.5"}


def test_stop_conditions(base):
    rt = make_runtime(base, WIDTH)
    study = optuna.create_study(directions=rt.directions)
    s = Searcher(rt, study, EvolutionarySampler(offspring=3, seed=0), progress=False)
    assert s.run(timeout=0).trials == 0
    stats = s.run(max_tokens=1)
    assert stats.stopped_by == "max_tokens" and stats.generations == 1 and stats.tokens >= 1
    stats = s.run(n_trials=2)  # a generation always completes
    assert stats.stopped_by == "n_trials" and stats.trials == 3
    study2 = optuna.create_study(directions=rt.directions, sampler=optuna.samplers.RandomSampler(seed=0))
    s2 = Searcher(rt, study2, progress=False)
    stats = s2.run(max_tokens=3 * 128)
    assert stats.stopped_by == "max_tokens" and stats.tokens >= 3 * 128 and stats.evaluated == stats.trials
    with pytest.raises(ValueError, match="stop condition"):
        s2.run()
    with pytest.raises(ValueError, match="generation sampler"):
        s2.run(n_generations=1)


def test_errors_are_helpful(base):
    rt = make_runtime(base, WIDTH)
    with pytest.raises(ValueError, match="directions"):
        Searcher(rt, optuna.create_study(directions=["minimize", "minimize"]), progress=False)
    bad = make_runtime(base, WIDTH, objectives=("accuracy",))
    with pytest.raises(ValueError, match="neither an evaluator"):
        Searcher(bad, optuna.create_study(), progress=False)
    with pytest.raises(TypeError, match="sampler must be"):
        Searcher(rt, optuna.create_study(), sampler=object(), progress=False)


def test_failed_evaluation_marks_fail_and_releases(base):
    class Boom:
        name = "kl"
        direction = "minimize"

        def evaluate(self, model, candidate, context):
            raise RuntimeError("boom")

    rt = make_runtime(base, WIDTH, stages=[Stage(name="final", evaluators=[Boom()], eval_tokens=0)])
    study = optuna.create_study(directions=rt.directions, sampler=optuna.samplers.RandomSampler(seed=0))
    rec = OptunaRecorder(study)
    with pytest.raises(RuntimeError, match="boom"):
        Searcher(rt, study, recorder=rec, progress=False).run(n_trials=1)
    (t,) = study.trials
    assert t.state == STATE.FAIL
    assert rec.claim(t.user_attrs[ATTR_PREFIX + "candidate_key"])  # released: may be retried
    assert not rt.pruner.is_applied


def test_recorder_protocol_and_custom_recorder(base):
    class ListRecorder:
        def __init__(self):
            self.rows, self.results, self.state, self.claimed = [], [], None, set()

        def record_candidate(self, trial_id, candidate, *, source="sampler"):
            self.rows.append(("cand", trial_id, candidate.key, source))

        def record_stage(self, trial_id, stage, evaluator, tokens, value, seconds, details):
            self.rows.append(("stage", trial_id, stage, evaluator, tokens))

        def record_stage_result(self, trial_id, stage, stage_index, objective, promoted):
            self.results.append((trial_id, stage, objective, promoted))

        def stage_history(self, stage):
            return [o for _, s, o, _ in self.results if s == stage]

        def save_sampler_state(self, generation, state):
            self.state = (generation, json.loads(json.dumps(state)))

        def load_sampler_state(self):
            return self.state

        def claim(self, key):
            if key in self.claimed:
                return False
            self.claimed.add(key)
            return True

        def release(self, key):
            self.claimed.discard(key)

    class Incomplete(ListRecorder):
        finished_trial = None  # the protocol's replay hook is missing

    rec = ListRecorder()
    assert not isinstance(rec, Recorder)  # no finished_trial yet: the driver refuses it
    rt = make_runtime(base, WIDTH)
    study = optuna.create_study(directions=rt.directions)
    with pytest.raises(TypeError, match="Recorder protocol"):
        Searcher(rt, study, EvolutionarySampler(offspring=3, seed=0), recorder=rec, progress=False)
    ListRecorder.finished_trial = lambda self, key: None
    rec = ListRecorder()
    assert isinstance(rec, Recorder) and not isinstance(Incomplete(), Recorder)
    Searcher(rt, study, EvolutionarySampler(offspring=3, seed=0), recorder=rec, progress=False).run(n_generations=2)
    assert rec.state[0] == 2
    assert sum(r[0] == "cand" for r in rec.rows) == 4
    assert {r[4] for r in rec.rows if r[0] == "stage"} == {128, 512}
    assert [p for _, s, _, p in rec.results if s == "final"] == [None] * 3


def test_uniform_seed_and_single_objective_pruned_rank_below_complete(base):
    rt = make_runtime(base, WIDTH)
    study = optuna.create_study(directions=rt.directions)
    evo = EvolutionarySampler(offspring=4, init=uniform(rt.space), seed=0)
    Searcher(rt, study, evo, progress=False).run(n_generations=2)
    assert study.trials[0].user_attrs[ATTR_PREFIX + "source"] == "seed"
    assert evo.best[1] == pytest.approx(study.best_value)
    pruned = [t for t in study.trials if t.state == STATE.PRUNED]
    assert pruned and all(t.last_step == 0 for t in pruned)
    assert np.isfinite(study.best_value)


class _ReapedFirstGeneration(OptunaRecorder):
    """Fails every trial of the first generation in the storage just before its first stage result is
    recorded -- what another worker's reaper does to a search that stalled past --grace."""

    def __init__(self, study):
        super().__init__(study)
        self.to_reap = None

    def save_sampler_state(self, generation, state):
        if self.to_reap is None:  # right after the first ask: the generation's size
            self.to_reap = len(state["pending"])
            self.reaped = self.to_reap
        super().save_sampler_state(generation, state)

    def record_stage(self, trial_id, *args, **kwargs):
        if self.to_reap and self._storage.get_trial(trial_id).state == STATE.RUNNING:
            self._storage.set_trial_state_values(trial_id, STATE.FAIL)
            self.to_reap -= 1
        super().record_stage(trial_id, *args, **kwargs)


def test_a_generation_finished_by_another_process_is_drawn_again_not_a_crash(base):
    """Issue 23: when every trial of the first generation was failed by another process (a stall past the
    grace period), their results are discarded and the search draws a new generation and goes on."""
    rt = make_runtime(base, WIDTH)
    study = optuna.create_study(directions=rt.directions)
    rec = _ReapedFirstGeneration(study)
    stats = Searcher(rt, study, EvolutionarySampler(offspring=4, seed=0), rec, progress=False).run(n_generations=2)
    assert rec.to_reap == 0 and stats.discarded == rec.reaped >= 1
    assert stats.generations == 2
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states[: rec.reaped] == [STATE.FAIL] * rec.reaped
    assert STATE.COMPLETE in states[rec.reaped:]


class _ReapedAtBirth(OptunaRecorder):
    """Fails the first ``n`` trials in the storage just before their candidate is recorded -- another worker's
    reaper acting while this search stalled right after it created the trial (the CI failure of issue 23:
    ``UpdateFinishedTrialError`` escaped from ``record_candidate``)."""

    def __init__(self, study, n):
        super().__init__(study)
        self.left, self.reaped = n, []

    def record_candidate(self, trial_id, candidate, **kwargs):
        if self.left:
            self._storage.set_trial_state_values(trial_id, STATE.FAIL)
            self.left -= 1
            self.reaped.append(candidate.key)
        super().record_candidate(trial_id, candidate, **kwargs)


@pytest.mark.parametrize("mode", ["generation", "optuna"])
def test_a_trial_failed_by_another_process_before_its_candidate_is_recorded_is_dropped_not_a_crash(base, mode):
    rt = make_runtime(base, WIDTH)
    sampler = optuna.samplers.RandomSampler(seed=0) if mode == "optuna" else None
    study = optuna.create_study(directions=rt.directions, sampler=sampler)
    rec = _ReapedAtBirth(study, 2)
    if mode == "optuna":
        stats = Searcher(rt, study, None, rec, progress=False).run(n_trials=4)
    else:
        stats = Searcher(rt, study, EvolutionarySampler(offspring=4, seed=0), rec, progress=False).run(n_generations=2)
        assert stats.generations == 2
    assert rec.left == 0 and stats.discarded == 2
    trials = study.get_trials(deepcopy=False)
    failed = [t for t in trials if t.state == STATE.FAIL]
    assert len(failed) == 2 and all(ATTR_PREFIX + "candidate" not in t.user_attrs for t in failed)
    assert any(t.state == STATE.COMPLETE for t in trials)
    # the dropped trials' candidates were released: nothing holds them, a later trial may evaluate them
    assert all(rec.claim(key) for key in rec.reaped)
