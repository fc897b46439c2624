"""GGUF export: a (pruned) Llama-family model as one file that llama.cpp runs, exactly.

llama.cpp reads per-layer arrays for the head count, the KV head count and the feed-forward
length, but only some of its architectures use them:

* ``llama`` builds every block alike (its Q shape comes from the global head count), so it is
  used when every written block has the same widths and keeps both sublayers;
* ``deci`` (Nemotron-NAS) builds each block from its own head / KV-head / feed-forward counts and
  skips the attention of a block whose head count is 0. It is used for everything else.

Encodings that keep llama.cpp on its exact path (each proven by ``tests/pruning/test_export_gguf.py``):

* a dropped block is not written (the block list closes up);
* a dropped attention sublayer is head count 0 (no attention tensors, no KV cache) -- except in
  the first written block, from whose head count llama.cpp derives the head size: there it is one
  attention head whose V and output weights are zero (its output is exactly 0);
* a dropped MLP is a feed-forward of width 1 with zero weights (``silu(0) * 0`` through a zero
  down projection is exactly 0); feed-forward length 0 would make ``deci`` skip the rest of the
  block (wrong) or crash in the last one;
* Q and K rows are permuted from transformers' rotate-half layout to llama.cpp's interleaved
  rotary layout (as llama.cpp's own ``convert_hf_to_gguf.py`` does);
* unstructured / 2:4 sparsity is written dense (its zeros are in the weights);
* a linear attention replacement (or a block's, which sits in the attention slot) is ``deci``'s
  "linear attention": query heads ``hidden / head_dim``, KV heads 0, the attention norm and the
  fitted ``hidden x hidden`` map as ``attn_output`` (llama.cpp applies it to the attention-normed
  input; evoprune fits it on that input). A linear MLP replacement has no llama.cpp form and is refused.

Supported: ``llama``, ``mistral``, ``qwen2`` (q/k/v biases) and ``phi3`` (fused projections are
split) with rope ``default``, ``linear`` or ``llama3``. A Mistral/Qwen2 sliding window is written as the
context length: up to the window full attention equals windowed attention (llama.cpp only warns when a
longer context is asked for; beyond the window it attends to everything).
Anything else (q/k norms as in Qwen3, other rope scalings, a tokenizer llama.cpp cannot read)
raises :class:`ExportFormatError` before a file is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._logging import get_logger
from ._adapters import get_adapter
from ._auto import dense_model_type
from ._modules import DroppedAttention, DroppedMLP, LinearReplacement

__all__ = ["GGUF_DTYPES", "ExportFormatError", "GGUFBlock", "check_gguf_support", "gguf_blocks", "write_gguf"]

_log = get_logger("pruning")

GGUF_DTYPES = ("f32", "f16", "bf16")
GGUF_MODEL_TYPES = ("llama", "mistral", "qwen2", "phi3")
_ROPE_TYPES = ("default", "linear", "llama3")


class ExportFormatError(ValueError):
    """A model or candidate that the requested export format cannot hold exactly (nothing was written)."""


@dataclass(frozen=True)
class GGUFBlock:
    """One written block: its llama.cpp counts and how its sublayers are encoded."""

    n_head: int
    n_head_kv: int
    n_ff: int
    attn: str  # "real", "none" (head count 0), "zero" (one head with zero V / output weights) or "linear"
    # (query heads > 0, KV heads 0: llama.cpp's deci runs wo on the attention-normed input)
    mlp: str  # "real" or "zero" (width 1, zero weights)


# --------------------------------------------------------------------------- checks


def _rope(config: Any) -> dict[str, Any]:
    rp = getattr(config, "rope_parameters", None)
    if not rp:
        rp = dict(getattr(config, "rope_scaling", None) or {})
        rp.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rp = dict(rp)
    if "full_attention" in rp and isinstance(rp["full_attention"], dict):
        rp = dict(rp["full_attention"])
    rp.setdefault("rope_type", rp.get("type", "default"))
    return rp


def check_gguf_support(config: Any, dtype: str = "f32") -> None:
    """Raise :class:`ExportFormatError` (one line, saying what to do) when a model of ``config``
    cannot be written to GGUF exactly; cheap, reads the config only."""
    if dtype not in GGUF_DTYPES:
        raise ExportFormatError(f"GGUF dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}.")
    model_type = getattr(config, "model_type", None)
    model_type = dense_model_type(model_type) or model_type
    if model_type not in GGUF_MODEL_TYPES:
        raise ExportFormatError(
            f"GGUF export supports model types {', '.join(GGUF_MODEL_TYPES)} (llama.cpp architectures llama/deci); "
            f"this model is {model_type!r}: export it as a Hugging Face checkpoint (--format hf) instead."
        )
    rp = _rope(config)
    if rp["rope_type"] not in _ROPE_TYPES:
        raise ExportFormatError(
            f"GGUF export handles rope types {', '.join(_ROPE_TYPES)}; this model uses {rp['rope_type']!r}, which "
            "llama.cpp's deci architecture does not run exactly: export it as a Hugging Face checkpoint (--format hf)."
        )
    if float(getattr(config, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise ExportFormatError("GGUF export needs rotary embeddings over the whole head (partial_rotary_factor 1); "
                                "export this model as a Hugging Face checkpoint (--format hf).")
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ExportFormatError(f"GGUF export needs a SiLU-gated MLP; this model uses {act!r}: export it with --format hf.")


def model_adapter(model: Any) -> Any:
    """The adapter of ``model``, also for an ``evoprune_<type>`` export's config."""
    model_type = model.config.model_type
    return get_adapter(dense_model_type(model_type) or model_type)


