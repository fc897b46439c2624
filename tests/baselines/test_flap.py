"""FLAP-style allocation as in the FLAP paper: channel scores standardized per layer, an attention unit
scored by the mean of its channels' standardized scores; budget bands are met without repair."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evoprune.pruning import Pruner
from evoprune.baselines import flap, flap_scores
from evoprune.space import Budget, SearchSpace
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model = tiny_model("llama", num_hidden_layers=6)
    calib = torch.randint(3, 97, (4, 32), generator=torch.Generator().manual_seed(2))
    pruner = Pruner(model, calib)
    return model, pruner, flap_scores(pruner, calib)


def test_budget_band_is_met_by_the_threshold_not_by_repair(setup, caplog):
    model, pruner, scores = setup
    assert scores["head_channel"].shape == (6, 8 * 8)
    space = SearchSpace.from_model(model.config, attention="kv_groups", mlp_step=8,
                                   budget=Budget(metric="params", max_ratio=0.7, min_ratio=0.6))
    with caplog.at_level("WARNING", logger="evoprune"):
        cand = flap(space, pruner, scores=scores)
    assert space.satisfies_budget(cand) and "repairing" not in caplog.text
    assert len({(lc.num_kv_heads, lc.mlp_channels) for lc in cand.layers}) > 1


def test_group_scores_come_from_standardized_channel_scores(setup):
    """Synthetic channel scores: in every layer one KV group has one live and 15 dead ``o_proj`` input
    channels, the other three all-equal live ones; the budget allows cutting one group per layer, and
    FLAP cuts exactly one in every layer (not two in some and none in others)."""
    model, pruner, scores = setup
    space = SearchSpace.from_model(model.config, attention="kv_groups", mlp=False,
                                   budget=Budget(metric="params", max_ratio=0.92))
    fake = {k: (np.array(v, dtype=float, copy=True) if k != "tokens" else v) for k, v in scores.items()}
    hc = np.ones_like(fake["head_channel"])  # [L, 8 heads * head_dim 8]: 4 groups of 16 channels
    hc[:, 16:32] = 0.0
    hc[:, 16] = 2.0
    fake["head_channel"] = hc
    with pytest.raises(ValueError, match="flap_scores"):
        flap(space, pruner, scores={k: v for k, v in fake.items() if k != "head_channel"})
    cand = flap(space, pruner, scores=fake)
    assert space.satisfies_budget(cand)
    assert [lc.num_kv_heads for lc in cand.layers] == [3] * 6
