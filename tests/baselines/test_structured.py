"""Wanda-sp and FLAP with bias compensation (issue 25): the published metrics choose the kept units,
the compensation keeps each layer's mean output, and the export loads as a standard checkpoint."""

from __future__ import annotations

import pytest
import torch

from evoprune.baselines import compensated, flap, input_means, structured_pruner, uniform, with_zero_biases
from evoprune.pruning import get_adapter, load_pruned
from evoprune.space import Budget, Candidate, LayerConfig, SearchSpace
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _calib(seed: int = 2) -> torch.Tensor:
    return torch.randint(3, 97, (4, 32), generator=torch.Generator().manual_seed(seed))


def test_wanda_sp_keeps_the_units_with_the_largest_published_score():
    model = tiny_model("llama")
    calib = _calib()
    adapter = get_adapter(model)
    o = model.get_submodule(adapter.layers)[0].self_attn.o_proj
    xs = []
    h = o.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(calib, use_cache=False)
    h.remove()
    x = torch.cat(xs).double()
    want = (x.pow(2).sum(0).sqrt() * o.weight.detach().double().abs().sum(0))  # ||X_j|| * sum_i |W_ij|
    heads = want.view(-1, model.config.head_dim).sum(-1)
    pruner = structured_pruner(model, calib, "wanda_sp")
    G = pruner.spec.num_kv_heads
    q = heads.view(G, -1)
    got = pruner.importance.q_head[0].double()
    torch.testing.assert_close(got, q.float().double(), rtol=1e-4, atol=1e-6)
    assert torch.equal(pruner.importance.kv_group[0], pruner.importance.q_head[0].sum(-1))


def test_flap_compensation_keeps_the_mean_output_and_exports_with_biases(tmp_path):
    dense = tiny_model("llama", num_hidden_layers=4)
    calib = _calib()
    model = with_zero_biases(dense)
    with torch.no_grad():
        torch.testing.assert_close(model(calib).logits, dense(calib).logits)  # zero biases: the same function
    pruner = structured_pruner(model, calib, "flap")
    space = SearchSpace.from_model(model.config, attention="q_per_group", mlp_step=8,
                                   budget=Budget(metric="params", max_ratio=0.7))
    cand = flap(space, pruner, calib)
    means = input_means(pruner, calib)
    sp = pruner.spec
    dense_lc = LayerConfig(num_kv_heads=sp.num_kv_heads, q_per_kv=sp.q_per_kv, mlp_channels=sp.intermediate_size)
    first = Candidate(layers=(LayerConfig(num_kv_heads=sp.num_kv_heads - 1, q_per_kv=sp.q_per_kv - 1,
                                                 mlp_channels=sp.intermediate_size),) + (dense_lc,) * (sp.num_layers - 1))
    a = get_adapter(model)
    o0 = pruner.model.get_submodule(a.layers)[0].self_attn.o_proj
    outs = {}
    h = o0.register_forward_hook(lambda m, i, out: outs.__setitem__("y", out.detach().double()))
    with torch.no_grad():
        pruner.model(calib)
        dense_mean = outs["y"].reshape(-1, outs["y"].shape[-1]).mean(0)
        with pruner.applied(first):
            pruner.model(calib)
            plain_mean = outs["y"].reshape(-1, outs["y"].shape[-1]).mean(0)
        with compensated(pruner, first, means) as m:
            m(calib)
            comp_mean = outs["y"].reshape(-1, outs["y"].shape[-1]).mean(0)
        with compensated(pruner, cand, means) as m:
            want = m(calib).logits
            pruner.export(cand, tmp_path / "flap")
    h.remove()
    # block 0's o_proj sees the dense inputs: compensated, its mean output is the dense one
    torch.testing.assert_close(comp_mean, dense_mean, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(plain_mean, dense_mean, atol=1e-5)
    assert float(o0.bias.detach().abs().max()) == 0.0  # biases back to zero on exit
    loaded = load_pruned(tmp_path / "flap")
    assert loaded.config.attention_bias and loaded.config.mlp_bias
    with torch.no_grad():
        torch.testing.assert_close(loaded(calib).logits, want, atol=1e-5, rtol=1e-5)


def test_uniform_wanda_sp_candidate_applies():
    model = tiny_model("qwen3")
    calib = _calib()
    pruner = structured_pruner(model, calib, "wanda_sp")
    space = SearchSpace.from_model(model.config, mlp_step=8, budget=Budget(metric="params", max_ratio=0.8))
    with pruner.applied(uniform(space)), torch.no_grad():
        assert torch.isfinite(pruner.model(calib).logits).all()


def test_bad_input_is_one_line():
    with pytest.raises(ValueError, match="needs a Llama model"):
        with_zero_biases(tiny_model("qwen3"))
    with pytest.raises(ValueError, match="must be one of"):
        structured_pruner(tiny_model("llama"), _calib(), "wanda")
    with pytest.raises(ValueError, match="pass calib_ids"):
        structured_pruner(tiny_model("llama"), None, "flap")

