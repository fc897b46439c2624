"""EvolutionarySampler and level-switch mutation: budget by construction, duplicates, state, seeds."""

from __future__ import annotations

import collections
import hashlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evoprune.space import Budget, SearchSpace
from evoprune.search import BudgetSweep, EvolutionarySampler, level_switch

CFG = dict(model_type="llama", num_hidden_layers=6, hidden_size=64, num_attention_heads=8,
           num_key_value_heads=4, intermediate_size=128, vocab_size=100)


def _spaces():
    return {
        "depth": SearchSpace.from_model(CFG, attention=None, mlp=False, drop_blocks=True,
                                        budget=Budget(metric="params", max_ratio=0.6)),
        "mlp": SearchSpace.from_model(CFG, attention=None, mlp_step=16, budget=Budget(metric="params", max_ratio=0.7)),
        "width": SearchSpace.from_model(CFG, mlp_step=32, frozen_layers=(0,),
                                        budget=Budget(metric="params", max_ratio=0.6)),
        "mixed": SearchSpace.from_model(CFG, mlp_step=32, drop_blocks=True, frozen_layers=(0, -1),
                                        budget=[Budget(metric="params", max_ratio=0.7),
                                                Budget(metric="kv_bytes", max_ratio=0.9)]),
    }


SPACES = _spaces()
SPARSE = SearchSpace.from_model(CFG, attention=None, mlp_step=32, sparsity_levels=(0, 0.25, 0.5),
                                budget=Budget(metric="nonzero_params", max_ratio=0.6))


def _costs(space, cand):
    return [space.cost(cand, m) for m, _, _ in space.budget_bounds()]


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(sorted(SPACES)), seed=st.integers(0, 2**32 - 1), steps=st.integers(1, 8))
def test_level_switch_preserves_budget_cost_exactly(name, seed, steps):
    """Every switch keeps every budget cost exactly (block swaps hand the widths over); no repair involved."""
    space = SPACES[name]
    rng = np.random.default_rng(seed)
    cand = space.random(rng)
    before = _costs(space, cand)
    lv = list(space.levels_of(cand).values())
    for _ in range(steps):
        new = level_switch(space, lv, rng)
        if new is None:
            break
        moved = sum(abs(a - b) for a, b in zip(new, lv))
        lv = new
        c = space.candidate_from_levels(dict(zip(space.gene_names, lv)))
        assert space.satisfies_budget(c)
        if moved == 1:  # no switch existed: one gene went down into budget slack
            assert all(a >= b for a, b in zip(_costs(space, c), before))
            before = _costs(space, c)
            continue
        assert moved >= 2  # one gene up, one down (a block swap also hands the widths over)
        assert _costs(space, c) == before


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_level_switch_unequal_steps_stays_in_budget(seed):
    """Sparsity x width (nonzero params): steps differ, but a switch never leaves the budget."""
    rng = np.random.default_rng(seed)
    cand = SPARSE.random(rng)
    lv = list(SPARSE.levels_of(cand).values())
    for _ in range(6):
        new = level_switch(SPARSE, lv, rng)
        if new is None:
            break
        lv = new
        assert SPARSE.satisfies_budget(SPARSE.candidate_from_levels(dict(zip(SPARSE.gene_names, lv))))


def test_block_swap_hands_widths_over():
    space = SPACES["mixed"]
    swaps = 0
    for seed in range(60):
        rng = np.random.default_rng(seed)
        start = space.random(rng)
        vec = list(space.levels_of(start).values())
        new = level_switch(space, vec, rng)
        if new is None:
            continue
        c = space.candidate_from_levels(dict(zip(space.gene_names, new)))
        was = {i for i, layer in enumerate(start.layers) if layer.dropped}
        now = {i for i, layer in enumerate(c.layers) if layer.dropped}
        if len(was - now) != 1 or len(now - was) != 1:
            continue  # no swap (or the single-move fallback into budget slack)
        swaps += 1
        (restored,), (dropped,) = was - now, now - was
        assert c.layers[restored] == start.layers[dropped]
        assert _costs(space, c) == _costs(space, start)
    assert swaps > 0


