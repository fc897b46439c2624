"""The one per-architecture registry, keyed by transformers' ``config.model_type``.

Each entry is an :class:`ArchFacts`: what the search space and the cost model need to
know about an architecture beyond its config's sizes (biases, q/k norms, fused
projections). The pruning backend's ``ArchAdapter`` *is* an :class:`ArchFacts` (a
subclass that adds where the modules live), and ``evoprune.pruning.register_adapter``
stores it here, so registering an adapter is all it takes to add an architecture.
This module holds the built-in facts itself, so ``evoprune.space`` works without torch;
importing ``evoprune.pruning`` replaces each built-in entry by its adapter (same facts).

>>> from evoprune.space import get_arch, registered_model_types
>>> registered_model_types()
('llama', 'mistral', 'phi3', 'qwen2', 'qwen3')
>>> get_arch("phi3").fused_qkv, get_arch("qwen3").qk_norm, get_arch("qwen2").qkv_bias
(True, True, True)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

__all__ = ["ArchFacts", "find_arch", "get_arch", "register_arch", "registered_archs", "registered_model_types"]

_BIAS_FLAGS = ("qkv_bias", "o_bias", "mlp_bias")
_SHAPE_FLAGS = ("qk_norm", "fused_qkv", "fused_gate_up")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArchFacts:
    """Per-architecture facts of the parameter count.

    Args:
        model_type: the transformers ``config.model_type``.
        qkv_bias: q/k/v projections have biases; ``None`` reads ``config.attention_bias``.
        o_bias: the output projection has a bias; ``None`` reads ``config.attention_bias``.
        mlp_bias: gate/up/down have biases; ``None`` reads ``config.mlp_bias``.
        qk_norm: attention has per-``head_dim`` ``q_norm`` and ``k_norm`` (Qwen3).
        fused_qkv: q, k, v are one ``[q | k | v]`` projection (Phi-3's ``qkv_proj``).
        fused_gate_up: gate and up are one ``[gate | up]`` projection (Phi-3's ``gate_up_proj``).

    A config attribute that is missing reads as ``False``.
    """

    model_type: str
    qkv_bias: bool | None = None
    o_bias: bool | None = None
    mlp_bias: bool | None = None
    qk_norm: bool = False
    fused_qkv: bool = False
    fused_gate_up: bool = False

    def __post_init__(self) -> None:
        if not self.model_type or not isinstance(self.model_type, str):
            raise ValueError(f"{type(self).__name__}.model_type must be a non-empty string, got {self.model_type!r}.")
        for name in _BIAS_FLAGS:
            if getattr(self, name) not in (None, True, False):
                raise ValueError(f"{type(self).__name__}.{name} must be True, False or None (read the config).")
        for name in _SHAPE_FLAGS:
            if getattr(self, name) not in (True, False):
                raise ValueError(f"{type(self).__name__}.{name} must be True or False, got {getattr(self, name)!r}.")

    def facts(self) -> "ArchFacts":
        """These facts as a plain :class:`ArchFacts` (drops what a subclass adds)."""
        return ArchFacts(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ArchFacts)})

    def resolve(self, get: Callable[[str, Any], Any]) -> dict[str, bool]:
        """The six flags for one config (``get(name, default)`` reads it); ``None`` biases resolved."""
        attention_bias = bool(get("attention_bias", False))
        return {
            "qkv_bias": attention_bias if self.qkv_bias is None else self.qkv_bias,
            "o_bias": attention_bias if self.o_bias is None else self.o_bias,
            "mlp_bias": bool(get("mlp_bias", False)) if self.mlp_bias is None else self.mlp_bias,
            **{name: getattr(self, name) for name in _SHAPE_FLAGS},
        }


_REGISTRY: dict[str, ArchFacts] = {}


def register_arch(facts: ArchFacts, *, replace: bool = False) -> ArchFacts:
    """Register ``facts`` for its ``model_type`` (``evoprune.pruning.register_adapter`` calls this).

    An entry with the same facts is replaced silently (that is how the pruning backend's
    adapters take over the built-in entries); different facts need ``replace=True``.
    """
    if not isinstance(facts, ArchFacts):
        raise TypeError(f"register_arch expects ArchFacts, got {type(facts).__name__}.")
    old = _REGISTRY.get(facts.model_type)
    if old is not None and not replace and old.facts() != facts.facts():
        raise ValueError(
            f"model_type={facts.model_type!r} is already registered with other facts ({old.facts()}); "
            "pass replace=True to override it."
        )
    _REGISTRY[facts.model_type] = facts
    return facts


def registered_model_types() -> tuple[str, ...]:
    """The ``model_type`` of every registered architecture, sorted."""
    return tuple(sorted(_REGISTRY))


def registered_archs() -> tuple[ArchFacts, ...]:
    """Every registered entry, sorted by ``model_type``."""
    return tuple(_REGISTRY[k] for k in sorted(_REGISTRY))


def find_arch(model_type: Any) -> ArchFacts | None:
    """The registered entry for ``model_type``, or ``None``."""
    return _REGISTRY.get(model_type) if isinstance(model_type, str) else None


def get_arch(model_type: Any) -> ArchFacts:
    """The registered entry for ``model_type`` (``ValueError`` naming the supported ones otherwise)."""
    entry = find_arch(model_type)
    if entry is None:
        raise ValueError(
            f"evoprune does not support model_type={model_type!r}; supported architectures: "
            f"{', '.join(registered_model_types())} (evoprune.pruning.register_adapter adds one)."
        )
    return entry


for _facts in (
    ArchFacts(model_type="llama"),
    ArchFacts(model_type="mistral", qkv_bias=False, o_bias=False, mlp_bias=False),
    ArchFacts(model_type="qwen2", qkv_bias=True, o_bias=False, mlp_bias=False),
    ArchFacts(model_type="qwen3", mlp_bias=False, qk_norm=True),
    ArchFacts(model_type="phi3", qkv_bias=False, o_bias=False, mlp_bias=False, fused_qkv=True, fused_gate_up=True),
):
    register_arch(_facts)
del _facts
