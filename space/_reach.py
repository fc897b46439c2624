"""What a space can reach: the drop states of a block, the most a candidate can drop in a count
metric, and the check (at construction) that every budget can be met, with a one-line error that says
what to loosen. A mixin of :class:`~evoprune.space.SearchSpace` (it reads the space's genes, budget
and cost model)."""

from __future__ import annotations

from typing import Any

from ._candidate import LayerConfig
from ._cost import COUNT_METRICS, Budget, _layer_count

__all__ = ["ReachMixin"]


class ReachMixin:
    """Budget reachability of a :class:`~evoprune.space.SearchSpace`."""

    spec: Any
    genes: Any
    budget: Any
    frozen_layers: Any
    _layer_genes: Any

    def _layer_drop_states(self, i: int) -> tuple[tuple[bool, bool], ...]:
        """``(attn dropped, mlp dropped)`` states block ``i`` can take in this space."""
        g = self._layer_genes[i]
        attn = "attn" in g and self.genes[g["attn"]].drops
        mlp = "mlp" in g and self.genes[g["mlp"]].drops
        states = [(False, False)]
        if attn:
            states.append((True, False))
        if mlp:
            states.append((False, True))
        if "block" in g or (attn and mlp):
            states.append((True, True))
        return tuple(states)

    def max_count(self, metric: str, *, keep_one: bool = True) -> int:
        """The most a candidate of this space can drop in a count metric (:data:`COUNT_METRICS`).

        With ``keep_one`` (default) at least one block stays, as in every candidate;
        without it, the number of droppable blocks/sublayers (the reference of count
        ratios, see :meth:`dense_cost`).
        """
        if metric not in COUNT_METRICS:
            raise ValueError(f"max_count: {metric!r} is not a count metric; use one of {COUNT_METRICS}.")
        total, slack = 0, []
        for i in range(self.spec.num_layers):
            values = {s: _state_count(s, metric) for s in self._layer_drop_states(i)}
            best = max(values.values())
            total += best
            slack.append(best - max(v for s, v in values.items() if s != (True, True)))
        if keep_one and min(slack) > 0:
            total -= min(slack)
        return total

    def _check_budget_reachable(self) -> None:
        for b in self.budget:
            if b.is_count:
                self._check_count_budget(b)
                continue
            lo, hi = b.bounds(self.dense_cost(b.metric))
            if hi is not None:
                _, smallest = self._extreme(b.metric, minimize=True)
                if smallest > hi:
                    raise ValueError(
                        f"Budget {b.metric} <= {hi:.6g} cannot be met: the cheapest candidate in this space costs "
                        f"{smallest:.6g} ({smallest / self.dense_cost(b.metric):.1%} of dense). Loosen the budget or "
                        "allow more compression (narrower attn_levels/mlp_min, drop_attention/drop_mlp/drop_blocks, "
                        "higher sparsity_levels, fewer frozen_layers)."
                    )
            if lo is not None:
                _, largest = self._extreme(b.metric, minimize=False)
                if largest < lo:
                    raise ValueError(
                        f"Budget {b.metric} >= {lo:.6g} cannot be met: the largest candidate in this space costs "
                        f"{largest:.6g}. Lower min_ratio/min_value."
                    )

    def _check_count_budget(self, b: Budget) -> None:
        what = b.metric.partition("_")[2]
        name = {"blocks": "blocks", "attn": "attention sublayers", "mlp": "MLP sublayers",
                "sublayers": "sublayers"}[what]
        if self.max_count(b.metric, keep_one=False) == 0:
            hint = {"blocks": "drop_blocks=True (or drop_attention=True and drop_mlp=True)",
                    "attn": "drop_attention=True (or drop_blocks=True)",
                    "mlp": "drop_mlp=True (or drop_blocks=True)",
                    "sublayers": "drop_attention=True and/or drop_mlp=True (or drop_blocks=True)"}[what]
            raise ValueError(
                f"Budget on {b.metric!r}: this space drops no {name}; pass {hint} or remove the budget."
            )
        lo, _ = b.bounds(self.dense_cost(b.metric))
        most = self.max_count(b.metric)
        if lo is not None and lo > most:
            frozen = f", {len(self.frozen_layers)} frozen" if self.frozen_layers else ""
            raise ValueError(
                f"Budget {b.metric} >= {lo:g} cannot be met: this space can drop at most {most} {name} "
                f"({self.spec.num_layers} layers{frozen}; one block always stays). Lower the count, or unfreeze "
                "layers / enable more drop_* options."
            )


def _state_count(state: tuple[bool, bool], metric: str) -> int:
    """A block's count in ``metric`` when its attention/MLP are dropped as in ``state``."""
    attn, mlp = state
    return _layer_count(LayerConfig(num_kv_heads=0 if attn else 1, q_per_kv=0 if attn else 1,
                                    mlp_channels=0 if mlp else 1), metric)
