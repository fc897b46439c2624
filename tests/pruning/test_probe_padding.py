"""Probe Pruning with padded batches (issue 25): the probe ranking, the probe's statistics and the
history update ignore padded tokens (from the attention mask), as the reference code's
``pad_tokens`` handling does, so a right-padded batch behaves as the same sequences unpadded."""

from __future__ import annotations

import pytest
import torch

from helpers import sibling_module
from tiny_models import tiny_model

from evoprune.pruning import Pruner
from evoprune.pruning._probe import select_probe
from evoprune.space import Candidate, LayerConfig, ProbeSettings

SETTINGS = ProbeSettings(seq_ratio=0.5, batch_ratio=0.5, momentum=0.9)


pytestmark = pytest.mark.usefixtures("one_thread")


_ids = sibling_module(__file__, "test_probe")._ids  # random token ids (n, seq) from a seed


def _setup(arch: str = "llama"):
    pruner = Pruner(tiny_model(arch), _ids(4, 16, 0))
    pruner.set_mode("probe", SETTINGS)
    s = pruner.spec
    lc = LayerConfig(num_kv_heads=max(1, s.num_kv_heads - 1), q_per_kv=max(1, s.q_per_kv - 1),
                     mlp_channels=s.intermediate_size // 2)
    return pruner, Candidate(layers=(lc,) * s.num_layers)


def _run(pruner, cand, batches):
    out = []
    with pruner.applied(cand), torch.no_grad():
        for ids, mask in batches:
            logits = pruner.model(ids, attention_mask=mask, use_cache=False).logits
            out.append((logits, pruner.probe.selections(), pruner.probe.history()))
    return out


def _same_state(a, b):
    for i, sel in a[1].items():
        for k, v in sel.items():
            assert torch.equal(v, b[1][i][k]), (i, k)
    for i, hist in a[2].items():
        for k, h in hist.items():
            torch.testing.assert_close(b[2][i][k], h, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_right_padded_batch_equals_unpadded(arch):
    pruner, cand = _setup(arch)
    real = [_ids(4, 12, 10), _ids(4, 12, 11)]
    plain = _run(pruner, cand, [(ids, None) for ids in real])
    pad = 20  # past the calibration history's 16 positions: padding must not grow it either
    padded = _run(pruner, cand, [(torch.cat([ids, torch.zeros(4, pad - 12, dtype=ids.dtype)], 1),
                                  torch.cat([torch.ones(4, 12, dtype=torch.long), torch.zeros(4, pad - 12, dtype=torch.long)], 1))
                                 for ids in real])
    for a, b in zip(plain, padded):
        torch.testing.assert_close(b[0][:, :12], a[0], atol=1e-4, rtol=1e-4)
        _same_state(a, b)
    # without the mask the padding does enter the probe and the history (what the mask prevents)
    unmasked = _run(pruner, cand, [(torch.cat([ids, torch.zeros(4, pad - 12, dtype=ids.dtype)], 1), None)
                                   for ids in real])
    assert any(h.shape[0] != plain[-1][2][i][k].shape[0] or not torch.allclose(h, plain[-1][2][i][k], atol=1e-5)
               for i, d in unmasked[-1][2].items() for k, h in d.items())


def test_pad_content_never_matters_with_mixed_lengths():
    pruner, cand = _setup()
    ids = _ids(4, 14, 12)
    lengths = torch.tensor([14, 9, 6, 11])
    mask = (torch.arange(14) < lengths[:, None]).long()
    a = _run(pruner, cand, [(ids.masked_fill(mask == 0, 0), mask)] * 2)
    b = _run(pruner, cand, [(ids.masked_fill(mask == 0, 7), mask)] * 2)
    for x, y in zip(a, b):
        torch.testing.assert_close(y[0][mask.bool()], x[0][mask.bool()], atol=1e-4, rtol=1e-4)
        _same_state(x, y)


def test_select_probe_skips_padding():
    residual = torch.randn(4, 10, 8)
    valid = torch.ones(4, 10, dtype=torch.bool)
    valid[:, 6:] = False  # four all-padding positions
    valid[3] = False  # an all-padding sequence
    residual[~valid] = 1e3  # huge padded activations would win the ranking unmasked
    seqs, pos = select_probe(residual, ProbeSettings(seq_ratio=0.5, batch_ratio=0.5), valid)
    assert int(pos.max()) < 6 and 3 not in seqs.tolist()
    assert len(pos) == 3 and len(seqs) == 2  # shares of the 6 real positions and 3 real sequences
    seqs_u, pos_u = select_probe(residual[:3, :6], ProbeSettings(seq_ratio=0.5, batch_ratio=0.5))
    assert torch.equal(pos, pos_u) and torch.equal(seqs, seqs_u)
