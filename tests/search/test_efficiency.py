"""Token-efficient selection: nested stage windows, the per-window KL cache, racing promotion, the
surrogate, the convergence stop and the presets (issue 16)."""

from __future__ import annotations

import dataclasses

import numpy as np
import optuna
import pytest
import torch


from evoprune.evaluators import EvalContext, KLToDense, Pipeline, Race, Stage, TopK, finetune
from evoprune.evaluators._pipeline import paired_gap
from evoprune.search import (
    PRESETS,
    EvolutionarySampler,
    Runtime,
    Searcher,
    StudyConfig,
    evopress_depth_generations,
)
from evoprune.space import Budget, SearchSpace

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def base(six_block_llama):
    return six_block_llama


def _stages(race=None, extends=True):
    promote = Race(*race) if race is not None else TopK(2)
    return [
        Stage(name="s1", evaluators=[KLToDense(name="kl")], eval_tokens=128, seq_len=32, promote=promote),
        Stage(name="final", evaluators=[KLToDense(name="kl")], eval_tokens=512, seq_len=32,
              extends="s1" if extends else None),
    ]


def _runtime(base, stages, drop=2):
    model, ids, pruner = base
    space0 = SearchSpace.from_model(model.config, attention=None, mlp=False, drop_blocks=True)
    k = space0.cost(space0.candidate_from_levels({f"L{i}.block": 1 for i in range(drop)}), "params")
    space = dataclasses.replace(space0, budget=(Budget(metric="params", min_value=k, max_value=k),))
    ctx = EvalContext(eval_ids=ids, pruner=pruner, cost_model=space.cost_model, cache_dir=False, seed=0)
    return Runtime(model=model, space=space, pipeline=Pipeline(stages), context=ctx, objectives=["kl"], pruner=pruner)


def _drop(space, *blocks):
    return space.candidate_from_levels({f"L{i}.block": 1 for i in blocks})


def test_extending_stage_windows_start_with_the_first_stage_windows(base):
    rt = _runtime(base, _stages())
    s1 = rt.pipeline.stage_context("s1", rt.context).tokens
    final = rt.pipeline.stage_context("final", rt.context).tokens
    assert torch.equal(final.ids[: s1.num_sequences], s1.ids)
    independent = _runtime(base, _stages(extends=False))
    other = independent.pipeline.stage_context("final", independent.context).tokens
    assert not torch.equal(other.ids[: s1.num_sequences], s1.ids)
    with pytest.raises(ValueError, match="same seq_len"):
        Pipeline([_stages()[0], Stage(name="final", evaluators=[KLToDense()], eval_tokens=512, seq_len=16,
                                      extends="s1")])
    with pytest.raises(ValueError, match="not an earlier stage"):
        Pipeline([Stage(name="a", evaluators=[KLToDense()], eval_tokens=64, seq_len=32, extends="b")])


def test_a_promoted_candidate_pays_only_for_new_windows_and_gets_the_same_value(base):
    model = base[0]
    rt = _runtime(base, _stages())
    cand = _drop(rt.space, 1, 3)
    rt.pipeline.prepare(model, rt.context)
    s1 = rt.pipeline.run_stage("s1", model, cand, rt.context)
    fin = rt.pipeline.run_stage("final", model, cand, rt.context)
    assert s1.records[0].tokens == 128 and fin.records[0].tokens == 512 - 128
    assert fin.records[0].details["reused_tokens"] == 128
    again = rt.pipeline.run_stage("final", model, cand, rt.context)
    assert again.records[0].tokens == 0 and again.objective == fin.objective
    fresh = _runtime(base, _stages())  # a new context: nothing cached, every window computed
    fresh.pipeline.prepare(model, fresh.context)
    ref = fresh.pipeline.run_stage("final", model, cand, fresh.context)
    assert ref.records[0].tokens == 512
    assert ref.objective == pytest.approx(fin.objective, rel=1e-6)


def test_a_fine_tuned_model_never_reuses_cached_windows(base):
    model = base[0]
    rt = _runtime(base, _stages())
    cand = _drop(rt.space, 2, 4)
    rt.pipeline.prepare(model, rt.context)
    ctx = rt.pipeline.stage_context("final", rt.context)
    kl = rt.pipeline.stage("final").evaluators[0]
    with rt.pruner.applied(cand):
        plain = kl.evaluate(model, cand, ctx)
        with finetune(model, dataclasses.replace(ctx, allow_train_on_eval=True), tokens=256, lr=1e-2):
            tuned = kl.evaluate(model, cand, ctx)
        assert tuned.tokens == 512 and tuned.value != plain.value
        assert kl.evaluate(model, cand, ctx).tokens == 0  # back to dense + candidate: the cache serves it


