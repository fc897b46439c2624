"""Nemotron-NAS (DeciLM) export: a pruned Llama-family model as the heterogeneous HF format that vLLM
serves natively (``model_type: nemotron-nas``, ``architectures: ["DeciLMForCausalLM"]``).

The format (as vLLM's ``nemotron_nas.py`` and llama.cpp's ``DeciModel`` converter read it) gives
each block a ``block_configs`` entry::

    {"attention": {"n_heads_in_group": int | None, "no_op": bool, "replace_with_linear": bool},
     "ffn": {"ffn_mult": float | None, "no_op": bool, "replace_with_linear": bool}}

* every kept attention has ``num_attention_heads`` (global) query heads and
  ``num_attention_heads // n_heads_in_group`` KV heads;
* the MLP width is ``_ffn_mult_to_intermediate_size(ffn_mult, hidden) = find_multiple(int(2 * ffn_mult
  * hidden / 3), 256)`` -- always a multiple of 256;
* ``no_op`` drops a sublayer together with its norm.

evoprune candidates map onto it exactly, with zero padding where the format is coarser:

* KV groups per block: ``n_heads_in_group = num_attention_heads // kv`` (needs ``kv`` to divide the
  head count); query heads a candidate pruned inside a group are written as zero heads (zero Q rows,
  zero O columns: they contribute exactly 0 but still cost their compute in the server);
* MLP widths are padded with zero channels up to the next multiple of 256 (``silu(0) * 0`` through
  zero down-projection columns is exactly 0);
* dropped sublayers are ``no_op``, dropped blocks vanish; sparsity stays in the (dense) weights;
* a full-rank linear replacement is ``replace_with_linear`` as DeciLM defines it (the norm kept,
  ``self_attn.linear_attn.weight`` / ``mlp.linear_mlp.weight``, ``hidden x hidden``; a block's map
  is the attention's with the FFN ``no_op``; a low-rank map is written as its product). vLLM's
  ``nemotron_nas`` loader does not run these (it reads only ``no_op`` and ``n_heads_in_group``);
  DeciLM's modeling code and evoprune do.

The folder also holds ``configuration_decilm.py`` (evoprune's own small config class, for
``trust_remote_code`` loaders such as vLLM that read ``block_configs`` as attributes) and the
tokenizer. ``config.json``'s ``evoprune`` section records the real widths, so
:func:`read_nemotron_nas` can rebuild evoprune's own (unpadded) model from the folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .._logging import get_logger
from .._paths import atomic_folder, new_folder
from ._auto import dense_model_type
from ._gguf import ExportFormatError, _head_dim, _layer_tensors, _rope, model_adapter
from ._modules import per_layer_modules

__all__ = ["NEMOTRON_NAS_MODEL_TYPES", "check_nemotron_nas_support", "ffn_mult_to_intermediate_size",
           "nemotron_nas_layout", "write_nemotron_nas"]

_log = get_logger("pruning")

NEMOTRON_NAS_MODEL_TYPES = ("llama", "mistral", "qwen2", "phi3")

_CONFIG_MODULE = '''"""DeciLM / Nemotron-NAS config written by evoprune: block_configs as attribute objects."""

from dataclasses import dataclass

from transformers import LlamaConfig


@dataclass(frozen=True)
class AttentionConfig:
    no_op: bool = False
    replace_with_linear: bool = False
    n_heads_in_group: int | None = None
    sparsify: list | None = None


@dataclass(frozen=True)
class FFNConfig:
    no_op: bool = False
    replace_with_linear: bool = False
    ffn_mult: float | None = None
    sparsify: list | None = None


@dataclass(frozen=True)
class BlockConfig:
    attention: AttentionConfig
    ffn: FFNConfig

    @classmethod
    def from_dict(cls, d):
        return cls(attention=AttentionConfig(**d["attention"]), ffn=FFNConfig(**d["ffn"]))

    def to_dict(self):
        from dataclasses import asdict
        return asdict(self)


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        blocks = [b if isinstance(b, BlockConfig) else BlockConfig.from_dict(b) for b in (block_configs or [])]
        self.block_configs = blocks
        super().__init__(**kwargs)

    def to_dict(self):
        out = super().to_dict()
        out["block_configs"] = [b.to_dict() if isinstance(b, BlockConfig) else b for b in self.block_configs]
        return out
'''


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The MLP width of ``ffn_mult`` exactly as vLLM's / llama.cpp's DeciLM code computes it."""
    n = int(2 * ffn_mult * hidden_size / 3)
    return n if n % 256 == 0 else n + 256 - (n % 256)


