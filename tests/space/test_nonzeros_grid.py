"""One kept-per-row rule: the cost model's nonzeros equal the materialized model's, on a grid.

Grid: input widths 1..130 (many not divisible by 4) x unstructured levels 0.00..0.95 in
0.01 steps, plus 2:4. A materialization per pair would take minutes, so the test is split
without losing exactness:

* for **every** pair, the mask function (what ``Pruner.materialize`` bakes in) keeps exactly
  the rows the cost model counts: ``CostModel.nonzero_params`` of a one-block candidate whose
  ``down_proj`` has that width and level equals its ``params`` minus the weights the mask prunes
  (the number pruned does not depend on the weight values, only on width and level);
* end to end, ``Pruner.materialize`` on a 13-block Llama (``down_proj`` input width = kept MLP
  channels) is counted weight by weight for every width 1..130 (twice, at different levels),
  every level, every float edge (``level * width`` a hair off an integer, e.g.
  ``0.29 * 100 = 28.999999999999996``) and every 2:4 width;
* 2:4 on a width not divisible by 4 is rejected by ``Candidate`` (MLP width), by
  ``CostModel``/``Pruner.apply``/``Pruner.materialize`` (hidden size, attention width) and by
  the mask function, with a message saying what to do.
"""

from __future__ import annotations

import pytest
import torch

from tiny_models import tiny_model

from evoprune.pruning import Pruner, wanda_mask
from evoprune.space import Candidate, CostModel, LayerConfig, ModelSpec