def test_race_promotes_by_paired_differences():
    ref = torch.tensor([1.0, 3.0, 0.5, 2.0, 1.5, 0.7])
    noise = 0.01 * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    same = ref + noise  # equal on average: not clearly worse
    worse = ref + 0.05 + noise  # slightly but consistently worse: clearly worse, although far within the spread
    better = ref - 0.2
    assert paired_gap(worse, ref)[0] == pytest.approx(0.05)
    values = [float(w.mean()) for w in (same, worse, better)]
    assert Race(z=2.0).select_paired(values, [same, worse, better], ref) == [True, False, True]
    assert Race(z=2.0, max_count=1).select_paired(values, [same, worse, better], ref) == [False, False, True]
    # unpaired, the difference of `worse` is hidden in the window-to-window spread
    assert 0.05 < float(ref.std() / np.sqrt(len(ref)))
    with pytest.raises(ValueError, match="Race.z"):
        Race(z=-1)


def test_race_in_a_generation_stops_clearly_worse_offspring_at_the_first_stage(base):
    rt = _runtime(base, _stages(race=(2.0, None)))
    study = optuna.create_study(directions=rt.directions)
    sampler = EvolutionarySampler(offspring=6, seed=0, surrogate=1, patience=None)
    searcher = Searcher(rt, study, sampler, progress=False)
    searcher.run(n_generations=3)
    incumbent = sampler.incumbent
    assert incumbent is not None
    pipe, ctx, model = rt.pipeline, rt.context, rt.model
    ref1 = pipe.window_values("s1", model, incumbent, ctx)
    assert ref1 is not None  # the incumbent's first-stage windows are known from its final score
    reached = {}
    for t in study.trials:
        if t.number == 0:
            continue
        stage = t.user_attrs.get("evoprune:stage_reached")
        cand = rt.space.candidate_from_params(t.params)
        w = pipe.window_values("s1", model, cand, ctx)
        reached[t.number] = (stage, w)
    stopped = [w for s, w in reached.values() if s == "s1" and w is not None]
    assert stopped, "some offspring should stop at s1"


def test_convergence_stop_ends_a_width_search_by_itself(base, tmp_path):
    rt = _runtime(base, _stages(race=(2.0, 4)))
    model = base[0]
    rt.space = SearchSpace.from_model(model.config, attention=None, mlp_step=16,
                                      budget=Budget(metric="params", max_ratio=0.7))
    study = optuna.create_study(directions=rt.directions)
    sampler = EvolutionarySampler(offspring=4, seed=0, patience=2)
    stats = Searcher(rt, study, sampler, progress=False).run(n_generations=60)
    assert stats.stopped_by == "converged" and sampler.converged
    assert 3 <= stats.generations < 60
    twin = EvolutionarySampler(offspring=4, seed=0, patience=2)
    twin.setup(rt.space)
    twin.load_state_dict(sampler.state_dict())
    assert twin.converged and twin.ask_generation() == []


def test_surrogate_ranks_offspring_by_an_additive_model_fitted_to_scores():
    cfg = dict(model_type="llama", num_hidden_layers=12, hidden_size=64, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=128, vocab_size=100)
    space0 = SearchSpace.from_model(cfg, attention=None, mlp=False, drop_blocks=True)
    k = space0.cost(space0.candidate_from_levels({f"L{i}.block": 1 for i in range(4)}), "params")
    space = dataclasses.replace(space0, budget=(Budget(metric="params", min_value=k, max_value=k),))
    weight = np.linspace(1.0, 3.0, 12)[np.random.default_rng(0).permutation(12)]

    def score(c):  # additive in the dropped blocks
        lv = list(space.levels_of(c).values())
        return float(np.exp(sum(w for w, x in zip(weight, lv) if x)))

    means = {}
    for pool in (1, 4):
        evo = EvolutionarySampler(offspring=8, seed=3, surrogate=pool, patience=None, init="random")
        evo.setup(space)
        later = []
        for gen in range(6):
            kids = evo.ask_generation()
            scored = [(p.candidate, score(p.candidate)) for p in kids]
            evo.observe_generation(scored)
            evo.tell_generation(scored)
            if gen >= 3:
                later += [v for _c, v in scored]
        means[pool] = np.mean(later)
        assert evo.state_dict()["settings"]["surrogate"] == pool
    assert means[4] < means[1]


