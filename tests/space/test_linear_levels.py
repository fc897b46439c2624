"""The ``linear`` level: a dropped block / attention / MLP replaced by a fitted linear map (levels ``-rank``
before the drop level), its exact cost, budgets, repair, random starts, level switches, enumeration, prior."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from evoprune.search import level_switch
from evoprune.space import Budget, Candidate, LayerConfig, ModelSpec, SearchSpace

SPEC = ModelSpec.from_config(dict(model_type="llama", num_hidden_layers=6, hidden_size=64, num_attention_heads=8,
                                  num_key_value_heads=4, intermediate_size=256, vocab_size=100))
H = SPEC.hidden_size


def _spaces():
    return {
        "depth": SearchSpace.from_model(SPEC, attention=None, mlp=False, drop_blocks=True, linear_ranks=(H, 8),
                                        budget=Budget(metric="params", max_ratio=0.7)),
        "sublayers": SearchSpace.from_model(SPEC, attention=None, mlp=False, drop_attention=True, drop_mlp=True,
                                            linear_ranks=(H,), budget=Budget(metric="params", max_ratio=0.6)),
        "widths + counts": SearchSpace.from_model(SPEC, mlp_step=64, drop_blocks=True, linear_ranks=(16,),
                                                  budget=(Budget(metric="params", max_ratio=0.7),
                                                          Budget(metric="dropped_blocks", exactly=1))),
    }


def test_genes_levels_and_round_trip():
    s = _spaces()["depth"]
    assert s.gene("L0.block").levels == (1, -H, -8, 0)
    c = s.candidate_from_levels({"L1.block": 1, "L2.block": 2, "L3.block": 3})
    assert c.layers[1] == LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0, block_linear=H)
    assert c.layers[2].block_linear == 8 and c.layers[3].dropped and not c.layers[1].dropped
    assert c.kept_layers == (0, 1, 2, 4, 5)
    assert s.levels_of(c) == {**{f"L{i}.block": 0 for i in range(6)}, "L1.block": 1, "L2.block": 2, "L3.block": 3}
    assert Candidate.from_json(c.to_json()) == c and SearchSpace.from_json(s.to_json()) == s
    sub = _spaces()["sublayers"]
    assert sub.gene("L0.attn").levels == (4, -H, 0) and sub.gene("L0.mlp").levels == (256, -H, 0)
    c = sub.candidate_from_levels({"L0.attn": 1, "L0.mlp": 2, "L1.mlp": 1})
    assert c.layers[0].attn_linear == H and c.layers[0].mlp_dropped and c.layers[1].mlp_linear == H
    assert sub.canonical(c) == c


def test_cost_counts_the_linear_parameters_and_flops_exactly():
    s = _spaces()["depth"]
    cm = s.cost_model
    dense = cm.layer_cost(SPEC.dense_layer(), "params")
    full = LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0, block_linear=H)
    low = LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0, block_linear=8)
    assert cm.layer_cost(full, "params") == H * H + H  # the matrix and the kept input norm
    assert cm.layer_cost(low, "params") == 2 * H * 8 + H
    assert cm.layer_cost(full, "flops") == 2 * H * H and cm.layer_cost(low, "flops") == 2 * 2 * H * 8
    assert cm.layer_cost(full, "kv_bytes") == 0
    c = Candidate(layers=(full,) + (SPEC.dense_layer(),) * 5)
    assert cm.params(c) == cm.params(SPEC.dense_candidate()) - dense + H * H + H
    # a replaced part is not dropped: counts stay 0
    assert all(cm.cost(c, m) == 0 for m in ("dropped_blocks", "dropped_attn", "dropped_mlp", "dropped_sublayers"))


@pytest.mark.parametrize("name", ["depth", "sublayers", "widths + counts"])
def test_random_repair_fill_and_level_switch_stay_in_the_space_and_budget(name):
    s = _spaces()[name]
    rng = np.random.default_rng(0)
    seen_linear = 0
    for seed in range(12):
        c = s.random(seed)
        assert s.contains(c) and s.satisfies_budget(c)
        seen_linear += c.has_linear
        start = s.random(seed, within_budget=False)
        fixed = s.repair(start, np.random.default_rng(seed))
        assert s.satisfies_budget(fixed) and s.contains(fixed)
        lv = list(s.levels_of(c).values())
        for _ in range(10):
            new = level_switch(s, lv, rng)
            if new is None:
                break
            cand = s.candidate_from_levels(dict(zip(s.gene_names, new)))
            assert s.satisfies_budget(cand)
            lv = new
    assert seen_linear > 0


def test_enumerate_matches_brute_force_with_linear_levels():
    spec = ModelSpec.from_dict(dict(SPEC.to_dict(), num_layers=4))
    s = SearchSpace.from_model(spec, attention=None, mlp=False, drop_blocks=True, linear_ranks=(H, 8),
                               budget=Budget(metric="params", max_ratio=0.8))
    brute = set()
    for levels in itertools.product(*(range(g.top + 1) for g in s.genes)):
        try:
            c = s.candidate_from_levels(dict(zip(s.gene_names, levels)))
        except ValueError:
            continue
        if s.satisfies_budget(c):
            brute.add(c)
    got = list(s.enumerate())
    assert len(got) == len(set(got)) and set(got) == brute and any(c.has_linear for c in got)


def test_the_prior_puts_linear_between_keep_and_drop():
    from evoprune.search._surrogate import LINEAR_PRIOR_SHARE, gene_prior

    s = _spaces()["depth"]
    prior = gene_prior(s, {"block_influence": [0.2] * 6, "attn_influence": [0.1] * 6, "mlp_influence": [0.1] * 6})
    keep, full, low, drop = prior["L0.block"]
    assert keep == 0 < full < low < drop == pytest.approx(0.2)
    assert full == pytest.approx(0.2 * LINEAR_PRIOR_SHARE)


def test_bad_linear_input_is_one_line():
    cases = [
        (lambda: SearchSpace.from_model(SPEC, attention=None, mlp=False, drop_blocks=True, linear_ranks=(H + 1,)),
         "not in 1..64"),
        (lambda: SearchSpace.from_model(SPEC, mlp_step=64, linear_ranks=(H,)), "add drop_blocks"),
        (lambda: SearchSpace.from_model(SPEC, attention=None, mlp=False, drop_blocks=True, linear_ranks=(H,),
                                        mode="probe"), "mode: static"),
        (lambda: SPEC.check_candidate(Candidate(layers=(LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0,
                                                                    block_linear=H + 1),) + (SPEC.dense_layer(),) * 5)),
         "rank larger than the hidden size"),
        (lambda: LayerConfig(num_kv_heads=4, q_per_kv=2, mlp_channels=0, attn_linear=H), "set num_kv_heads"),
        (lambda: _spaces()["depth"].validate(Candidate(layers=(LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0,
                                                                           block_linear=16),) + (SPEC.dense_layer(),) * 5)),
         "not a level of this space"),
    ]
    for make, msg in cases:
        with pytest.raises(ValueError, match=msg) as exc:
            make()
        assert "\n" not in str(exc.value)
