"""Fine-tuning an applied candidate: it learns, pruned stays pruned, dense comes back bit for bit."""

from __future__ import annotations

import pytest
import torch

from evoprune.evaluators import (
    EvalContext,
    FineTuned,
    KLToDense,
    finetune,
    select_trainable,
)
from evoprune.pruning import Pruner
from helpers import bits, calib, candidate
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # the shared 2 cores: one intra-op thread


def _snapshot(model):
    return {n: bits(p) for n, p in model.state_dict(keep_vars=True).items()}


def _assert_same(model, snap):
    now = _snapshot(model)
    assert now.keys() == snap.keys()
    changed = [n for n in snap if not torch.equal(now[n], snap[n])]
    assert not changed, changed


def _loss(model, token_set):
    with torch.no_grad():
        losses = [model(input_ids=b, labels=b).loss for b in token_set.batches(16)]
    return float(torch.stack(losses).mean())


def _full_storage(p: torch.Tensor, shape) -> torch.Tensor:
    """The whole dense tensor behind a prefix-slice view (storage offset 0, contiguous dense)."""
    return torch.empty(0, dtype=p.dtype).set_(p.untyped_storage(), 0, shape)


def test_finetune_learns_keeps_pruned_structure_and_restores_dense(ref_data):
    model = ref_data.model()
    pruner = Pruner(model, calib(ref_data.eval_ids))
    spec = pruner.spec
    dense = _snapshot(model)
    # dense weights by storage: views of the applied model are renamed when blocks are dropped
    by_storage = {p.untyped_storage().data_ptr(): (n, p.shape) for n, p in model.named_parameters()}
    ctx = EvalContext(
        eval_ids=ref_data.eval_ids, train_ids=ref_data.train_ids, data_fingerprint=ref_data.fingerprint,
        cache_dir=False, pruner=pruner,
    ).for_stage("s2", eval_tokens=1024, seq_len=128)
    cand = candidate(spec, mlp=spec.intermediate_size // 2, kv=1, sparsity=0.5, drop=(2,))
    train_set = ctx.token_set(8192, 128, split="train")
    with pruner.applied(cand):
        masks = pruner.masks
        assert masks, "candidate has sparse linears"
        views = {
            by_storage[p.untyped_storage().data_ptr()]: p
            for p in model.parameters()
            if p.shape != by_storage[p.untyped_storage().data_ptr()][1]
        }
        assert views, "candidate has sliced linears"
        applied = _snapshot(model)
        before = _loss(model, train_set)
        with finetune(model, ctx, tokens=8192, lr=2e-3, batch_size=8, verify="exact") as report:
            after = _loss(model, train_set)
            assert report.steps == 8 and report.tokens == 8192 and len(report.losses) == 8
            # it learned
            assert after < before - 0.02, (before, after)
            # sparsity zeros stay exactly zero (the stored weights, not just the forward's product)
            for w, m in masks.items():
                assert torch.count_nonzero(w.detach()[~m]) == 0
            # pruned rows/columns were not touched: outside its kept slice each dense weight is as before
            for (n, shape), p in views.items():
                full = _full_storage(p, shape)
                kept = torch.zeros(shape, dtype=torch.bool)
                kept[tuple(slice(0, s) for s in p.shape)] = True
                ref = dense[n].view(p.dtype).view(shape)
                assert torch.equal(full[~kept], ref[~kept]), n
                assert not torch.equal(full[kept], ref[kept]), n  # and inside it training did write
            # the live structure is still the candidate's
            assert pruner.candidate == cand
            assert all(p.grad is None for p in model.parameters())
        # fine-tune undone: the applied model is bit for bit what it was
        _assert_same(model, applied)
        assert _loss(model, train_set) == pytest.approx(before, abs=0)
    _assert_same(model, dense)
    assert all(p.requires_grad for p in model.parameters())


def test_finetune_selected_parameters_only(ref_data):
    model = ref_data.model()
    pruner = Pruner(model, calib(ref_data.eval_ids))
    spec = pruner.spec
    ctx = EvalContext(train_ids=ref_data.train_ids, cache_dir=False, pruner=pruner, seed=3)
    cand = candidate(spec, mlp=spec.intermediate_size // 2)
    with pruner.applied(cand):
        chosen = dict(select_trainable(model, pruner=pruner, train="norms+lm_head", layers=[1]))
        assert "lm_head.weight" in chosen and "model.norm.weight" in chosen
        assert "model.layers.0.input_layernorm.weight" in chosen
        assert "model.layers.1.mlp.up_proj.weight" in chosen
        assert "model.layers.0.mlp.up_proj.weight" not in chosen
        assert "model.embed_tokens.weight" not in chosen
        before = _snapshot(model)
        with finetune(model, ctx, tokens=1024, seq_len=128, lr=1e-3, batch_size=4, train="norms+lm_head",
                      layers=[1]):
            now = _snapshot(model)
            changed = {n for n in before if not torch.equal(now[n], before[n])}
        assert changed and changed <= set(chosen), changed - set(chosen)
        assert "model.layers.1.mlp.up_proj.weight" in changed
        _assert_same(model, before)
    with pytest.raises(ValueError, match="train must be"):
        select_trainable(model, train="everything")


def test_finetune_half_precision_uses_master_weights_and_restores():
    model = tiny_model("llama", dtype=torch.bfloat16)
    ids = (torch.arange(20_000) * 31 + 7) % 97
    ctx = EvalContext(eval_ids=ids, train_ids=ids, cache_dir=False)
    snap = _snapshot(model)
    with finetune(model, ctx, tokens=512, seq_len=64, lr=1e-2, batch_size=4) as report:
        assert report.steps == 2
        assert any(not torch.equal(bits(p), snap[n]) for n, p in model.named_parameters())
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    _assert_same(model, snap)


def test_finetuned_wrapper_scores_the_finetuned_candidate(ref_data):
    model = ref_data.model()
    pruner = Pruner(model, calib(ref_data.eval_ids))
    spec = pruner.spec
    ctx = EvalContext(
        eval_ids=ref_data.eval_ids, train_ids=ref_data.train_ids, cache_dir=False, pruner=pruner
    ).for_stage("s", eval_tokens=1024, seq_len=128)
    kl = KLToDense()
    wrapped = FineTuned([kl], tokens=4096, lr=1e-3, batch_size=8)
    wrapped.prepare(model, ctx)
    assert wrapped.direction == "minimize" and wrapped.name == "finetuned_kl"
    cand = candidate(spec, mlp=spec.intermediate_size // 4, drop=(1,))
    with pruner.applied(cand):
        plain = kl.evaluate(model, cand, ctx).value
        pairs = wrapped.evaluate_all(model, cand, ctx)
        assert [n for n, _ in pairs] == ["finetune", "kl"]
        assert pairs[0][1].tokens == 4096 and pairs[1][1].details["finetune_tokens"] == 4096
        tuned = pairs[1][1].value
        assert tuned != plain
        # undone: scoring again without fine-tune gives the same value as before
        assert kl.evaluate(model, cand, ctx).value == plain
        res = wrapped.evaluate(model, cand, ctx)
        assert res.value == tuned and "finetune" in res.details


def test_finetune_stops_on_a_non_finite_loss_and_restores(ref_data):
    """NaN/inf loss (here: a learning rate that blows the weights up) stops the fine-tune early, and
    the model gets its exact weights back; the stage then scores a non-finite value (the trial fails)."""
    import math

    model = ref_data.model()
    pruner = Pruner(model, calib(ref_data.eval_ids))
    spec = pruner.spec
    dense = _snapshot(model)
    ctx = EvalContext(
        eval_ids=ref_data.eval_ids, train_ids=ref_data.train_ids, data_fingerprint=ref_data.fingerprint,
        cache_dir=False, pruner=pruner,
    ).for_stage("s2", eval_tokens=1024, seq_len=128)
    cand = candidate(spec, mlp=spec.intermediate_size // 2, kv=1, sparsity=0.5, drop=(2,))
    with pruner.applied(cand):
        applied = _snapshot(model)
        with finetune(model, ctx, tokens=8192, lr=1e30, batch_size=8, max_grad_norm=None,
                      verify="exact") as report:
            assert report.steps < 8 and not math.isfinite(report.losses[-1])
        _assert_same(model, applied)
    _assert_same(model, dense)
