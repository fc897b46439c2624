"""Optuna samplers without waste (issue 16): a TPE/NSGA-II suggestion that is over the budget or repeats
a seen candidate is resampled -- told at once so the sampler learns, never evaluated, not a trial --
the resampled share is reported, the run stops as "exhausted" when nothing new is proposed, and
workers of one study get different sampler seeds.

The problem: a real tiny Llama with 6 blocks, "drop exactly 2 blocks" written as a params band equal
to the 2-block cost (15 feasible candidates of 64).
"""

from __future__ import annotations

import optuna
import pytest
import torch
from optuna.trial import TrialState
from helpers import make_storage_url, tiny_study_config
from tiny_models import tiny_model

from evoprune import create_study, load_study
from evoprune._cli import main
from evoprune._optuna_private import trial_id
from evoprune.evaluators import EvalContext, KLToDense, Pipeline, Stage
from evoprune.pruning import Pruner
from evoprune.search import Runtime, Searcher
from evoprune.search._searcher import is_resampled
from evoprune.space import Budget, SearchSpace
from evoprune.storage._values import CREATOR_ATTR, RESAMPLED_ATTR

optuna.logging.set_verbosity(optuna.logging.WARNING)

TOKENS = 64  # forward tokens per evaluated candidate (one stage)
BAND = {"metric": "params", "min_ratio": 0.68, "max_ratio": 0.70}  # exactly 2 of 6 blocks dropped
FEASIBLE = 15  # C(6, 2)


@pytest.fixture(scope="module")
def model_and_ids():
    model = tiny_model("llama", num_hidden_layers=6)
    ids = torch.randint(3, 97, (2000,), generator=torch.Generator().manual_seed(0))
    return model, ids, Pruner(model, ids[: 4 * 32].reshape(4, 32))


def _config(**changes):
    data = dict(
        space={"attention": None, "mlp": False, "drop_blocks": True},
        budget=BAND,
        stages=[{"name": "final", "evaluators": ["kl"], "eval_tokens": TOKENS, "seq_len": 32}],
        sampler={"name": "tpe", "options": {"n_startup_trials": 5}},
        objectives=["kl"],
        seed=3,
    )
    data.update(changes)
    return tiny_study_config(**data)


def _runtime(model_and_ids, config):
    model, ids, pruner = model_and_ids
    space = SearchSpace.from_model(model.config, attention=None, mlp=False, drop_blocks=True,
                                   budget=Budget(**BAND))
    stages = [Stage(name="final", evaluators=[KLToDense(name="kl")], eval_tokens=TOKENS, seq_len=32)]
    ctx = EvalContext(eval_ids=ids, pruner=pruner, cost_model=space.cost_model, cache_dir=False, seed=config.seed)
    return Runtime(model=model, space=space, pipeline=Pipeline(stages), context=ctx, objectives=list(config.objectives),
                   pruner=pruner, config=config)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    url, drop = make_storage_url(request.param, tmp_path)
    yield url
    drop()


