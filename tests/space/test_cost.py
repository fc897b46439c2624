"""Cost model: exact parameter counts against real transformers models, FLOPs, KV bytes, latency."""

from __future__ import annotations

import itertools

import pytest
import torch
import transformers

from evoprune.space import (
    Budget,
    Candidate,
    CostModel,
    LatencyTable,
    LayerConfig,
    ModelSpec,
    SearchSpace,
    kept_per_row,
)
from tiny_models import ARCHS, tiny_config


def _meta_model(config):
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _layer_parts(arch: str, *, nkv: int, m: int, channels: int, head_dim: int, **overrides) -> tuple[int, int]:
    """(attention part, MLP part) of one real decoder block with these widths, each with its norm."""
    cfg = tiny_config(
        arch,
        num_hidden_layers=1,
        num_attention_heads=nkv * m,
        num_key_value_heads=nkv,
        intermediate_size=channels,
        head_dim=head_dim,
        **overrides,
    )
    layer = _meta_model(cfg).model.layers[0]
    attn = _numel(layer.self_attn) + _numel(layer.input_layernorm)
    mlp = _numel(layer.mlp) + _numel(layer.post_attention_layernorm)
    assert attn + mlp == _numel(layer)
    return attn, mlp


def _outside_blocks(model) -> int:
    return _numel(model) - sum(_numel(layer) for layer in model.model.layers)


def test_dense_params_equal_real_model(tiny, arch):
    spec = ModelSpec.from_config(tiny.config)
    cost = CostModel(spec)
    assert cost.params(spec.dense_candidate()) == sum(p.numel() for p in tiny.parameters())
    assert cost.nonzero_params(spec.dense_candidate()) == cost.params(spec.dense_candidate())


@pytest.mark.parametrize(
    "overrides",
    [
        dict(attention_bias=True, mlp_bias=True),
        dict(tie_word_embeddings=True),
        dict(num_key_value_heads=2, intermediate_size=80),
    ],
)
def test_dense_params_flags(overrides):
    for arch in ARCHS:
        cfg = tiny_config(arch, **overrides)
        model = _meta_model(cfg)
        spec = ModelSpec.from_config(cfg)
        assert CostModel(spec).params(spec.dense_candidate()) == _numel(model), (arch, overrides)


@pytest.mark.parametrize("arch", ARCHS)
def test_uniform_pruned_params_equal_smaller_real_model(arch):
    """A candidate pruning every block alike has the params of a dense model with the smaller widths."""
    spec = ModelSpec.from_config(tiny_config(arch))
    hd = spec.head_dim
    cost = CostModel(spec)
    # kv_groups style: 2 of 4 KV groups, each with its 2 query heads; MLP 96 -> 32
    cand = Candidate(layers=(LayerConfig(num_kv_heads=2, q_per_kv=2, mlp_channels=32),) * spec.num_layers)
    small = _meta_model(
        tiny_config(arch, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32, head_dim=hd)
    )
    assert cost.params(cand) == _numel(small)
    # q_per_group style: all 4 KV groups, 1 query head each; and 2 blocks dropped whole
    cand = Candidate(
        layers=(LayerConfig(num_kv_heads=4, q_per_kv=1, mlp_channels=64),) * 2
        + (LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0),) * 2
    )
    small = _meta_model(
        tiny_config(
            arch, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64, head_dim=hd
        )
    )
    assert cost.params(cand) == _numel(small)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bias", [False, True])
def test_non_uniform_params_equal_sum_of_real_blocks(arch, bias):
    # with bias=True, mistral/qwen2/qwen3/phi3 must ignore the config flags they hard-code
    overrides = dict(attention_bias=True, mlp_bias=True) if bias else {}
    cfg = tiny_config(arch, **overrides)
    spec = ModelSpec.from_config(cfg)
    hd = spec.head_dim
    layers = (
        LayerConfig(num_kv_heads=2, q_per_kv=1, mlp_channels=96),
        LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=40),  # attention dropped
        LayerConfig(num_kv_heads=4, q_per_kv=1, mlp_channels=0),  # MLP dropped
        LayerConfig(num_kv_heads=1, q_per_kv=2, mlp_channels=8, sparsity=0.5),
    )
    cand = Candidate(layers=layers)
    expected = _outside_blocks(_meta_model(cfg))
    for layer in layers:
        attn, mlp = _layer_parts(
            arch, nkv=max(layer.num_kv_heads, 1), m=max(layer.q_per_kv, 1), channels=max(layer.mlp_channels, 8),
            head_dim=hd, **overrides,
        )
        expected += (0 if layer.attn_dropped else attn) + (0 if layer.mlp_dropped else mlp)
    assert CostModel(spec).params(cand) == expected