WIDTHS = range(1, 131)
LEVELS = tuple(round(k * 0.01, 2) for k in range(96))  # 0.0, 0.01, ..., 0.95 (the nearest floats)
FLOAT_EDGES = tuple(
    (w, lv) for w in WIDTHS for lv in LEVELS if lv * w != round(lv * w) and abs(lv * w - round(lv * w)) < 1e-9
)
HIDDEN, LAYERS = 8, 13


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _positive_model(**overrides) -> torch.nn.Module:
    """A tiny Llama whose every parameter is nonzero (so counted nonzeros = kept weights)."""
    model = tiny_model("llama", vocab_size=8, **overrides)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def _nonzeros(model: torch.nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


@pytest.fixture(scope="module")
def pruner() -> Pruner:
    model = _positive_model(num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=2,
                            num_key_value_heads=1, intermediate_size=max(WIDTHS))
    return Pruner(model, None)


def test_grid_has_float_edges():
    assert (100, 0.29) in FLOAT_EDGES and len(FLOAT_EDGES) >= 5


def test_mask_and_cost_model_agree_on_every_width_and_level():
    spec = ModelSpec.from_config(dict(model_type="llama", num_hidden_layers=1, hidden_size=HIDDEN,
                                      num_attention_heads=2, num_key_value_heads=1,
                                      intermediate_size=max(WIDTHS), vocab_size=8))
    cost = CostModel(spec)
    g = torch.Generator().manual_seed(1)
    bad = []
    for w in WIDTHS:
        weight, norm = torch.rand(HIDDEN, w, generator=g), torch.rand(w, generator=g)
        patterns = [("unstructured", lv) for lv in LEVELS] + ([("2:4", 0.5)] if w % 4 == 0 else [])
        for pattern, lv in patterns:
            mask = wanda_mask(weight, norm, lv, pattern)
            pruned = 0 if mask is None else int((~mask).sum())
            if mask is not None and len(set((~mask).sum(1).tolist())) != 1:
                bad.append((w, lv, pattern, "rows prune different counts"))
            layer = LayerConfig(num_kv_heads=1, q_per_kv=2, mlp_channels=w, linear_sparsity={"down": lv})
            cand = Candidate(layers=(layer,), sparsity_pattern=pattern)
            if cost.nonzero_params(cand) != cost.params(cand) - pruned:
                bad.append((w, lv, pattern, cost.params(cand) - cost.nonzero_params(cand), pruned))
    assert not bad, f"{len(bad)} (width, level) pairs disagree, e.g. {bad[:5]}"


def _level(w: int, salt: int) -> float:
    return LEVELS[(37 * w + salt) % len(LEVELS)]


def _layer(w: int, down: float, rest: float) -> LayerConfig:
    return LayerConfig(num_kv_heads=1, q_per_kv=1 + w % 2, mlp_channels=w, sparsity=rest,
                       linear_sparsity={"down": down})


def _candidates() -> list[Candidate]:
    widths = list(WIDTHS)
    out = []
    for salt in (0, 41):  # every width twice; w -> 37 w mod 96 hits every level
        for j in range(0, len(widths), LAYERS):
            chunk = widths[j : j + LAYERS]
            chunk += widths[: LAYERS - len(chunk)]
            out.append(Candidate(layers=tuple(_layer(w, _level(w, salt), _level(w, salt + 7)) for w in chunk)))
    edges = list(FLOAT_EDGES)
    for j in range(0, len(edges), LAYERS):
        chunk = edges[j : j + LAYERS]
        chunk += edges[: LAYERS - len(chunk)]
        out.append(Candidate(layers=tuple(_layer(w, lv, lv) for w, lv in chunk)))
    fours = [w for w in WIDTHS if w % 4 == 0]
    for j in range(0, len(fours), LAYERS):
        chunk = fours[j : j + LAYERS]
        chunk += fours[: LAYERS - len(chunk)]
        out.append(Candidate(layers=tuple(_layer(w, 0.5, 0.5) for w in chunk), sparsity_pattern="2:4"))
    return out


def test_materialized_nonzeros_equal_cost_model(pruner):
    cost = CostModel(pruner.spec)
    cands = _candidates()
    covered = {(lc.mlp_channels, lc.sparsity_of("down"), c.sparsity_pattern) for c in cands for lc in c.layers}
    assert {w for w, _, _ in covered} == set(WIDTHS)
    assert {lv for _, lv, p in covered if p == "unstructured"} == set(LEVELS)
    assert {(w, lv) for w, lv, _ in covered} >= set(FLOAT_EDGES)
    assert {w for w, _, p in covered if p == "2:4"} == {w for w in WIDTHS if w % 4 == 0}
    for cand in cands:
        small = pruner.materialize(cand)
        assert _nonzeros(small) == cost.nonzero_params(cand), cand.to_json()
        assert sum(p.numel() for p in small.parameters()) == cost.params(cand)


def test_2_4_rejected_on_mlp_widths_not_divisible_by_4():
    for w in WIDTHS:
        layer = LayerConfig(num_kv_heads=1, q_per_kv=2, mlp_channels=w, sparsity=0.5)
        if w % 4 == 0:
            Candidate(layers=(layer,), sparsity_pattern="2:4")
            continue
        with pytest.raises(ValueError, match="divisible by 4"):
            Candidate(layers=(layer,), sparsity_pattern="2:4")
        with pytest.raises(ValueError, match="divisible by 4"):
            wanda_mask(torch.rand(2, w), None, 0.5, "2:4")
        # a dense down_proj may have any width
        dense_down = LayerConfig(num_kv_heads=1, q_per_kv=2, mlp_channels=w, sparsity=0.5,
                                 linear_sparsity={"down": 0.0})
        Candidate(layers=(dense_down,), sparsity_pattern="2:4")


def test_2_4_rejected_by_cost_model_and_pruner_on_hidden_and_attention_widths():
    model = _positive_model(num_hidden_layers=2, hidden_size=6, num_attention_heads=3, num_key_value_heads=1,
                            intermediate_size=8)
    pruner = Pruner(model, None)
    cost = CostModel(pruner.spec)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    on_hidden = Candidate(layers=(LayerConfig(num_kv_heads=1, q_per_kv=3, mlp_channels=8, sparsity=0.5),) * 2,
                          sparsity_pattern="2:4")  # q/k/v/gate/up read hidden_size=6
    o_layer = LayerConfig(num_kv_heads=1, q_per_kv=1, mlp_channels=8, linear_sparsity={"o": 0.5})
    on_o = Candidate(layers=(o_layer,) * 2, sparsity_pattern="2:4")  # o_proj reads 1 head * head_dim 2 = 2 inputs
    for cand, where in ((on_hidden, "linear 'q'"), (on_o, "linear 'o'")):
        for call in (cost.nonzero_params, pruner.apply, pruner.materialize):
            with pytest.raises(ValueError, match=f"layer 0 {where}: 2:4 sparsity needs an input width divisible by 4"):
                call(cand)
    assert not pruner.is_applied
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    fits_layer = LayerConfig(num_kv_heads=1, q_per_kv=2, mlp_channels=8, linear_sparsity={"o": 0.5, "down": 0.5})
    fits = Candidate(layers=(fits_layer,) * 2, sparsity_pattern="2:4")  # o_proj: 2 heads * 2 = 4 inputs, down: 8
    assert _nonzeros(pruner.materialize(fits)) == cost.nonzero_params(fits) < cost.params(fits)
