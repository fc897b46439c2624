"""What a candidate keeps, as ratios to the dense model: per-layer cells and a one-line summary.

Pure functions of a :class:`~evoprune.space.Candidate` and the dense widths (:class:`DenseWidths`),
shared by the architecture heatmap and every hover text.

>>> from evoprune.space import Candidate, LayerConfig
>>> dense = DenseWidths(num_kv_heads=2, num_heads=4, intermediate_size=176)
>>> c = Candidate(layers=(LayerConfig(num_kv_heads=1, q_per_kv=2, mlp_channels=88, sparsity=0.5),
...                       LayerConfig(num_kv_heads=0, q_per_kv=0, mlp_channels=0)))
>>> layer_cells(c, dense)
((0.5, 0.5, 0.5, 0.0), (0.0, 0.0, 0.0, 1.0))
>>> s = summarize(c, dense)
>>> s.blocks_kept, s.num_layers, s.kv_kept, s.mlp_kept, s.sparsity
(1, 2, 0.25, 0.25, 0.5)
>>> s.text()
'blocks kept 1/2 · KV groups 25% · query heads 25% · MLP width 25% · sparsity 50%'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from ..space import ATTN_LINEARS, MLP_LINEARS, Candidate

__all__ = ["CELL_COLUMNS", "ArchSummary", "DenseWidths", "layer_cells", "summarize"]

#: the heatmap's columns, in the order of :func:`layer_cells`
CELL_COLUMNS: tuple[str, ...] = ("attention kept", "MLP kept", "sparsity", "dropped")


@dataclasses.dataclass(frozen=True)
class DenseWidths:
    """The dense model's widths that kept counts are divided by."""

    num_kv_heads: int
    num_heads: int
    intermediate_size: int

    @classmethod
    def of_spec(cls, spec: Any) -> DenseWidths:
        """From a :class:`~evoprune.space.ModelSpec`."""
        return cls(num_kv_heads=spec.num_kv_heads, num_heads=spec.num_heads, intermediate_size=spec.intermediate_size)

    @classmethod
    def widest(cls, candidates: Iterable[Candidate]) -> DenseWidths:
        """The widest kept widths seen (a stand-in when the model's config cannot be read)."""
        kv = heads = mlp = 1
        for c in candidates:
            for layer in c.layers:
                kv, heads = max(kv, layer.num_kv_heads), max(heads, layer.num_q_heads)
                mlp = max(mlp, layer.mlp_channels)
        return cls(num_kv_heads=kv, num_heads=heads, intermediate_size=mlp)


def _kept_levels(layer: Any) -> list[float]:
    """The sparsity level of each kept linear of ``layer``."""
    names = (() if layer.attn_dropped else ATTN_LINEARS) + (() if layer.mlp_dropped else MLP_LINEARS)
    if not layer.linear_sparsity:  # the common case, without a call per linear
        return [layer.sparsity] * len(names)
    return [layer.sparsity_of(n) for n in names]


def _layer_sparsity(layer: Any) -> float:
    levels = _kept_levels(layer)
    return sum(levels) / len(levels) if levels else 0.0


def layer_cells(candidate: Candidate, dense: DenseWidths) -> tuple[tuple[float, float, float, float], ...]:
    """Per layer: query heads kept / dense heads (= KV groups kept when whole groups are pruned), MLP
    channels kept / dense, mean sparsity of the kept linears, and the dropped fraction of the block's
    two sublayers (1 = block removed, 0.5 = attention or MLP removed)."""
    return tuple(
        (layer.num_q_heads / dense.num_heads, layer.mlp_channels / dense.intermediate_size, _layer_sparsity(layer),
         (int(layer.attn_dropped) + int(layer.mlp_dropped)) / 2)
        for layer in candidate.layers
    )


@dataclasses.dataclass(frozen=True)
class ArchSummary:
    """Means over all layers (a dropped sublayer counts as 0 kept) of what a candidate keeps."""

    blocks_kept: int
    num_layers: int
    kv_kept: float
    heads_kept: float
    mlp_kept: float
    sparsity: float

    def text(self) -> str:
        return (f"blocks kept {self.blocks_kept}/{self.num_layers} · KV groups {self.kv_kept:.0%} · "
                f"query heads {self.heads_kept:.0%} · MLP width {self.mlp_kept:.0%} · sparsity {self.sparsity:.0%}")


def summarize(candidate: Candidate, dense: DenseWidths) -> ArchSummary:
    """The :class:`ArchSummary` of ``candidate``; ``sparsity`` is the mean level of every kept linear."""
    layers = candidate.layers
    n = len(layers)
    levels = [level for layer in layers for level in _kept_levels(layer)]
    return ArchSummary(
        blocks_kept=len(candidate.kept_layers),
        num_layers=n,
        kv_kept=sum(layer.num_kv_heads for layer in layers) / (n * dense.num_kv_heads),
        heads_kept=sum(layer.num_q_heads for layer in layers) / (n * dense.num_heads),
        mlp_kept=sum(layer.mlp_channels for layer in layers) / (n * dense.intermediate_size),
        sparsity=sum(levels) / len(levels) if levels else 0.0,
    )
