"""SearchSpace: genes and levels, validity, budgets, repair, Optuna mapping, JSON."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evoprune.space import (
    GENE_KINDS,
    LINEAR_NAMES,
    Budget,
    Candidate,
    LatencyTable,
    LayerConfig,
    ModelSpec,
    SearchSpace,
)
from tiny_models import tiny_config

optuna.logging.set_verbosity(optuna.logging.WARNING)

# llama-like, 6 blocks, 4 KV groups x 2 query heads, head_dim 16, MLP 256
SPEC = ModelSpec.from_config(
    dict(model_type="llama", num_hidden_layers=6, hidden_size=128, num_attention_heads=8,
         num_key_value_heads=4, intermediate_size=256, vocab_size=300)
)
H, HD = SPEC.hidden_size, SPEC.head_dim

SPACES = {
    "widths": dict(mlp_step=64),
    "q_per_group+drops": dict(attention="q_per_group", mlp_step=32, mlp_min=64, drop_attention=True, drop_mlp=True,
                              frozen_layers=(0, -1)),
    "depth": dict(attention=None, mlp=False, drop_blocks=True),
    "everything": dict(attn_levels=(4, 2, 1), mlp_step=64, drop_attention=True, drop_mlp=True, drop_blocks=True,
                       sparsity_levels=(0, 0.25, 0.5, 0.7), frozen_layers=(0,),
                       budget=Budget(metric="params", max_ratio=0.6)),
    "linear sparsity": dict(attention=None, mlp=False, sparsity_levels=(0, 0.5, 0.7), sparsity_granularity="linear",
                            drop_attention=True, budget=Budget(metric="nonzero_params", max_ratio=0.6)),
    "2:4": dict(mlp_step=64, pattern_2_4=True, budget=[Budget(metric="flops", max_ratio=0.9),
                                                       Budget(metric="nonzero_params", max_ratio=0.8)]),
}


def space(name: str) -> SearchSpace:
    return SearchSpace.from_model(SPEC, **SPACES[name])


@pytest.fixture(params=sorted(SPACES))
def any_space(request) -> SearchSpace:
    return space(request.param)


# ---------------------------------------------------------------- genes and levels


def test_gene_names_kinds_and_levels():
    s = space("everything")
    assert [g.name for g in s.genes if g.layer == 1] == ["L1.block", "L1.attn", "L1.mlp", "L1.sparsity"]
    assert not [g for g in s.genes if g.layer == 0]  # frozen
    assert s.gene("L3.attn").levels == (4, 2, 1, 0)
    assert s.gene("L3.mlp").levels == (256, 192, 128, 64, 0)
    assert s.gene("L3.block").levels == (1, 0)
    assert s.gene("L3.sparsity").levels == (0.0, 0.25, 0.5, 0.7)
    assert s.gene("L3.mlp").drops and not s.gene("L3.sparsity").drops
    assert {g.kind for g in s.genes} <= set(GENE_KINDS)
    assert all(g.name == f"L{g.layer}.{g.kind}" for g in s.genes)
    lin = space("linear sparsity")
    assert [g.name for g in lin.genes if g.layer == 2] == ["L2.attn"] + [f"L2.{n}.sparsity" for n in LINEAR_NAMES]
    assert lin.gene("L2.gate.sparsity").linear == "gate" and lin.gene("L2.attn").linear is None
    q = space("q_per_group+drops")
    assert q.gene("L1.attn").levels == (2, 1, 0)  # query heads per KV group
    assert q.gene("L1.mlp").levels == (256, 224, 192, 160, 128, 96, 64, 0)
    assert [g.layer for g in q.genes][0] == 1 and max(g.layer for g in q.genes) == 4
    with pytest.raises(KeyError, match="no gene"):
        s.gene("L0.mlp")


def test_level_zero_is_dense_and_levels_compress():
    for name in SPACES:
        s = space(name)
        assert s.dense() == s.candidate_from_levels({})
        assert all(v == 0 for v in s.levels_of(s.dense()).values())
        assert s.cost(s.dense(), "params") == s.cost_model.params(SPEC.dense_candidate())
        # every step up a gene never raises the cost in any metric
        base = s.levels_of(s.dense())
        for g in s.genes:
            prev = s.cost_model.costs(s.dense())
            for level in range(1, g.top + 1):
                now = s.cost_model.costs(s.candidate_from_levels({**base, g.name: level}))
                assert all(now[m] <= prev[m] for m in now), (name, g.name, level)
                assert any(now[m] < prev[m] for m in now), (name, g.name, level)
                prev = now


def test_candidate_from_levels_widths():
    s = space("everything")
    c = s.candidate_from_levels({"L2.attn": 1, "L2.mlp": 3, "L3.attn": 3, "L4.block": 1, "L5.sparsity": 2})
    assert (c.layers[2].num_kv_heads, c.layers[2].q_per_kv, c.layers[2].mlp_channels) == (2, 2, 64)
    assert c.layers[3].attn_dropped and c.layers[3].mlp_channels == 256
    assert c.layers[4].dropped
    assert c.layers[5].sparsity == 0.5
    q = space("q_per_group+drops")
    c = q.candidate_from_levels({"L2.attn": 1})
    assert (c.layers[2].num_kv_heads, c.layers[2].q_per_kv) == (4, 1)
    with pytest.raises(ValueError, match="unknown gene"):
        s.candidate_from_levels({"L2.mpl": 1})
    with pytest.raises(ValueError, match=r"0\.\.4"):
        s.candidate_from_levels({"L2.mlp": 5})
    with pytest.raises(ValueError, match="drop every block"):
        space("depth").candidate_from_levels({f"L{i}.block": 1 for i in range(6)})


def test_dropped_parts_are_canonical():
    s = space("everything")
    # widths and sparsity of a dropped block do not matter: one candidate, levels reported at 0
    a = s.candidate_from_levels({"L2.block": 1, "L2.mlp": 2, "L2.sparsity": 3})
    b = s.candidate_from_levels({"L2.block": 1})
    assert a == b and a.layers[2] == LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0)
    assert s.levels_of(a)["L2.mlp"] == 0 and s.levels_of(a)["L2.block"] == 1
    # both sublayers dropped = the block dropped
    c = s.candidate_from_levels({"L2.attn": 3, "L2.mlp": 4})
    assert c == b
    lin = space("linear sparsity")
    d = lin.candidate_from_levels({"L1.attn": 1, "L1.q.sparsity": 2, "L1.up.sparsity": 1})
    assert d.layers[1].linear_sparsity == (("up", 0.5),)
    assert lin.levels_of(d)["L1.q.sparsity"] == 0
    # a non-canonical but equivalent candidate is accepted and canonicalized
    odd = s.dense().replace_layer(3, num_kv_heads=0, q_per_kv=0, mlp_channels=0, sparsity=0.5)
    assert odd != s.candidate_from_levels({"L3.block": 1})
    assert s.canonical(odd) == s.candidate_from_levels({"L3.block": 1})


def _levels_strategy(s: SearchSpace):
    return st.fixed_dictionaries({g.name: st.integers(0, g.top) for g in s.genes})


@pytest.mark.parametrize("name", sorted(SPACES))
def test_levels_candidate_round_trip(name):
    s = space(name)

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_levels_strategy(s))
    def check(levels):
        try:
            cand = s.candidate_from_levels(levels)
        except ValueError as exc:
            assert "drop every block" in str(exc)
            return
        canon = s.levels_of(cand)
        assert s.candidate_from_levels(canon) == cand
        assert s.levels_of(s.candidate_from_levels(canon)) == canon
        # genes that matter agree with what was asked for
        for g in s.genes:
            layer = cand.layers[g.layer]
            if not layer.dropped and g.kind == "mlp" and canon[g.name] != levels[g.name]:
                assert layer.mlp_dropped  # only dead genes may differ
        assert Candidate.from_json(cand.to_json()) == cand
        assert s.contains(cand)

    check()


# ---------------------------------------------------------------- validate


def test_validate_rejects_candidates_outside_the_space():
    s = space("everything")
    dense = s.dense()
    with pytest.raises(ValueError, match="frozen"):
        s.validate(dense.replace_layer(0, mlp_channels=64))
    with pytest.raises(ValueError, match="frozen"):
        s.validate(dense.replace_layer(0, sparsity=0.5))
    with pytest.raises(ValueError, match="not a level"):
        s.validate(dense.replace_layer(2, mlp_channels=100))
    with pytest.raises(ValueError, match="kv_groups"):
        s.validate(dense.replace_layer(2, q_per_kv=1))
    with pytest.raises(ValueError, match="not a level"):
        s.validate(dense.replace_layer(2, num_kv_heads=3))
    with pytest.raises(ValueError, match="sparsity_granularity='linear'"):
        s.validate(dense.replace_layer(2, linear_sparsity={"q": 0.5}))
    with pytest.raises(ValueError, match="sparsity 0.3"):
        s.validate(dense.replace_layer(2, sparsity=0.3))
    with pytest.raises(ValueError, match="layers"):
        s.validate(Candidate(layers=dense.layers[:5]))
    w = space("widths")
    with pytest.raises(ValueError, match="drop_attention=True"):
        w.validate(w.dense().replace_layer(1, num_kv_heads=0, q_per_kv=0))
    with pytest.raises(ValueError, match="drop_mlp=True"):
        w.validate(w.dense().replace_layer(1, mlp_channels=0))
    with pytest.raises(ValueError, match="drop_blocks=True"):
        w.validate(w.dense().replace_layer(1, num_kv_heads=0, q_per_kv=0, mlp_channels=0))
    with pytest.raises(ValueError, match="sparsity"):
        w.validate(w.dense().replace_layer(1, sparsity=0.5))
    q = space("q_per_group+drops")
    with pytest.raises(ValueError, match="q_per_group"):
        q.validate(q.dense().replace_layer(1, num_kv_heads=2))
    assert not q.contains(q.dense().replace_layer(1, num_kv_heads=2))
    # an equivalent candidate with per-linear overrides that are all equal is fine in "layer" granularity
    same = dense.replace_layer(2, linear_sparsity={n: 0.5 for n in LINEAR_NAMES})
    assert s.levels_of(same)["L2.sparsity"] == 2


# ---------------------------------------------------------------- space validation


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(mlp_step=48), "does not divide intermediate_size=256"),
        (dict(mlp_step=64, mlp_min=96), "multiple of mlp_step"),
        (dict(mlp_step=64, mlp_min=512), "exceeds intermediate_size"),
        (dict(attn_levels=(4, 5)), "more than the dense model has"),
        (dict(attn_levels=(3, 2)), "must include the dense width 4"),
        (dict(attn_levels=(4, 0)), "drop_attention=True"),
        (dict(attn_levels=(4, 2, 2)), "duplicates"),
        (dict(attention="heads"), "attention must be one of"),
        (dict(attention=None, attn_levels=(4, 2)), "attn_levels needs"),
        (dict(mlp=False, mlp_step=64), "only used with mlp=True"),
        (dict(sparsity_levels=(0.5, 0.7)), "must include 0.0"),
        (dict(sparsity_levels=(0, 1.0)), r"\[0, 1\)"),
        (dict(sparsity_levels=(0, 0.5), sparsity_granularity="row"), "sparsity_granularity"),
        (dict(pattern_2_4=True, sparsity_levels=(0, 0.5, 0.7)), r"\(0.0, 0.5\)"),
        (dict(frozen_layers=(6,)), "out of range"),
        (dict(attention=None, mlp=False), "searches nothing"),
        (dict(mlp_step=64, frozen_layers=range(6)), "searches nothing"),
        (dict(mlp_step=64, budget=Budget(metric="params", max_ratio=0.1)), "cannot be met"),
        (dict(mlp_step=64, budget=Budget(metric="kv_bytes", max_ratio=0.2)), "cannot be met"),
        (dict(mlp_step=64, budget=[Budget(metric="params", max_ratio=0.9), Budget(metric="params", min_ratio=.5)]),
         "merge them"),
        (dict(mlp_step=64, budget=Budget(metric="latency", max_ratio=0.9)), "LatencyTable"),
        (dict(mlp_step=64, budget=Budget(metric="params", min_value=1e12)), "cannot be met"),
        (dict(mlp_step=64, seq_len=0), "seq_len"),
    ],
)
def test_space_validation_errors(options, message):
    with pytest.raises(ValueError, match=message):
        SearchSpace.from_model(SPEC, **options)


def test_space_validation_type_errors_and_budget_errors():
    with pytest.raises(TypeError, match="True or False"):
        SearchSpace.from_model(SPEC, drop_blocks=1)
    with pytest.raises(TypeError, match="Budget"):
        SearchSpace.from_model(SPEC, budget="params<0.5")
    with pytest.raises(TypeError, match="from_model"):
        SearchSpace(spec=tiny_config("llama"))
    with pytest.raises(ValueError, match="metric"):
        Budget(metric="memory", max_ratio=0.5)
    with pytest.raises(ValueError, match="not both"):
        Budget(metric="params", max_ratio=0.5, max_value=10)
    with pytest.raises(ValueError, match="needs a bound"):
        Budget(metric="params")
    with pytest.raises(ValueError, match="exceeds max_ratio"):
        Budget(metric="params", min_ratio=0.6, max_ratio=0.5)
    mqa = ModelSpec.from_config(dict(model_type="llama", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                     num_key_value_heads=1, intermediate_size=64, vocab_size=10))
    with pytest.raises(ValueError, match="q_per_group"):
        SearchSpace.from_model(mqa)
    assert SearchSpace.from_model(mqa, attention="q_per_group").gene("L0.attn").levels == (4, 3, 2, 1)


def test_budget_reachability_uses_exact_minimum():
    # MLP only: the cheapest candidate keeps attention and 64 channels everywhere
    s = SearchSpace.from_model(SPEC, attention=None, mlp_step=64)
    smallest = s.cost(s.candidate_from_levels({f"L{i}.mlp": 3 for i in range(6)}), "params")
    assert s.min_cost("params") == smallest
    ratio = smallest / s.dense_cost("params")
    SearchSpace.from_model(SPEC, attention=None, mlp_step=64, budget=Budget(metric="params", max_ratio=ratio))
    with pytest.raises(ValueError, match="cannot be met"):
        SearchSpace.from_model(SPEC, attention=None, mlp_step=64,
                               budget=Budget(metric="params", max_value=smallest - 1))
    # depth only, nothing frozen: one block must survive
    d = space("depth")
    assert d.smallest("params").kept_layers == (0,)
    assert d.min_cost("params") == d.cost_model.params(d.smallest("params"))


def test_auto_mlp_step():
    assert SearchSpace.from_model(SPEC).mlp_step == 32  # 256 / 32 = 8 levels
    tiny = SearchSpace.from_model(tiny_config("llama"))  # intermediate 96
    assert tiny.mlp_step == 8 and tiny.gene("L0.mlp").levels[:3] == (96, 88, 80)
    assert SearchSpace.from_model(tiny_config("llama"), mlp_step=32).gene("L0.mlp").levels == (96, 64, 32)


# ---------------------------------------------------------------- cost per level step


def test_equal_steps_cost_the_same_in_every_layer():
    s = space("everything")
    for metric in ("params", "flops", "kv_bytes", "nonzero_params"):
        savings = s.step_savings(metric)
        for kind in ("attn", "mlp", "block", "sparsity"):
            per_layer = {savings[g.name] for g in s.genes_of_kind(kind)}
            assert len(per_layer) == 1, (metric, kind, per_layer)
    mlp = s.step_savings("params")["L1.mlp"]
    assert mlp[:3] == (3 * H * 64,) * 3  # 64 channels of gate, up, down
    assert mlp[3] == 3 * H * 64 + H  # the drop step also removes post_attention_layernorm
    attn = s.step_savings("params")["L1.attn"]
    group = H * HD * (2 * 2 + 2)  # one KV group: 2 query heads (q and o) + its k and v head
    assert attn == (2 * group, group, group + H)
    assert s.step_savings("params")["L1.sparsity"] == (0, 0, 0)
    assert s.step_savings("kv_bytes")["L1.attn"] == (2 * 2 * HD * 2, 2 * HD * 2, 2 * HD * 2)


def test_width_steps_are_additive_in_mixed_candidates():
    """An mlp/attn step saves the same params whatever the other genes are (block kept)."""
    s = space("everything")
    savings = s.step_savings("params")
    rng = np.random.default_rng(1)
    for _ in range(20):
        levels = s.levels_of(s.random(rng, within_budget=False))
        for name, lv in levels.items():
            g = s.gene(name)
            if g.kind not in ("attn", "mlp") or lv == g.top or levels[f"L{g.layer}.block"] == 1:
                continue
            other = "mlp" if g.kind == "attn" else "attn"
            if levels[f"L{g.layer}.{other}"] == s.gene(f"L{g.layer}.{other}").top and lv + 1 == g.top:
                continue  # would drop the block
            before = s.cost(s.candidate_from_levels(levels), "params")
            after = s.cost(s.candidate_from_levels({**levels, name: lv + 1}), "params")
            assert before - after == savings[name][lv]


# ---------------------------------------------------------------- budgets and repair


def test_satisfies_budget_and_constraints():
    s = space("everything")
    dense = s.dense()
    assert not s.satisfies_budget(dense)
    cons = s.constraints(dense)
    assert list(cons) == ["params_max"] and cons["params_max"] == pytest.approx(0.4)
    (metric, lo, hi), = s.budget_bounds()
    assert metric == "params" and lo is None and hi == pytest.approx(0.6 * s.dense_cost("params"))
    assert space("widths").satisfies_budget(space("widths").dense())
    assert space("widths").constraints(space("widths").dense()) == {}


@pytest.mark.parametrize("name", ["everything", "linear sparsity", "2:4"])
def test_repair_meets_budget_deterministically(name):
    s = space(name)
    for seed in range(5):
        start = s.random(seed, within_budget=False)
        fixed = s.repair(start, np.random.default_rng(seed))
        assert s.satisfies_budget(fixed)
        assert fixed == s.repair(start, np.random.default_rng(seed))
        assert s.contains(fixed)
        assert fixed.layers[0] == SPEC.dense_layer() or 0 not in s.frozen_layers
        # repair only moves genes towards compression when over the budget
        a, b = s.levels_of(s.canonical(start)), s.levels_of(fixed)
        for g in s.genes:
            if fixed.layers[g.layer].dropped or s.canonical(start).layers[g.layer].dropped:
                continue
            assert b[g.name] >= a[g.name], g.name
    assert s.repair(s.dense(), 0) != s.repair(s.dense(), 1) or name == "2:4"


def test_repair_moves_only_genes_that_help():
    s = space("everything")  # params budget: sparsity does not change params
    for seed in range(5):
        fixed = s.repair(s.dense(), seed)
        assert all(fixed.layers[i].sparsity == 0 for i in range(6))
        assert not fixed.has_sparsity


def test_repair_keeps_one_block_under_the_tightest_depth_budget():
    d = space("depth")
    tight = SearchSpace.from_model(SPEC, **{**SPACES["depth"], "budget": Budget(
        metric="params", max_value=d.min_cost("params"))})
    for seed in range(4):
        fixed = tight.repair(tight.dense(), seed)
        assert len(fixed.kept_layers) == 1 and tight.satisfies_budget(fixed)
    # widths too, nothing frozen: the last kept block must shrink instead of being dropped
    options = dict(attn_levels=(4, 1), mlp_step=64, drop_attention=True, drop_mlp=True, drop_blocks=True)
    smallest = SearchSpace.from_model(SPEC, **options).min_cost("params")
    tight = SearchSpace.from_model(SPEC, **options, budget=Budget(metric="params", max_value=smallest))
    for seed in range(8):
        fixed = tight.repair(tight.dense(), seed)
        assert len(fixed.kept_layers) == 1 and tight.cost(fixed, "params") == smallest


def test_repair_band_moves_back_towards_dense():
    s = SearchSpace.from_model(SPEC, attention=None, mlp_step=32,
                               budget=Budget(metric="params", min_ratio=0.7, max_ratio=0.75))
    smallest = s.smallest("params")
    assert s.ratio(smallest, "params") < 0.7
    fixed = s.repair(smallest, 0)
    assert 0.7 <= s.ratio(fixed, "params") <= 0.75
    assert s.satisfies_budget(s.repair(s.dense(), 0))
    ok = s.repair(s.dense(), 5)
    assert s.repair(ok, 99) == ok  # already inside: unchanged


def test_random_candidates_respect_frozen_layers_and_budget():
    s = space("everything")
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(15):
        c = s.random(rng)
        assert s.satisfies_budget(c)
        assert c.layers[0] == SPEC.dense_layer()
        seen.add(c.key)
    assert len(seen) > 10
    q = space("q_per_group+drops")
    for seed in range(10):
        c = q.random(seed)
        assert c.layers[0] == c.layers[5] == SPEC.dense_layer()
    assert s.random(3) == s.random(3)


def test_uniform():
    s = SearchSpace.from_model(SPEC, attention=None, mlp_step=32, budget=Budget(metric="params", max_ratio=0.7))
    u = s.uniform(0.7)
    widths = {layer.mlp_channels for layer in u.layers}
    assert len(widths) == 1 and s.ratio(u, "params") <= 0.7
    # the next wider uniform candidate would break the ratio
    width = widths.pop()
    wider = Candidate(layers=(LayerConfig(num_kv_heads=4, q_per_kv=2, mlp_channels=width + 32),) * 6)
    assert s.ratio(wider, "params") > 0.7
    assert s.uniform(1.0) == s.dense()
    assert {layer.mlp_channels for layer in s.uniform(3).layers} == {256 - 3 * 32}
    with pytest.raises(ValueError, match="levels 0..7"):
        s.uniform(9)
    with pytest.raises(ValueError, match="most compressed uniform"):
        s.uniform(0.05)
    e = space("everything")
    u = e.uniform(0.6)
    assert e.satisfies_budget(u) and len({layer for layer in u.layers[1:]}) == 1
    assert not any(layer.dropped or layer.attn_dropped or layer.mlp_dropped for layer in u.layers)


# ---------------------------------------------------------------- 2:4


def test_pattern_2_4():
    s = space("2:4")
    assert s.sparsity_levels == (0.0, 0.5)
    c = s.candidate_from_levels({"L1.sparsity": 1})
    assert c.sparsity_pattern == "2:4" and c.layers[1].sparsity == 0.5
    nonstructured = Candidate(layers=c.layers)  # same levels but "unstructured"
    with pytest.raises(ValueError, match="2:4"):
        s.validate(nonstructured)
    assert s.cost_model.nonzero_params(c) == s.cost_model.nonzero_params(nonstructured)
    weights = 2 * H * 8 * HD + 2 * H * 4 * HD + 3 * H * 256
    assert s.cost(s.dense(), "nonzero_params") - s.cost(c, "nonzero_params") == weights // 2
    with pytest.raises(ValueError, match="multiple of 4"):
        SearchSpace.from_model(SPEC, mlp_step=2, pattern_2_4=True)
    plain = space("everything")
    with pytest.raises(ValueError, match="unstructured"):
        plain.validate(plain.dense().replace_layer(1, sparsity=0.5).__class__(
            layers=plain.dense().replace_layer(1, sparsity=0.5).layers, sparsity_pattern="2:4"))


# ---------------------------------------------------------------- Optuna


def test_optuna_distributions_and_params_round_trip(any_space):
    s = any_space
    dists = s.optuna_distributions()
    assert list(dists) == [g.name for g in s.genes]
    assert all(isinstance(d, optuna.distributions.IntDistribution) for d in dists.values())
    assert all((d.low, d.high) == (0, s.gene(n).top) for n, d in dists.items())
    cats = s.optuna_distributions(categorical=True)
    assert all(c.choices == tuple(range(s.gene(n).top + 1)) for n, c in cats.items())
    for seed in range(5):
        cand = s.random(seed)
        params = s.params_of(cand)
        for name, value in params.items():
            assert dists[name]._contains(dists[name].to_internal_repr(value))
        assert s.candidate_from_params({**params, "lr": 1e-4}) == cand  # other params are ignored
    with pytest.raises(ValueError, match="missing genes"):
        s.candidate_from_params({})


@pytest.mark.parametrize("categorical", [False, True])
def test_suggest_with_real_study(categorical):
    s = space("everything")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    cands = []
    for _ in range(8):
        trial = study.ask()
        try:
            cand = s.suggest(trial, categorical=categorical)
        except ValueError:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        cands.append(cand)
        assert cand == s.candidate_from_params(trial.params)
        assert s.params_of(cand) == s.levels_of(s.candidate_from_params(trial.params))
        assert set(trial.params) == set(s.gene_names)
        study.tell(trial, s.ratio(cand, "params"))
    assert len({c.key for c in cands}) == len(cands) > 3
    # the trials remember their constraints
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    assert len(done) == len(cands)
    for t, c in zip(done, cands):
        assert t.constraints == {"params_max": pytest.approx(s.constraints(c)["params_max"])}
        assert (t.constraints["params_max"] <= 0) == s.satisfies_budget(c)

    # enqueue a repaired candidate and get it back from suggest
    target = s.repair(s.dense(), 7)
    study.enqueue_trial(s.params_of(target))
    trial = study.ask()
    assert s.suggest(trial, categorical=categorical) == target
    # a sampler that knows the distributions up front
    study2 = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    trial = study2.ask(s.optuna_distributions(categorical=categorical))
    assert s.candidate_from_params(trial.params) == s.suggest(trial, categorical=categorical)


# ---------------------------------------------------------------- serialization


def test_space_json_round_trip(any_space):
    s = any_space
    text = s.to_json()
    json.loads(text)
    back = SearchSpace.from_json(text)
    assert back == s and back.key == s.key
    assert back.genes == s.genes
    assert back.to_json() == text
    assert SearchSpace.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    c = s.random(0)
    assert back.levels_of(c) == s.levels_of(c)


def test_space_json_with_latency_and_errors():
    table = LatencyTable(entries={("attn", 8): 1.0, ("mlp", 256): 2.0}, base=0.5)
    s = SearchSpace.from_model(SPEC, mlp_step=64, latency=table,
                               budget=(Budget(metric="latency", max_ratio=0.8), Budget(metric="params", min_ratio=.3)))
    back = SearchSpace.from_json(s.to_json())
    assert back == s and back.latency == table and back.budget == s.budget
    assert SearchSpace.from_model(SPEC, mlp_step=64) != s
    with pytest.raises(ValueError, match="version"):
        SearchSpace.from_dict({**s.to_dict(), "version": 99})
    with pytest.raises(ValueError, match="unknown keys"):
        SearchSpace.from_dict({**s.to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match="not valid JSON"):
        SearchSpace.from_json("{")
    with pytest.raises(ValueError, match="ModelSpec"):
        ModelSpec.from_dict({"model_type": "llama"})
    assert ModelSpec.from_dict(SPEC.to_dict()) == SPEC


def test_from_model_accepts_models_configs_and_specs(tiny):
    a = SearchSpace.from_model(tiny, mlp_step=32)
    b = SearchSpace.from_model(tiny.config, mlp_step=32)
    c = SearchSpace.from_model(ModelSpec.from_config(tiny.config), mlp_step=32)
    assert a == b == c
    assert a.cost(a.dense(), "params") == sum(p.numel() for p in tiny.parameters())


@settings(max_examples=30, deadline=None)
@given(
    attention=st.sampled_from(["kv_groups", "q_per_group", None]),
    drops=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    sparsity=st.sampled_from([(), (0.0, 0.5), (0.0, 0.3, 0.6)]),
    granularity=st.sampled_from(["layer", "linear"]),
    frozen=st.sampled_from([(), (0,), (0, -1)]),
    seed=st.integers(0, 2**16),
)
def test_property_spaces_round_trip(attention, drops, sparsity, granularity, frozen, seed):
    s = SearchSpace.from_model(
        SPEC, attention=attention, mlp_step=64, drop_attention=drops[0], drop_mlp=drops[1], drop_blocks=drops[2],
        sparsity_levels=sparsity, sparsity_granularity=granularity, frozen_layers=frozen,
    )
    assert SearchSpace.from_json(s.to_json()) == s
    cand = s.random(seed)
    assert s.candidate_from_levels(s.levels_of(cand)) == cand
    assert s.candidate_from_params(s.params_of(cand)) == cand
    assert Candidate.from_json(cand.to_json()) == cand
    for i in s.frozen_layers:
        assert cand.layers[i] == SPEC.dense_layer()
    assert s.cost(cand, "params") <= s.dense_cost("params")
    assert s.min_cost("params") <= s.cost(cand, "params")
