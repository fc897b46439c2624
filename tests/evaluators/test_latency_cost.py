"""Latency (materialized, relative to dense) and analytic cost."""

from __future__ import annotations

import pytest

from evoprune.evaluators import Cost, EvalContext, Latency, measure_latency
from evoprune.pruning import Pruner
from evoprune.space import CostModel, ModelSpec
from helpers import candidate
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # the shared 2 cores: one intra-op thread


def test_latency_of_half_depth_is_below_dense():
    model = tiny_model("llama", hidden_size=128, intermediate_size=384, num_hidden_layers=8,
                       max_position_embeddings=256)
    pruner = Pruner(model)  # magnitude importance: no calibration tokens needed
    spec = pruner.spec
    ctx = EvalContext(pruner=pruner)
    lat = Latency(seq_len=128, warmup=2, repeats=7)
    with pytest.raises(RuntimeError, match="prepare"):
        lat.evaluate(model, spec.dense_candidate(), ctx)
    lat.prepare(model, ctx)
    half = candidate(spec, drop=(1, 2, 4, 5))
    live = [p for p in model.parameters()]
    with pruner.applied(half):
        res = lat.evaluate(model, half, ctx)
    assert res.value < 0.85, res.details
    assert res.details["candidate_s"] < res.details["dense_s"]
    assert len(res.details["candidate_runs"]) == 7
    # the live model was not touched by materializing
    assert [p for p in model.parameters()] == live
    # the dense timing is cached in the context (shared by stage contexts)
    assert ctx.for_stage("later").shared["dense_latency"]


def test_measure_latency_decode_mode():
    model = tiny_model("qwen3")
    times = measure_latency(model, seq_len=16, new_tokens=4, warmup=1, repeats=2, mode="decode")
    assert len(times) == 2 and all(t > 0 for t in times)
    with pytest.raises(ValueError):
        Latency(mode="train")


def test_cost_from_cost_model_without_forward():
    model = tiny_model("llama")
    spec = ModelSpec.from_config(model.config)
    ctx = EvalContext(cost_model=CostModel(spec, seq_len=64))
    half = candidate(spec, drop=(0, 1))
    params = Cost(metric="params").evaluate(None, half, ctx)
    dense_params = sum(p.numel() for p in model.parameters())
    assert params.details["dense"] == dense_params
    assert params.value == pytest.approx(params.details["value"] / dense_params)
    assert Cost(metric="kv_bytes").evaluate(None, half, ctx).value == pytest.approx(0.5)
    absolute = Cost(metric="flops", relative=False, seq_len=32).evaluate(None, half, ctx)
    assert absolute.value == ctx.cost_model.flops(half, seq_len=32)
    assert Cost(metric="params").name == "params_ratio" and Cost.direction == "minimize"
    with pytest.raises(ValueError, match="cost_model"):
        Cost().evaluate(None, half, EvalContext())
