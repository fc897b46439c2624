"""Healing by distillation: KL to the dense teacher (computed with the candidate reverted, no model copy)."""

from __future__ import annotations

import pytest
import torch

from evoprune.evaluators import EvalContext, KLToDense, Stage, finetune
from evoprune.evaluators._distill import _teacher_batch, distill_loss, teacher_reference
from evoprune.pruning import Pruner
from helpers import bits, calib, candidate

pytestmark = pytest.mark.usefixtures("one_thread")


def _snapshot(model):
    return {n: bits(p) for n, p in model.state_dict(keep_vars=True).items()}


def test_distill_loss_is_the_kl_and_zero_on_the_teacher():
    g = torch.Generator().manual_seed(0)
    t_logits, s_logits = torch.randn(2, 5, 40, generator=g), torch.randn(2, 5, 40, generator=g)
    for temp in (1.0, 2.0):
        full = _teacher_batch(t_logits, None, temp)
        p = torch.softmax(t_logits / temp, -1)
        want = (p * (p.log() - torch.log_softmax(s_logits / temp, -1))).sum(-1).mean() * temp**2
        assert float(distill_loss(s_logits, full)) == pytest.approx(float(want), rel=1e-5)
        assert float(distill_loss(t_logits, full)) == pytest.approx(0.0, abs=1e-6)
        # top-k: the (k+1)-way KL, a lower bound of the full one, equal to it at k = vocab - 1
        top = _teacher_batch(t_logits, 8, temp)
        assert 0 <= float(distill_loss(s_logits, top)) <= float(want) + 1e-6
        assert float(distill_loss(t_logits, top)) == pytest.approx(0.0, abs=1e-5)
        almost = _teacher_batch(t_logits, 39, temp)
        assert float(distill_loss(s_logits, almost)) == pytest.approx(float(want), rel=1e-4)


def test_kd_heals_kl_to_dense_more_than_ce_at_equal_tokens(ref_data):
    """The issue's direction test: on the tiny reference model, 4096 tokens of KL healing lower the KL to
    the dense model more than 4096 tokens of next-token healing (same seed, windows, lr); the dense weights
    come back bit for bit and the teacher is computed from the live model (no copy)."""
    torch.manual_seed(0)
    model = ref_data.model()
    pruner = Pruner(model, calib(ref_data.eval_ids))
    spec = pruner.spec
    dense = _snapshot(model)
    ctx = EvalContext(eval_ids=ref_data.eval_ids, train_ids=ref_data.train_ids, cache_dir=False,
                      pruner=pruner, seed=0).for_stage("heal", eval_tokens=2048, seq_len=128)
    kl = KLToDense()
    kl.prepare(model, ctx)
    cand = candidate(spec, mlp=spec.intermediate_size // 4, drop=(1,))
    after: dict[str, float] = {}
    with pruner.applied(cand):
        before = kl.evaluate(model, cand, ctx).value
        for loss in ("ce", "kl", "kl+ce"):
            with finetune(model, ctx, tokens=4096, lr=1e-3, batch_size=8, loss=loss, verify="exact") as rep:
                after[loss] = kl.evaluate(model, cand, ctx).value
                assert rep.loss == loss and rep.tokens == 4096
                assert (rep.teacher_bytes > 0) == (loss != "ce")
            assert pruner.candidate == cand
    _assert = _snapshot(model)
    assert all(torch.equal(_assert[n], dense[n]) for n in dense)
    assert after["kl"] < after["ce"] < before, (before, after)
    assert after["kl+ce"] < before


def test_teacher_is_the_dense_model_and_cached_per_token_set(ref_data):
    model = ref_data.model()
    pruner = Pruner(model, calib(ref_data.eval_ids))
    spec = pruner.spec
    ctx = EvalContext(train_ids=ref_data.train_ids, cache_dir=False, pruner=pruner, seed=1)
    tokens = ctx.for_stage("t", seq_len=64).token_set(512, 64, split="train")
    with torch.no_grad():
        dense_logits = torch.cat([model(input_ids=b).logits for b in tokens.batches(4)])
    cand = candidate(spec, mlp=spec.intermediate_size // 2, drop=(0,))
    with pruner.applied(cand):
        ref = teacher_reference(model, ctx, tokens, temperature=2.0, top_k=None, batch_size=4)
        assert pruner.candidate == cand  # applied again
        assert ref.indices is None and ref.nbytes == tokens.num_tokens * ref.logprobs.shape[-1] * 4
        torch.testing.assert_close(ref.logprobs, torch.log_softmax(dense_logits / 2.0, -1), rtol=1e-5, atol=1e-5)
        assert teacher_reference(model, ctx, tokens, temperature=2.0, top_k=None) is ref
        top = teacher_reference(model, ctx, tokens, temperature=1.0, top_k=16)
        assert top.indices.shape[-1] == 16 and top.nbytes == tokens.num_tokens * (16 * 8 + 4)


def test_bad_distillation_input_is_one_line(ref_data):
    model = ref_data.model()
    ctx = EvalContext(train_ids=ref_data.train_ids, cache_dir=False, seed=1)  # no pruner: no dense teacher
    with pytest.raises(ValueError, match="need the dense teacher"):
        with finetune(model, ctx, tokens=256, seq_len=64, loss="kl"):
            pass
    for kwargs, msg in (({"loss": "mse"}, "loss must be one of ce, kl, kl\\+ce"),
                        ({"loss": "kl", "temperature": 0}, "temperature must be a positive"),
                        ({"loss": "kl", "top_k": 0}, "top_k must be")):
        with pytest.raises(ValueError, match=msg) as exc:
            with finetune(model, ctx, tokens=256, seq_len=64, **kwargs):
                pass
        assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="loss must be one of"):
        Stage(name="s", evaluators=[KLToDense()], eval_tokens=64, finetune_tokens=64, finetune={"loss": "kld"})


def test_study_config_refuses_a_bad_distillation_loss():
    from evoprune.search import StudyConfig

    base = {"model": "x", "stages": [{"name": "s", "finetune_tokens": 64, "finetune": {"loss": "kl", "temperature": -1}}]}
    with pytest.raises(ValueError, match=r"stages\['s'\].finetune: temperature must be"):
        StudyConfig.from_dict(base)