def test_tpe_evaluates_only_new_in_budget_candidates_and_stops_when_exhausted(model_and_ids, url, capsys):
    cfg = _config()
    rt = _runtime(model_and_ids, cfg)
    assert len(list(_all_feasible(rt.space))) == FEASIBLE
    study = create_study(cfg, storage=url, study_name="waste")
    # more trials than feasible candidates: TPE would repeat; without resampling 40 trials held
    # a handful of distinct candidates
    stats = study.run(n_trials=40, runtime=rt)

    rows = study.optuna_study.get_trials(deepcopy=False)
    trials = study.trials()
    assert len(trials) == stats.trials <= FEASIBLE < 40
    assert stats.stopped_by == "exhausted"  # every feasible candidate seen, or 101 resamples in a row
    # every trial is a distinct, in-budget, evaluated candidate
    keys = [study.candidate(t.number).key for t in trials]
    assert len(set(keys)) == len(keys)
    assert all(rt.space.satisfies_budget(study.candidate(t.number)) for t in trials)
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # wasted suggestions were counted, told at once and never evaluated
    assert stats.proposals == len(rows) == stats.trials + stats.resampled
    assert stats.infeasible > 0 and stats.duplicates > 0 and stats.invalid >= 0
    assert stats.wasted_share == pytest.approx(stats.resampled / stats.proposals)
    assert stats.to_dict()["wasted_share"] == stats.wasted_share
    resampled = [t for t in rows if is_resampled(t)]
    assert len(resampled) == stats.resampled
    by_reason = {r: sum(1 for t in resampled if t.system_attrs[RESAMPLED_ATTR] == r)
                 for r in ("over_budget", "duplicate", "invalid")}
    assert by_reason == {"over_budget": stats.infeasible, "duplicate": stats.duplicates, "invalid": stats.invalid}
    for t in resampled:
        assert t.state.is_finished() and "evoprune:stage_reached" not in t.user_attrs
        assert study.db.candidate_of(trial_id(t)) is None and not study.stage_records(t.number)
        if t.system_attrs[RESAMPLED_ATTR] == "over_budget":  # the sampler sees the violation
            assert t.state == TrialState.COMPLETE and max(t.constraints.values()) > 0
        elif t.system_attrs[RESAMPLED_ATTR] == "duplicate":  # one objective: told the earlier value
            earlier = t.user_attrs["evoprune:duplicate_of"]
            assert t.state == TrialState.COMPLETE and t.value == study.optuna_study.trials[earlier].value
            assert study.candidate(t.number) == study.candidate(earlier)
            assert rt.space.candidate_from_params(t.params).key in keys
    # tokens: only the distinct candidates were paid for
    assert stats.tokens == len(set(keys)) * TOKENS
    # the stored record is honest: status, show, report data and check count only the trials
    st = study.status()
    assert st.trials == {"COMPLETE": len(trials)} and st.tokens == stats.tokens
    assert st.resampled == by_reason and st.proposals == len(rows)
    assert st.wasted_share == pytest.approx(stats.wasted_share)
    best = min(trials, key=lambda t: t.value)
    assert [p.number for p in study.pareto_front()] == [best.number]  # no copy of it
    assert study.check() == []
    from evoprune.report import load_snapshot

    assert load_snapshot(study, space=rt.space).state_counts() == {"COMPLETE": len(trials)}
    study.close()
    assert main(["status", "--storage", url, "--study", "waste"]) == 0
    out = capsys.readouterr().out
    share = f"{100 * stats.wasted_share:.1f} %"
    [line] = [x for x in out.splitlines() if "sampler proposals" in x]
    assert f"sampler proposals: {stats.proposals}; resampled without a trial {stats.resampled} ({share}): " in line
    assert f"already seen {stats.duplicates}" in line and f"over budget {stats.infeasible}" in line
    assert f"trials: complete {len(trials)} ({len(trials)} in all)" in out
    assert main(["show", "--storage", url, "--study", "waste"]) == 0
    assert f"trials: complete {len(trials)}\n" in capsys.readouterr().out


def test_resampling_is_capped_per_trial(model_and_ids):
    cfg = _config()
    rt = _runtime(model_and_ids, cfg)
    study = optuna.create_study(directions=rt.directions, sampler=optuna.samplers.RandomSampler(seed=0))
    # every candidate is seen already: the first trial resamples 1 + max_resamples times, then stops
    searcher = Searcher(rt, study, progress=False, budget_mode="constrain", max_resamples=7)
    for c in _all_feasible(rt.space):
        assert searcher.recorder.claim(c.key)
    stats = searcher.run(n_trials=5)
    assert stats.stopped_by == "exhausted" and stats.trials == 0 and stats.tokens == 0
    assert stats.proposals == 8 == stats.resampled == len(study.trials)
    assert stats.wasted_share == 1.0
    with pytest.raises(ValueError, match="max_resamples"):
        Searcher(rt, study, progress=False, max_resamples=-1)


def _all_feasible(space):
    import itertools

    for bits in itertools.product((0, 1), repeat=len(space.genes)):
        if all(bits):
            continue  # every block dropped: no candidate
        c = space.candidate_from_params({g.name: b * g.top for g, b in zip(space.genes, bits)})
        if space.satisfies_budget(c):
            yield c


def test_workers_with_the_same_config_seed_propose_different_candidates(model_and_ids, tmp_path):
    cfg = _config(sampler={"name": "tpe", "options": {"n_startup_trials": 10}})
    rt = _runtime(model_and_ids, cfg)
    url = f"sqlite:///{tmp_path / 'workers.db'}"

    def first_proposals(study_name: str, workers: int) -> list[dict]:
        create_study(cfg, storage=url, study_name=study_name).close()
        handles = [load_study(storage=url, study_name=study_name) for _ in range(workers)]
        for h in handles:  # both registered before either searches: two workers at once
            h.db.register_worker(command="worker")
        assert [h.worker_index() for h in handles] == list(range(workers))
        for h in handles:
            h.run(n_trials=2, runtime=rt)
        rows = handles[0].optuna_study.get_trials(deepcopy=False)
        out = []
        for h in handles:
            mine = [t for t in rows if t.system_attrs.get(CREATOR_ATTR) == h.db.owner.name]
            out.append(min(mine, key=lambda t: t.number).params)
            h.close()
        return out

    a, b = first_proposals("two", 2)
    assert a != b  # the same seed gave both workers the same first suggestion before
    # a single worker keeps the config's seed: reproducible from run to run
    [solo] = first_proposals("solo", 1)
    assert solo == a
