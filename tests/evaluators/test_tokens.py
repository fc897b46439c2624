"""Token sets and promotion rules: pure functions, no models."""

from __future__ import annotations

import math

import pytest
import torch

from evoprune.evaluators import EvalContext, TokenSet, TopFraction, TopK, make_token_set


IDS = (torch.arange(20_000) * 7919) % 1013


def test_token_set_deterministic_and_shaped():
    a = make_token_set(IDS, num_tokens=1000, seq_len=64, stage="s1", seed=3, data_fingerprint="fp")
    b = make_token_set(IDS.clone(), num_tokens=1000, seq_len=64, stage="s1", seed=3, data_fingerprint="fp")
    assert isinstance(a, TokenSet)
    assert a.ids.shape == (16, 64) and a.ids.dtype == torch.long  # ceil(1000 / 64)
    assert torch.equal(a.ids, b.ids) and a.key == b.key
    assert a.num_tokens == 1024 and a.seq_len == 64 and a.num_sequences == 16
    # every row is a contiguous window of the data, and windows do not overlap
    starts = []
    for row in a.ids:
        hits = [s for s in range(0, IDS.numel() - 63, 64) if torch.equal(IDS[s : s + 64], row)]
        assert len(hits) == 1
        starts.append(hits[0])
    assert len(set(starts)) == len(starts)


def test_token_sets_differ_across_stage_seed_and_data():
    base = make_token_set(IDS, num_tokens=640, seq_len=64, stage="s1", seed=0, data_fingerprint="fp")
    for other in (
        make_token_set(IDS, num_tokens=640, seq_len=64, stage="s2", seed=0, data_fingerprint="fp"),
        make_token_set(IDS, num_tokens=640, seq_len=64, stage=1, seed=0, data_fingerprint="fp"),
        make_token_set(IDS, num_tokens=640, seq_len=64, stage="s1", seed=1, data_fingerprint="fp"),
        make_token_set(IDS, num_tokens=640, seq_len=64, stage="s1", seed=0, data_fingerprint="other"),
    ):
        assert not torch.equal(base.ids, other.ids)
        assert base.key != other.key


def test_token_set_more_tokens_extends_fewer():
    small = make_token_set(IDS, num_tokens=320, seq_len=64, stage="s", seed=0)
    large = make_token_set(IDS, num_tokens=3200, seq_len=64, stage="s", seed=0)
    assert torch.equal(large.ids[: small.num_sequences], small.ids)
    # the fingerprint defaults to a digest of the data
    assert small.data_fingerprint == make_token_set(IDS, num_tokens=64, seq_len=64, stage="x").data_fingerprint


def test_token_set_is_independent_of_global_rng():
    torch.manual_seed(0)
    a = make_token_set(IDS, num_tokens=640, seq_len=64, stage="s", seed=0)
    torch.manual_seed(123)
    torch.rand(10)
    b = make_token_set(IDS, num_tokens=640, seq_len=64, stage="s", seed=0)
    assert torch.equal(a.ids, b.ids)


def test_token_set_errors():
    with pytest.raises(ValueError, match="1-D"):
        make_token_set(IDS.view(2, -1), num_tokens=10, seq_len=5, stage="s")
    with pytest.raises(ValueError, match="only 20000 tokens"):
        make_token_set(IDS, num_tokens=30_000, seq_len=100, stage="s")
    with pytest.raises(ValueError, match="integer"):
        make_token_set(IDS.float(), num_tokens=10, seq_len=5, stage="s")


def test_context_token_sets_per_stage_and_split():
    ctx = EvalContext(eval_ids=IDS, train_ids=IDS.flip(0), seed=5)
    s1 = ctx.for_stage("s1", eval_tokens=512, seq_len=64)
    s2 = ctx.for_stage("s2", eval_tokens=512, seq_len=64)
    assert s1.tokens.ids.shape == (8, 64)
    assert not torch.equal(s1.tokens.ids, s2.tokens.ids)
    assert s1.token_set(512, 64) is s1.tokens  # cached, shared
    assert s1.shared is ctx.shared
    train = s1.token_set(512, 64, split="train")
    assert train.key != s1.tokens.key
    # a second worker with the same data and seed draws the same sets
    other = EvalContext(eval_ids=IDS.clone(), train_ids=IDS.flip(0).clone(), seed=5)
    assert other.for_stage("s1", eval_tokens=512, seq_len=64).tokens.key == s1.tokens.key
    with pytest.raises(ValueError, match="train_ids"):
        EvalContext(eval_ids=IDS).token_set(64, 64, split="train")


# --------------------------------------------------------------------------- promotion rules


def test_topk_select_batch_local():
    assert TopK(2).select([0.3, 0.1, 0.2, 0.4]) == [False, True, True, False]
    assert TopK(2).select([0.3, 0.1, 0.2, 0.4], direction="maximize") == [True, False, False, True]
    # ties are broken by position so exactly k are promoted
    assert TopK(2).select([0.1, 0.1, 0.1]) == [True, True, False]
    assert TopK(5).select([0.2, 0.1]) == [True, True]
    # NaN is always worst
    assert TopK(1).select([math.nan, 5.0]) == [False, True]
    assert TopK(1).select([math.nan, -5.0], direction="maximize") == [False, True]


def test_topfraction_from_history_matches_batch_decision():
    values = [0.9, 0.2, 0.5, 0.7, 0.1, 0.3, 0.8, 0.4]
    rule = TopFraction(0.25)
    # streaming: each value judged against everything seen before it
    streamed = [rule.promotes(v, values[:i]) for i, v in enumerate(values)]
    # 0.9 is the first ever seen (limit 1 of 1) -> promoted; 0.2 best of 2 -> promoted; ...
    assert streamed == [True, True, False, False, True, False, False, False]
    # batch with all values seen: exactly ceil(0.25 * 8) = 2 promoted, the best two
    assert rule.select(values) == [v in (0.1, 0.2) for v in values]
    assert rule.limit(8) == 2 and rule.limit(1) == 1 and TopFraction(0.5, min_count=3).limit(2) == 3
    # a batch ranked together with a history from a shared database
    assert rule.select([0.05, 0.6], history=[0.1, 0.2, 0.3, 0.4, 0.5, 0.7]) == [True, False]
    assert TopK(1).promotes(0.2, [0.3, 0.4]) and not TopK(1).promotes(0.35, [0.3, 0.4])
    assert TopK(1).promotes(0.3, [0.3])  # ties go to the newcomer


def test_rule_validation():
    with pytest.raises(ValueError):
        TopK(0)
    with pytest.raises(ValueError):
        TopFraction(0.0)
    with pytest.raises(ValueError):
        TopFraction(1.5)
    with pytest.raises(ValueError, match="direction"):
        TopK(1).select([1.0], direction="up")
