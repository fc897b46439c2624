"""Analytic cost of a candidate (parameters, FLOPs, KV-cache bytes) without a forward pass."""

from __future__ import annotations

import time
from typing import Any

import torch

from ._base import EvalContext, EvalResult

__all__ = ["Cost"]


class Cost:
    """A cost-model metric of the candidate (minimize); the model is not run.

    Uses ``context.cost_model`` (an ``evoprune.space.CostModel``), i.e.
    ``cost_model.cost(candidate, metric)``; with ``relative=True`` (default) the
    value is that divided by the dense model's cost.

    Args:
        metric: ``"params"``, ``"nonzero_params"``, ``"flops"``, ``"kv_bytes"``
            or ``"latency"`` (the cost model's predicted latency table).
        relative: divide by the dense cost.
        seq_len: context length for ``"flops"`` (default: the cost model's).

    Example::

        >>> from evoprune.space import CostModel, ModelSpec
        >>> spec = ModelSpec.from_config(dict(model_type="llama", num_hidden_layers=2, hidden_size=64,
        ...     num_attention_heads=8, num_key_value_heads=4, intermediate_size=96, vocab_size=97))
        >>> ctx = EvalContext(cost_model=CostModel(spec))
        >>> cand = spec.dense_candidate().replace_layer(1, num_kv_heads=0, q_per_kv=0, mlp_channels=0)
        >>> round(Cost(metric="kv_bytes").evaluate(None, cand, ctx).value, 3)
        0.5
    """

    direction = "minimize"

    def __init__(
        self, *, metric: str = "params", relative: bool = True, seq_len: int | None = None, name: str | None = None
    ) -> None:
        self.metric = metric
        self.relative = relative
        self.seq_len = seq_len
        self.name = name or (f"{metric}_ratio" if relative else metric)

    def __repr__(self) -> str:
        return f"Cost(metric={self.metric!r}, relative={self.relative})"

    def evaluate(self, model: torch.nn.Module | None, candidate: Any, context: EvalContext) -> EvalResult:
        cm = context.cost_model
        if cm is None:
            raise ValueError("Cost needs context.cost_model (e.g. evoprune.space.CostModel(ModelSpec.from_config(cfg))).")
        start = time.perf_counter()
        kw = {"seq_len": self.seq_len} if self.seq_len is not None and self.metric == "flops" else {}
        absolute = float(cm.cost(candidate, self.metric, **kw))
        dense = float(cm.cost(cm.spec.dense_candidate(), self.metric, **kw))
        value = absolute / dense if self.relative else absolute
        return EvalResult(
            value=value,
            details={"metric": self.metric, "value": absolute, "dense": dense},
            tokens=None,
            seconds=time.perf_counter() - start,
        )