def _head_dim(config: Any) -> int:
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else config.hidden_size // config.num_attention_heads


# --------------------------------------------------------------------------- weights per block


def _layer_tensors(model: Any, adapter: Any, j: int, layer: Any, head_dim: int) -> dict[str, Any]:
    """The block's HF tensors as separate q/k/v/o/gate/up/down (fused ones split) plus counts."""
    out: dict[str, Any] = {"attn": None, "mlp": None}
    attn = getattr(layer, adapter.attn)
    if isinstance(attn, LinearReplacement):  # llama.cpp's deci "linear attention": wo on the attention-normed input
        out["attn"] = dict(linear=attn.matrix(), norm=getattr(layer, adapter.attn_norm).weight)
    elif not isinstance(attn, DroppedAttention):
        o = getattr(attn, adapter.o)
        n_head = o.weight.shape[1] // head_dim
        if adapter.fused_qkv:
            qkv = getattr(attn, adapter.qkv)
            n_kv = (qkv.weight.shape[0] // head_dim - n_head) // 2
            sizes = [n_head * head_dim, n_kv * head_dim, n_kv * head_dim]
            q_w, k_w, v_w = torch.split(qkv.weight, sizes, 0)
            bias = qkv.bias
            q_b, k_b, v_b = torch.split(bias, sizes, 0) if bias is not None else (None, None, None)
        else:
            q, k, v = (getattr(attn, n) for n in (adapter.q, adapter.k, adapter.v))
            n_kv = k.weight.shape[0] // head_dim
            q_w, k_w, v_w = q.weight, k.weight, v.weight
            q_b, k_b, v_b = q.bias, k.bias, v.bias
        out["attn"] = dict(n_head=n_head, n_kv=n_kv, q=q_w, k=k_w, v=v_w, q_b=q_b, k_b=k_b, v_b=v_b,
                           o=o.weight, o_b=o.bias, norm=getattr(layer, adapter.attn_norm).weight)
        for name in adapter.head_norms:
            if getattr(attn, name, None) is not None:
                raise ExportFormatError("GGUF export cannot hold per-head q/k norms (as in Qwen3); export this model "
                                        "as a Hugging Face checkpoint (--format hf).")
    mlp = getattr(layer, adapter.mlp)
    if isinstance(mlp, LinearReplacement):
        out["mlp"] = dict(linear=mlp.matrix(), norm=getattr(layer, adapter.mlp_norm).weight)
    elif not isinstance(mlp, DroppedMLP):
        down = getattr(mlp, adapter.down)
        if adapter.fused_gate_up:
            gu = getattr(mlp, adapter.gate_up)
            gate_w, up_w = torch.chunk(gu.weight, 2, 0)
            gate_b, up_b = torch.chunk(gu.bias, 2, 0) if gu.bias is not None else (None, None)
        else:
            gate, up = getattr(mlp, adapter.gate), getattr(mlp, adapter.up)
            gate_w, up_w, gate_b, up_b = gate.weight, up.weight, gate.bias, up.bias
        out["mlp"] = dict(n_ff=down.weight.shape[1], gate=gate_w, up=up_w, down=down.weight, gate_b=gate_b,
                          up_b=up_b, down_b=down.bias, norm=getattr(layer, adapter.mlp_norm).weight)
    return out


def gguf_blocks(model: Any) -> tuple[str, list[GGUFBlock]]:
    """llama.cpp architecture (``"llama"`` or ``"deci"``) and the per-block counts for ``model``."""
    adapter = model_adapter(model)
    hd = _head_dim(model.config)
    layers = model.get_submodule(adapter.layers)
    blocks = []
    for j, layer in enumerate(layers):
        t = _layer_tensors(model, adapter, j, layer, hd)
        a, m = t["attn"], t["mlp"]
        if m is not None and "linear" in m:
            raise ExportFormatError("GGUF export cannot hold a linear MLP replacement (llama.cpp's deci runs linear "
                                    "attention only); use a space without mlp linear levels or --format hf/nemotron-nas.")
        if a is not None and "linear" in a:  # query heads > 0, KV heads 0 (the head size stays hidden / n_head)
            if model.config.hidden_size % hd:
                raise ExportFormatError(f"GGUF linear attention needs hidden_size ({model.config.hidden_size}) to be "
                                        f"a multiple of head_dim ({hd}); export with --format hf.")
            attn, nh, nkv = "linear", model.config.hidden_size // hd, 0
        elif a is not None:
            attn, nh, nkv = "real", a["n_head"], a["n_kv"]
        elif j == 0:
            attn, nh, nkv = "zero", 1, 1
        else:
            attn, nh, nkv = "none", 0, 0
        mlp, nff = ("real", m["n_ff"]) if m is not None else ("zero", 1)
        blocks.append(GGUFBlock(n_head=nh, n_head_kv=nkv, n_ff=nff, attn=attn, mlp=mlp))
    uniform = all(b.attn == "real" and b.mlp == "real" for b in blocks) and len(
        {(b.n_head, b.n_head_kv, b.n_ff) for b in blocks}) == 1
    return ("llama" if uniform else "deci"), blocks


# --------------------------------------------------------------------------- tokenizer

# tokenizer.ggml.pre names for BPE pre-tokenizers, keyed by llama.cpp's check hash (convert_hf_to_gguf.py)
_CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) '
           '✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
           '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
           '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
