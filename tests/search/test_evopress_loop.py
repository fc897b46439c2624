"""EvoPress's own loop as a preset, close calls settled by evidence, the unseen-candidate bound of the
convergence stop, and searches without a stop flag (issue 27)."""

from __future__ import annotations

import dataclasses

import numpy as np
import optuna
import pytest
import torch


from evoprune.evaluators import EvalContext, KLToDense, Pipeline, Stage, TopK
from evoprune.evaluators._pipeline import paired_gap
from evoprune.search import EvolutionarySampler, Runtime, Searcher, StudyConfig
from evoprune.search._evidence import settle, settled_order
from evoprune.storage.internal import CLOSE_CALL_ATTR
from evoprune.search._unseen import explore_before_stop
from evoprune.space import Budget, SearchSpace

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def base(six_block_llama):
    return six_block_llama


def _runtime(base, drop=2, extends=None):
    model, ids, pruner = base
    space0 = SearchSpace.from_model(model.config, attention=None, mlp=False, drop_blocks=True)
    k = space0.cost(space0.candidate_from_levels({f"L{i}.block": 1 for i in range(drop)}), "params")
    space = dataclasses.replace(space0, budget=(Budget(metric="params", min_value=k, max_value=k),))
    stages = [Stage(name="s1", evaluators=[KLToDense(name="kl")], eval_tokens=64, seq_len=32, promote=TopK(2)),
              Stage(name="final", evaluators=[KLToDense(name="kl")], eval_tokens=256, seq_len=32, extends=extends)]
    ctx = EvalContext(eval_ids=ids, pruner=pruner, cost_model=space.cost_model, cache_dir=False, seed=0)
    return Runtime(model=model, space=space, pipeline=Pipeline(stages), context=ctx, objectives=["kl"], pruner=pruner)


def _evopress(seed=0, **kw):
    return EvolutionarySampler(offspring=4, parents=1, surrogate=1, patience=None, init="random", init_samples=6,
                               fresh_windows=True, rescore_parents=True, repeats=True, seed=seed, **kw)


def test_a_context_draw_gives_fresh_windows_that_depend_only_on_the_draw():
    ctx = EvalContext(eval_ids=torch.arange(20_000) % 101, seed=3)
    fixed = ctx.token_set(256, 32, stage="s1")
    d1 = dataclasses.replace(ctx, draw=1).token_set(256, 32, stage="s1")
    d2 = dataclasses.replace(ctx, draw=2).token_set(256, 32, stage="s1")
    again = dataclasses.replace(EvalContext(eval_ids=torch.arange(20_000) % 101, seed=3), draw=1)
    assert not torch.equal(d1.ids, d2.ids) and not torch.equal(d1.ids, fixed.ids)
    assert torch.equal(again.token_set(256, 32, stage="s1").ids, d1.ids)
    dataclasses.replace(ctx, draw=2).forget_draws(keep=2)
    keys = ctx.shared["token_sets"].keys()
    assert [k[-1] for k in keys if k[-1] is not None] == [2] and any(k[-1] is None for k in keys)


