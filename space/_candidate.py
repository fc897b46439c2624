"""`Candidate`: a pure value that says, layer by layer, what of a dense model to keep.

A candidate never refers to weights. Together with the dense model it determines
exactly one pruned model (the pruning backend orders heads and channels by
importance once, so "keep k" always means "keep the k most important").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from .._validate import check_keys
from ._sparsity import SPARSITY_PATTERNS, check_sparsity

LINEAR_NAMES: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
"""Logical names of the seven linear maps of a decoder block (fused projections,
e.g. Phi-3's ``qkv_proj``/``gate_up_proj``, are addressed by their logical parts)."""

ATTN_LINEARS: tuple[str, ...] = ("q", "k", "v", "o")
MLP_LINEARS: tuple[str, ...] = ("gate", "up", "down")

_JSON_VERSION = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerConfig:
    """What one decoder block keeps.

    Args:
        num_kv_heads: KV groups kept (each with its ``q_per_kv`` query heads).
            ``0`` drops the attention sublayer (and its input norm).
        q_per_kv: query heads kept in every kept KV group. Must be ``0`` exactly
            when ``num_kv_heads`` is ``0``.
        mlp_channels: MLP intermediate channels kept. ``0`` drops the MLP
            sublayer (and its input norm).
        sparsity: unstructured sparsity of every kept linear in this block, in
            ``[0, 1)``.
        linear_sparsity: per-linear overrides of ``sparsity`` as
            ``((name, level), ...)`` with names from :data:`LINEAR_NAMES`;
            a mapping is accepted and normalized to a sorted tuple.

        attn_linear, mlp_linear: rank of the linear map that replaces the
            dropped attention / MLP sublayer (``0``: dropped, nothing replaces it):
            the sublayer's output becomes ``norm(x) @ A`` with ``A`` fitted in closed
            form on calibration data (full ``hidden x hidden`` when the rank is the
            hidden size, else ``U @ V`` of that rank). Needs the sublayer dropped.
        block_linear: rank of one linear map that replaces the whole block
            (both sublayers dropped): ``x + input_norm(x) @ A``, fitted to the
            block's whole residual update.

    A block with both sublayers dropped and nothing linear is dropped whole (``dropped``).
    """

    num_kv_heads: int
    q_per_kv: int
    mlp_channels: int
    sparsity: float = 0.0
    linear_sparsity: tuple[tuple[str, float], ...] = ()
    attn_linear: int = 0
    mlp_linear: int = 0
    block_linear: int = 0

    def __post_init__(self) -> None:
        for name in ("num_kv_heads", "q_per_kv", "mlp_channels", "attn_linear", "mlp_linear", "block_linear"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"LayerConfig.{name} must be a non-negative int, got {value!r}.")
        if (self.num_kv_heads == 0) != (self.q_per_kv == 0):
            raise ValueError(
                "LayerConfig: num_kv_heads and q_per_kv must both be 0 (attention dropped) "
                f"or both be positive; got num_kv_heads={self.num_kv_heads}, q_per_kv={self.q_per_kv}."
            )
        if self.attn_linear and self.num_kv_heads:
            raise ValueError("LayerConfig: attn_linear replaces a dropped attention; set num_kv_heads=q_per_kv=0.")
        if self.mlp_linear and self.mlp_channels:
            raise ValueError("LayerConfig: mlp_linear replaces a dropped MLP; set mlp_channels=0.")
        if self.block_linear and (self.num_kv_heads or self.mlp_channels or self.attn_linear or self.mlp_linear):
            raise ValueError("LayerConfig: block_linear replaces the whole block; set num_kv_heads=q_per_kv="
                             "mlp_channels=0 and no attn_linear/mlp_linear.")
        _check_level("LayerConfig.sparsity", self.sparsity)
        object.__setattr__(self, "sparsity", float(self.sparsity))
        items: Iterable[tuple[str, float]]
        if isinstance(self.linear_sparsity, Mapping):
            items = self.linear_sparsity.items()
        else:
            items = self.linear_sparsity
        normalized: dict[str, float] = {}
        for entry in items:
            try:
                name, level = entry
            except (TypeError, ValueError):
                raise ValueError(
                    f"LayerConfig.linear_sparsity entries must be (name, level) pairs, got {entry!r}."
                ) from None
            if name not in LINEAR_NAMES:
                raise ValueError(
                    f"LayerConfig.linear_sparsity: unknown linear {name!r}; use one of {LINEAR_NAMES}."
                )
            if name in normalized:
                raise ValueError(f"LayerConfig.linear_sparsity: linear {name!r} given twice.")
            _check_level(f"LayerConfig.linear_sparsity[{name!r}]", level)
            normalized[name] = float(level)
        object.__setattr__(
            self, "linear_sparsity", tuple(sorted(normalized.items(), key=lambda kv: LINEAR_NAMES.index(kv[0])))
        )

    @property
    def attn_dropped(self) -> bool:
        return self.num_kv_heads == 0

    @property
    def mlp_dropped(self) -> bool:
        return self.mlp_channels == 0

    @property
    def dropped(self) -> bool:
        """The whole block is removed (both sublayers dropped, nothing linear in their place)."""
        return self.attn_dropped and self.mlp_dropped and not self.replaced

    @property
    def replaced(self) -> bool:
        """Some part of the block is a fitted linear map (``attn_linear``, ``mlp_linear``, ``block_linear``)."""
        return bool(self.attn_linear or self.mlp_linear or self.block_linear)

    @property
    def num_q_heads(self) -> int:
        return self.num_kv_heads * self.q_per_kv

    def sparsity_of(self, linear: str) -> float:
        """Sparsity level of one logical linear (``"q"``, ..., ``"down"``)."""
        if linear not in LINEAR_NAMES:
            raise ValueError(f"unknown linear {linear!r}; use one of {LINEAR_NAMES}.")
        for name, level in self.linear_sparsity:
            if name == linear:
                return level
        return self.sparsity

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "num_kv_heads": self.num_kv_heads,
            "q_per_kv": self.q_per_kv,
            "mlp_channels": self.mlp_channels,
        }
        if self.sparsity:
            out["sparsity"] = self.sparsity
        if self.linear_sparsity:
            out["linear_sparsity"] = dict(self.linear_sparsity)
        for name in ("attn_linear", "mlp_linear", "block_linear"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerConfig":
        check_keys(f"LayerConfig {dict(data)!r}", data, (f.name for f in dataclasses.fields(cls)))
        return cls(**dict(data))


class JsonValue:
    """Canonical JSON round trip and a short stable key for a value type with ``to_dict``/``from_dict``
    (:class:`Candidate`, :class:`~evoprune.space.SearchSpace`)."""

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): equal values give equal strings."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Any:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{cls.__name__}.from_json: not valid JSON ({exc}).") from None
        return cls.from_dict(data)

    @property
    def key(self) -> str:
        """Short stable digest of the canonical JSON; used to detect duplicates."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Candidate(JsonValue):
    """A pruned architecture: one :class:`LayerConfig` per dense decoder block.

    Candidates are immutable, hashable and round-trip through JSON::

        >>> from evoprune.space import Candidate, LayerConfig
        >>> c = Candidate(layers=(LayerConfig(num_kv_heads=4, q_per_kv=2, mlp_channels=512),
        ...                       LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0)))
        >>> Candidate.from_json(c.to_json()) == c
        True
        >>> c.kept_layers
        (0,)

    Args:
        layers: one entry per decoder block of the dense model, in order.
        sparsity_pattern: ``"unstructured"`` or ``"2:4"``; with ``"2:4"`` every
            sparsity level must be 0 or 0.5 (two of every four weights kept) and every
            sparse linear's input width a multiple of 4 (checked here for ``down``, whose
            width is ``mlp_channels``; the others by ``ModelSpec.check_candidate``).
    """

    layers: tuple[LayerConfig, ...]
    sparsity_pattern: str = "unstructured"

    def __post_init__(self) -> None:
        layers = tuple(self.layers)
        if not layers:
            raise ValueError("Candidate.layers must not be empty.")
        for i, layer in enumerate(layers):
            if not isinstance(layer, LayerConfig):
                raise TypeError(f"Candidate.layers[{i}] must be a LayerConfig, got {type(layer).__name__}.")
        object.__setattr__(self, "layers", layers)
        if self.sparsity_pattern not in SPARSITY_PATTERNS:
            raise ValueError(
                f"Candidate.sparsity_pattern must be one of {SPARSITY_PATTERNS}, got {self.sparsity_pattern!r}."
            )
        if self.sparsity_pattern == "2:4":
            for i, layer in enumerate(layers):
                for name in LINEAR_NAMES:
                    # down_proj reads the kept MLP channels: its width is known here (the others
                    # need the model: ModelSpec.check_candidate)
                    width = layer.mlp_channels if name == "down" and not layer.mlp_dropped else None
                    try:
                        check_sparsity(layer.sparsity_of(name), "2:4", width)
                    except ValueError as exc:
                        raise ValueError(
                            f"Candidate (sparsity_pattern='2:4'): layer {i} linear {name!r}: {exc}"
                        ) from None
        if all(layer.dropped for layer in layers):
            raise ValueError("Candidate drops every block; keep at least one sublayer.")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def kept_layers(self) -> tuple[int, ...]:
        """Indices (in the dense model) of the blocks that are not dropped whole."""
        return tuple(i for i, layer in enumerate(self.layers) if not layer.dropped)

    @property
    def has_linear(self) -> bool:
        """Some block or sublayer is replaced by a fitted linear map."""
        return any(layer.replaced for layer in self.layers)

    @property
    def has_sparsity(self) -> bool:
        return any(
            layer.sparsity_of(name) > 0 for layer in self.layers for name in LINEAR_NAMES
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": _JSON_VERSION,
            "sparsity_pattern": self.sparsity_pattern,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Candidate":
        version = data.get("version", _JSON_VERSION)
        if version != _JSON_VERSION:
            raise ValueError(
                f"Candidate JSON version {version} is not supported by this evoprune (expects {_JSON_VERSION}); "
                "upgrade evoprune."
            )
        if "layers" not in data:
            raise ValueError("Candidate JSON needs a 'layers' list.")
        return cls(
            layers=tuple(LayerConfig.from_dict(d) for d in data["layers"]),
            sparsity_pattern=data.get("sparsity_pattern", "unstructured"),
        )

    def replace_layer(self, index: int, **changes: Any) -> "Candidate":
        """A copy with layer ``index`` changed (``dataclasses.replace`` semantics)."""
        layers = list(self.layers)
        layers[index] = dataclasses.replace(layers[index], **changes)
        return dataclasses.replace(self, layers=tuple(layers))


def _check_level(what: str, level: Any) -> None:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not (0.0 <= float(level) < 1.0):
        raise ValueError(f"{what} must be a number in [0, 1), got {level!r}.")