_PRE = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
}


def _tokenizer_kind(tokenizer: Any) -> tuple[str, dict[str, Any]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportFormatError("GGUF export needs a fast (tokenizer.json) tokenizer; pass one, e.g. "
                                "AutoTokenizer.from_pretrained(dense_model_path).")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportFormatError(f"GGUF export writes BPE tokenizers (byte-level or byte-fallback); this one is "
                                f"{model.get('type')!r}: export as a Hugging Face checkpoint (--format hf).")
    return ("llama" if model.get("byte_fallback") else "gpt2"), spec


def check_tokenizer(tokenizer: Any) -> None:
    """Raise :class:`ExportFormatError` when ``tokenizer`` cannot be written into a GGUF file."""
    if tokenizer is None:
        raise ExportFormatError("GGUF export needs the model's tokenizer (llama.cpp loads it from the file); pass "
                                "tokenizer=AutoTokenizer.from_pretrained(dense_model_path).")
    _tokenizer_kind(tokenizer)


def _add_tokenizer(writer: Any, tokenizer: Any, n_vocab: int) -> None:
    import gguf

    kind, _ = _tokenizer_kind(tokenizer)
    with tempfile.TemporaryDirectory(prefix="evoprune-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        if kind == "llama":
            vocab = gguf.LlamaHfVocab(Path(tmp))
            tokens, scores, types = [], [], []
            for text, score, typ in vocab.all_tokens():
                tokens.append(text)
                scores.append(score)
                types.append(typ)
            for i in range(len(tokens), n_vocab):
                tokens.append(f"[PAD{i}]".encode())
                scores.append(-1000.0)
                types.append(gguf.TokenType.UNUSED)
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_token_list(tokens[:n_vocab])
            writer.add_token_scores(scores[:n_vocab])
            writer.add_token_types(types[:n_vocab])
        else:
            reverse = {i: t for t, i in tokenizer.get_vocab().items()}
            added = tokenizer.get_added_vocab()
            decoder = tokenizer.added_tokens_decoder
            if reverse and max(reverse) >= n_vocab:
                raise ExportFormatError(f"the tokenizer has ids up to {max(reverse)} but the model only {n_vocab} "
                                        "embeddings; pass the model's own tokenizer.")
            tokens, types = [], []
            for i in range(n_vocab):
                if i not in reverse:
                    tokens.append(f"[PAD{i}]")
                    types.append(gguf.TokenType.UNUSED)
                    continue
                token = reverse[i]
                if token in added:
                    special = decoder[i].special if i in decoder else True
                    types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
                else:
                    types.append(gguf.TokenType.NORMAL)
                tokens.append(token)
            chkhsh = hashlib.sha256(str(tokenizer.encode(_CHKTXT)).encode()).hexdigest()
            pre = _PRE.get(chkhsh)
            if pre is None:
                _log.warning("GGUF export: unknown BPE pre-tokenizer (hash %s); writing 'default' -- llama.cpp's own "
                             "tokenization of text may differ from transformers' (token ids fed directly are exact)",
                             chkhsh[:16])
                pre = "default"
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(pre)
            writer.add_token_list(tokens)
            writer.add_token_types(types)
        special = gguf.SpecialVocab(Path(tmp), load_merges=kind == "gpt2", n_vocab=n_vocab)
        special.add_to_gguf(writer, quiet=True)


# --------------------------------------------------------------------------- writing


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """transformers' rotate-half rows -> llama.cpp's interleaved rotary rows (per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _array(t: torch.Tensor, dtype: str) -> tuple[Any, Any]:
    import gguf

    t = t.detach().to("cpu")
    if t.ndim == 1 or dtype == "f32":
        return t.to(torch.float32).contiguous().numpy(), None
    if dtype == "f16":
        return t.to(torch.float16).contiguous().numpy(), None
    raw = t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
    return raw, gguf.GGMLQuantizationType.BF16


def _llama3_factors(rp: dict[str, Any], dim: int) -> torch.Tensor:
    base = rp.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rp.get("factor", 8.0)
    lo, hi = rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old = rp.get("original_max_position_embeddings", 8192)
    lo_wl, hi_wl = old / lo, old / hi
    out = []
    for f in freqs.tolist():
        wl = 2 * math.pi / f
        if wl < hi_wl:
            out.append(1.0)
        elif wl > lo_wl:
            out.append(factor)
        else:
            s = (old / wl - lo) / (hi - lo)
            out.append(1 / ((1 - s) / factor + s))
    return torch.tensor(out, dtype=torch.float32)


@torch.no_grad()
def write_gguf(model: Any, path: str | os.PathLike[str], *, tokenizer: Any, dtype: str = "f32",
               name: str | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` (a materialized evoprune model, a :func:`load_pruned` one or a dense one) to the
    GGUF file ``path`` (written under a temporary name and renamed when complete).

    Args:
        model: a causal LM of a supported Llama-family type (see the module docstring).
        path: the ``.gguf`` file to create (must not exist).
        tokenizer: the model's fast tokenizer (written into the file; llama.cpp needs it).
        dtype: ``"f32"``, ``"f16"`` or ``"bf16"`` for the matrices (norms stay f32).
        name: ``general.name``.
        metadata: extra string entries written as ``evoprune.<key>``.

    Raises :class:`ExportFormatError` (nothing written) for a model or tokenizer it cannot hold exactly.
    """
    import gguf

    config = model.config
    check_gguf_support(config, dtype)
    check_tokenizer(tokenizer)
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; choose a new GGUF file name.")
    adapter = model_adapter(model)
    arch, blocks = gguf_blocks(model)
    hd = _head_dim(config)
    rp = _rope(config)
    layers = model.get_submodule(adapter.layers)
    embed = model.get_input_embeddings().weight
    n_vocab, hidden = embed.shape
    T = gguf.TENSOR_NAMES
    MT = gguf.MODEL_TENSOR

    ctx = int(getattr(config, "max_position_embeddings", 4096))
    window = getattr(config, "sliding_window", None)
    if window and (getattr(config, "use_sliding_window", True) is not False) and window < ctx:
        _log.warning("GGUF export: context length set to the sliding window (%d < %d): llama.cpp has no sliding "
                     "window here, so it matches transformers up to %d tokens", window, ctx, window)
        ctx = int(window)

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(str(partial), arch)
    try:
        writer.add_name(name or str(getattr(config, "_name_or_path", "") or "evoprune-model"))
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])
        writer.add_vocab_size(n_vocab)
        writer.add_context_length(ctx)
        writer.add_embedding_length(hidden)
        writer.add_block_count(len(blocks))
        if arch == "llama":
            writer.add_feed_forward_length(blocks[0].n_ff)
            writer.add_head_count(blocks[0].n_head)
            writer.add_head_count_kv(blocks[0].n_head_kv)
        else:
            writer.add_feed_forward_length([b.n_ff for b in blocks])
            writer.add_head_count([b.n_head for b in blocks])
            writer.add_head_count_kv([b.n_head_kv for b in blocks])
        writer.add_key_length(hd)
        writer.add_value_length(hd)
        writer.add_rope_dimension_count(hd)
        writer.add_rope_freq_base(float(rp.get("rope_theta", 10000.0)))
        if rp["rope_type"] == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rp["factor"]))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        for key, value in (metadata or {}).items():
            writer.add_string(f"evoprune.{key}", str(value))
        _add_tokenizer(writer, tokenizer, n_vocab)

        def put(name: str, t: torch.Tensor) -> None:
            arr, raw = _array(t, dtype)
            writer.add_tensor(name, arr, raw_dtype=raw)

        put(T[MT.TOKEN_EMBD] + ".weight", embed)
        put(T[MT.OUTPUT_NORM] + ".weight", model.get_submodule(adapter.layers.rsplit(".", 1)[0]).norm.weight)
        out = model.get_output_embeddings()
        if not (getattr(config, "tie_word_embeddings", False) and out.weight.data_ptr() == embed.data_ptr()):
            put(T[MT.OUTPUT] + ".weight", out.weight)
        if rp["rope_type"] == "llama3":
            put(T[MT.ROPE_FREQS] + ".weight", _llama3_factors(rp, hd))
        for j, (layer, b) in enumerate(zip(layers, blocks)):
            t = _layer_tensors(model, adapter, j, layer, hd)
            n = {k: T[k].format(bid=j) for k in (MT.ATTN_NORM, MT.ATTN_Q, MT.ATTN_K, MT.ATTN_V, MT.ATTN_OUT,
                                                  MT.FFN_NORM, MT.FFN_GATE, MT.FFN_UP, MT.FFN_DOWN)}
            a = t["attn"]
            if b.attn == "real":
                put(n[MT.ATTN_NORM] + ".weight", a["norm"])
                put(n[MT.ATTN_Q] + ".weight", _permute(a["q"], b.n_head))
                put(n[MT.ATTN_K] + ".weight", _permute(a["k"], b.n_head_kv))
                put(n[MT.ATTN_V] + ".weight", a["v"])
                put(n[MT.ATTN_OUT] + ".weight", a["o"])
                if a["q_b"] is not None:
                    put(n[MT.ATTN_Q] + ".bias", _permute(a["q_b"], b.n_head))
                    put(n[MT.ATTN_K] + ".bias", _permute(a["k_b"], b.n_head_kv))
                    put(n[MT.ATTN_V] + ".bias", a["v_b"])
                if a["o_b"] is not None:
                    put(n[MT.ATTN_OUT] + ".bias", a["o_b"])
            elif b.attn == "linear":  # wo [hidden, hidden] on the attention-normed input (no q/k/v, no KV cache)
                put(n[MT.ATTN_NORM] + ".weight", a["norm"])
                put(n[MT.ATTN_OUT] + ".weight", a["linear"])
            elif b.attn == "zero":  # one head, V and output zero: contributes exactly 0
                put(n[MT.ATTN_NORM] + ".weight", torch.ones(hidden))
                for key in (MT.ATTN_Q, MT.ATTN_K, MT.ATTN_V):
                    put(n[key] + ".weight", torch.zeros(hd, hidden))
                put(n[MT.ATTN_OUT] + ".weight", torch.zeros(hidden, hd))
            m = t["mlp"]
            if b.mlp == "real":
                put(n[MT.FFN_NORM] + ".weight", m["norm"])
                put(n[MT.FFN_GATE] + ".weight", m["gate"])
                put(n[MT.FFN_UP] + ".weight", m["up"])
                put(n[MT.FFN_DOWN] + ".weight", m["down"])
                for key, bias in ((MT.FFN_GATE, m["gate_b"]), (MT.FFN_UP, m["up_b"]), (MT.FFN_DOWN, m["down_b"])):
                    if bias is not None:
                        put(n[key] + ".bias", bias)
            else:  # width 1, zero weights: silu(0) * 0 -> zero down projection -> exactly 0
                put(n[MT.FFN_NORM] + ".weight", torch.ones(hidden))
                put(n[MT.FFN_GATE] + ".weight", torch.zeros(1, hidden))
                put(n[MT.FFN_UP] + ".weight", torch.zeros(1, hidden))
                put(n[MT.FFN_DOWN] + ".weight", torch.zeros(hidden, 1))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, path)
    except BaseException:
        try:
            writer.close()
        finally:
            partial.unlink(missing_ok=True)
        raise
    _log.info("wrote GGUF %s (arch %s, %d blocks, %s)", path, arch, len(blocks), dtype)
    return path