def _ffn_mult(width: int, hidden_size: int) -> float:
    """An ``ffn_mult`` whose :func:`ffn_mult_to_intermediate_size` is ``width`` (a multiple of 256)."""
    for mult in (3 * width / (2 * hidden_size), round(3 * width / (2 * hidden_size), 6),
                 3 * (width - 128) / (2 * hidden_size)):
        if ffn_mult_to_intermediate_size(mult, hidden_size) == width:
            return mult
    raise AssertionError(f"no ffn_mult gives width {width}")  # unreachable for multiples of 256


def check_nemotron_nas_support(config: Any) -> None:
    """Raise :class:`ExportFormatError` (one line, nothing written) when a model of ``config`` cannot be
    written as Nemotron-NAS exactly."""
    model_type = dense_model_type(config.model_type) or config.model_type
    if model_type not in NEMOTRON_NAS_MODEL_TYPES:
        raise ExportFormatError(
            f"the Nemotron-NAS export supports model types {', '.join(NEMOTRON_NAS_MODEL_TYPES)}; this model is "
            f"{model_type!r} (e.g. Qwen3's q/k norms have no place in DeciLM blocks): use --format hf instead."
        )
    rp = _rope(config)
    if rp["rope_type"] not in ("default", "linear", "llama3"):
        raise ExportFormatError(f"the Nemotron-NAS export handles rope types default, linear and llama3, not "
                                f"{rp['rope_type']!r}: use --format hf instead.")
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ExportFormatError(f"the Nemotron-NAS export needs a SiLU-gated MLP, not {act!r}: use --format hf.")


def check_candidate_fits(dense_heads: int, kv_per_layer: list[int]) -> None:
    """Every kept attention's KV-group count must divide the global query-head count."""
    for j, kv in enumerate(kv_per_layer):
        if kv and dense_heads % kv:
            raise ExportFormatError(
                f"the Nemotron-NAS format needs every block's KV-head count to divide num_attention_heads "
                f"({dense_heads}); block {j} keeps {kv}: choose KV levels that divide it, or use --format gguf/hf."
            )


