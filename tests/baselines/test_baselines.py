"""Baselines: uniform, ShortGPT, SLEB, FLAP give valid candidates in budget; pareto helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tiny_models import tiny_model

from evoprune.pruning import Pruner
from evoprune.baselines import calibration_loss, flap, flap_scores, shortgpt, sleb, uniform
from evoprune.study import hypervolume, pareto_front
from evoprune.space import Budget, SearchSpace


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("qwen2", num_hidden_layers=6)
    gen = torch.Generator().manual_seed(1)
    calib = torch.randint(3, 97, (4, 32), generator=gen)
    return model, calib, Pruner(model, calib)


def depth_space(model, ratio=0.6, **kw):
    return SearchSpace.from_model(model.config, attention=None, mlp=False, drop_blocks=True,
                                  budget=Budget(metric="params", max_ratio=ratio), **kw)


def test_shortgpt_drops_lowest_influence_blocks(setup):
    model, _, pruner = setup
    space = depth_space(model)
    cand = shortgpt(space, pruner)
    assert space.satisfies_budget(cand)
    dropped = [i for i, layer in enumerate(cand.layers) if layer.dropped]
    infl = pruner.importance.block_influence.tolist()
    lowest = sorted(range(len(infl)), key=lambda i: (infl[i], i))[: len(dropped)]
    assert sorted(dropped) == sorted(lowest)
    assert shortgpt(space, infl, num_blocks=1).kept_layers != cand.kept_layers
    frozen = depth_space(model, frozen_layers=tuple(lowest[:1]))
    assert lowest[0] not in [i for i, layer in enumerate(shortgpt(frozen, pruner).layers) if layer.dropped]
    with pytest.raises(ValueError, match="drop_blocks=True"):
        shortgpt(SearchSpace.from_model(model.config, mlp_step=16), pruner, num_blocks=1)


def test_sleb_never_drops_first_or_last_and_is_greedy(setup):
    model, calib, pruner = setup
    space = depth_space(model, ratio=0.45)
    report = {}
    cand = sleb(space, pruner, calib, report=report)
    assert space.satisfies_budget(cand)
    assert not cand.layers[0].dropped and not cand.layers[-1].dropped
    assert sorted(report["order"]) == [i for i, layer in enumerate(cand.layers) if layer.dropped]
    assert report["tokens"] > 0 and not pruner.is_applied
    # greedy: the first block dropped is the one whose sole removal hurts the calibration loss least
    losses = {}
    for i in range(1, 5):
        with pruner.applied(space.candidate_from_levels({f"L{i}.block": 1})):
            losses[i] = calibration_loss(model, calib)[0]
    assert report["order"][0] == min(losses, key=losses.get)
    # the dense model is untouched afterwards
    assert np.isfinite(calibration_loss(model, calib)[0])


@pytest.mark.parametrize("attention", ["kv_groups", "q_per_group"])
def test_flap_widths_meet_budget_and_are_non_uniform(setup, attention):
    model, calib, pruner = setup
    space = SearchSpace.from_model(model.config, attention=attention, mlp_step=8, frozen_layers=(0,),
                                   budget=Budget(metric="params", max_ratio=0.55))
    scores = flap_scores(pruner, calib)
    assert scores["head"].shape == (6, 8) and scores["channel"].shape == (6, 96)
    cand = flap(space, pruner, scores=scores)
    space.validate(cand)
    assert space.satisfies_budget(cand)
    assert space.ratio(cand, "params") > 0.45  # uses the budget, does not overshoot far below it
    widths = {layer.mlp_channels for layer in cand.layers[1:]}
    assert len(widths) > 1
    assert flap(space, pruner, calib) == cand


def test_uniform_baseline(setup):
    model, _, _ = setup
    space = SearchSpace.from_model(model.config, mlp_step=16, sparsity_levels=(0, 0.5),
                                   budget=Budget(metric="nonzero_params", max_ratio=0.5))
    cand = uniform(space)
    assert space.satisfies_budget(cand)
    assert len(set(cand.layers)) == 1


def test_pareto_helpers_match_optuna():
    rng = np.random.default_rng(0)
    pts = rng.random((30, 2))
    idx = pareto_front(pts)
    for i in idx:
        assert not any(np.all(pts[j] <= pts[i]) and np.any(pts[j] < pts[i]) for j in range(30))
    hv = hypervolume(pts, (1.0, 1.0))
    order = np.argsort(pts[idx, 0])
    front = pts[idx][order]
    manual, prev = 0.0, 1.0
    for x, y in front:
        manual += (1 - x) * (prev - y)
        prev = y
    assert hv == pytest.approx(manual)
    assert hypervolume(1 - pts, (0.0, 0.0), directions=["maximize", "maximize"]) == pytest.approx(hv)
    assert pareto_front([[1, 2], [1, 2], [2, 1]]) == [0, 1, 2]  # ties kept, as Study.best_trials