def test_evopress_loop_redraws_windows_rescores_the_parent_and_counts_every_token(base):
    rt = _runtime(base)
    sampler = _evopress()
    study = optuna.create_study(directions=rt.directions)
    searcher = Searcher(rt, study, sampler, progress=False)
    st0 = searcher.run(n_generations=1)
    # the initial population: 6 random candidates on the first stage only, all PRUNED there
    assert st0.tokens == 6 * 64 and st0.reference_tokens == 0
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 6
    parent = sampler.incumbent
    s1_windows = searcher.pipeline.stage_context("s1", searcher.context).tokens.ids.clone()
    st1 = searcher.run(n_generations=1)
    # offspring on s1, top 2 on the final stage, and the parent scored again on the final stage's fresh windows
    assert st1.reference_tokens == 256
    assert st1.tokens == 4 * 64 + 2 * 256 + 256
    assert not torch.equal(searcher.pipeline.stage_context("s1", searcher.context).tokens.ids, s1_windows)
    assert sampler.population[0][0].key == parent.key or sampler.population[0][1] <= \
        min(t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    searcher.run(n_generations=3)
    # reproducible: the same seed gives the same run, token for token
    rt2 = _runtime(base)
    twin = _evopress()
    study2 = optuna.create_study(directions=rt2.directions)
    s2 = Searcher(rt2, study2, twin, progress=False)
    total = sum(s2.run(n_generations=1).tokens for _ in range(5))
    assert twin.incumbent.key == sampler.incumbent.key
    assert total == st0.tokens + st1.tokens + searcher.stats.tokens


def test_evopress_repeats_seen_candidates_without_new_trials(base):
    space = _runtime(base, drop=1).space  # 6 configurations: a parent and its neighbours are soon all seen
    evo = _evopress(seed=1)
    evo.setup(space)
    evo.tell_generation([(p.candidate, float(i)) for i, p in enumerate(evo.ask_generation())])
    sources = []
    for gen in range(4):
        props = evo.ask_generation()
        assert props and all(p.candidate.key != evo.incumbent.key for p in props)
        assert len({p.candidate.key for p in props}) == len(props)
        sources += [p.source for p in props]
        evo.tell_generation([(p.candidate, 10.0 + i) for i, p in enumerate(props)])
    assert "repeat" in sources
    plain = EvolutionarySampler(offspring=4, surrogate=1, patience=None, init="random", init_samples=6, seed=1)
    plain.setup(space)
    plain.tell_generation([(p.candidate, float(i)) for i, p in enumerate(plain.ask_generation())])
    seen = set()
    for _ in range(4):
        props = plain.ask_generation()
        assert not seen & {p.candidate.key for p in props}
        seen |= {p.candidate.key for p in props}
        plain.tell_generation([(p.candidate, 10.0) for p in props])


def test_a_close_call_is_settled_on_nested_paired_windows_or_tied_at_the_cap(base):
    rt = _runtime(base, extends="s1")
    model, ctx, pipe = rt.model, rt.context, rt.pipeline
    a, b = [rt.space.candidate_from_levels({f"L{i}.block": 1 for i in blocks}) for blocks in ((1, 2), (1, 3))]
    pipe.prepare(model, ctx)
    for c in (a, b):
        pipe.run_stage("final", model, c, ctx)
    # an enormous noise band: never separated, a tie at the cap; both pay for the new windows only
    tie = settle(pipe, model, ctx, a, b, z=1e6, factor=4)
    assert tie["verdict"] == "tie" and tie["eval_tokens"] == 1024 and tie["tokens"] == 2 * (1024 - 256)
    # a narrow one: separated on the first doubling, in the direction of the paired mean difference
    w = [pipe.window_values(dataclasses.replace(pipe.stages[-1], eval_tokens=512), model, c, ctx) for c in (a, b)]
    gap, _se = paired_gap(w[0], w[1])
    won = settle(pipe, model, ctx, a, b, z=1e-9, factor=4)
    if won is not None:  # separated already on the final stage's own windows: no close call
        assert won["verdict"] == ("won" if gap < 0 else "lost") and won["tokens"] == 0
    # who survives: a tie or a loss keeps the incumbent even with a better last-stage value, a win displaces it
    inc, ch = (a, 0.50), (b, 0.49)
    assert sorted([ch, inc], key=settled_order({b.key: "tie"}, 0.50))[0][0] is a
    assert sorted([(b, 0.51), inc], key=settled_order({b.key: "won"}, 0.50))[0][0] is b


def test_the_default_loop_records_its_close_calls_and_counts_their_tokens(base):
    rt = _runtime(base, extends="s1")
    sampler = EvolutionarySampler(offspring=4, surrogate=1, patience=None, settle=4, settle_z=1e6, seed=0)
    study = optuna.create_study(directions=rt.directions)
    searcher = Searcher(rt, study, sampler, progress=False)
    searcher.run(n_generations=1)
    parent = sampler.incumbent
    stats = searcher.run(n_generations=2)
    calls = [t.user_attrs[CLOSE_CALL_ATTR] for t in study.trials if CLOSE_CALL_ATTR in t.user_attrs]
    assert calls and all(c["verdict"] == "tie" and c["incumbent"] == parent.key for c in calls)
    assert stats.close_call_tokens == sum(c["tokens"] for c in calls) > 0
    assert sampler.incumbent.key == parent.key  # every tie kept the incumbent, whatever its last-stage value


def test_before_stopping_the_sampler_proposes_unseen_candidates_the_surrogate_says_may_win():
    space = SearchSpace.from_model(
        dict(model_type="llama", num_hidden_layers=8, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=100),
        attention=None, mlp=False, drop_blocks=True, budget=Budget(metric="dropped_blocks", exactly=3))
    cost = np.array([5.0, 1.0, 4.0, 3.0, 2.0, 6.0, 1.5, 7.0])  # the optimum drops blocks 1, 4 and 6

    def score(c):
        lv = space.levels_of(c)
        return float(np.exp(sum(cost[i] for i in range(8) if lv[f"L{i}.block"]) / 10))

    best = space.candidate_from_levels({"L1.block": 1, "L4.block": 1, "L6.block": 1}).key
    evo = EvolutionarySampler(offspring=2, surrogate=2, patience=1, patience_fraction=0, explored=0,
                              unseen_chance=0.05, init="random", init_samples=10, seed=0)
    evo.setup(space)
    explored = False
    for _gen in range(60):
        props = evo.ask_generation()
        if not props:
            break
        scored = [(p.candidate, score(p.candidate)) for p in props]
        evo.observe_generation(scored)
        explored = explored or bool(explore_before_stop(evo))
        evo.tell_generation(scored)
    assert evo.converged and evo.incumbent.key == best
    assert explored  # the stop was held off at least once by an unseen candidate that might win
    assert explore_before_stop(evo) == []


def test_a_search_without_a_stop_flag_runs_to_the_samplers_own_stop(base):
    rt = _runtime(base)
    sampler = EvolutionarySampler(offspring=4, patience=1, seed=0)
    study = optuna.create_study(directions=rt.directions)
    stats = Searcher(rt, study, sampler, progress=False).run()
    assert stats.stopped_by in ("converged", "exhausted") and sampler.stops_itself
    with pytest.raises(ValueError, match="give a stop condition"):
        Searcher(rt, optuna.create_study(directions=rt.directions),
                 optuna.samplers.TPESampler(seed=0), progress=False).run()
    with pytest.raises(ValueError, match="give a stop condition"):
        Searcher(rt, optuna.create_study(directions=rt.directions),
                 EvolutionarySampler(patience=None), progress=False).run()
    assert StudyConfig().stops() == {}
    with pytest.raises(ValueError, match="no stop condition"):
        StudyConfig(sampler={"name": "tpe"}).stops()
    with pytest.raises(ValueError, match="no stop condition"):
        StudyConfig.from_dict({"preset": "evopress"}).stops()


def test_the_evopress_preset_is_the_faithful_loop_and_the_old_one_is_kept_as_fixed():
    cfg = StudyConfig.from_dict({"preset": "evopress", "calibration": {"num_sequences": 8, "seq_len": 256}})
    o = cfg.sampler.options
    assert (o["fresh_windows"], o["rescore_parents"], o["repeats"], o["init"], o["init_samples"]) == \
        (True, True, True, "random", 64)
    assert [(s.eval_tokens, s.promote) for s in cfg.stages] == [(2048, {"top_k": 2}), (32768, None)]
    levels = StudyConfig.from_dict({"preset": "evopress-levels", "calibration": {"num_sequences": 8, "seq_len": 256}})
    assert levels.sampler.options["offspring"] == 64 and levels.sampler.options["init"] == "uniform"
    fixed = StudyConfig.from_dict({"preset": "evopress-fixed", "calibration": {"num_sequences": 8, "seq_len": 256}})
    assert not fixed.sampler.options.get("fresh_windows") and not fixed.sampler.options.get("repeats")
    with pytest.raises(ValueError, match="settle"):
        EvolutionarySampler(settle=-1)
    with pytest.raises(ValueError, match="unseen_chance"):
        EvolutionarySampler(unseen_chance=1.5)


def test_the_cli_searches_without_a_stop_flag_until_the_sampler_stops(tmp_path, capsys):
    import yaml

    from evoprune._cli import main

    cfg = {
        "model": "reference:tiny", "calibration": {"num_sequences": 4, "seq_len": 64},
        "space": {"attention": None, "mlp_step": 16},
        "budget": [{"metric": "params", "max_ratio": 0.8}],
        "stages": [{"name": "final", "evaluators": ["kl"], "eval_tokens": 256, "seq_len": 64}],
        "sampler": {"name": "evolutionary", "options": {"offspring": 4, "patience": 1}},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert main(["search", str(path), "--storage", url, "--study", "own", "--threads", "1"]) == 0
    assert "stopped by converged" in capsys.readouterr().out
    cfg["sampler"] = {"name": "random"}
    path.write_text(yaml.safe_dump(cfg))
    assert main(["search", str(path), "--storage", url, "--study", "rnd", "--threads", "1"]) != 0
    assert "no stop condition" in capsys.readouterr().err
