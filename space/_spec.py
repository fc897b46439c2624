"""`ModelSpec`: the architecture facts the search space and cost model need.

Built from a transformers config (never from weights), so ``space/`` stays free
of torch models. Per-architecture facts (biases, q/k norms, fused projections)
come from the one registry in :mod:`evoprune.space._archs`; the tests check that
the cost model's parameter count equals the materialized model's ``sum(p.numel())``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .._validate import check_keys
from ._archs import get_arch
from ._candidate import Candidate, LayerConfig
from ._sparsity import kept_per_row


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
        flags = get_arch(model_type).resolve(get)
        hidden = int(get("hidden_size"))
        heads = int(get("num_attention_heads"))
        kv = get("num_key_value_heads") or heads
        head_dim = get("head_dim") or hidden // heads
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
            **flags,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able facts; :meth:`from_dict` rebuilds an equal spec."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "ModelSpec":
        """Inverse of :meth:`to_dict` (not a transformers config: use :meth:`from_config` for those)."""
        names = {f.name for f in dataclasses.fields(cls)}
        check_keys("ModelSpec.from_dict (pass what ModelSpec.to_dict() wrote)", data, names)
        missing = names - set(data)
        if missing:
            raise ValueError(f"ModelSpec.from_dict: missing keys {sorted(missing)}; pass what ModelSpec.to_dict() wrote.")
        return cls(**dict(data))

    def dense_layer(self) -> LayerConfig:
        return LayerConfig(
            num_kv_heads=self.num_kv_heads, q_per_kv=self.q_per_kv, mlp_channels=self.intermediate_size
        )

    def dense_candidate(self) -> Candidate:
        """The candidate that keeps everything."""
        return Candidate(layers=(self.dense_layer(),) * self.num_layers)

    def attn_shapes(self, num_kv_heads: int, q_per_kv: int, *, kv_heads: int | None = None
                    ) -> tuple[tuple[str, int, int], ...]:
        """``((name, out_features, in_features), ...)`` of the kept q, k, v, o weights (``kv_heads``: K/V
        computed for that many heads instead of ``num_kv_heads``, as Probe Pruning's ``gqa: reference``)."""
        h, hd = self.hidden_size, self.head_dim
        q_out, kv_out = num_kv_heads * q_per_kv * hd, (num_kv_heads if kv_heads is None else kv_heads) * hd
        return (("q", q_out, h), ("k", kv_out, h), ("v", kv_out, h), ("o", h, q_out))

    def linear_shapes(self, rank: int) -> tuple[tuple[str, int, int], ...]:
        """``((name, out_features, in_features), ...)`` of a fitted linear replacement of ``rank``: one
        ``hidden x hidden`` matrix at full rank, else ``U`` (hidden -> rank) and ``V`` (rank -> hidden)."""
        h = self.hidden_size
        if rank <= 0:
            return ()
        return (("A", h, h),) if rank >= h else (("U", rank, h), ("V", h, rank))

    def mlp_shapes(self, channels: int) -> tuple[tuple[str, int, int], ...]:
        """``((name, out_features, in_features), ...)`` of the kept gate, up, down weights."""
        h = self.hidden_size
        return (("gate", channels, h), ("up", channels, h), ("down", h, channels))

    def check_sparsity(self, candidate: Candidate) -> None:
        """Raise ``ValueError`` if a sparse linear's width does not fit ``candidate.sparsity_pattern``
        (2:4 needs input widths divisible by 4)."""
        if candidate.sparsity_pattern == "unstructured":
            return
        for i, layer in enumerate(candidate.layers):
            shapes = () if layer.attn_dropped else self.attn_shapes(layer.num_kv_heads, layer.q_per_kv)
            shapes += () if layer.mlp_dropped else self.mlp_shapes(layer.mlp_channels)
            for name, _, in_features in shapes:
                try:
                    kept_per_row(in_features, layer.sparsity_of(name), candidate.sparsity_pattern)
                except ValueError as exc:
                    raise ValueError(f"layer {i} linear {name!r}: {exc}") from None

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
            for name in ("attn_linear", "mlp_linear", "block_linear"):
                if getattr(layer, name) > self.hidden_size:
                    raise ValueError(f"layer {i}: {name}={getattr(layer, name)} is a rank larger than the hidden size "
                                     f"{self.hidden_size}; use a rank of 1..{self.hidden_size}.")
        self.check_sparsity(candidate)
