"""Large vocabularies: ``KLToDense(top_k="auto")`` switches to top-k KL and the dense-reference memory is bounded."""

from __future__ import annotations

import pytest
import torch

from evoprune.evaluators import EvalContext, KLToDense, dense_reference, reference_nbytes
from evoprune.evaluators._kl import AUTO_FULL_MAX_VOCAB, AUTO_TOP_K, resolve_top_k
from evoprune.pruning import Pruner
from helpers import candidate
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # the shared 2 cores: one intra-op thread

VOCAB = 20_000  # > AUTO_FULL_MAX_VOCAB


@pytest.fixture(scope="module")
def big_vocab():
    """A tiny Llama with a 20k vocabulary whose output head is scaled so next-token distributions are peaked
    (entropy of a few nats, like a trained LM's, not the near-uniform output of random init)."""
    torch.set_num_threads(1)
    model = tiny_model("llama", vocab_size=VOCAB)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.multinomial(1.0 / torch.arange(1, VOCAB + 1).double(), 12_000, replacement=True, generator=gen)
    pruner = Pruner(model, ids[: 8 * 32].view(8, 32))
    return model, pruner, ids


def test_auto_rule():
    assert VOCAB > AUTO_FULL_MAX_VOCAB
    assert resolve_top_k("auto", 768, 65536) is None
    assert resolve_top_k("auto", 49152, 512) == AUTO_TOP_K
    assert resolve_top_k("auto", 100, 512) is None and resolve_top_k(8, 49152, 512) == 8
    # below the vocabulary threshold, but the full reference would break the byte bound
    assert resolve_top_k("auto", 4096, 65536, limit=reference_nbytes(65536, 4096) - 1) == AUTO_TOP_K
    with pytest.raises(ValueError, match="top_k must be"):
        KLToDense(top_k="all")


def test_topk_kl_approximates_full_kl_on_a_large_vocabulary(big_vocab):
    model, pruner, ids = big_vocab
    ctx = EvalContext(eval_ids=ids, cache_dir=False, pruner=pruner).for_stage("s", eval_tokens=1024, seq_len=64)
    full, auto = KLToDense(top_k=None), KLToDense()
    for ev in (full, auto):
        ev.prepare(model, ctx)
    spec = pruner.spec
    cands = [candidate(spec, mlp=spec.intermediate_size // 2), candidate(spec, drop=(2,)), candidate(spec, kv=1),
             candidate(spec, mlp=spec.intermediate_size // 4, drop=(1,))]
    rows = []
    for cand in cands:
        with pruner.applied(cand):
            f, a = (ev.evaluate(model, cand, ctx) for ev in (full, auto))
        assert a.details["top_k"] == AUTO_TOP_K and f.details["top_k"] is None
        rows.append((f.value, a.value))
    for f, a in rows:
        assert a <= f * (1 + 1e-6)  # the (k+1)-bucket coarsening can only lower the KL
        assert a >= 0.75 * f, rows
    rank = lambda col: sorted(range(len(rows)), key=lambda i: rows[i][col])  # noqa: E731
    assert rank(0) == rank(1)
    # memory per token: 256 * 8 + 4 bytes instead of 20k * 4 + 8
    ref = dense_reference(model, ctx, ctx.tokens, top_k=AUTO_TOP_K, compute=False)
    assert ref.nbytes == reference_nbytes(1024, VOCAB, AUTO_TOP_K) < reference_nbytes(1024, VOCAB) / 30


def test_dense_reference_memory_is_bounded_and_reloads_from_disk(big_vocab, tmp_path):
    model, pruner, ids = big_vocab
    per_set = reference_nbytes(512, VOCAB, AUTO_TOP_K)
    bound = int(1.5 * per_set)  # room for one token set, not two
    base = EvalContext(eval_ids=ids, cache_dir=tmp_path, pruner=pruner)
    stages = [base.for_stage(name, eval_tokens=512, seq_len=64) for name in ("s1", "s2", "s3")]
    kl = KLToDense(max_cache_bytes=bound)
    mem = base.shared.setdefault("dense_reference", {})
    for ctx in stages:
        kl.prepare(model, ctx)
        assert sum(r.nbytes for r in mem.values()) <= bound
    assert len(mem) == 1 and len(list(tmp_path.glob("dense-*.pt"))) == 3
    cand = candidate(pruner.spec, mlp=pruner.spec.intermediate_size // 2)
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pruner.applied(cand):
            first = kl.evaluate(model, cand, stages[0]).value  # evicted: memory-mapped back from disk
            n = len(calls)
            assert kl.evaluate(model, cand, stages[0]).tokens == 0 and len(calls) == n  # per-window cache
            base.shared.pop("kl_windows")
            again = kl.evaluate(model, cand, stages[0]).value
    finally:
        hook.remove()
    assert first == again > 0
    assert len(calls) == 2 * n  # evaluation forwards only: no dense forward was rerun
    assert sum(r.nbytes for r in mem.values()) <= bound
    # without a disk cache an evicted reference is an error that says what to do
    nodisk = EvalContext(eval_ids=ids, cache_dir=False, pruner=pruner)
    a, b = (nodisk.for_stage(n, eval_tokens=512, seq_len=64) for n in ("a", "b"))
    kl.prepare(model, a)
    kl.prepare(model, b)
    with pruner.applied(cand), pytest.raises(RuntimeError, match="prepare"):
        kl.evaluate(model, cand, a)
