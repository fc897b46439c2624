"""KL's per-window cache in probe mode (issue 25): under Probe Pruning a window's value depends on
its batch-mates and on the session's history, so a cached value is keyed by the mode's settings,
the batch size and the history's state, and reused only where that key says it is the same value."""

from __future__ import annotations

import pytest
import torch

from evoprune.evaluators import EvalContext, KLToDense
from evoprune.pruning import Pruner
from evoprune.space import Candidate, LayerConfig, ProbeSettings
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = (torch.arange(20_000) * 7919 + 13) % 97


def _setup(settings: ProbeSettings):
    model = tiny_model("llama")
    pruner = Pruner(model, IDS[:512].view(8, 64))
    pruner.set_mode("probe", settings)
    s = pruner.spec
    cand = Candidate(layers=(LayerConfig(num_kv_heads=s.num_kv_heads, q_per_kv=max(1, s.q_per_kv - 1),
                                         mlp_channels=s.intermediate_size // 2),) * s.num_layers)
    base = EvalContext(eval_ids=IDS, cache_dir=False, pruner=pruner)
    return model, pruner, cand, base


def _kl(model, pruner, cand, ctx, bs):
    ev = KLToDense(batch_size=bs)
    with pruner.applied(cand):
        return ev.evaluate(model, cand, ctx)


@pytest.mark.parametrize("momentum", [0.5, 1.0])
def test_a_window_scored_in_another_batch_composition_is_not_reused(momentum):
    model, pruner, cand, base = _setup(ProbeSettings(batch_ratio=0.25, momentum=momentum))
    ctx = base.for_stage("s", eval_tokens=512, seq_len=32)
    pruner.revert()
    KLToDense().prepare(model, ctx)
    first = _kl(model, pruner, cand, ctx, 8)  # 16 windows in batches of 8
    other = _kl(model, pruner, cand, ctx, 4)  # the same windows, batched by 4
    fresh_ctx = EvalContext(eval_ids=IDS, cache_dir=False, pruner=pruner).for_stage("s", eval_tokens=512, seq_len=32)
    pruner.revert()
    KLToDense().prepare(model, fresh_ctx)
    want = _kl(model, pruner, cand, fresh_ctx, 4)
    assert first.value != want.value  # the batch composition does change the value here
    assert other.value == want.value and "reused_tokens" not in other.details
    again = _kl(model, pruner, cand, ctx, 4)  # the same composition from a fresh apply: reused whole
    assert again.value == want.value and again.details["reused_tokens"] == 512


def test_history_state_and_static_values_are_not_reused():
    model, pruner, cand, base = _setup(ProbeSettings(batch_ratio=0.25, momentum=0.5))
    ctx = base.for_stage("s", eval_tokens=256, seq_len=32)
    pruner.set_mode("static")
    KLToDense().prepare(model, ctx)
    static = _kl(model, pruner, cand, ctx, 4)
    pruner.set_mode("probe", ProbeSettings(batch_ratio=0.25, momentum=0.5))
    probe = _kl(model, pruner, cand, ctx, 4)
    assert "reused_tokens" not in probe.details and probe.value != static.value
    ev = KLToDense(batch_size=4)
    with pruner.applied(cand):
        one = ev.evaluate(model, cand, ctx)  # fresh session: the cached value (no batch runs)
        with torch.no_grad():
            model(IDS[:128].view(4, 32), use_cache=False)  # a prefill batch moves the history
        two = ev.evaluate(model, cand, ctx)  # computed again after that batch, not the cached value
    assert one.value == probe.value and one.details["reused_tokens"] == 256
    assert "reused_tokens" not in two.details and two.value != one.value
    # nested windows: a larger stage does not reuse a prefix computed without the batches before it
    big = base.for_stage("s", eval_tokens=512, seq_len=32)
    pruner.revert()
    KLToDense().prepare(model, big)
    part = _kl(model, pruner, cand, big, 4)
    assert "reused_tokens" not in part.details
