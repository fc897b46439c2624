"""Latency (materialized, relative to dense) and analytic cost."""

from __future__ import annotations

import pytest

from evoprune.evaluators import Cost, EvalContext, Latency, measure_latency
from evoprune.pruning import Pruner
from evoprune.space import CostModel, ModelSpec
from helpers import candidate
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # the shared 2 cores: one intra-op thread


def test_latency_times_the_materialized_candidate():
    """Behaviour only (no wall-clock threshold; the measured ratio is a TARGET of bench/speedup.py):
    the dense model is timed in ``prepare``, the candidate's materialized copy in ``evaluate`` --
    its dropped blocks never run, the live model never runs -- and the value is the ratio of medians."""
    import math

    import torch
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    model = tiny_model("llama", num_hidden_layers=8)
    pruner = Pruner(model)  # magnitude importance: no calibration tokens needed
    spec = pruner.spec
    ctx = EvalContext(pruner=pruner)
    lat = Latency(seq_len=16, warmup=1, repeats=3)
    with pytest.raises(RuntimeError, match="prepare"):
        lat.evaluate(model, spec.dense_candidate(), ctx)
    live_layers = {id(m) for m in model.modules() if isinstance(m, LlamaDecoderLayer)}
    calls = {"live": 0, "other": 0}

    def count(module, args, output):
        if isinstance(module, LlamaDecoderLayer):
            calls["live" if id(module) in live_layers else "other"] += 1

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        lat.prepare(model, ctx)
        assert calls == {"live": 8 * (1 + 3), "other": 0}  # the dense model: warmup + repeats, all blocks
        calls.update(live=0, other=0)
        half = candidate(spec, drop=(1, 2, 4, 5))
        live = [p for p in model.parameters()]
        with pruner.applied(half):
            res = lat.evaluate(model, half, ctx)
        lat.prepare(model, ctx)  # the dense timing is cached in the context: not measured again
    finally:
        handle.remove()
    assert calls == {"live": 0, "other": 4 * (1 + 3)}  # only the 4 kept blocks of the materialized copy ran
    d = res.details
    assert len(d["candidate_runs"]) == 3 and len(d["dense_runs"]) == 3
    assert all(t > 0 and math.isfinite(t) for t in d["candidate_runs"] + d["dense_runs"])
    assert res.value == pytest.approx(d["candidate_s"] / d["dense_s"]) and res.value > 0
    assert (d["mode"], d["seq_len"], d["batch_size"]) == ("prefill", 16, 1)
    # the live model was not touched by materializing
    assert [p for p in model.parameters()] == live
    # the dense timing is cached in the context (shared by stage contexts)
    assert ctx.for_stage("later").shared["dense_latency"]
    # what the latency ratio stands for, deterministically: half the blocks, fewer FLOPs
    cost = CostModel(spec, seq_len=16)
    assert cost.flops(half) < cost.flops(spec.dense_candidate())


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