def test_presets_expand_and_unknown_ones_say_what_exists():
    cfg = StudyConfig.from_dict({"preset": "evopress-unstructured", "calibration": {"num_sequences": 8, "seq_len": 256},
                                 "sampler": {"name": "evolutionary", "options": {"seed": 3}}})
    assert [(s.eval_tokens, s.promote) for s in cfg.stages] == [(2048, {"top_k": 8}), (16384, {"top_k": 2}),
                                                               (65536, None)]
    assert cfg.sampler.options["offspring"] == 64 and cfg.sampler.options["seed"] == 3
    default = StudyConfig.from_dict({"calibration": {"num_sequences": 8, "seq_len": 256}})
    assert default.stages == StudyConfig.from_dict({"preset": "default", "calibration": {"num_sequences": 8,
                                                                                         "seq_len": 256}}).stages
    assert default.stages[1].extends == "s1" and "race" in default.stages[0].promote
    assert evopress_depth_generations(num_blocks=32, drop=8) == 128
    assert set(PRESETS) >= {"default", "evopress-depth", "evopress-unstructured", "evopress-fast"}
    with pytest.raises(ValueError, match="unknown preset 'evopres'.*evopress-depth"):
        StudyConfig.from_dict({"preset": "evopres", "calibration": {"num_sequences": 8, "seq_len": 256}})
    with pytest.raises(ValueError, match="promote"):
        StudyConfig.from_dict({"calibration": {"num_sequences": 8, "seq_len": 256},
                               "stages": [{"name": "a", "promote": {"race": -1}}, {"name": "b"}]})