def nemotron_nas_layout(model: Any, dense_heads: int) -> list[dict[str, Any]]:
    """Per written block: ``n_kv``, ``q_per_kv`` (real query heads per group), ``mlp`` (real width),
    ``ffn_width`` (padded) and the ``block_configs`` entry."""
    adapter = model_adapter(model)
    hd = _head_dim(model.config)
    hidden = model.config.hidden_size
    out = []
    for j, layer in enumerate(model.get_submodule(adapter.layers)):
        t = _layer_tensors(model, adapter, j, layer, hd)
        a, m = t["attn"], t["mlp"]
        entry: dict[str, Any] = {"attn_linear": bool(a is not None and "linear" in a),
                                 "mlp_linear": bool(m is not None and "linear" in m)}
        if entry["attn_linear"]:  # DeciLM: input_layernorm + self_attn.linear_attn (hidden x hidden)
            entry.update(n_kv=0, q_per_kv=0)
            att = {"n_heads_in_group": None, "no_op": False, "replace_with_linear": True}
        elif a is None:
            entry.update(n_kv=0, q_per_kv=0)
            att = {"n_heads_in_group": None, "no_op": True, "replace_with_linear": False}
        else:
            entry.update(n_kv=a["n_kv"], q_per_kv=a["n_head"] // a["n_kv"])
            check_candidate_fits(dense_heads, [a["n_kv"]])
            att = {"n_heads_in_group": dense_heads // a["n_kv"], "no_op": False, "replace_with_linear": False}
        if entry["mlp_linear"]:  # DeciLM: post_attention_layernorm + mlp.linear_mlp (hidden x hidden)
            entry.update(mlp=0, ffn_width=0)
            ffn = {"ffn_mult": None, "no_op": False, "replace_with_linear": True}
        elif m is None:
            entry.update(mlp=0, ffn_width=0)
            ffn = {"ffn_mult": None, "no_op": True, "replace_with_linear": False}
        else:
            width = -(-m["n_ff"] // 256) * 256
            entry.update(mlp=m["n_ff"], ffn_width=width)
            ffn = {"ffn_mult": _ffn_mult(width, hidden), "no_op": False, "replace_with_linear": False}
        entry["block_config"] = {"attention": att, "ffn": ffn}
        out.append(entry)
    return out


def _pad_heads(w: torch.Tensor, n_kv: int, q_per_kv: int, group: int, hd: int, dim: int) -> torch.Tensor:
    """Real query heads of each KV group first in that group's ``group`` slots, zero heads after."""
    if q_per_kv == group:
        return w
    shape = list(w.shape)
    shape[dim] = n_kv * group * hd
    out = w.new_zeros(shape)
    for g in range(n_kv):
        src = slice(g * q_per_kv * hd, (g + 1) * q_per_kv * hd)
        dst = slice(g * group * hd, (g * group + q_per_kv) * hd)
        if dim == 0:
            out[dst] = w[src]
        else:
            out[:, dst] = w[:, src]
    return out


def _pad_rows(w: torch.Tensor, n: int, dim: int = 0) -> torch.Tensor:
    if w.shape[dim] == n:
        return w
    shape = list(w.shape)
    shape[dim] = n
    out = w.new_zeros(shape)
    if dim == 0:
        out[: w.shape[0]] = w
    else:
        out[:, : w.shape[1]] = w
    return out


@torch.no_grad()
def nemotron_nas_state_dict(model: Any, layout: list[dict[str, Any]], dense_heads: int) -> dict[str, torch.Tensor]:
    """The DeciLM weight names and (padded) shapes vLLM's loader expects."""
    adapter = model_adapter(model)
    hd = _head_dim(model.config)
    sd: dict[str, torch.Tensor] = {}

    def put(name: str, t: torch.Tensor | None) -> None:
        if t is not None:
            sd[name] = t.detach().to("cpu").contiguous().clone()

    put("model.embed_tokens.weight", model.get_input_embeddings().weight)
    put("model.norm.weight", model.get_submodule(adapter.layers.rsplit(".", 1)[0]).norm.weight)
    if not model.config.tie_word_embeddings:
        put("lm_head.weight", model.get_output_embeddings().weight)
    for j, (layer, e) in enumerate(zip(model.get_submodule(adapter.layers), layout)):
        t = _layer_tensors(model, adapter, j, layer, hd)
        p = f"model.layers.{j}."
        a, m = t["attn"], t["mlp"]
        if e["attn_linear"]:
            put(p + "input_layernorm.weight", a["norm"])
            put(p + "self_attn.linear_attn.weight", a["linear"])
        elif a is not None:
            group = dense_heads // e["n_kv"]
            put(p + "input_layernorm.weight", a["norm"])
            put(p + "self_attn.q_proj.weight", _pad_heads(a["q"], e["n_kv"], e["q_per_kv"], group, hd, 0))
            put(p + "self_attn.k_proj.weight", a["k"])
            put(p + "self_attn.v_proj.weight", a["v"])
            put(p + "self_attn.o_proj.weight", _pad_heads(a["o"], e["n_kv"], e["q_per_kv"], group, hd, 1))
            if a["q_b"] is not None:
                put(p + "self_attn.q_proj.bias", _pad_heads(a["q_b"], e["n_kv"], e["q_per_kv"], group, hd, 0))
                put(p + "self_attn.k_proj.bias", a["k_b"])
                put(p + "self_attn.v_proj.bias", a["v_b"])
            put(p + "self_attn.o_proj.bias", a["o_b"])
        if e["mlp_linear"]:
            put(p + "post_attention_layernorm.weight", m["norm"])
            put(p + "mlp.linear_mlp.weight", m["linear"])
        elif m is not None:
            w = e["ffn_width"]
            put(p + "post_attention_layernorm.weight", m["norm"])
            put(p + "mlp.gate_proj.weight", _pad_rows(m["gate"], w))
            put(p + "mlp.up_proj.weight", _pad_rows(m["up"], w))
            put(p + "mlp.down_proj.weight", _pad_rows(m["down"], w, 1))
            if m["gate_b"] is not None:
                put(p + "mlp.gate_proj.bias", _pad_rows(m["gate_b"], w))
                put(p + "mlp.up_proj.bias", _pad_rows(m["up_b"], w))
            put(p + "mlp.down_proj.bias", m["down_b"])
    return sd


def nemotron_nas_config(model: Any, layout: list[dict[str, Any]], dense_heads: int,
                        evoprune_section: dict[str, Any] | None = None) -> dict[str, Any]:
    """``config.json`` of the Nemotron-NAS export (a Llama-style config + ``block_configs``)."""
    c = model.config
    hd = _head_dim(c)
    rp = _rope(c)
    kvs = [e["n_kv"] for e in layout if e["n_kv"]]
    ctx = int(getattr(c, "max_position_embeddings", 4096))
    window = getattr(c, "sliding_window", None)
    if window and getattr(c, "use_sliding_window", True) is not False and window < ctx:
        ctx = int(window)  # DeciLM attends to everything: exact within the window
    attn = next((_layer_tensors(model, model_adapter(model), j, layer, hd)["attn"]
                 for j, layer in enumerate(model.get_submodule(model_adapter(model).layers))
                 if layout[j]["n_kv"]), None)
    qkv_bias = bool(attn is not None and attn["q_b"] is not None)
    o_bias = bool(attn is not None and attn["o_b"] is not None)
    mlp_bias = bool(getattr(c, "mlp_bias", False))
    rope_parameters = {k: v for k, v in rp.items() if k != "type"}
    cfg: dict[str, Any] = {
        "architectures": ["DeciLMForCausalLM"],
        "model_type": "nemotron-nas",
        "auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig"},
        "hidden_size": c.hidden_size,
        "num_attention_heads": dense_heads,
        "num_key_value_heads": max(kvs) if kvs else 1,
        "head_dim": hd,
        "intermediate_size": max((e["ffn_width"] for e in layout), default=0),
        "num_hidden_layers": len(layout),
        "vocab_size": model.get_input_embeddings().weight.shape[0],
        "max_position_embeddings": ctx,
        "rms_norm_eps": c.rms_norm_eps,
        "hidden_act": "silu",
        "rope_theta": rope_parameters.get("rope_theta", 10000.0),
        "rope_parameters": rope_parameters,
        "attention_bias": o_bias,  # vLLM: o_proj bias; q/k/v too unless qkv_bias is given
        "qkv_bias": qkv_bias,
        "mlp_bias": mlp_bias,
        "tie_word_embeddings": bool(c.tie_word_embeddings),
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": getattr(c, "pad_token_id", None),
        "torch_dtype": str(model.get_input_embeddings().weight.dtype).replace("torch.", ""),
        "block_configs": [e["block_config"] for e in layout],
    }
    if rp["rope_type"] != "default":
        cfg["rope_scaling"] = rope_parameters  # what transformers 4 (and so older vLLM) reads
    cfg["evoprune"] = {
        **(evoprune_section or {}),
        "format": "nemotron-nas",
        "real_widths": [{"num_kv_heads": e["n_kv"], "q_per_kv": e["q_per_kv"], "mlp_channels": e["mlp"],
                         **({"attn_linear": True} if e["attn_linear"] else {}),
                         **({"mlp_linear": True} if e["mlp_linear"] else {})} for e in layout],
    }
    return cfg


def write_nemotron_nas(model: Any, path: str | os.PathLike[str], *, tokenizer: Any = None,
                       evoprune_section: dict[str, Any] | None = None, dense_heads: int | None = None) -> Path:
    """Write ``model`` (materialized or loaded evoprune model) as a Nemotron-NAS folder at ``path``.

    ``dense_heads`` is the dense model's query-head count (the format's global one; default: the
    model config's ``num_attention_heads``). Raises :class:`ExportFormatError` before writing
    anything when the model does not fit. Returns the folder.
    """
    from safetensors.torch import save_file

    check_nemotron_nas_support(model.config)
    dense_heads = int(dense_heads or model.config.num_attention_heads)
    layout = nemotron_nas_layout(model, dense_heads)
    path = new_folder(path)
    cfg = nemotron_nas_config(model, layout, dense_heads, evoprune_section)
    sd = nemotron_nas_state_dict(model, layout, dense_heads)
    with atomic_folder(path) as partial:
        save_file(sd, str(partial / "model.safetensors"), metadata={"format": "pt"})
        (partial / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (partial / "configuration_decilm.py").write_text(_CONFIG_MODULE)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(partial)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
    if any(e["attn_linear"] or e["mlp_linear"] for e in layout):
        _log.warning("Nemotron-NAS export %s has replace_with_linear blocks: DeciLM's own modeling code and evoprune "
                     "run them, vLLM's nemotron_nas loader does not (it reads only no_op and n_heads_in_group)", path)
    padded = sum(e["ffn_width"] - e["mlp"] for e in layout)
    _log.info("wrote Nemotron-NAS export %s (%d blocks, %d zero MLP channels of padding)", path, len(layout), padded)
    return path


def read_nemotron_nas(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``config.json`` and the weights of a Nemotron-NAS folder."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    return cfg, load_file(str(path / "model.safetensors"))


def deci_reference_model(path: str | os.PathLike[str]) -> Any:
    """A transformers Llama built from a Nemotron-NAS folder the way vLLM's ``DeciLMForCausalLM`` reads it
    (widths from ``block_configs`` via ``n_heads_in_group`` and :func:`ffn_mult_to_intermediate_size`,
    ``no_op`` sublayers skipped with their norms); the weights must match those shapes and names exactly.
    This is the target engine of ``evoprune verify-export`` (vLLM needs a GPU)."""
    cfg, sd = read_nemotron_nas(path)
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    per_layer, linear = {}, {}
    for j, b in enumerate(cfg["block_configs"]):
        a, f = b["attention"], b["ffn"]
        a_lin, f_lin = bool(a.get("replace_with_linear")), bool(f.get("replace_with_linear"))
        linear[j] = {**({"attention": hidden} if a_lin else {}), **({"mlp": hidden} if f_lin else {})}
        per_layer[j] = (0 if a["no_op"] or a_lin else heads,
                        0 if a["no_op"] or a_lin else heads // a["n_heads_in_group"],
                        0 if f["no_op"] or f_lin else ffn_mult_to_intermediate_size(f["ffn_mult"], hidden))
    return _llama(cfg, sd, per_layer, path, linear)


def evoprune_model_from_nemotron_nas(path: str | os.PathLike[str]) -> Any:
    """evoprune's own (unpadded) model of a Nemotron-NAS folder: the real widths its ``evoprune`` section
    records, sliced out of the padded weights (zero heads and channels removed)."""
    cfg, sd = read_nemotron_nas(path)
    real = (cfg.get("evoprune") or {}).get("real_widths")
    if not real or len(real) != len(cfg["block_configs"]):
        raise ValueError(f"{path}: config.json has no evoprune.real_widths; it was not written by evoprune's "
                         "Nemotron-NAS export.")
    heads = cfg["num_attention_heads"]
    hd = cfg["head_dim"]
    per_layer, linear = {}, {}
    for j, w in enumerate(real):
        kv, q, mc = w["num_kv_heads"], w["q_per_kv"], w["mlp_channels"]
        linear[j] = {**({"attention": cfg["hidden_size"]} if w.get("attn_linear") else {}),
                     **({"mlp": cfg["hidden_size"]} if w.get("mlp_linear") else {})}
        p = f"model.layers.{j}."
        if kv:
            group = heads // kv
            keep = torch.cat([torch.arange(g * group * hd, (g * group + q) * hd) for g in range(kv)])
            for name, dim in (("self_attn.q_proj.weight", 0), ("self_attn.q_proj.bias", 0),
                              ("self_attn.o_proj.weight", 1)):
                if p + name in sd:
                    sd[p + name] = sd[p + name].index_select(dim, keep).contiguous()
        if mc:
            for name, dim in (("mlp.gate_proj.weight", 0), ("mlp.up_proj.weight", 0), ("mlp.down_proj.weight", 1),
                              ("mlp.gate_proj.bias", 0), ("mlp.up_proj.bias", 0)):
                if p + name in sd:
                    sd[p + name] = sd[p + name].narrow(dim, 0, mc).contiguous()
        per_layer[j] = (kv * q, kv, mc)
    return _llama(cfg, sd, per_layer, path, linear)


def _llama(cfg: dict[str, Any], sd: dict[str, torch.Tensor], widths: dict[int, tuple[int, int, int]],
           path: Any, linear: dict[int, dict[str, int]] | None = None) -> Any:
    """A transformers Llama whose block ``j`` has ``widths[j] = (q heads, kv heads, mlp)`` (0: dropped; with
    ``linear[j]`` ``{"attention" | "mlp": hidden}``: replaced by DeciLM's ``linear_attn`` / ``linear_mlp``),
    loaded from ``sd`` with exact names and shapes."""
    from transformers import LlamaConfig, LlamaForCausalLM  # deferred: keeps `import evoprune.pruning` cheap

    linear = {j: v for j, v in (linear or {}).items() if v}
    for old, new in ((".self_attn.linear_attn.weight", ".self_attn.A.weight"),
                     (".mlp.linear_mlp.weight", ".mlp.A.weight")):  # DeciLM's names -> evoprune's module
        for n in [n for n in sd if n.endswith(old)]:
            sd[n[: -len(old)] + new] = sd.pop(n)
    per_layer = {}
    for j, (nq, nkv, mc) in widths.items():
        over: dict[str, Any] = {}
        skip = []
        if nkv:
            over.update(num_attention_heads=nq, num_key_value_heads=nkv)
        else:
            skip.append("attention")
        if mc:
            over["intermediate_size"] = mc
        else:
            skip.append("mlp")
        if skip:
            over["skip"] = skip
        if linear:
            over["linear"] = linear.get(j, {})
        per_layer[j] = over
    keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
            "num_hidden_layers", "vocab_size", "max_position_embeddings", "rms_norm_eps", "hidden_act",
            "rope_parameters", "tie_word_embeddings", "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id")
    kw = {k: cfg[k] for k in keys if k in cfg}
    kw["intermediate_size"] = max(kw["intermediate_size"], 1)
    kw["attention_bias"] = bool(cfg.get("qkv_bias", cfg.get("attention_bias", False)))
    kw.update(per_layer_config=per_layer, allow_global_per_layer_attribute_access=True)
    config = LlamaConfig(**kw)
    with per_layer_modules(), torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    if kw["attention_bias"] and not cfg.get("attention_bias", False):
        # vLLM: qkv_bias without attention_bias -> no o_proj bias; Llama's flag adds one: zeros
        for n in list(expected):
            if n.endswith("o_proj.bias"):
                sd[n] = torch.zeros(expected[n])
    got = {n: tuple(t.shape) for n, t in sd.items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))[:4]
        extra = sorted(set(got) - set(expected))[:4]
        wrong = sorted(n for n in set(got) & set(expected) if got[n] != expected[n])[:4]
        raise ValueError(f"{path}: weights do not match block_configs (missing {missing}, unexpected {extra}, "
                         f"wrong shape {wrong}).")
    model.load_state_dict(sd, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:  # rotary inv_freq: rebuild on CPU
            mod_name, _, bname = name.rpartition(".")
            mod = model.get_submodule(mod_name)
            mod._buffers[bname] = getattr(type(mod)(config=config), bname)
    return model.float().eval()
