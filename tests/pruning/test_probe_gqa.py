"""Probe Pruning's two GQA treatments (issue 25): ``gqa: groups`` (KV groups kept whole or not at
all, K/V shrink) and ``gqa: reference`` (the reference code: K/V whole, query heads anywhere)."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import sibling_module
from tiny_models import ARCHS, tiny_model

from evoprune.pruning import Pruner, get_adapter, load_pruned
from evoprune.space import Candidate, LayerConfig, ProbeSettings

REF = ProbeSettings(seq_ratio=0.5, batch_ratio=0.5, momentum=0.9, gqa="reference")


pytestmark = pytest.mark.usefixtures("one_thread")


_ids = sibling_module(__file__, "test_probe")._ids  # random token ids (n, seq) from a seed


def _attn_only(spec, kv: int, q: int) -> Candidate:
    return Candidate(layers=(LayerConfig(num_kv_heads=kv, q_per_kv=q, mlp_channels=spec.intermediate_size),)
                     * spec.num_layers)


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_keeps_kv_whole_and_equals_dense_without_the_dropped_heads(arch):
    """With K/V whole, dropping query heads is the dense model with those heads' o_proj columns zeroed."""
    pruner = Pruner(tiny_model(arch), _ids(4, 16, 0))
    pruner.set_mode("probe", REF)
    spec, adapter = pruner.spec, get_adapter(arch)
    cand = _attn_only(spec, max(1, spec.num_kv_heads - 1), spec.q_per_kv)  # fewer query heads than dense
    ids = _ids(4, 12, 3)
    with pruner.applied(cand), torch.no_grad():
        got = pruner.model(ids, use_cache=False).logits
        sel = pruner.probe.selections()
        k_out = {}
        name = adapter.qkv or adapter.k
        mod = pruner.model.get_submodule(adapter.layers)[0]
        lin = getattr(getattr(mod, adapter.attn), name)
        h = lin.register_forward_hook(lambda m, a, o: k_out.__setitem__("w", o.shape[-1]))
        with pruner.probe.hold():
            pruner.model(ids, use_cache=False)
        h.remove()
    n = cand.layers[0].num_q_heads
    hd = spec.head_dim
    # each kept query head gets its own group's K/V (computed whole, repeated per head)
    assert k_out["w"] == (3 * n * hd if adapter.qkv else n * hd)
    dense = copy.deepcopy(pruner.model)
    layers = dense.get_submodule(adapter.layers)
    uneven = False
    for i, layer in enumerate(layers):
        heads = sel[i]["heads"]
        assert heads.numel() == n and torch.equal(heads, heads.sort().values)
        counts = torch.bincount(heads // spec.q_per_kv, minlength=spec.num_kv_heads)
        uneven |= bool((counts[counts > 0] != counts[counts > 0][0]).any()) or int((counts > 0).sum()) != cand.layers[i].num_kv_heads
        o = getattr(getattr(layer, adapter.attn), adapter.o)
        drop = torch.ones(spec.num_heads, dtype=torch.bool)
        drop[heads] = False
        with torch.no_grad():
            o.weight[:, drop.repeat_interleave(hd)] = 0
    with torch.no_grad():
        want = dense(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    if arch == "llama":
        assert uneven  # heads chosen anywhere: not the groups mode's structure


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_reference_cached_decoding_equals_recomputation(arch):
    pruner = Pruner(tiny_model(arch), _ids(4, 16, 0))
    pruner.set_mode("probe", REF)
    spec = pruner.spec
    cand = _attn_only(spec, 1, spec.q_per_kv).replace_layer(0, mlp_channels=spec.intermediate_size // 2)
    prompt = _ids(2, 9, 7)
    with pruner.applied(cand), torch.no_grad():
        out = pruner.model(prompt, use_cache=True)
        cache, steps, tokens = out.past_key_values, [out.logits[:, -1]], [prompt]
        for _ in range(3):
            nxt = steps[-1].argmax(-1, keepdim=True)
            tokens.append(nxt)
            out = pruner.model(nxt, cache=cache, use_cache=True)
            steps.append(out.logits[:, -1])
            cache = out.past_key_values
        with pruner.probe.hold():
            full = pruner.model(torch.cat(tokens, 1), use_cache=False).logits
    torch.testing.assert_close(torch.stack(steps, 1), full[:, prompt.shape[1] - 1:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("gqa", ["groups", "reference"])
def test_both_gqa_modes_export_and_reload_exactly(gqa, tmp_path):
    settings = ProbeSettings(seq_ratio=0.5, batch_ratio=0.5, momentum=0.9, gqa=gqa)
    pruner = Pruner(tiny_model("qwen2"), _ids(4, 16, 0))
    pruner.set_mode("probe", settings)
    s = pruner.spec
    cand = Candidate(layers=(LayerConfig(num_kv_heads=1, q_per_kv=s.q_per_kv, mlp_channels=s.intermediate_size // 2),)
                     * s.num_layers)
    batches = [_ids(4, 12, 20), _ids(4, 12, 21)]
    with pruner.applied(cand), torch.no_grad():
        want = [pruner.model(b, use_cache=False).logits for b in batches]
        sel = pruner.probe.selections()
    pruner.export(cand, tmp_path / "pp")
    loaded = load_pruned(tmp_path / "pp")
    assert loaded.evoprune_pruner.probe.settings == settings
    assert ("gqa" in loaded.config.evoprune["probe"]) == (gqa == "reference")
    with torch.no_grad():
        got = [loaded(b, use_cache=False).logits for b in batches]
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    again = loaded.evoprune_pruner.probe.selections()
    assert all(torch.equal(sel[i]["heads"], again[i]["heads"]) for i in sel)


def test_gqa_setting_is_checked():
    with pytest.raises(ValueError, match="gqa must be one of"):
        ProbeSettings(gqa="heads")
    assert ProbeSettings.from_dict({"gqa": "reference"}).gqa == "reference"


def test_history_only_scoring_runs_no_probe_and_ranks_by_the_history():
    settings = ProbeSettings(batch_ratio=0.5, use_probe=False)
    pruner = Pruner(tiny_model("llama"), _ids(4, 16, 0))
    pruner.set_mode("probe", settings)
    s = pruner.spec
    cand = Candidate(layers=(LayerConfig(num_kv_heads=s.num_kv_heads, q_per_kv=s.q_per_kv,
                                         mlp_channels=s.intermediate_size // 2),) * s.num_layers)
    hist = {i: d["down"] for i, d in pruner.probe.calib_history.items()}
    with pruner.applied(cand), torch.no_grad():
        pruner.model(_ids(2, 12, 5), use_cache=False)
        sel = pruner.probe.selections()
    adapter = get_adapter("llama")
    for i, layer in enumerate(pruner.model.get_submodule(adapter.layers)):
        w = getattr(getattr(layer, adapter.mlp), adapter.down).weight.float()
        x2 = hist[i][:12].sum(0)
        want = torch.topk(torch.linalg.vector_norm(x2[None] * w.pow(2), dim=0), s.intermediate_size // 2).indices.sort().values
        assert torch.equal(sel[i]["mlp"], want) and sel[i]["mlp_probe"].tolist() == [0, 0]
    with pytest.raises(ValueError, match="needs history"):
        ProbeSettings(use_probe=False, history=False)


def test_the_cost_model_counts_kv_whole_under_gqa_reference():
    """Under ``gqa: reference`` K/V stay whole: a candidate that keeps fewer KV groups saves only its query
    and output heads (params, FLOPs, KV cache), while ``gqa: groups`` also saves the K/V rows."""
    from evoprune.space import SearchSpace

    model = tiny_model("llama")
    spec_kw = dict(mode="probe")
    ref = SearchSpace.from_model(model.config, probe={"gqa": "reference"}, **spec_kw)
    grp = SearchSpace.from_model(model.config, **spec_kw)
    spec = ref.spec
    assert spec.num_kv_heads >= 2
    dense, cand = spec.dense_candidate(), _attn_only(spec, spec.num_kv_heads - 1, spec.q_per_kv)
    hd, h, L = spec.head_dim, spec.hidden_size, spec.num_layers
    q_rows = spec.q_per_kv * hd  # one KV group's query heads
    for space in (ref, grp):
        assert space.cost_model.params(dense) == sum(p.numel() for p in model.parameters())
    saved_ref = ref.cost_model.params(dense) - ref.cost_model.params(cand)
    saved_grp = grp.cost_model.params(dense) - grp.cost_model.params(cand)
    assert saved_ref == L * 2 * q_rows * h  # q rows and o columns of the dropped group's heads
    assert saved_grp == saved_ref + L * 2 * hd * h  # and its k and v rows
    assert ref.cost_model.kv_bytes(cand) == ref.cost_model.kv_bytes(dense)
    assert grp.cost_model.kv_bytes(cand) < grp.cost_model.kv_bytes(dense)
    assert grp.cost_model.flops(cand) < ref.cost_model.flops(cand) < ref.cost_model.flops(dense)
