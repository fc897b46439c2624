"""Probe Pruning mode (pruning/_probe.py) on tiny models of all five architectures.

The reference computation here is written from the paper's formulas and the reference code
(Qi-Le1/Probe_Pruning: ``generate_probe``/``rank_process``, ``cal_*_prune_metric`` with
``ppwandasp``, ``update_global_metric_score_distribution_ema``) without calling the module under
test: its own probe selection, its own eager attention over the probe positions, the explicit
``||X2 * W^2||_2`` norms and an independent calibration history.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from tiny_models import ARCHS, tiny_model

from evoprune.pruning import Pruner, get_adapter, load_pruned
from evoprune.space import Candidate, LayerConfig, ProbeSettings, SearchSpace

SETTINGS = ProbeSettings(seq_ratio=0.5, batch_ratio=0.5, momentum=0.9)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ids(n: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (n, seq), generator=g)


def _pruner(arch: str, settings: ProbeSettings = SETTINGS) -> Pruner:
    pruner = Pruner(tiny_model(arch), _ids(4, 16, 0))
    pruner.set_mode("probe", settings)
    return pruner


def _candidate(spec, seed: int = 0) -> Candidate:
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(spec.num_layers):
        kv = int(torch.randint(1, spec.num_kv_heads, (1,), generator=g))
        m = int(torch.randint(1, spec.q_per_kv + 1, (1,), generator=g))
        mc = int(torch.randint(8, spec.intermediate_size - 8, (1,), generator=g))
        layers.append(LayerConfig(num_kv_heads=kv, q_per_kv=m, mlp_channels=mc))
    return Candidate(layers=tuple(layers))


# -- independent reference -------------------------------------------------------------------------
def _ref_select(residual: torch.Tensor, s: ProbeSettings):
    norm = residual.float().norm(dim=2)  # [B, S]
    B, S = norm.shape
    n_seq = min(S, max(math.ceil(S * s.seq_ratio), 2))
    pos = torch.topk(norm.norm(dim=0), n_seq).indices.sort().values
    if n_seq <= 10 and n_seq < S:
        pos[0] = 0
        pos = pos.sort().values
    n_b = min(B, max(math.ceil(B * s.batch_ratio), 1))
    seqs = torch.topk(norm[:, pos].norm(dim=1), n_b).indices.sort().values
    return seqs, pos


def _ref_combine(x: torch.Tensor, hist: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    p = torch.linalg.vector_norm(x.float(), ord=2, dim=0) ** 2 / x.shape[0]
    g = torch.zeros_like(p)
    ok = pos < hist.shape[0]
    g[ok] = hist[pos[ok]]
    r = p / (p + g + 1e-6)
    return ((1 - r) * g + r * p).sum(0)


def _ref_probe_attention(attn, adapter, spec, probe, cos, sin):
    """o_proj input of the probe: eager causal attention among the probe positions, dense weights."""
    b, s, _ = probe.shape
    H, G, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    if adapter.qkv:
        qkv = F.linear(probe, getattr(attn, adapter.qkv).weight, getattr(attn, adapter.qkv).bias)
        q, k, v = qkv.split([H * hd, G * hd, G * hd], dim=-1)
    else:
        q, k, v = (F.linear(probe, getattr(attn, n).weight, getattr(attn, n).bias) for n in (adapter.q, adapter.k, adapter.v))
    q, k, v = q.view(b, s, H, hd), k.view(b, s, G, hd), v.view(b, s, G, hd)
    if adapter.head_norms:
        q, k = getattr(attn, adapter.head_norms[0])(q), getattr(attn, adapter.head_norms[1])(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    q, k = rope(q, k, cos, sin)
    k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
    w = (q @ k.transpose(2, 3)) * attn.scaling
    w = w.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    return (w @ v).transpose(1, 2).reshape(b, s, H * hd)


def _ref_history(model, adapter, layers, calib):
    sums = {}
    hooks = []
    for i, layer in enumerate(layers):
        for key, mod in (("o", getattr(getattr(layer, adapter.attn), adapter.o)),
                         ("down", getattr(getattr(layer, adapter.mlp), adapter.down))):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, key=(i, key): sums.__setitem__(key, sums.get(key, 0) + a[0].float().pow(2).sum(0))))
    with torch.no_grad():
        model(calib, use_cache=False)
    for h in hooks:
        h.remove()
    return {k: v / calib.shape[0] for k, v in sums.items()}


# -- tests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_ratio_one_is_dense_and_revert_is_exact(arch):
    pruner = _pruner(arch)
    model, spec = pruner.model, pruner.spec
    ids = _ids(3, 10, 1)
    dense = model(ids).logits
    full = Candidate(layers=(LayerConfig(num_kv_heads=spec.num_kv_heads, q_per_kv=spec.q_per_kv,
                                         mlp_channels=spec.intermediate_size),) * spec.num_layers)
    with pruner.applied(full):
        assert torch.equal(model(ids).logits, dense)
        assert pruner.probe.selections() == {}  # nothing probed: dense blocks run untouched
    with pruner.applied(_candidate(spec)):
        assert not torch.allclose(model(ids).logits, dense)
    assert torch.equal(model(ids).logits, dense)


@pytest.mark.parametrize("arch", ARCHS)
def test_kept_units_match_reference_pp_score(arch):
    pruner = _pruner(arch)
    model, spec, adapter = pruner.model, pruner.spec, get_adapter(arch)
    layers = model.get_submodule(adapter.layers)
    hist = _ref_history(model, adapter, layers, _ids(4, 16, 0))  # dense, before any apply
    cand = _candidate(spec, seed=3)
    seen: dict = {}
    hooks = []
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, adapter.attn), getattr(layer, adapter.mlp)
        hooks += [
            getattr(layer, adapter.attn_norm).register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__((i, "ra"), a[0])),
            getattr(layer, adapter.mlp_norm).register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__((i, "rm"), a[0])),
            attn.register_forward_pre_hook(lambda m, a, kw, i=i: seen.__setitem__((i, "attn"), kw), with_kwargs=True),
            mlp.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__((i, "mlp"), a[0])),
            getattr(attn, adapter.o).register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__((i, "o"), a[0])),
            getattr(mlp, adapter.down).register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__((i, "down"), a[0])),
        ]
    G, Q, hd, D = spec.num_kv_heads, spec.q_per_kv, spec.head_dim, spec.hidden_size
    try:
        with pruner.applied(cand):
            for batch in range(2):  # the second batch sees the history after one EMA update
                with torch.no_grad():
                    model(_ids(4, 12, 10 + batch), use_cache=False)
                got = pruner.probe.selections()
                for i, layer in enumerate(layers):
                    lc = cand.layers[i]
                    attn, mlp = getattr(layer, adapter.attn), getattr(layer, adapter.mlp)
                    # attention
                    kw = seen[(i, "attn")]
                    seqs, pos = _ref_select(seen[(i, "ra")], SETTINGS)
                    probe = kw["hidden_states"][seqs][:, pos]
                    cos, sin = (t[:, pos] for t in kw["position_embeddings"])
                    with torch.no_grad():
                        x = _ref_probe_attention(attn, adapter, spec, probe, cos, sin)
                    x2 = _ref_combine(x, hist[(i, "o")], pos)
                    wo = getattr(attn, adapter.o).weight.float()
                    head = torch.linalg.vector_norm((x2[None] * wo.pow(2)).reshape(D, G * Q, hd), dim=(0, 2)).view(G, Q)
                    kv = torch.topk(head.sum(1), lc.num_kv_heads).indices.sort().values
                    assert torch.equal(got[i]["kv"], kv), (arch, batch, i)
                    for g, qs in zip(kv.tolist(), got[i]["q"]):
                        assert torch.equal(qs, torch.topk(head[g], lc.q_per_kv).indices.sort().values)
                    # MLP
                    seqs, pos = _ref_select(seen[(i, "rm")], SETTINGS)
                    probe = seen[(i, "mlp")][seqs][:, pos]
                    if adapter.gate_up:
                        gate, up = F.linear(probe, getattr(mlp, adapter.gate_up).weight).chunk(2, dim=-1)
                    else:
                        gate, up = (F.linear(probe, getattr(mlp, n).weight, getattr(mlp, n).bias) for n in (adapter.gate, adapter.up))
                    act = getattr(mlp, "act_fn", None) or mlp.activation_fn
                    x2 = _ref_combine(act(gate) * up, hist[(i, "down")], pos)
                    wd = getattr(mlp, adapter.down).weight.float()
                    score = torch.linalg.vector_norm(x2[None] * wd.pow(2), dim=0)
                    ch = torch.topk(score, lc.mlp_channels).indices.sort().values
                    assert torch.equal(got[i]["mlp"], ch), (arch, batch, i)
                    # the full batch ran on the kept units only (smaller matmuls), and updates the history
                    assert seen[(i, "o")].shape[-1] == lc.num_q_heads * hd
                    assert seen[(i, "down")].shape[-1] == lc.mlp_channels
                    for key, cols in (("o", (got[i]["heads"].view(-1, 1) * hd + torch.arange(hd)).reshape(-1)),
                                      ("down", got[i]["mlp"])):
                        h, xin = hist[(i, key)], seen[(i, key)].float()
                        h[: xin.shape[1], cols] = 0.9 * h[: xin.shape[1], cols] + 0.1 * xin.pow(2).sum(0) / xin.shape[0]
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_decoding_equals_recomputation_with_held_units(arch):
    pruner = _pruner(arch)
    model, spec = pruner.model, pruner.spec
    cand = _candidate(spec, seed=5)
    prompt = _ids(2, 9, 7)
    with pruner.applied(cand), torch.no_grad():
        with pytest.raises(RuntimeError, match="before any prefill"):
            from transformers import DynamicCache
            cache = DynamicCache(config=model.config)
            model(prompt[:, :3], use_cache=True, cache=cache)  # fills the cache (prefill) ...
            pruner.apply(cand)  # ... a fresh session has no units yet
            model(prompt[:, 3:4], use_cache=True, cache=cache)
        out = model(prompt, use_cache=True)
        cache, steps, tokens = out.past_key_values, [out.logits[:, -1]], [prompt]
        chosen = pruner.probe.selections()
        for _ in range(4):
            nxt = steps[-1].argmax(-1, keepdim=True)
            tokens.append(nxt)
            out = model(nxt, cache=cache, use_cache=True)
            steps.append(out.logits[:, -1])
            cache = out.past_key_values
        assert all(torch.equal(chosen[i][k], v) for i in chosen for k, v in pruner.probe.selections()[i].items())
        first = next(i for i, lc in enumerate(cand.layers))
        assert cache.layers[0].keys.shape[1] == cand.layers[first].num_kv_heads  # only kept KV groups cached
        full_ids = torch.cat(tokens, 1)
        with pruner.probe.hold():
            full = model(full_ids, use_cache=False).logits
        torch.testing.assert_close(torch.stack(steps, 1), full[:, prompt.shape[1] - 1:], atol=1e-4, rtol=1e-4)
        fresh = model(full_ids, use_cache=False).logits  # a new prefill batch chooses its own units
        assert fresh.shape == full.shape


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_export_and_load_pruned_prune_per_batch(arch, tmp_path):
    pruner = _pruner(arch)
    cand = _candidate(pruner.spec, seed=2)
    cand = cand.replace_layer(1, num_kv_heads=0, q_per_kv=0)  # a dropped sublayer goes through too
    batches = [_ids(4, 12, 20), _ids(4, 12, 21)]
    with pruner.applied(cand), torch.no_grad():
        want = [pruner.model(b, use_cache=False).logits for b in batches]
        sel = pruner.probe.selections()
    pruner.export(cand, tmp_path / "pp")
    loaded = load_pruned(tmp_path / "pp")
    assert loaded.config.evoprune["mode"] == "probe" and loaded.evoprune_pruner.candidate == cand
    with torch.no_grad():
        got = [loaded(b, use_cache=False).logits for b in batches]
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    again = loaded.evoprune_pruner.probe.selections()
    assert all(torch.equal(sel[i]["mlp"], again[i]["mlp"]) for i in sel)
    with pytest.raises(ValueError, match="no fixed smaller model"):
        pruner.materialize(cand)
    with pytest.raises(ValueError, match="need a static candidate"):
        pruner.export(cand, tmp_path / "gguf", format="gguf")


def test_space_and_config_carry_the_mode():
    from evoprune.search import StudyConfig

    model = tiny_model("llama")
    space = SearchSpace.from_model(model, mode="probe", probe={"seq_ratio": 0.25})
    assert space.probe == ProbeSettings(seq_ratio=0.25) and SearchSpace.from_json(space.to_json()) == space
    assert "mode" not in SearchSpace.from_model(model).to_dict()  # static spaces keep their JSON and key
    cfg = StudyConfig(space={"mode": "probe", "probe": {"batch_ratio": 0.25}})
    assert StudyConfig.from_dict(cfg.to_dict()) == cfg
    for bad, match in [({"mode": "dynamic"}, "mode must be one of"),
                       ({"mode": "probe", "sparsity_levels": [0, 0.5]}, "no sparsity masks"),
                       ({"mode": "probe", "probe": {"seq_ratio": 0}}, "share in"),
                       ({"mode": "probe", "probe": {"ratio": 0.5}}, "unknown keys"),
                       ({"probe": {"seq_ratio": 0.5}}, "only used with mode='probe'")]:
        with pytest.raises(ValueError, match=match):
            StudyConfig(space=bad)
    with pytest.raises(ValueError, match="cannot be fine-tuned"):
        StudyConfig(space={"mode": "probe"}, stages=[{"name": "s", "evaluators": ["kl"], "eval_tokens": 64,
                                                       "seq_len": 32, "finetune_tokens": 64}])
    pruner = _pruner("llama")
    with pytest.raises(ValueError, match="no sparsity masks"):
        pruner.apply(Candidate(layers=(LayerConfig(num_kv_heads=2, q_per_kv=2, mlp_channels=64, sparsity=0.5),) * 4))


@pytest.mark.parametrize("sampler", ["evolutionary", "tpe", "nsgaii"])
def test_samplers_search_probe_mode_through_the_evaluators(sampler, tmp_path):
    from helpers import char_tokenizer as _char_tokenizer

    from evoprune.search import Searcher, StudyConfig, build_runtime

    (tmp_path / "t.txt").write_text(" ".join(["the king of a sword and crown night falls"] * 300))
    cfg = StudyConfig.from_dict({
        "model": "tiny-llama-in-memory",
        "data": {"source": "text", "train": [str(tmp_path / "t.txt")], "validation": [str(tmp_path / "t.txt")]},
        "calibration": {"num_sequences": 4, "seq_len": 32},
        "space": {"attention": "kv_groups", "mlp_step": 16, "mode": "probe", "probe": {"batch_ratio": 0.25}},
        "budget": [{"metric": "params", "max_ratio": 0.8}],
        "stages": [{"name": "final", "evaluators": ["kl"], "eval_tokens": 128, "seq_len": 32}],
        "sampler": {"name": sampler, **({"options": {"offspring": 3}} if sampler == "evolutionary" else {})},
        "seed": 0, "stop": {"n_trials": 4}, "cache_dir": str(tmp_path / "cache"),
    })
    rt = build_runtime(cfg, model=tiny_model("llama"), tokenizer=_char_tokenizer())
    assert rt.pruner.mode == "probe" and rt.space.probe.batch_ratio == 0.25
    study = rt.create_study()
    s, mode = rt.make_sampler()
    Searcher(rt, study, s, budget_mode=mode, progress=False).run(**cfg.stop.kwargs())
    done = [t for t in study.get_trials(deepcopy=False) if t.values]
    assert done and all(t.values[0] > 0 for t in done)
    cand = rt.space.candidate_from_params(done[0].params)  # the same candidate scores the same again
    kl = rt.pipeline.stages[-1].evaluators[0]
    ctx = rt.context.for_stage("final", eval_tokens=128, seq_len=32)
    with rt.pruner.applied(cand):
        one = kl.evaluate(rt.model, cand, ctx).value
    with rt.pruner.applied(cand):
        assert kl.evaluate(rt.model, cand, ctx).value == one
    if sampler == "evolutionary":  # measured latency times the applied model (probe and gathers included)
        from evoprune.evaluators import Latency

        lat = Latency(batch_size=2, seq_len=16, warmup=0, repeats=1)
        lat.prepare(rt.model, ctx)
        with rt.pruner.applied(cand):
            assert lat.evaluate(rt.model, cand, ctx).value > 0


def test_generate_keeps_the_prefill_units():
    pruner = _pruner("qwen3")
    model = pruner.model
    prompt = _ids(2, 8, 3)
    with pruner.applied(_candidate(pruner.spec, seed=1)), torch.no_grad():
        out = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
        with pruner.probe.hold():
            again = model(out[:, :-1], use_cache=False).logits[:, prompt.shape[1] - 1:].argmax(-1)
    assert torch.equal(out[:, prompt.shape[1]:], again)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_eager_attention_masks_the_probe_alike(arch):
    """With eager attention the model passes a 4-D mask; the probe uses its rows/columns of the probe
    positions and picks the same units as with SDPA's causal path."""
    got = {}
    for impl in ("sdpa", "eager"):
        pruner = Pruner(tiny_model(arch, attn_implementation=impl), _ids(4, 16, 0))
        pruner.set_mode("probe", SETTINGS)
        with pruner.applied(_candidate(pruner.spec, seed=4)), torch.no_grad():
            got[impl] = (pruner.model(_ids(4, 12, 9)).logits, pruner.probe.selections())
    torch.testing.assert_close(got["eager"][0], got["sdpa"][0], atol=1e-5, rtol=1e-5)
    for i, sel in got["sdpa"][1].items():
        assert all(torch.equal(v, got["eager"][1][i][k]) for k, v in sel.items())


