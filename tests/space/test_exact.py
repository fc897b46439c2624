"""Count budgets ("drop exactly k blocks", "drop a attention + b MLP sublayers"), enumeration of
exact spaces, and budget-exact random starts (random candidates next to the budget boundary)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from evoprune.search import StudyConfig, fill_budget, level_switch
from evoprune.space import Budget, ModelSpec, SearchSpace
from evoprune.space._cost import COUNT_METRICS

SPEC8 = ModelSpec.from_config(dict(model_type="llama", num_hidden_layers=8, hidden_size=64, num_attention_heads=8,
                                   num_key_value_heads=4, intermediate_size=256, vocab_size=100))
# SmolLM2-135M's shape (a Llama): 30 layers, hidden 576, 9 heads / 3 KV heads, MLP 1536, tied embeddings
SMOL = ModelSpec.from_config(dict(model_type="llama", num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
                                  num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                                  tie_word_embeddings=True))

DEPTH = dict(attention=None, mlp=False, drop_blocks=True)
SUBLAYERS = dict(attention=None, mlp=False, drop_attention=True, drop_mlp=True)
EXACT = {  # name -> (space options, number of candidates)
    "drop 3 of 8 blocks": (dict(DEPTH, budget=Budget(metric="dropped_blocks", exactly=3)), 56),
    "drop 2 attn + 2 mlp of 8 layers": (dict(SUBLAYERS, budget=(Budget(metric="dropped_attn", exactly=2),
                                                                Budget(metric="dropped_mlp", exactly=2))), 784),
    "drop any 4 of 16 sublayers": (dict(SUBLAYERS, budget=Budget(metric="dropped_sublayers", exactly=4)), 1820),
}
# mixed spaces: widths and drops, counts together with a params bound
MIXED = {
    "widths + 2 attn + 2 mlp": dict(mlp_step=64, drop_attention=True, drop_mlp=True, budget=(
        Budget(metric="params", max_ratio=0.6), Budget(metric="dropped_attn", exactly=2),
        Budget(metric="dropped_mlp", exactly=2))),
    "widths + 2 blocks": dict(mlp_step=64, drop_blocks=True, budget=(
        Budget(metric="params", max_ratio=0.6), Budget(metric="dropped_blocks", exactly=2))),
    "everything + counts": dict(mlp_step=64, drop_blocks=True, drop_attention=True, drop_mlp=True, frozen_layers=(0,),
                                sparsity_levels=(0, 0.5), budget=(
        Budget(metric="params", max_ratio=0.6), Budget(metric="dropped_blocks", max_value=2),
        Budget(metric="dropped_sublayers", exactly=5))),
}


def space(name: str) -> SearchSpace:
    opts = EXACT[name][0] if name in EXACT else MIXED[name]
    return SearchSpace.from_model(SPEC8, **opts)


def counts(s: SearchSpace, cand) -> dict[str, int]:
    return {b.metric: int(s.cost(cand, b.metric)) for b in s.budget if b.is_count}


def test_count_metrics_count_dropped_parts():
    s = SearchSpace.from_model(SPEC8, **SUBLAYERS)
    c = s.candidate_from_levels({"L1.attn": 1, "L1.mlp": 1, "L2.attn": 1, "L5.mlp": 1})
    got = {m: s.cost(c, m) for m in COUNT_METRICS}
    assert got == {"dropped_blocks": 1, "dropped_attn": 2, "dropped_mlp": 2, "dropped_sublayers": 4}
    assert all(s.cost(s.dense(), m) == 0 for m in COUNT_METRICS)
    # the reference of count ratios is what the space can drop
    assert s.dense_cost("dropped_sublayers") == 16 and s.ratio(c, "dropped_sublayers") == 0.25
    assert s.max_count("dropped_sublayers") == 15 and s.max_count("dropped_attn") == 8
    assert "dropped_blocks" not in s.cost_model.costs(c)  # counts are budgets, not cost objectives


@pytest.mark.parametrize("name", list(EXACT))
def test_exact_spaces_enumerate(name):
    s = space(name)
    cands = list(s.enumerate())
    assert len(cands) == EXACT[name][1]
    assert len({c.key for c in cands}) == len(cands)
    assert all(s.satisfies_budget(c) and s.contains(c) for c in cands)
    assert cands == list(s.enumerate())  # a fixed order
    exact = {b.metric: b.min_value for b in s.budget}
    assert all(counts(s, c) == exact for c in cands)


def test_enumerate_matches_brute_force_with_a_params_band():
    s = SearchSpace.from_model(SPEC8, attention=None, mlp_step=128, drop_mlp=True, drop_blocks=True,
                               frozen_layers=(0, 1, 2, 3), budget=(Budget(metric="params", min_ratio=0.6, max_ratio=0.8),
                                                                   Budget(metric="dropped_blocks", max_value=1)))
    brute = set()
    for levels in itertools.product(*(range(g.top + 1) for g in s.genes)):
        c = s.candidate_from_levels(dict(zip(s.gene_names, levels)))
        if s.satisfies_budget(c):
            brute.add(c)
    got = list(s.enumerate())
    assert len(got) == len(set(got)) and set(got) == brute and len(brute) > 10


def test_enumerate_refuses_huge_spaces():
    s = SearchSpace.from_model(SMOL, mlp_step=128)
    with pytest.raises(ValueError, match="over limit=100,000; pass a larger limit="):
        s.enumerate()
    with pytest.raises(ValueError, match="limit"):
        next(iter(space("drop 3 of 8 blocks").enumerate(limit=10)))
    with pytest.raises(ValueError, match="positive int"):
        space("drop 3 of 8 blocks").enumerate(limit=0)


@pytest.mark.parametrize("name", list(EXACT) + list(MIXED))
def test_random_candidates_keep_counts(name):
    s = space(name)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(25):
        c = s.random(rng)
        assert s.satisfies_budget(c) and s.contains(c)
        seen.add(c.key)
    assert len(seen) > 5
    assert s.random(3) == s.random(3)


def test_random_drop_sets_are_uniform():
    s = space("drop 3 of 8 blocks")
    rng = np.random.default_rng(1)
    hits = np.zeros(8)
    for _ in range(800):
        hits += [layer.dropped for layer in s.random(rng).layers]
    assert hits.sum() == 3 * 800
    assert hits.min() > 0.8 * 300 and hits.max() < 1.2 * 300  # each block dropped 3/8 of the time


@pytest.mark.parametrize("name", list(MIXED) + ["smol widths", "smol depth"])
def test_random_lands_within_one_level_step_of_the_budget(name):
    if name.startswith("smol"):
        opts = dict(mlp_step=128) if name == "smol widths" else DEPTH
        s = SearchSpace.from_model(SMOL, **opts, budget=Budget(metric="params", max_ratio=0.8))
    else:
        s = space(name)
    for seed in range(4):
        c = s.random(seed)
        levels = s.levels_of(c)
        for g in s.genes:  # one level less compression anywhere: same candidate or over a budget
            if levels[g.name] == 0:
                continue
            other = s.candidate_from_levels({**levels, g.name: levels[g.name] - 1})
            assert other == c or not s.satisfies_budget(other), (seed, g.name)


def test_random_fills_the_budget_on_a_smollm2_shape():
    budget = Budget(metric="params", max_ratio=0.8)
    for opts in (dict(mlp_step=128), DEPTH):
        s = SearchSpace.from_model(SMOL, **opts, budget=budget)
        rng = np.random.default_rng(0)
        filled = [s.ratio(s.random(rng), "params") for _ in range(20)]
        rng = np.random.default_rng(0)
        old = [s.ratio(s.random(rng, fill=False), "params") for _ in range(20)]
        assert all(r <= 0.8 for r in filled + old)
        assert min(filled) > 0.77 and np.mean(old) < 0.7


def test_fill_leaves_count_only_spaces_alone():
    s = SearchSpace.from_model(SPEC8, mlp_step=64, drop_blocks=True, budget=Budget(metric="dropped_blocks", exactly=2))
    c = s.random(0)
    assert fill_budget(s, c, 0) == c == s.fill(c, 0)
    assert s.random(0, fill=False) == c  # no cost bound: nothing to fill


@pytest.mark.parametrize("name", list(EXACT) + list(MIXED))
@pytest.mark.parametrize("same_kind", [True, False])
def test_level_switches_keep_counts(name, same_kind):
    s = space(name)
    rng = np.random.default_rng(5)
    moves = 0
    for _ in range(3):
        c = s.random(rng)
        want = counts(s, c)
        lv = list(s.levels_of(c).values())
        for _ in range(40):
            new = level_switch(s, lv, rng, same_kind=same_kind)
            if new is None:
                break
            cand = s.candidate_from_levels(dict(zip(s.gene_names, new)))
            assert s.satisfies_budget(cand)
            exact = {b.metric: int(b.min_value) for b in s.budget if b.is_count and b.min_value == b.max_value}
            assert {m: v for m, v in counts(s, cand).items() if m in exact} == exact
            if name in EXACT:
                assert counts(s, cand) == want  # one dropped, one restored
            moves += new != lv
            lv = new
    assert moves > 50


@pytest.mark.parametrize("name", list(EXACT) + list(MIXED))
def test_repair_meets_counts(name):
    s = space(name)
    for seed in range(8):
        start = s.random(seed, within_budget=False)
        fixed = s.repair(start, np.random.default_rng(seed))
        assert s.satisfies_budget(fixed) and s.contains(fixed)
        assert fixed == s.repair(start, np.random.default_rng(seed))
        assert s.repair(fixed, 99) == fixed  # already inside: unchanged


def test_repair_keeps_exact_counts_while_fixing_params():
    s = space("widths + 2 blocks")
    start = s.candidate_from_levels({"L3.block": 1, "L6.block": 1})  # counts right, params far over
    assert not s.satisfies_budget(start) and counts(s, start) == {"dropped_blocks": 2}
    for seed in range(5):
        fixed = s.repair(start, seed)
        assert s.satisfies_budget(fixed) and {i for i, layer in enumerate(fixed.layers) if layer.dropped} == {3, 6}


def test_budget_exactly_and_ratios():
    b = Budget(metric="dropped_blocks", exactly=3)
    assert b == Budget(metric="dropped_blocks", min_value=3, max_value=3) == Budget.from_dict(b.to_dict())
    assert b.to_dict() == {"metric": "dropped_blocks", "max_value": 3, "min_value": 3} and b.is_count
    assert Budget(metric="dropped_mlp", max_value=0).bounds(8) == (None, 0)  # "drop no MLP" is a valid bound
    s = SearchSpace.from_model(SPEC8, **DEPTH, budget=Budget(metric="dropped_blocks", max_ratio=0.5))
    assert s.budget_bounds() == (("dropped_blocks", None, 4.0),)  # half of the 8 droppable blocks
    assert s.constraints(s.dense()) == {"dropped_blocks_max": -0.5}
    # cost budgets come first whatever the order given (code that reads "the" budget ratio sees a cost)
    s = SearchSpace.from_model(SPEC8, mlp_step=64, drop_blocks=True,
                               budget=(b, Budget(metric="params", max_ratio=0.9)))
    assert [x.metric for x in s.budget] == ["params", "dropped_blocks"]
    assert 0.7 < s.ratio(s.uniform(0.9), "params") <= 0.9  # uniform() targets the params budget, never a count
    with pytest.raises(ValueError, match="cannot target a count"):
        s.uniform(0.5, metric="dropped_blocks")


def test_space_round_trip_with_counts():
    for name in list(EXACT) + list(MIXED):
        s = space(name)
        back = SearchSpace.from_json(s.to_json())
        assert back == s and back.budget == s.budget
        assert SearchSpace.from_dict(json.loads(json.dumps(s.to_dict()))) == s
        assert back.random(0) == s.random(0)


def test_study_config_yaml_with_counts(tmp_path):
    path = tmp_path / "exact.yaml"
    path.write_text(
        "model: reference:tiny\n"
        "calibration: {num_sequences: 8, seq_len: 64}\n"
        "space: {attention: null, mlp: false, drop_attention: true, drop_mlp: true}\n"
        "budget:\n"
        "  - {metric: dropped_attn, exactly: 2}\n"
        "  - {metric: dropped_mlp, exactly: 2}\n"
    )
    cfg = StudyConfig.from_yaml(path)
    assert cfg.budget == (Budget(metric="dropped_attn", exactly=2), Budget(metric="dropped_mlp", exactly=2))
    assert StudyConfig.from_dict(json.loads(cfg.to_json())) == cfg
    s = SearchSpace.from_model(SPEC8, budget=cfg.budget, **cfg.space)
    assert len(list(s.enumerate())) == 784


@pytest.mark.parametrize("build, match", [
    (lambda: SearchSpace.from_model(SPEC8, **DEPTH, budget=Budget(metric="dropped_blocks", exactly=8)),
     "can drop at most 7 blocks"),
    (lambda: SearchSpace.from_model(SPEC8, **DEPTH, frozen_layers=(0,), budget=Budget(metric="dropped_blocks",
                                                                                      min_value=8)),
     "can drop at most 7 blocks .8 layers, 1 frozen"),
    (lambda: SearchSpace.from_model(SPEC8, **SUBLAYERS, budget=Budget(metric="dropped_sublayers", exactly=16)),
     "at most 15 sublayers"),
    (lambda: Budget(metric="dropped_blocks", exactly=-1), "whole number >= 0"),
    (lambda: Budget(metric="dropped_attn", max_value=-2), "whole number >= 0"),
    (lambda: Budget(metric="dropped_blocks", exactly=2.5), "whole number >= 0"),
    (lambda: Budget(metric="dropped_blocks", exactly=True), "whole number >= 0"),
    (lambda: Budget(metric="dropped_blocks", exactly=2, max_value=3), "exactly=... alone"),
    (lambda: Budget(metric="params", exactly=2), "exactly is for count metrics"),
    (lambda: SearchSpace.from_model(SPEC8, mlp_step=64, budget=Budget(metric="dropped_blocks", exactly=2)),
     "drops no blocks; pass drop_blocks=True"),
    (lambda: SearchSpace.from_model(SPEC8, mlp_step=64, drop_attention=True, budget=Budget(metric="dropped_mlp",
                                                                                        max_value=1)),
     "drops no MLP sublayers; pass drop_mlp=True"),
    (lambda: SearchSpace.from_model(SPEC8, mlp_step=64, drop_blocks=True, budget=Budget(metric="dropped_attn",
                                                                                         exactly=1)).smallest(
        "dropped_attn"), "count metric has no cheapest candidate"),
])
def test_bad_counts_say_what_to_do(build, match):
    with pytest.raises(ValueError, match=match) as info:
        build()
    assert "\n" not in str(info.value)