def test_nonzero_params_sparsity_and_2_4():
    spec = ModelSpec.from_config(tiny_config("qwen2"))  # has q/k/v biases, which stay dense
    cost = CostModel(spec)
    dense = spec.dense_candidate()
    h, hd, i = spec.hidden_size, spec.head_dim, spec.intermediate_size
    linear_weights = h * (8 * hd) * 2 + 2 * h * (4 * hd) + 3 * h * i
    half = Candidate(layers=(LayerConfig(num_kv_heads=4, q_per_kv=2, mlp_channels=96, sparsity=0.5),) * 4)
    assert cost.nonzero_params(dense) - cost.nonzero_params(half) == 4 * linear_weights // 2
    assert cost.params(half) == cost.params(dense)  # sparsity never changes the parameter count
    two_four = Candidate(layers=half.layers, sparsity_pattern="2:4")
    assert cost.nonzero_params(two_four) == cost.nonzero_params(half)
    # per-row floor: at 0.7, a row of 64 inputs keeps 64 - floor(44.8) = 20
    one = dense.replace_layer(0, linear_sparsity={"q": 0.7})
    assert cost.nonzero_params(dense) - cost.nonzero_params(one) == (8 * hd) * (64 - 20)
    assert kept_per_row(96, 0.7) == 96 - 67
    # sparsity on a dropped sublayer does not count
    gone = dense.replace_layer(0, num_kv_heads=0, q_per_kv=0, sparsity=0.5)
    attn_only = dense.replace_layer(0, num_kv_heads=0, q_per_kv=0)
    assert cost.nonzero_params(attn_only) - cost.nonzero_params(gone) == 3 * h * i // 2


def test_flops_formula_and_monotone():
    spec = ModelSpec.from_config(tiny_config("qwen3"))
    cost = CostModel(spec, seq_len=64)
    dense = spec.dense_candidate()
    h, hd, v, i = spec.hidden_size, spec.head_dim, spec.vocab_size, spec.intermediate_size
    nq, nkv = spec.num_heads, spec.num_kv_heads
    matmul = 2 * h * nq * hd + 2 * h * nkv * hd + 3 * h * i
    per_layer = 2 * matmul + 4 * nq * hd * (64 + 1) // 2
    assert cost.flops(dense) == 4 * per_layer + 2 * v * h
    assert cost.flops(dense, seq_len=128) > cost.flops(dense)
    tied = CostModel(ModelSpec.from_config(tiny_config("qwen3", tie_word_embeddings=True)), seq_len=64)
    assert tied.flops(dense) == cost.flops(dense)  # the lm_head matmul runs even when tied
    assert cost.flops(dense.replace_layer(0, sparsity=0.5)) == cost.flops(dense)  # dense kernels

    # every single step towards compression lowers FLOPs (strictly for widths and drops)
    space = SearchSpace.from_model(spec, mlp_step=32, drop_attention=True, drop_mlp=True, drop_blocks=True,
                                   sparsity_levels=(0, 0.5), seq_len=64, frozen_layers=(0,))
    base = space.levels_of(space.dense())
    for gene in space.genes:
        prev = space.cost(space.dense(), "flops")
        for level in range(1, gene.top + 1):
            now = space.cost(space.candidate_from_levels({**base, gene.name: level}), "flops")
            if gene.kind.endswith("sparsity"):
                assert now == prev
            else:
                assert now < prev, gene.name
            prev = now


def test_kv_bytes():
    spec = ModelSpec.from_config(tiny_config("llama"))
    hd = spec.head_dim
    dense = spec.dense_candidate()
    assert CostModel(spec).kv_bytes(dense) == 4 * 2 * 4 * hd * 2
    assert CostModel(spec, kv_dtype_bytes=4).kv_bytes(dense) == 4 * 2 * 4 * hd * 4
    cost = CostModel(spec)
    assert cost.kv_bytes(dense.replace_layer(1, num_kv_heads=0, q_per_kv=0)) == 3 * 2 * 4 * hd * 2
    assert cost.kv_bytes(dense.replace_layer(1, num_kv_heads=1)) == (3 * 4 + 1) * 2 * hd * 2
    assert cost.kv_bytes(dense.replace_layer(1, q_per_kv=1)) == cost.kv_bytes(dense)  # fewer q heads: same cache
    assert cost.kv_bytes(dense.replace_layer(1, mlp_channels=0)) == cost.kv_bytes(dense)


def test_cost_rejects_wrong_layer_count_and_unknown_metric():
    spec = ModelSpec.from_config(tiny_config("llama"))
    cost = CostModel(spec)
    with pytest.raises(ValueError, match="4"):
        cost.params(Candidate(layers=(spec.dense_layer(),) * 3))
    with pytest.raises(ValueError, match="unknown cost metric"):
        cost.cost(spec.dense_candidate(), "watts")
    with pytest.raises(ValueError, match="LatencyTable"):
        cost.latency(spec.dense_candidate())
    assert CostModel.from_dict(cost.to_dict()) == cost


