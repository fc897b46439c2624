"""Per-architecture adapters: where a decoder block keeps its projections and norms.

An adapter is a small frozen descriptor registered by ``model_type``. The pruning
backend never hard-codes module names; it asks the adapter. Fused projections
are described by their row layout: Phi-3's ``qkv_proj`` rows are ``[q | k | v]``
and its ``gate_up_proj`` rows are ``[gate | up]``.

:class:`ArchAdapter` is an :class:`evoprune.space.ArchFacts` (the facts the cost model
needs) plus module names, and it lives in the one per-architecture registry of
``evoprune.space``: :func:`register_adapter` is all it takes to add an architecture.

Example::

    >>> from evoprune.pruning import get_adapter
    >>> get_adapter("phi3").qkv, get_adapter("phi3").fused_qkv
    ('qkv_proj', True)
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from ..space import ArchFacts, find_arch, get_arch, register_arch, registered_archs, registered_model_types

__all__ = ["ArchAdapter", "get_adapter", "register_adapter", "registered_model_types"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArchAdapter(ArchFacts):
    """How to find the prunable parts of one architecture's decoder blocks (and its cost facts).

    Args:
        model_type: the transformers ``config.model_type`` this adapter serves.
        qkv_bias, o_bias, mlp_bias: whether the projections have biases (``None``: read
            ``config.attention_bias`` / ``config.mlp_bias``, missing = ``False``); see
            :class:`~evoprune.space.ArchFacts`.
        decoder_layer: dotted path ``"module:Class"`` of the decoder-layer class
            (patched while loading non-uniform checkpoints, see
            :func:`~evoprune.pruning.per_layer_modules`).
        layers: attribute path from the causal-LM model to the ``ModuleList`` of blocks.
        attn, mlp: attribute names of the attention and MLP sublayers in a block.
        attn_norm, mlp_norm: the norms in front of them (dropped with them).
        q, k, v: separate projection names, or ``None`` when ``qkv`` is fused.
        qkv: fused ``[q | k | v]`` projection name, or ``None``.
        o: output projection name.
        gate, up: separate MLP input projections, or ``None`` when ``gate_up`` is fused.
        gate_up: fused ``[gate | up]`` projection name, or ``None``.
        down: MLP output projection name.
        head_norms: the per-``head_dim`` q and k norms inside attention, or ``()`` (kept
            unchanged, e.g. Qwen3's ``("q_norm", "k_norm")``).
        attn_reads_config_heads: the attention forward reads
            ``config.num_attention_heads``/``num_key_value_heads`` (Phi-3 splits its fused
            output that way), so applied mode gives the module a per-layer config copy.
        attn_head_attrs: attention attributes holding head counts; ``"num_key_value_groups"``
            (query heads per KV head) is always set, ``"num_key_value_heads"`` and
            ``"num_heads"`` when listed.

    ``fused_qkv``, ``fused_gate_up`` and ``qk_norm`` follow from ``qkv``, ``gate_up`` and
    ``head_norms`` (not arguments).
    """

    qk_norm: bool = dataclasses.field(init=False, default=False)
    fused_qkv: bool = dataclasses.field(init=False, default=False)
    fused_gate_up: bool = dataclasses.field(init=False, default=False)
    decoder_layer: str
    layers: str = "model.layers"
    attn: str = "self_attn"
    mlp: str = "mlp"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    q: str | None = "q_proj"
    k: str | None = "k_proj"
    v: str | None = "v_proj"
    qkv: str | None = None
    o: str = "o_proj"
    gate: str | None = "gate_proj"
    up: str | None = "up_proj"
    gate_up: str | None = None
    down: str = "down_proj"
    head_norms: tuple[str, ...] = ()
    attn_reads_config_heads: bool = False
    attn_head_attrs: tuple[str, ...] = ("num_key_value_groups",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.decoder_layer, str) or ":" not in self.decoder_layer:
            raise ValueError(
                f"ArchAdapter.decoder_layer must look like 'package.module:ClassName', got {self.decoder_layer!r}."
            )
        separate = (self.q, self.k, self.v)
        if self.qkv is None and any(n is None for n in separate):
            raise ValueError("ArchAdapter: give q, k and v, or a fused qkv projection.")
        if self.qkv is not None and any(n is not None for n in separate):
            raise ValueError("ArchAdapter: with a fused qkv projection set q=k=v=None.")
        if self.gate_up is None and (self.gate is None or self.up is None):
            raise ValueError("ArchAdapter: give gate and up, or a fused gate_up projection.")
        if self.gate_up is not None and (self.gate is not None or self.up is not None):
            raise ValueError("ArchAdapter: with a fused gate_up projection set gate=up=None.")
        object.__setattr__(self, "head_norms", tuple(self.head_norms))
        object.__setattr__(self, "attn_head_attrs", tuple(self.attn_head_attrs))
        if len(self.head_norms) not in (0, 2):
            raise ValueError(
                f"ArchAdapter.head_norms must name the q and k norms (2 * head_dim parameters) or be (); "
                f"got {self.head_norms}."
            )
        object.__setattr__(self, "qk_norm", bool(self.head_norms))
        object.__setattr__(self, "fused_qkv", self.qkv is not None)
        object.__setattr__(self, "fused_gate_up", self.gate_up is not None)

    # -- module names ------------------------------------------------------------------------
    @property
    def attn_linears(self) -> tuple[str, ...]:
        """Attention projection module names, input side first."""
        return ((self.qkv,) if self.qkv else (self.q, self.k, self.v)) + (self.o,)  # type: ignore[return-value]

    @property
    def mlp_linears(self) -> tuple[str, ...]:
        return ((self.gate_up,) if self.gate_up else (self.gate, self.up)) + (self.down,)  # type: ignore[return-value]

    def decoder_layer_class(self) -> type:
        """Import and return the decoder-layer class."""
        module_name, _, cls_name = self.decoder_layer.partition(":")
        return getattr(importlib.import_module(module_name), cls_name)


def register_adapter(adapter: ArchAdapter, *, replace: bool = False) -> ArchAdapter:
    """Register ``adapter`` for its ``model_type`` (``replace=True`` to override one).

    The adapter goes into the one per-architecture registry of ``evoprune.space``, so
    ``ModelSpec``, ``SearchSpace`` and ``CostModel`` accept the new ``model_type`` too; its
    bias flags (``qkv_bias``/``o_bias``/``mlp_bias``) are what the parameter count needs.

    Example::

        register_adapter(ArchAdapter(model_type="mymodel",
                                     decoder_layer="mypkg.modeling:MyDecoderLayer"))
    """
    if not isinstance(adapter, ArchAdapter):
        raise TypeError(f"register_adapter expects an ArchAdapter, got {type(adapter).__name__}.")
    if isinstance(find_arch(adapter.model_type), ArchAdapter) and not replace:
        raise ValueError(
            f"an adapter for model_type={adapter.model_type!r} is already registered; pass replace=True to override it."
        )
    register_arch(adapter, replace=replace)
    return adapter


def registered_adapters() -> tuple[ArchAdapter, ...]:
    """Every registered adapter, sorted by ``model_type``."""
    return tuple(a for a in registered_archs() if isinstance(a, ArchAdapter))


def get_adapter(obj: Any) -> ArchAdapter:
    """The adapter for a model, a config, or a ``model_type`` string.

    Raises ``ValueError`` naming the supported architectures for anything else.
    """
    if isinstance(obj, str):
        model_type = obj
    else:
        config = getattr(obj, "config", obj)
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        model_type = getattr(config, "model_type", None)
        if model_type is None and isinstance(config, dict):
            model_type = config.get("model_type")
    adapter = find_arch(model_type)
    if not isinstance(adapter, ArchAdapter):
        raise ValueError(
            f"evoprune.pruning does not support model_type={model_type!r}; supported architectures: "
            f"{', '.join(a.model_type for a in registered_adapters())} (register_adapter adds one)."
        )
    return adapter


def _builtin(model_type: str, decoder_layer: str, **modules: Any) -> ArchAdapter:
    """A built-in adapter: bias facts from the registry's built-in entry (one copy of each fact)."""
    facts = get_arch(model_type)
    return ArchAdapter(model_type=model_type, qkv_bias=facts.qkv_bias, o_bias=facts.o_bias,
                       mlp_bias=facts.mlp_bias, decoder_layer=decoder_layer, **modules)


_TF = "transformers.models"
for _adapter in (
    _builtin("llama", f"{_TF}.llama.modeling_llama:LlamaDecoderLayer"),
    _builtin("mistral", f"{_TF}.mistral.modeling_mistral:MistralDecoderLayer"),
    _builtin("qwen2", f"{_TF}.qwen2.modeling_qwen2:Qwen2DecoderLayer"),
    _builtin("qwen3", f"{_TF}.qwen3.modeling_qwen3:Qwen3DecoderLayer", head_norms=("q_norm", "k_norm")),
    _builtin(
        "phi3",
        f"{_TF}.phi3.modeling_phi3:Phi3DecoderLayer",
        q=None,
        k=None,
        v=None,
        qkv="qkv_proj",
        gate=None,
        up=None,
        gate_up="gate_up_proj",
        attn_reads_config_heads=True,
        attn_head_attrs=("num_key_value_groups", "num_key_value_heads"),
    ),
):
    register_adapter(_adapter)  # takes over the built-in entry; its facts must be the same
del _adapter
