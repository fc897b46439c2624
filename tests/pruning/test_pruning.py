"""Pruning backend: apply/revert, materialize, export/reload, importance, masks (all five archs)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import RELOAD_SCRIPT as _RELOAD_SCRIPT
from helpers import expected_params, random_layer
from tiny_models import ARCHS, tiny_config, tiny_model

from evoprune.pruning import (
    ArchAdapter,
    Pruner,
    get_adapter,
    load_pruned,
    per_layer_modules,
    wanda_mask,
)
from evoprune.space import Candidate, LayerConfig, ModelSpec

N_RANDOM = 16  # random candidates per architecture
TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Toy matmuls gain nothing from threads, and on a loaded 2-core box every OpenMP barrier
    can wait for a descheduled thread (~40 ms per op); run this module single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- helpers ---------------------------------------------------------------------------------------
def calib(vocab: int = 97, n: int = 4, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, seq_len), generator=g)


def random_candidates(spec: ModelSpec, n: int, seed: int) -> list[Candidate]:
    rng = random.Random(seed)
    out: list[Candidate] = []
    # always cover: layer 0's attention dropped, a whole block dropped, 2:4, strided GQA slices
    first = [random_layer(spec, rng, "unstructured") for _ in range(spec.num_layers)]
    first[0] = LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=spec.intermediate_size // 2, sparsity=0.3)
    first[1] = LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0)
    first[2] = LayerConfig(num_kv_heads=3, q_per_kv=1, mlp_channels=spec.intermediate_size)
    out.append(Candidate(layers=tuple(first)))
    while len(out) < n:
        pattern = "2:4" if len(out) % 4 == 1 else "unstructured"
        layers = tuple(random_layer(spec, rng, pattern) for _ in range(spec.num_layers))
        if all(layer.dropped for layer in layers):
            continue
        out.append(Candidate(layers=layers, sparsity_pattern=pattern))
    return out


def snapshot(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    out = {n: (p.detach().clone(), p.data_ptr()) for n, p in model.named_parameters()}
    out.update({f"buffer:{n}": (b.detach().clone(), b.data_ptr()) for n, b in model.named_buffers()})
    return out


def assert_same(model: torch.nn.Module, snap: dict[str, tuple[torch.Tensor, int]]) -> None:
    now = {n: p for n, p in model.named_parameters()}
    now.update({f"buffer:{n}": b for n, b in model.named_buffers()})
    assert now.keys() == snap.keys()
    for name, (value, ptr) in snap.items():
        assert torch.equal(now[name], value), name
        assert now[name].data_ptr() == ptr, name


def storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


# -- adapters and errors ---------------------------------------------------------------------------
def test_unsupported_architecture_names_supported_ones():
    import transformers

    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50)
    model = torch.nn.Linear(2, 2)
    model.config = cfg  # only the config decides
    with pytest.raises(ValueError, match="llama.*mistral.*phi3.*qwen2.*qwen3"):
        get_adapter(model)
    with pytest.raises(ValueError, match="supported"):
        Pruner(model)


def test_adapter_descriptor_validation():
    with pytest.raises(ValueError, match="fused qkv"):
        ArchAdapter(model_type="x", decoder_layer="m:C", q=None)
    assert get_adapter("phi3").attn_linears == ("qkv_proj", "o_proj")
    assert get_adapter(tiny_config("qwen3")).head_norms == ("q_norm", "k_norm")


def test_invalid_inputs():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="2-D LongTensor"):
        Pruner(model, torch.randint(3, 97, (16,)))
    with pytest.raises(ValueError, match="needs calib_ids"):
        Pruner(tiny_model("llama"), None, method="taylor")
    pruner = Pruner(tiny_model("llama"), calib())
    spec = pruner.spec
    with pytest.raises(ValueError, match="layers"):
        pruner.apply(Candidate(layers=(spec.dense_layer(),) * 3))
    too_many = LayerConfig(num_kv_heads=spec.num_kv_heads + 1, q_per_kv=1, mlp_channels=8)
    with pytest.raises(ValueError, match="num_kv_heads"):
        pruner.apply(Candidate(layers=(too_many,) * 4))
    assert not pruner.is_applied


def test_second_pruner_on_same_model_is_refused():
    model = tiny_model("qwen2")
    Pruner(model, calib())
    with pytest.raises(ValueError, match="already permuted"):
        Pruner(model, calib())


# -- the core equality suite -----------------------------------------------------------------------
def test_apply_equals_materialize_and_reverts_exactly(arch):
    model = tiny_model(arch)
    ids = calib(seed=1)
    dense_logits = model(ids).logits
    pruner = Pruner(model, calib())
    spec = pruner.spec
    # the permutation is function-preserving
    assert (model(ids).logits - dense_logits).abs().max() <= TOL
    snap = snapshot(model)
    dense_storage = storages(list(model.parameters()) + list(model.buffers()))
    for k, cand in enumerate(random_candidates(spec, N_RANDOM, seed=ARCHS.index(arch))):
        with pruner.applied(cand):
            applied = model(ids).logits
            if k < 2:  # materializing works in applied mode too (from the dense weights)
                inside = pruner.materialize(cand)
                assert (inside(ids).logits - applied).abs().max() <= TOL
            live = pruner.trainable_parameters()
            # no copy: every live parameter is a view into a dense storage
            live_storage = storages(live.values())
            assert set(live_storage) <= set(dense_storage)
            assert sum(p.numel() for p in live.values()) == expected_params(spec, cand)
            for p, mask in pruner.masks.items():
                assert mask.dtype == torch.bool and mask.shape == p.shape
                assert any(p is q for q in live.values())
        assert_same(model, snap)
        small = pruner.materialize(cand)
        assert sum(p.numel() for p in small.parameters()) == expected_params(spec, cand)
        assert small.config.num_hidden_layers == len(cand.kept_layers)
        diff = (small(ids).logits - applied).abs().max().item()
        assert diff <= TOL, (cand.to_json(), diff)
    assert_same(model, snap)


def test_masked_weights_are_exactly_zero(arch):
    model = tiny_model(arch)
    pruner = Pruner(model, calib())
    spec, a = pruner.spec, get_adapter(arch)
    layer = LayerConfig(num_kv_heads=2, q_per_kv=1, mlp_channels=40, sparsity=0.5)
    for pattern in ("unstructured", "2:4"):
        cand = Candidate(layers=(layer,) * spec.num_layers, sparsity_pattern=pattern)
        small = pruner.materialize(cand)
        for blk in small.model.layers:  # baked-in zeros in the materialized model
            for mod in [getattr(blk.self_attn, n) for n in a.attn_linears] + [getattr(blk.mlp, n) for n in a.mlp_linears]:
                w = mod.weight
                if pattern == "unstructured":
                    assert ((w == 0).sum(-1) >= w.shape[1] // 2).all()
                else:
                    groups = w[:, : w.shape[1] // 4 * 4].reshape(w.shape[0], -1, 4)
                    assert ((groups == 0).sum(-1) >= 2).all()
        with pruner.applied(cand):
            assert pruner.masks, "every linear is sparse here"
            for p, m in pruner.masks.items():
                if p.dim() == 2 and pattern == "unstructured":
                    assert (~m).sum(-1).eq(int(0.5 * p.shape[-1])).all()
            # the applied forward uses exactly the materialized (zero-masked) weights: probe with I
            for live, mat in zip(model.model.layers, small.model.layers):
                pairs = [(getattr(live.self_attn, n), getattr(mat.self_attn, n)) for n in a.attn_linears]
                pairs += [(getattr(live.mlp, n), getattr(mat.mlp, n)) for n in a.mlp_linears]
                for lm, mm in pairs:
                    eye = torch.eye(mm.in_features)
                    assert torch.equal(lm(eye), mm(eye))


def test_wanda_mask_rules():
    w = torch.tensor([[1.0, -4.0, 2.0, 3.0, 0.5, 0.5], [3.0, 3.0, 3.0, 3.0, 1.0, 2.0]])
    norm = torch.tensor([1.0, 1.0, 1.0, 1.0, 10.0, 1.0])
    m = wanda_mask(w, norm, 0.5, "unstructured")
    # row 0 scores: 1,4,2,3,5,0.5 -> prune 0.5 (col 5), 1 (col 0), 2 (col 2)
    assert m[0].tolist() == [False, True, False, True, True, False]
    # row 1 ties (3,3,3,3): stable -> lower index pruned first; scores 3,3,3,3,10,2
    assert m[1].tolist() == [False, False, True, True, True, False]
    w8, norm8 = torch.cat([w, w[:, :2]], 1), torch.cat([norm, norm[:2]])
    m24 = wanda_mask(w8, norm8, 0.5, "2:4")
    # groups of 4: row 0 scores (1,4,2,3 | 5,0.5,1,4) -> keep cols 1,3 | 4,7
    assert m24[0].tolist() == [False, True, False, True, True, False, False, True]
    assert m24.view(2, 2, 4).sum(-1).eq(2).all()
    assert torch.equal(m24, wanda_mask(w8, norm8, 0.5, "2:4"))
    with pytest.raises(ValueError, match="divisible by 4"):  # 6 inputs: no whole groups of 4
        wanda_mask(w, norm, 0.5, "2:4")
    assert wanda_mask(w, norm, 0.0, "unstructured") is None
    assert wanda_mask(w, None, 0.1, "unstructured") is None  # floor(0.1 * 6) = 0


def test_dense_candidate_is_a_noop_and_sdpa_matches_eager(arch):
    ids = calib(seed=3)
    outs = []
    for impl in ("sdpa", "eager"):
        model = tiny_model(arch, attn_implementation=impl)
        pruner = Pruner(model, calib())
        dense = model(ids).logits
        with pruner.applied(pruner.spec.dense_candidate()):
            assert torch.equal(model(ids).logits, dense)
        cand = Candidate(layers=(LayerConfig(num_kv_heads=3, q_per_kv=1, mlp_channels=33, sparsity=0.2),) * 4)
        with pruner.applied(cand):
            outs.append(model(ids).logits)
    assert (outs[0] - outs[1]).abs().max() <= TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_apply_equals_materialize(dtype):
    for arch in ("qwen3", "phi3"):
        model = tiny_model(arch, dtype=dtype)
        pruner = Pruner(model, calib())
        cand = random_candidates(pruner.spec, 2, seed=5)[1]
        ids = calib(seed=2)
        with pruner.applied(cand):
            applied = model(ids).logits
        small = pruner.materialize(cand)
        assert small.dtype == dtype
        assert torch.equal(small(ids).logits, applied)


def test_generate_with_kv_cache_after_dropping_layer0_attention(arch):
    model = tiny_model(arch)
    pruner = Pruner(model, calib())
    spec = pruner.spec
    cand = Candidate(layers=(
        LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=spec.intermediate_size),
        LayerConfig(num_kv_heads=2, q_per_kv=1, mlp_channels=0),
        LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0),
        LayerConfig(num_kv_heads=4, q_per_kv=2, mlp_channels=10),
    ))
    prompt = calib(n=2, seq_len=5, seed=4)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with pruner.applied(cand):
        live = [model.generate(prompt, use_cache=u, **kw) for u in (True, False)]
    assert torch.equal(live[0], live[1])
    small = pruner.materialize(cand)
    attn_idx = [blk.self_attn.layer_idx for blk in small.model.layers if hasattr(blk.self_attn, "layer_idx")]
    assert attn_idx == [0, 1]
    gens = [small.generate(prompt, use_cache=u, **kw) for u in (True, False)]
    assert torch.equal(gens[0], gens[1]) and torch.equal(gens[0], live[0])


def test_mixed_sliding_and_full_attention_layers():
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=2)
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    pruner = Pruner(model, calib())
    ids = calib(n=2, seq_len=14, seed=5)
    full = LayerConfig(num_kv_heads=2, q_per_kv=2, mlp_channels=50)
    gone = LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0)
    no_attn = LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=50)
    # dropping whole blocks keeps cache index == block index pairing valid
    ok = Candidate(layers=(full, gone, full, no_attn))
    with pruner.applied(ok):
        assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
        applied = model(ids).logits
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    small = pruner.materialize(ok)
    assert (small(ids).logits - applied).abs().max() <= TOL
    prompt = ids[:1, :9]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(small.generate(prompt, use_cache=True, **kw), small.generate(prompt, use_cache=False, **kw))
    # cache layer 1 would be 'full' but the 2nd attention block is 'sliding': refused, not silently wrong
    bad = Candidate(layers=(no_attn, full, full, full))
    with pytest.raises(NotImplementedError, match="layer types"):
        pruner.materialize(bad)


# -- importance and its cache ----------------------------------------------------------------------
def test_importance_cache_hit_on_second_construction(tmp_path):
    ids = calib()
    first = Pruner(tiny_model("qwen3"), ids, cache_dir=tmp_path)
    assert not first.cache_hit and first.cache_path.exists()
    model = tiny_model("qwen3")
    second = Pruner(model, ids, cache_dir=tmp_path)
    assert second.cache_hit
    for key in ("kv_group", "q_head", "mlp_channel", "block_influence"):
        assert torch.equal(getattr(first.importance, key), getattr(second.importance, key))
    for (n, p), (_, q) in zip(first.model.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), n
    # another method or other data is another entry
    third = Pruner(tiny_model("qwen3"), calib(seed=9), cache_dir=tmp_path)
    assert not third.cache_hit
    assert len(list(tmp_path.glob("importance-*.safetensors"))) == 2


def test_importance_contents(arch):
    ids = calib()
    pruner = Pruner(tiny_model(arch), ids)
    imp, spec = pruner.importance, pruner.spec
    assert imp.method == "activation" and imp.num_tokens == ids.numel()
    assert imp.kv_group.shape == (spec.num_layers, spec.num_kv_heads)
    assert imp.q_head.shape == (spec.num_layers, spec.num_kv_heads, spec.q_per_kv)
    assert torch.allclose(imp.kv_group, imp.q_head.sum(-1))
    assert imp.mlp_channel.shape == (spec.num_layers, spec.intermediate_size)
    for infl in (imp.block_influence, imp.attn_influence, imp.mlp_influence):
        assert infl.shape == (spec.num_layers,) and torch.isfinite(infl).all() and (infl >= -1e-6).all()
    assert imp.kv_group.dtype == torch.float32
    kv_order, q_order, mlp_order = imp.orders()
    assert torch.equal(mlp_order[0], torch.sort(imp.mlp_channel[0], descending=True, stable=True).indices)
    magnitude = Pruner(tiny_model(arch), None)
    assert magnitude.method == "magnitude" and torch.isnan(magnitude.importance.block_influence).all()
    taylor = Pruner(tiny_model(arch), ids, method="taylor")
    assert taylor.importance.method == "taylor" and torch.isfinite(taylor.importance.kv_group).all()
    assert all(p.grad is None for p in taylor.model.parameters())


def test_permutation_orders_heads_and_channels_by_importance():
    model = tiny_model("llama")
    pruner = Pruner(model, calib())
    # re-scoring the permuted model gives descending scores
    from evoprune.pruning._importance import compute_importance

    again = compute_importance(model, pruner.adapter, pruner.spec, calib(), "activation", 8)
    assert (again.kv_group[:, :-1] >= again.kv_group[:, 1:] - 1e-4).all()
    assert (again.q_head[..., :-1] >= again.q_head[..., 1:] - 1e-4).all()
    assert (again.mlp_channel[:, :-1] >= again.mlp_channel[:, 1:] - 1e-4).all()


# -- export / reload in a fresh process ------------------------------------------------------------
@pytest.fixture(scope="session")
def reloaded(tmp_path_factory):
    """Export 3 candidates per architecture and reload them all in ONE fresh Python process."""
    root = tmp_path_factory.mktemp("exports")
    jobs, expected = [], {}
    ids = calib(n=2, seq_len=12, seed=7)
    prompt = calib(n=1, seq_len=4, seed=8)
    for arch in ARCHS:
        model = tiny_model(arch)
        pruner = Pruner(model, calib())
        cands = random_candidates(pruner.spec, 3, seed=11)
        for k, cand in enumerate(cands):
            out_dir = pruner.export(cand, root / f"{arch}-{k}")
            with pruner.applied(cand):
                applied = model(ids).logits
            small = pruner.materialize(cand)
            expected[(arch, k)] = dict(
                applied=applied, materialized=small(ids).logits, cand=cand, dir=out_dir,
                numel=expected_params(pruner.spec, cand),
            )
            jobs.append(dict(dir=str(out_dir), ids=ids.tolist(), prompt=prompt.tolist(),
                             out=str(root / f"{arch}-{k}.safetensors")))
    proc = subprocess.run(
        [sys.executable, "-c", _RELOAD_SCRIPT, json.dumps(jobs)],
        capture_output=True, text=True, timeout=600, cwd=str(Path(__file__).parents[1]),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    from safetensors.torch import load_file

    for (arch, k), exp in expected.items():
        exp["reloaded"] = load_file(str(root / f"{arch}-{k}.safetensors"))
    return expected


def test_export_reload_in_fresh_process_matches(arch, reloaded):
    for k in range(3):
        exp = reloaded[(arch, k)]
        got = exp["reloaded"]
        assert (exp["applied"] - exp["materialized"]).abs().max() <= TOL
        assert (got["logits"] - exp["applied"]).abs().max() <= TOL
        assert int(got["numel"]) == exp["numel"]
        assert torch.equal(got["gen_cache"], got["gen_nocache"])


def test_export_directory_is_standard_and_pickle_free(arch, reloaded):
    exp = reloaded[(arch, 0)]
    out_dir: Path = exp["dir"]
    files = {p.name for p in out_dir.iterdir()}
    assert "config.json" in files and any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle")) for f in files)
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["model_type"] in (arch, f"evoprune_{arch}")  # which one: tests/pruning/test_export_auto.py
    assert cfg["num_hidden_layers"] == len(exp["cand"].kept_layers)
    per_layer = cfg["per_layer_config"]
    kept = exp["cand"].kept_layers
    for j, i in enumerate(kept):
        lc = exp["cand"].layers[i]
        entry = next(v for k, v in per_layer.items() if int(k) == j)
        if lc.attn_dropped:
            assert "attention" in entry["skip"]
        else:
            assert entry["num_key_value_heads"] == lc.num_kv_heads
            assert entry["num_attention_heads"] == lc.num_q_heads
        if lc.mlp_dropped:
            assert "mlp" in entry["skip"]
        else:
            assert entry["intermediate_size"] == lc.mlp_channels
    assert Candidate.from_dict(cfg["evoprune"]["candidate"]) == exp["cand"]
    assert cfg["evoprune"]["dense_layers"] == list(kept)


def test_export_writes_the_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(96)} | {"[UNK]": 96}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    pruner = Pruner(tiny_model("mistral"), calib())
    cand = random_candidates(pruner.spec, 1, seed=4)[0]
    out = pruner.export(cand, tmp_path / "with-tok", tokenizer=tok)
    again = AutoTokenizer.from_pretrained(out)
    assert again("w5 w7 w95")["input_ids"] == [5, 7, 95]
    model = load_pruned(out)
    assert model.config.evoprune["candidate_key"] == cand.key


def test_exported_model_cannot_be_pruned_again(tmp_path):
    pruner = Pruner(tiny_model("llama"), calib())
    cand = random_candidates(pruner.spec, 1, seed=6)[0]
    with pytest.raises(ValueError, match="non-uniform"):
        Pruner(load_pruned(pruner.export(cand, tmp_path)), calib())


def test_from_pretrained_hook_is_scoped(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    original = LlamaDecoderLayer.__init__
    model = tiny_model("llama")
    pruner = Pruner(model, calib())
    cand = random_candidates(pruner.spec, 1, seed=2)[0]
    pruner.export(cand, tmp_path)
    with per_layer_modules():
        assert LlamaDecoderLayer.__init__ is not original
        hooked = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert LlamaDecoderLayer.__init__ is original
    with pytest.raises(RuntimeError, match="boom"):
        with per_layer_modules():
            raise RuntimeError("boom")
    assert LlamaDecoderLayer.__init__ is original
    ids = calib(seed=3)
    assert (hooked(ids).logits - load_pruned(tmp_path)(ids).logits).abs().max() <= TOL
    # outside the hook a homogeneous config still builds normally
    AutoModelForCausalLM.from_config(LlamaConfig(**tiny_config("llama").to_dict()))


def test_cost_model_counts_the_materialized_parameters(arch):
    """The space's cost model and the materialized model agree exactly (DESIGN invariant)."""
    from evoprune.space import CostModel

    model = tiny_model(arch)
    pruner = Pruner(model, calib())
    cost = CostModel(pruner.spec)
    for cand in random_candidates(pruner.spec, 6, seed=3) + [pruner.spec.dense_candidate()]:
        n = sum(p.numel() for p in pruner.materialize(cand).parameters())
        assert cost.params(cand) == n == expected_params(pruner.spec, cand)
    tied = Pruner(tiny_model(arch, tie_word_embeddings=True), calib())
    cand = random_candidates(tied.spec, 2, seed=4)[1]
    assert CostModel(tied.spec).params(cand) == sum(p.numel() for p in tied.materialize(cand).parameters())


# -- CUDA ------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_apply_materialize_reload(dtype, tmp_path):
    for arch in ARCHS:
        model = tiny_model(arch, dtype=dtype).to("cuda")
        pruner = Pruner(model, calib().cuda())
        snap = snapshot(model)
        ids = calib(seed=2).cuda()
        for cand in random_candidates(pruner.spec, 4, seed=13):
            with pruner.applied(cand):
                applied = model(ids).logits
                assert all(p.is_cuda for p in pruner.trainable_parameters().values())
            small = pruner.materialize(cand)
            assert all(p.is_cuda for p in small.parameters())
            tol = TOL if dtype == torch.float32 else 2e-2
            assert (small(ids).logits - applied).abs().max() <= tol
        assert_same(model, snap)
        pruner.export(cand, tmp_path / arch)
        again = load_pruned(tmp_path / arch, dtype=dtype).to("cuda")
        assert (again(ids).logits.float() - small(ids).logits.float()).abs().max() <= tol
