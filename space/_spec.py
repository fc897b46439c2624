"""`ModelSpec`: the architecture facts the search space and cost model need.

Built from a transformers config (never from weights), so ``space/`` stays free
of torch models. The pruning backend's adapters agree with these facts; the
tests check that the cost model's parameter count equals the materialized
model's ``sum(p.numel())``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ._candidate import Candidate, LayerConfig

# model_type -> (qkv_bias, o_bias, mlp_bias, qk_norm, fused_qkv, fused_gate_up)
# ``None`` for qkv_bias/o_bias means: read ``config.attention_bias``; for mlp_bias:
# read ``config.mlp_bias`` (only Llama's MLP honours it; the others hard-code bias=False).
_FLAGS = ("qkv_bias", "o_bias", "mlp_bias", "qk_norm", "fused_qkv", "fused_gate_up")
_ARCH: dict[str, dict[str, Any]] = {
    "llama": dict(zip(_FLAGS, (None, None, None, False, False, False))),
    "mistral": dict(zip(_FLAGS, (False, False, False, False, False, False))),
    "qwen2": dict(zip(_FLAGS, (True, False, False, False, False, False))),
    "qwen3": dict(zip(_FLAGS, (None, None, False, True, False, False))),
    "phi3": dict(zip(_FLAGS, (False, False, False, False, True, True))),
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_ARCH))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Shape facts of a dense decoder-only model.

    Use :meth:`from_config` (any transformers config or a plain dict).
    """

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    fused_qkv: bool
    fused_gate_up: bool

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelSpec: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}."
            )

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, config: Any) -> "ModelSpec":
        """Read a transformers ``PreTrainedConfig`` (or a model, or a dict)."""
        if hasattr(config, "config") and not isinstance(config, dict):
            config = config.config  # a model
        get = (lambda k, d=None: config.get(k, d)) if isinstance(config, dict) else (
            lambda k, d=None: getattr(config, k, d)
        )
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
            get = lambda k, d=None: getattr(config, k, d)  # noqa: E731
        model_type = get("model_type")
        if model_type not in _ARCH:
            raise ValueError(
                f"evoprune does not support model_type={model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}."
            )
        arch = _ARCH[model_type]
        hidden = int(get("hidden_size"))
        heads = int(get("num_attention_heads"))
        kv = get("num_key_value_heads") or heads
        head_dim = get("head_dim") or hidden // heads
        attention_bias = bool(get("attention_bias", False))
        return cls(
            model_type=model_type,
            num_layers=int(get("num_hidden_layers")),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(kv),
            head_dim=int(head_dim),
            intermediate_size=int(get("intermediate_size")),
            vocab_size=int(get("vocab_size")),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            qkv_bias=attention_bias if arch["qkv_bias"] is None else arch["qkv_bias"],
            o_bias=attention_bias if arch["o_bias"] is None else arch["o_bias"],
            mlp_bias=bool(get("mlp_bias", False)) if arch["mlp_bias"] is None else arch["mlp_bias"],
            qk_norm=arch["qk_norm"],
            fused_qkv=arch["fused_qkv"],
            fused_gate_up=arch["fused_gate_up"],
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able facts; :meth:`from_dict` rebuilds an equal spec."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "ModelSpec":
        """Inverse of :meth:`to_dict` (not a transformers config: use :meth:`from_config` for those)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        missing = names - set(data)
        if unknown or missing:
            raise ValueError(
                f"ModelSpec.from_dict: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}; "
                "pass what ModelSpec.to_dict() wrote."
            )
        return cls(**dict(data))

    def dense_layer(self) -> LayerConfig:
        return LayerConfig(
            num_kv_heads=self.num_kv_heads, q_per_kv=self.q_per_kv, mlp_channels=self.intermediate_size
        )

    def dense_candidate(self) -> Candidate:
        """The candidate that keeps everything."""
        return Candidate(layers=(self.dense_layer(),) * self.num_layers)

    def check_candidate(self, candidate: Candidate) -> None:
        """Raise ``ValueError`` if ``candidate`` does not fit this model."""
        if candidate.num_layers != self.num_layers:
            raise ValueError(
                f"candidate has {candidate.num_layers} layers but the model has {self.num_layers}."
            )
        for i, layer in enumerate(candidate.layers):
            if layer.num_kv_heads > self.num_kv_heads:
                raise ValueError(
                    f"layer {i}: num_kv_heads={layer.num_kv_heads} exceeds the model's {self.num_kv_heads}."
                )
            if layer.q_per_kv > self.q_per_kv:
                raise ValueError(f"layer {i}: q_per_kv={layer.q_per_kv} exceeds the model's {self.q_per_kv}.")
            if layer.mlp_channels > self.intermediate_size:
                raise ValueError(
                    f"layer {i}: mlp_channels={layer.mlp_channels} exceeds the model's {self.intermediate_size}."
                )
