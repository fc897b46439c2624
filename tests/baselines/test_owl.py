"""OWL (outlier-weighted layerwise sparsity) on a tiny real transformers Llama: the outlier ratio is
the share of a block's Wanda scores above M x their mean, blocks with more outliers get lower
sparsity, and the allocation meets the space's nonzero-params budget."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from evoprune.pruning import Pruner
from evoprune.baselines import owl, owl_allocation, owl_scores, uniform
from evoprune.space import Budget, SearchSpace
from tiny_models import tiny_model

LEVELS = (0.0, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8)


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model = tiny_model("llama", num_hidden_layers=6)
    with torch.no_grad():  # a few heavy input columns in some blocks -> different outlier ratios
        layers = model.model.layers
        for i, scale in ((1, 6.0), (4, 12.0)):
            layers[i].mlp.down_proj.weight[:, :3] *= scale
            layers[i].self_attn.q_proj.weight[:5] *= scale
    original = copy.deepcopy(model)  # the Pruner permutes `model` in place
    calib = torch.randint(3, 97, (4, 32), generator=torch.Generator().manual_seed(3))
    pruner = Pruner(model, calib)
    return original, model, pruner, calib, owl_scores(pruner, calib)


def _independent_ratios(model, calib, m: float) -> list[float]:
    """The outlier ratio recomputed from the raw inputs of every linear of the unpermuted model."""
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            handles.append(mod.register_forward_hook(
                lambda mod, args, out, name=name: inputs.setdefault(name, []).append(args[0].detach())))
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    for h in handles:
        h.remove()
    out = []
    for i in range(len(model.model.layers)):
        scores = []
        for name, mod in model.model.layers[i].named_modules():
            if isinstance(mod, torch.nn.Linear):
                x = torch.cat(inputs[f"model.layers.{i}.{name}"]).reshape(-1, mod.in_features).double()
                norm = torch.sqrt((x * x).sum(0))
                scores.append((mod.weight.double().abs() * norm[None, :]).flatten())
        s = torch.cat(scores)
        out.append(float((s > m * s.mean()).sum()) / s.numel())
    return out


def test_outlier_ratio_matches_an_independent_computation(setup):
    original, _model, pruner, calib, scores = setup
    assert scores["tokens"] == calib.numel() and scores["m"] == 5.0
    np.testing.assert_allclose(scores["outlier_ratio"], _independent_ratios(original, calib, 5.0), rtol=1e-6)
    # the scaled blocks stand out, the most in block 4
    r = scores["outlier_ratio"]
    assert int(np.argmax(r)) == 4 and r[1] > np.median(r)
    r3 = owl_scores(pruner, calib, m=3.0)["outlier_ratio"]
    np.testing.assert_allclose(r3, _independent_ratios(original, calib, 3.0), rtol=1e-6)
    assert np.all(r3 >= r)


def test_allocation_formula():
    r = np.array([0.01, 0.05, 0.03, 0.01])
    s = owl_allocation(r, 0.6, lam=0.1)
    assert s.mean() == pytest.approx(0.6)
    assert s.max() - s.min() == pytest.approx(0.2)  # 2 * lambda between the extremes
    np.testing.assert_allclose(s, 0.6 - (0.2 * (r - 0.01) / 0.04 - np.mean(0.2 * (r - 0.01) / 0.04)))
    np.testing.assert_allclose(owl_allocation([0.02] * 3, 0.5), [0.5] * 3)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_allocation_meets_the_budget_and_follows_the_outliers(setup, sparsity):
    _original, model, pruner, calib, scores = setup
    space = SearchSpace.from_model(model.config, attention=None, mlp=False, sparsity_levels=LEVELS)
    # budget: the nonzero params of every block at `sparsity` (what uniform Wanda keeps)
    lvl = LEVELS.index(sparsity)
    cap = space.cost(space.candidate_from_levels({g.name: lvl for g in space.genes}), "nonzero_params")
    space = SearchSpace.from_model(model.config, attention=None, mlp=False, sparsity_levels=LEVELS,
                                   budget=Budget(metric="nonzero_params", max_value=cap))
    report: dict = {}
    cand = owl(space, pruner, calib, report=report)
    assert report["tokens"] == calib.numel()
    np.testing.assert_allclose(report["outlier_ratio"], scores["outlier_ratio"])
    assert space.satisfies_budget(cand)
    # as close to the budget as the levels allow: the slack is below the largest one-level step back
    lv = space.levels_of(cand)
    cost = space.cost(cand, "nonzero_params")
    steps = [space.cost(space.candidate_from_levels({**lv, name: k - 1}), "nonzero_params") - cost
             for name, k in lv.items() if k > 0]
    assert 0 <= cap - cost < max(steps)
    sp = np.array([lc.sparsity for lc in cand.layers])
    r = scores["outlier_ratio"]
    order = np.argsort(-r)  # most outliers first -> lowest sparsity first
    assert np.all(np.diff(sp[order]) >= -1e-12)
    assert sp[4] < sparsity < sp[int(np.argmin(r))]
    assert abs(sp.mean() - sparsity) <= 0.05
    # the same allocation with the precomputed scores, and uniform Wanda sits at the level exactly
    assert owl(space, pruner, scores=scores) == cand
    assert {lc.sparsity for lc in uniform(space).layers} == {sparsity}


def test_more_outliers_lower_sparsity_with_synthetic_ratios(setup):
    _original, model, pruner, _calib, _scores = setup
    space = SearchSpace.from_model(model.config, attention=None, mlp=False, sparsity_levels=LEVELS)
    ratios = np.array([0.001, 0.02, 0.005, 0.01, 0.04, 0.0])
    cand = owl(space, pruner, scores={"outlier_ratio": ratios}, target=0.6, lam=0.1)
    sp = [lc.sparsity for lc in cand.layers]
    for i in range(6):
        for j in range(6):
            if ratios[i] > ratios[j]:
                assert sp[i] <= sp[j]
    want = owl_allocation(ratios, 0.6, lam=0.1)
    assert sp == [min(LEVELS, key=lambda v: abs(v - s)) for s in want]
    assert sp[4] < 0.6 < sp[5]


def test_joint_space_sets_only_sparsity_and_every_linear_gene(setup):
    _original, model, pruner, calib, scores = setup
    space = SearchSpace.from_model(model.config, attention="kv_groups", mlp_step=32, drop_blocks=True,
                                   sparsity_levels=LEVELS, sparsity_granularity="linear",
                                   budget=Budget(metric="nonzero_params", max_ratio=0.7))
    cand = owl(space, pruner, scores=scores)
    assert space.satisfies_budget(cand)
    for lc, dense in zip(cand.layers, space.dense().layers):
        assert (lc.num_kv_heads, lc.mlp_channels, lc.dropped) == (dense.num_kv_heads, dense.mlp_channels, False)
        assert len({lc.sparsity_of(n) for n in ("q", "k", "v", "o", "gate", "up", "down")}) == 1


def test_errors(setup):
    _original, model, pruner, calib, scores = setup
    dense_space = SearchSpace.from_model(model.config, attention=None, mlp_step=32)
    with pytest.raises(ValueError, match="sparsity_levels"):
        owl(dense_space, pruner, calib)
    space = SearchSpace.from_model(model.config, attention=None, mlp=False, sparsity_levels=LEVELS)
    with pytest.raises(ValueError, match="budget"):
        owl(space, pruner, scores=scores)
    with pytest.raises(ValueError, match="calib_ids"):
        owl(space, pruner, target=0.5)
    with pytest.raises(ValueError, match="outlier ratios"):
        owl(space, pruner, scores={"outlier_ratio": [0.1, 0.2]}, target=0.5)