def test_study_stores_the_mode_and_exports_a_probe_trial(reference_tiny, tmp_path):
    import evoprune

    config = {"model": "reference:tiny", "calibration": {"num_sequences": 4, "seq_len": 32},
              "space": {"mlp_step": 16, "mode": "probe", "probe": {"batch_ratio": 0.25}},
              "budget": {"metric": "params", "max_ratio": 0.7},
              "stages": [{"name": "final", "evaluators": ["kl"], "eval_tokens": 256, "seq_len": 32}],
              "sampler": {"name": "evolutionary", "options": {"offspring": 2}}, "objectives": ["kl"]}
    url = f"sqlite:///{tmp_path / 'pp.db'}"
    study = evoprune.create_study(config, storage=url, study_name="pp")
    study.run(n_trials=2)
    again = evoprune.load_study(storage=url, study_name="pp")  # resume: the mode comes from the database
    assert again.config.space["mode"] == "probe"
    runtime = again.build_runtime()
    assert runtime.pruner.mode == "probe" and runtime.space.probe.batch_ratio == 0.25
    number = again.pareto_front()[0].number
    with pytest.raises(ValueError, match="cannot be healed"):
        again.export(number, tmp_path / "healed", runtime=runtime, finetune_tokens=64)
    again.export(number, tmp_path / "out", runtime=runtime)
    loaded = load_pruned(tmp_path / "out")
    ids = _ids(4, 32, 5) % runtime.space.spec.vocab_size
    with runtime.pruner.applied(again.candidate(number)), torch.no_grad():
        want = runtime.model(ids, use_cache=False).logits
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, use_cache=False).logits, want, atol=1e-5, rtol=1e-5)
