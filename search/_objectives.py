"""Objective name -> what produces it and its direction: the one resolver.

A study's objectives are names. Each is either an evaluator of the **last stage** (its value on
the final token set; the direction is the evaluator's) or a cost metric of the space
(:data:`~evoprune.space.METRICS`, a ratio to the dense model, minimized). ``"kl"`` also names
the last stage's :class:`~evoprune.evaluators.KLToDense` when it was given another name. The
study config, the study's Optuna directions and the search driver all ask this module.

>>> from evoprune.evaluators import Cost, KLToDense, Pipeline, Stage
>>> pipe = Pipeline([Stage(name="final", evaluators=[KLToDense(name="kl_topk", top_k=8)], eval_tokens=64)])
>>> objective_directions(["kl", "params"], pipe)
['minimize', 'minimize']
>>> objective_source("kl", pipe).kind, objective_source("params", pipe).metric
('evaluator', 'params')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from ..space import METRICS

__all__ = ["ObjectiveSource", "objective_directions", "objective_source"]


@dataclasses.dataclass(frozen=True)
class ObjectiveSource:
    """Where an objective's value comes from: ``kind`` ``"evaluator"`` (``evaluator`` set) or
    ``"cost"`` (``metric`` set); ``direction`` is the Optuna direction."""

    name: str
    kind: str
    direction: str
    evaluator: Any = None
    metric: str | None = None


def objective_source(name: str, pipeline: Any, space: Any = None) -> ObjectiveSource:
    """Resolve objective ``name`` against the last stage of ``pipeline`` (and ``space``, when given,
    to check that a ``latency`` cost objective has a latency table)."""
    last = pipeline.stages[-1]
    evaluator = next((ev for ev in last.evaluators if ev.name == name), None)
    if evaluator is None and name == "kl":
        from ..evaluators import KLToDense  # the evaluators are built: torch is loaded already

        evaluator = next((ev for ev in last.evaluators if isinstance(ev, KLToDense)), None)
    if evaluator is not None:
        return ObjectiveSource(name=name, kind="evaluator", direction=evaluator.direction, evaluator=evaluator)
    if name in METRICS:
        if name == "latency" and space is not None and space.latency is None:
            raise ValueError(
                "objective 'latency': add a Latency() evaluator named 'latency' to the last stage (measured), "
                "or give the space a LatencyTable (space option latency=...)."
            )
        return ObjectiveSource(name=name, kind="cost", direction="minimize", metric=name)
    names = [ev.name for ev in last.evaluators]
    raise ValueError(
        f"objective {name!r} is neither an evaluator of the last stage {last.name!r} ({names}) nor a cost metric "
        f"{METRICS}; use one of those names (or 'kl' for the last stage's KL evaluator)."
    )


def objective_directions(objectives: Sequence[str], pipeline: Any, space: Any = None) -> list[str]:
    """Optuna study directions for ``objectives`` (create the study with ``directions=``)."""
    return [objective_source(name, pipeline, space).direction for name in objectives]