# ---------------------------------------------------------------- latency table


def test_latency_table_fit_lookup_roundtrip():
    rows = [("mlp", 32, 1.0), ("mlp", 32, 3.0), ("mlp", 32, 1.2), ("mlp", 64, 2.0), ("mlp", 96, 1.8),
            ("attn", 4, 0.5), ("attn", 8, 1.0), ("base", 0, 0.25), ("base", 0, 0.35)]
    table = LatencyTable.fit(rows)
    assert table.base == pytest.approx(0.3)
    assert table.lookup("mlp", 32) == 1.2  # median of repeats
    # isotonic: 64 -> 2.0 and 96 -> 1.8 violate monotonicity, pooled to 1.9
    assert table.lookup("mlp", 64) == pytest.approx(1.9) and table.lookup("mlp", 96) == pytest.approx(1.9)
    assert table.lookup("attn", 6) == pytest.approx(0.75)  # interpolation
    assert table.lookup("attn", 2) == pytest.approx(0.25)  # extrapolation from the two nearest
    assert table.lookup("attn", 0) == 0.0
    raw = LatencyTable.fit(rows, monotone=False)
    assert raw.lookup("mlp", 96) == 1.8
    assert LatencyTable.from_dict(table.to_dict()) == table
    import json

    assert LatencyTable.from_dict(json.loads(json.dumps(table.to_dict()))) == table
    with pytest.raises(ValueError, match="kind"):
        LatencyTable(entries={("conv", 3): 1.0})
    with pytest.raises(ValueError, match="no 'mlp' measurements"):
        LatencyTable(entries={("attn", 8): 1.0}).lookup("mlp", 8)
    single = LatencyTable(entries={("mlp", 96): 3.0})
    assert single.lookup("mlp", 48) == 1.5  # proportional from one point


def test_latency_metric_and_budget():
    spec = ModelSpec.from_config(tiny_config("llama"))
    table = LatencyTable(entries={("attn", 8): 1.0, ("attn", 4): 0.6, ("mlp", 96): 2.0, ("mlp", 48): 1.0}, base=0.5)
    cost = CostModel(spec, latency_table=table)
    dense = spec.dense_candidate()
    assert cost.latency(dense) == pytest.approx(0.5 + 4 * 3.0)
    assert cost.latency(dense.replace_layer(2, num_kv_heads=0, q_per_kv=0, mlp_channels=0)) == pytest.approx(9.5)
    assert cost.latency(dense.replace_layer(2, num_kv_heads=2)) == pytest.approx(0.5 + 3 * 3.0 + 0.6 + 2.0)
    with pytest.raises(ValueError, match="latency"):
        SearchSpace.from_model(spec, mlp_step=16, budget=Budget(metric="latency", max_ratio=0.5))
    space = SearchSpace.from_model(spec, mlp_step=16, latency=table, budget=Budget(metric="latency", max_ratio=0.6))
    cand = space.repair(space.dense(), 3)
    assert space.cost(cand, "latency") <= 0.6 * cost.latency(dense)
    assert SearchSpace.from_json(space.to_json()) == space


def test_smallest_matches_brute_force():
    """min_cost is exact: compare with every level assignment of a small space, every metric."""
    spec = ModelSpec.from_config(tiny_config("qwen3", num_hidden_layers=3, intermediate_size=64))
    table = LatencyTable(entries={("attn", 8): 1.0, ("attn", 2): 0.9, ("mlp", 64): 1.0, ("mlp", 32): 1.1}, base=0.1)
    for frozen in [(), (1,)]:
        space = SearchSpace.from_model(
            spec, attn_levels=(4, 1), mlp_step=32, drop_attention=True, drop_mlp=True, drop_blocks=True,
            sparsity_levels=(0.0, 0.5), frozen_layers=frozen, latency=table, seq_len=32,
        )
        names = [g.name for g in space.genes]
        tops = [range(g.top + 1) for g in space.genes]
        candidates = []
        for levels in itertools.product(*tops):
            try:
                candidates.append(space.candidate_from_levels(dict(zip(names, levels))))
            except ValueError:
                pass  # drops every block
        for metric in ("params", "nonzero_params", "flops", "kv_bytes", "latency"):
            brute = min(space.cost(c, metric) for c in candidates)
            assert space.min_cost(metric) == pytest.approx(brute), (frozen, metric)
            assert space.cost(space.smallest(metric), metric) == pytest.approx(brute)
            largest = max(space.cost(c, metric) for c in candidates)
            assert space._extreme(metric, minimize=False)[1] == pytest.approx(largest)