def test_same_kind_switches_by_default_and_cross_kind_on_request():
    space = SPACES["width"]
    rng = np.random.default_rng(0)
    lv = list(space.levels_of(space.random(rng)).values())
    kinds = [g.kind for g in space.genes]
    for _ in range(30):
        new = level_switch(space, lv, rng)
        moved = [k for k, (a, b) in enumerate(zip(new, lv)) if a != b]
        assert len({kinds[k] for k in moved}) == 1
    crossed = 0
    for _ in range(60):
        new = level_switch(space, lv, rng, same_kind=False)
        if new is not None:
            moved = [k for k, (a, b) in enumerate(zip(new, lv)) if a != b]
            crossed += len({kinds[k] for k in moved}) == 2
            assert space.satisfies_budget(space.candidate_from_levels(dict(zip(space.gene_names, new))))
    assert crossed > 0


def test_number_of_flips_follows_min_of_two_uniforms():
    space = SPACES["mlp"]
    evo = EvolutionarySampler(seed=0)
    evo.setup(space)
    rng = np.random.default_rng(1)
    parent = space.uniform(0.7)
    lv0 = np.array(list(space.levels_of(parent).values()))
    counts = collections.Counter()
    for _ in range(900):
        child = evo.mutate(parent, rng)
        counts[int(np.abs(np.array(list(space.levels_of(child).values())) - lv0).sum())] += 1
    # min(U{1..3}, U{1..3}) = 1, 2, 3 with probability 5/9, 3/9, 1/9 (flips can cancel: distance <= 2 * flips)
    assert max(counts) <= 6
    assert counts[2] > counts[4] > counts[6] > 0


def _fitness(cand) -> float:
    """A deterministic stand-in for KL: prefers dropping late blocks / narrow late layers."""
    h = int(hashlib.sha256(cand.key.encode()).hexdigest()[:6], 16) / 16**6
    return sum((i + 1) * (1 - layer.mlp_channels / 128 if layer.mlp_channels else 1) for i, layer in
               enumerate(cand.layers)) * -0.01 + 0.001 * h + 1.0


def _drive(evo, generations, *, keep=None):
    keys = []
    for g in range(generations):
        props = evo.ask_generation()
        keys.append([p.candidate.key for p in props])
        evo.tell_generation([(p.candidate, _fitness(p.candidate)) for p in props])
        if keep is not None and g == keep[0]:
            keep[1].append(json.loads(json.dumps(evo.state_dict())))
    return keys


@pytest.mark.parametrize("name", ["depth", "mlp"])
def test_duplicates_never_proposed(name):
    space = SPACES[name]
    evo = EvolutionarySampler(offspring=8, seed=3)
    evo.setup(space)
    keys = [k for gen in _drive(evo, 8) for k in gen]
    assert len(keys) == len(set(keys))


def test_claim_veto_redraws():
    space = SPACES["mlp"]
    evo = EvolutionarySampler(offspring=4, seed=0)
    evo.setup(space)
    evo.tell_generation([(p.candidate, 1.0) for p in evo.ask_generation()])
    vetoed = []

    def claim(key):
        if len(vetoed) < 3:
            vetoed.append(key)
            return False
        return True

    props = evo.ask_generation(claim)
    assert len(props) == 4 and not {p.candidate.key for p in props} & set(vetoed)
    assert all(evo.seen(k) for k in vetoed)


def test_state_dict_round_trip_continues_identically():
    space = SPACES["width"]
    saved = []
    a = EvolutionarySampler(offspring=6, parents=2, init="random", init_samples=5, seed=7)
    a.setup(space)
    full = _drive(a, 6, keep=(2, saved))
    b = EvolutionarySampler(offspring=6, parents=2, init="random", init_samples=5, seed=7)
    b.setup(space)
    b.load_state_dict(saved[0])
    assert b.generation == 3
    assert _drive(b, 3) == full[3:]
    assert b.state_dict() == a.state_dict()


