"""KL to dense and perplexity: exactness, monotonicity, top-k accuracy, caching."""

from __future__ import annotations

import math

import pytest
import torch

from evoprune.evaluators import (
    EvalContext,
    KLToDense,
    Perplexity,
    dense_reference,
    reference_nbytes,
)
from evoprune.pruning import Pruner
from helpers import calib, candidate
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # the shared 2 cores: one intra-op thread

IDS = (torch.arange(30_000) * 7919 + 13) % 97


@pytest.mark.parametrize("arch", ["llama", "qwen3", "phi3"])
def test_kl_of_dense_to_itself_is_zero(arch):
    model = tiny_model(arch)
    ctx = EvalContext(eval_ids=IDS, cache_dir=False).for_stage("s1", eval_tokens=512, seq_len=64)
    for ev in (KLToDense(), KLToDense(top_k=8)):
        ev.prepare(model, ctx)
        res = ev.evaluate(model, None, ctx)
        assert res.value == 0.0
        assert res.tokens == 512 and res.seconds > 0


def test_kl_needs_prepare_and_tokens():
    model = tiny_model("llama")
    ctx = EvalContext(eval_ids=IDS, cache_dir=False)
    with pytest.raises(ValueError, match="evaluation tokens"):
        KLToDense().evaluate(model, None, ctx)
    with pytest.raises(RuntimeError, match="prepare"):
        KLToDense().evaluate(model, None, ctx.for_stage("s", eval_tokens=128, seq_len=64))
    # an evaluator-specific token count draws its own set of the current stage
    own = KLToDense(num_tokens=128, seq_len=32)
    stage = ctx.for_stage("s")
    own.prepare(model, stage)
    assert own.evaluate(model, None, stage).tokens == 128


@pytest.fixture(scope="module")
def ref_pruned(ref_data):
    model = ref_data.model()
    pruner = Pruner(model, calib(ref_data.eval_ids))
    ctx = EvalContext(
        eval_ids=ref_data.eval_ids, data_fingerprint=ref_data.fingerprint, cache_dir=False, pruner=pruner
    ).for_stage("s1", eval_tokens=4096, seq_len=128)
    return model, pruner, ctx


def _kls(model, pruner, ctx, cands, evaluators):
    out = []
    for cand in cands:
        with pruner.applied(cand):
            out.append([ev.evaluate(model, cand, ctx).value for ev in evaluators])
    return out


def test_kl_grows_when_more_is_pruned(ref_pruned):
    model, pruner, ctx = ref_pruned
    spec = pruner.spec
    kl = KLToDense()
    kl.prepare(model, ctx)
    widths = [spec.intermediate_size, 3 * spec.intermediate_size // 4, spec.intermediate_size // 2,
              spec.intermediate_size // 4]
    by_width = [v[0] for v in _kls(model, pruner, ctx, [candidate(spec, mlp=w) for w in widths], [kl])]
    assert by_width[0] < 1e-7
    assert all(a < b for a, b in zip(by_width, by_width[1:])), by_width
    by_depth = [v[0] for v in _kls(model, pruner, ctx, [candidate(spec, drop=d) for d in ((), (2,), (1, 2))], [kl])]
    assert by_depth[0] < 1e-7
    assert all(a < b for a, b in zip(by_depth, by_depth[1:])), by_depth
    # KV heads too
    by_kv = [v[0] for v in _kls(model, pruner, ctx, [candidate(spec, kv=k) for k in (spec.num_kv_heads, 1)], [kl])]
    assert by_kv[0] < by_kv[1]


def test_topk_kl_agrees_with_full_kl(ref_pruned):
    """Top-k KL is a lower bound of the full KL; at k = vocab it equals it; at k = vocab/6 it is
    within 20 % (ratio >= 0.80 on this high-entropy tiny model) and ranks candidates alike."""
    model, pruner, ctx = ref_pruned
    spec = pruner.spec
    vocab = model.config.vocab_size
    evs = [KLToDense(), KLToDense(top_k=vocab), KLToDense(top_k=vocab // 6)]
    for ev in evs:
        ev.prepare(model, ctx)
    cands = [
        candidate(spec, mlp=spec.intermediate_size // 2),
        candidate(spec, drop=(2,)),
        candidate(spec, mlp=spec.intermediate_size // 4, drop=(1,)),
        candidate(spec, kv=1),
    ]
    rows = _kls(model, pruner, ctx, cands, evs)
    for full, all_k, top in rows:
        assert all_k == pytest.approx(full, rel=1e-5)
        assert top <= full * (1 + 1e-6)
        assert top >= 0.80 * full, (top, full)
    order = lambda col: sorted(range(len(rows)), key=lambda i: rows[i][col])  # noqa: E731
    assert order(0) == order(2)


def test_reference_memory_formula_and_disk_cache(tmp_path):
    model = tiny_model("llama")
    vocab = model.config.vocab_size
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    for top_k in (None, 5):
        ctx = EvalContext(eval_ids=IDS, cache_dir=tmp_path, seed=1).for_stage("s", eval_tokens=256, seq_len=64)
        ev = KLToDense(top_k=top_k, batch_size=3)
        ev.prepare(model, ctx)
        ref = dense_reference(model, ctx, ctx.tokens, top_k=top_k, compute=False)
        assert ref.nbytes == reference_nbytes(256, vocab, top_k)
        files = sorted(tmp_path.glob("dense-*.pt"))
        assert len(files) == (1 if top_k is None else 2)
        n_forward = len(calls)
        # a second worker (new context, same data/seed/model) loads the file instead of running the model
        other = EvalContext(eval_ids=IDS.clone(), cache_dir=tmp_path, seed=1).for_stage("s", eval_tokens=256, seq_len=64)
        ev.prepare(model, other)
        assert len(calls) == n_forward
        again = dense_reference(model, other, other.tokens, top_k=top_k, compute=False)
        assert again.tensors().keys() == ref.tensors().keys()
        assert all(torch.equal(a, b) for a, b in zip(again.tensors().values(), ref.tensors().values()))
    # a corrupt cache file is ignored and rewritten
    for f in tmp_path.glob("dense-*.pt"):
        f.write_bytes(b"garbage")
    ctx = EvalContext(eval_ids=IDS, cache_dir=tmp_path, seed=1).for_stage("s", eval_tokens=256, seq_len=64)
    KLToDense().prepare(model, ctx)
    assert KLToDense().evaluate(model, None, ctx).value == 0.0
    # a different seed is a different token set, hence a different file
    ctx2 = EvalContext(eval_ids=IDS, cache_dir=tmp_path, seed=2).for_stage("s", eval_tokens=256, seq_len=64)
    KLToDense().prepare(model, ctx2)
    assert len(list(tmp_path.glob("dense-*full*.pt"))) == 2
    assert reference_nbytes(65536, 128256, 256) == 65536 * (256 * 8 + 4)


def test_perplexity_matches_model_loss():
    model = tiny_model("qwen2")
    ctx = EvalContext(eval_ids=IDS, cache_dir=False).for_stage("s", eval_tokens=512, seq_len=64)
    res = Perplexity(batch_size=3).evaluate(model, None, ctx)
    with torch.no_grad():
        loss = model(input_ids=ctx.tokens.ids, labels=ctx.tokens.ids).loss
    assert res.value == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert res.tokens == 512 and Perplexity.direction == "minimize"