def test_a_cli_search_stops_by_itself_and_status_says_why(tmp_path, capsys):
    """A racing schedule on the tiny reference model's MLP widths with a generous generation cap: it
    stops by itself (converged) and `evoprune status` names the reason."""
    import yaml

    from evoprune._cli import main

    cfg = {
        "model": "reference:tiny", "calibration": {"num_sequences": 4, "seq_len": 64},
        "space": {"attention": None, "mlp_step": 16},
        "budget": [{"metric": "params", "max_ratio": 0.8}],
        "stages": [
            {"name": "s1", "evaluators": ["kl"], "eval_tokens": 256, "seq_len": 64,
             "promote": {"race": 2.0, "max_count": 2}},
            {"name": "final", "evaluators": ["kl"], "eval_tokens": 1024, "seq_len": 64, "extends": "s1"},
        ],
        "sampler": {"name": "evolutionary", "options": {"offspring": 4, "patience": 2}},
        "stop": {"n_generations": 60},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert main(["search", str(path), "--storage", url, "--study", "conv", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "stopped by converged" in out
    assert main(["status", "--storage", url, "--study", "conv"]) == 0
    assert "last stop: finished (converged)" in capsys.readouterr().out


def test_the_window_cache_reuses_only_windows_the_token_sets_share(base):
    """Two token sets of one stream name but other windows (hand-made, as a per-window scorer makes
    them) never get each other's cached scores; a set sharing only its first windows reuses those."""
    from evoprune.evaluators import TokenSet

    model, ids, pruner = base
    rt = _runtime(base, _stages())
    cand = _drop(rt.space, 0, 5)
    kl = KLToDense(name="kl")
    rows = ids[: 8 * 32].reshape(8, 32)

    def ctx_of(r, key):
        ts = TokenSet(ids=r, stage="eval:same", seed=0, data_fingerprint="fp", key=key)
        return dataclasses.replace(rt.context, tokens=ts)

    a, b, c = ctx_of(rows[:4], "a"), ctx_of(rows[4:], "b"), ctx_of(torch.cat([rows[:2], rows[6:]]), "c")
    for ctx in (a, b, c):
        kl.prepare(model, ctx)
    with pruner.applied(cand):
        va = kl.evaluate(model, cand, a)
        vc = kl.evaluate(model, cand, c)
        vb = kl.evaluate(model, cand, b)
        assert vc.tokens == 64 and vc.details["reused_tokens"] == 64  # c shares a's first two windows
        assert va.tokens == vb.tokens == 128  # b shares no window with a or c: all computed
        fresh = dataclasses.replace(b, shared={k: v for k, v in rt.context.shared.items() if k != "kl_windows"})
        assert kl.evaluate(model, cand, fresh).value == pytest.approx(vb.value, rel=1e-6)


def test_patience_waits_for_a_share_of_the_tokens_it_took_to_find_the_incumbent():
    cfg = dict(model_type="llama", num_hidden_layers=12, hidden_size=64, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=128, vocab_size=100)
    space0 = SearchSpace.from_model(cfg, attention=None, mlp=False, drop_blocks=True)
    space = dataclasses.replace(space0, budget=(Budget(metric="dropped_blocks", exactly=4),))
    def run(explored):
        evo = EvolutionarySampler(offspring=4, seed=0, surrogate=1, patience=1, patience_fraction=1.0,
                                  explored=explored)
        evo.setup(space)
        first = evo.ask_generation()
        evo.observe_generation([(p.candidate, 1.0) for p in first], close=False, tokens=1000)
        evo.tell_generation([(p.candidate, 1.0) for p in first])  # the incumbent, found after 1,000 tokens
        spent = 0
        while True:
            kids = evo.ask_generation()
            if not kids:
                break
            worse = [(p.candidate, 2.0) for p in kids]  # never close, never better
            evo.observe_generation(worse, close=False, tokens=300)
            evo.tell_generation(worse)
            spent += 300
        assert evo.converged and evo.state_dict()["tokens_at_reset"] == 1000
        return spent, evo.neighbourhood_seen()

    # one stale generation would do for patience=1, but 1,000 tokens since the incumbent are needed
    assert run(0.0)[0] == 1200
    # and with `explored`, half of the incumbent's 4 x 8 one-switch neighbours must have been proposed
    spent, seen = run(0.5)
    assert spent > 1200 and seen >= 0.5

    # a close finalist restarts the generation count but not the token count: the incumbent was
    # found after 1,000 tokens, so 1,000 more suffice however often a finalist came close
    evo = EvolutionarySampler(offspring=4, seed=0, surrogate=1, patience=1, patience_fraction=1.0, explored=0.0)
    evo.setup(space)
    first = evo.ask_generation()
    evo.observe_generation([(p.candidate, 1.0) for p in first], close=False, tokens=1000)
    evo.tell_generation([(p.candidate, 1.0) for p in first])
    closes = [True, True, True, False]
    for close in closes:
        kids = evo.ask_generation()
        assert kids
        worse = [(p.candidate, 2.0) for p in kids]
        evo.observe_generation(worse, close=close, tokens=300)
        evo.tell_generation(worse)
    assert evo.state_dict()["tokens_at_reset"] == 1000 and evo.state_dict()["stale"] == 1
    assert evo.ask_generation() == [] and evo.converged


def test_the_importance_prior_ranks_the_first_offspring_and_the_searcher_sets_it(base):
    from evoprune.search._surrogate import gene_prior, prior_score

    model, _ids, pruner = base
    rt = _runtime(base, _stages(), drop=2)
    space = rt.space
    infl = pruner.importance
    prior = gene_prior(space, infl)
    for i in range(6):  # a block's prior is its calibration influence (ShortGPT), only when dropped
        assert prior[f"L{i}.block"] == (0.0, pytest.approx(float(infl.block_influence[i])))
    # width levels: the share removed times the sublayer's influence; no calibration: no prior
    wspace = SearchSpace.from_model(model.config, mlp_step=32)
    wp = gene_prior(wspace, infl)
    g = wspace.gene("L2.mlp")
    assert wp["L2.mlp"] == pytest.approx(tuple(float(infl.mlp_influence[2]) * (1 - lv / g.levels[0])
                                               for lv in g.levels))
    nan = {k: torch.full((6,), float("nan")) for k in ("block_influence", "attn_influence", "mlp_influence")}
    assert gene_prior(space, nan) is None

    # a prior that says "blocks 1 and 4 matter least": before any score, the first offspring
    # proposed are ranked by it (best first), so the prior's best neighbour of the parent leads
    weights = [5.0, 0.1, 3.0, 4.0, 0.2, 6.0]
    fake = {"block_influence": weights, "attn_influence": [1.0] * 6, "mlp_influence": [1.0] * 6}
    evo = EvolutionarySampler(offspring=4, seed=1, patience=None)
    evo.setup(space)
    evo.set_prior(gene_prior(space, fake))
    gen0 = evo.ask_generation()
    evo.tell_generation([(p.candidate, 1.0) for p in gen0])
    kids = [p.candidate for p in evo.ask_generation()]
    scores = [prior_score(space, evo._prior, c) for c in kids]
    assert scores == sorted(scores)
    blind = EvolutionarySampler(offspring=4, seed=1, patience=None, surrogate=1)  # EvoPress: no ranking
    blind.setup(space)
    blind.set_prior(gene_prior(space, fake))
    blind.tell_generation([(p.candidate, 1.0) for p in blind.ask_generation()])
    assert min(scores) <= min(prior_score(space, evo._prior, p.candidate) for p in blind.ask_generation())

    # the Searcher hands the pruner's influences to the sampler
    s = EvolutionarySampler(offspring=4, seed=0, patience=None)
    Searcher(rt, optuna.create_study(directions=["minimize"]), s, progress=False)
    assert s._prior == prior