def test_state_rejects_other_settings():
    space = SPACES["depth"]
    a = EvolutionarySampler(offspring=4, seed=0)
    a.setup(space)
    _drive(a, 2)
    b = EvolutionarySampler(offspring=5, seed=0)
    b.setup(space)
    with pytest.raises(ValueError, match="other settings"):
        b.load_state_dict(a.state_dict())


def test_same_seed_same_run_other_seed_other_run():
    def run(seed):
        evo = EvolutionarySampler(offspring=6, seed=seed)
        evo.setup(SPACES["mixed"])
        return _drive(evo, 4)

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_elitism_parent_kept_unless_beaten():
    space = SPACES["mlp"]
    evo = EvolutionarySampler(offspring=3, seed=0)
    evo.setup(space)
    gen0 = evo.ask_generation()
    evo.tell_generation([(gen0[0].candidate, 0.5)])
    kids = evo.ask_generation()
    evo.tell_generation([(k.candidate, 0.6) for k in kids] + [(kids[0].candidate, None)])
    assert evo.best == (gen0[0].candidate, 0.5)
    kids = evo.ask_generation()
    evo.tell_generation([(kids[1].candidate, 0.4)])
    assert evo.best == (kids[1].candidate, 0.4)


def test_init_modes():
    space = SPACES["mlp"]
    seed_cand = space.repair(space.dense(), np.random.default_rng(0))
    evo = EvolutionarySampler(offspring=4, init=seed_cand, parents=2, seed=0, fill=False)
    evo.setup(space)
    props = evo.ask_generation()
    assert props[0].candidate == seed_cand and props[0].source == "seed" and len(props) == 2
    evo = EvolutionarySampler(offspring=4, init="random", init_samples=6, seed=0)
    evo.setup(space)
    props = evo.ask_generation()
    assert len(props) == 6 and all(space.satisfies_budget(p.candidate) for p in props)
    evo = EvolutionarySampler(init="uniform", fill=False)
    evo.setup(space)
    (p,) = evo.ask_generation()
    assert len({layer.mlp_channels for layer in p.candidate.layers}) == 1
    filled = EvolutionarySampler(init="uniform")
    filled.setup(space)
    (q,) = filled.ask_generation()  # the budget slack of the uniform candidate is spent first
    step = min(min(v) for v in space.step_savings("params").values())
    hi = space.budget_bounds()[0][2]
    assert space.cost(p.candidate, "params") <= space.cost(q.candidate, "params") <= hi
    assert hi - space.cost(q.candidate, "params") < step
    with pytest.raises(ValueError, match="init must be one of"):
        EvolutionarySampler(init="best")
    with pytest.raises(ValueError, match="offspring"):
        EvolutionarySampler(offspring=0)


def test_budget_sweep_levels_and_state():
    space = SPACES["mlp"]
    sweep = BudgetSweep(levels=(0.8, 0.65, 0.5), offspring=3, seed=1)
    sweep.setup(space)
    for _ in range(6):
        props = sweep.ask_generation()
        group = props[0].group
        r = float(group.split("<=")[1])
        assert all(p.space.satisfies_budget(p.candidate) and space.ratio(p.candidate, "params") <= r for p in props)
        sweep.tell_generation([(p.candidate, _fitness(p.candidate)) for p in props])
    assert [g for g, _, _ in sweep.best] == ["params<=0.8", "params<=0.65", "params<=0.5"]
    state = json.loads(json.dumps(sweep.state_dict()))
    twin = BudgetSweep(levels=(0.8, 0.65, 0.5), offspring=3, seed=1)
    twin.setup(space)
    twin.load_state_dict(state)
    assert [p.candidate for p in twin.ask_generation()] == [p.candidate for p in sweep.ask_generation()]
