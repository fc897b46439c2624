"""The stage funnel (how many candidates each stage scored and promoted, and the tokens it spent) and
stage fidelity (first-stage value vs final value of the candidates that reached the last stage, with
their Spearman rank correlation).

>>> spearman([1, 2, 3, 4], [10, 20, 40, 30])
0.8
>>> spearman([1, 1, 2], [3, 3, 1])
-1.0
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._snapshot import load_snapshot

__all__ = ["FidelityData", "FunnelData", "fidelity_data", "funnel_data", "plot_fidelity", "plot_funnel",
           "spearman"]


def _ranks(a: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's of the average-tie ranks); NaN for fewer than 2 pairs or a
    constant side."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} vs {len(y)} values; pass pairs.")
    if len(x) < 2:
        return math.nan
    rx, ry = _ranks(x) - (len(x) + 1) / 2.0, _ranks(y) - (len(y) + 1) / 2.0
    den = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return round(float(rx @ ry) / den, 12) if den else math.nan


# --------------------------------------------------------------------------- funnel


@dataclasses.dataclass(frozen=True)
class FunnelData:
    """Per stage (pipeline order): trials scored there (``entered``), promoted to the next stage
    (``None`` at the last stage), forward tokens and evaluation seconds spent there by all trials."""

    stages: tuple[str, ...]
    entered: tuple[int, ...]
    promoted: tuple[int | None, ...]
    tokens: tuple[int, ...]
    seconds: tuple[float, ...]


def _stage_order(snap: Any) -> list[str]:
    names = [s.name for s in snap.config.stages]
    for o in snap.outcomes:
        if o.stage not in names:
            names.append(o.stage)
    return names


def funnel_data(study: Any) -> FunnelData:
    """The data of :func:`plot_funnel`, from the stored stage outcomes and records."""
    snap = load_snapshot(study)
    names = _stage_order(snap)
    last = snap.config.stages[-1].name
    entered = {s: set() for s in names}
    promoted = {s: set() for s in names}
    for o in snap.outcomes:
        entered[o.stage].add(o.trial_id)
        if o.promoted:
            promoted[o.stage].add(o.trial_id)
    tokens = dict.fromkeys(names, 0)
    seconds = dict.fromkeys(names, 0.0)
    for r in snap.records:
        if r.stage in tokens:
            tokens[r.stage] += int(r.tokens or 0)
            seconds[r.stage] += float(r.seconds or 0.0)
    return FunnelData(stages=tuple(names), entered=tuple(len(entered[s]) for s in names),
                      promoted=tuple(None if s == last else len(promoted[s]) for s in names),
                      tokens=tuple(tokens[s] for s in names), seconds=tuple(seconds[s] for s in names))


def draw_funnel(data: FunnelData) -> Any:
    """Bars of candidates scored and promoted per stage; the tokens each stage spent on a second axis."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Bar(x=list(data.stages), y=list(data.entered), name="scored at the stage",
                         marker_color="#9aa5b1", text=list(data.entered), textposition="outside",
                         hovertemplate="%{x}: %{y} candidates scored<extra></extra>"), secondary_y=False)
    promoted = [p if p is not None else 0 for p in data.promoted]
    labels = [str(p) if p is not None else "(last stage)" for p in data.promoted]
    fig.add_trace(go.Bar(x=list(data.stages), y=promoted, name="promoted to the next stage", marker_color="#d62728",
                         text=labels, textposition="outside",
                         hovertemplate="%{x}: %{y} promoted<extra></extra>"), secondary_y=False)
    fig.add_trace(go.Scatter(x=list(data.stages), y=list(data.tokens), name="forward tokens spent",
                             mode="lines+markers", line=dict(color="#1f77b4"),
                             customdata=[[f"{s:.1f}"] for s in data.seconds],
                             hovertemplate="%{x}: %{y:,} tokens, %{customdata[0]} s<extra></extra>"),
                  secondary_y=True)
    fig.update_yaxes(title_text="candidates", secondary_y=False)
    fig.update_yaxes(title_text="forward tokens", secondary_y=True, rangemode="tozero")
    fig.update_layout(title=f"Stage funnel ({sum(data.tokens):,} forward tokens in all)", barmode="group",
                      template="plotly_white", legend=dict(orientation="h", y=-0.2))
    return fig


def plot_funnel(study: Any) -> Any:
    """Candidates entering and promoted at each stage, with the tokens per stage."""
    return draw_funnel(funnel_data(study))


# --------------------------------------------------------------------------- fidelity


@dataclasses.dataclass(frozen=True)
class FidelityData:
    """Trials scored at both the first and the last stage: their ``first`` and ``last`` stage objectives,
    and the Spearman correlation of the two (NaN for fewer than 2 trials or a single stage)."""

    first_stage: str
    last_stage: str
    direction: str | None
    numbers: tuple[int, ...]
    first: tuple[float, ...]
    last: tuple[float, ...]
    spearman: float


def fidelity_data(study: Any) -> FidelityData:
    """The data of :func:`plot_fidelity`, from the stored stage outcomes."""
    snap = load_snapshot(study)
    names = [s.name for s in snap.config.stages]
    first_name, last_name = names[0], names[-1]
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    direction = None
    for o in snap.outcomes:
        if o.stage == first_name:
            first[o.trial_id] = o.objective
        if o.stage == last_name:
            last[o.trial_id] = o.objective
            direction = o.direction or direction
    ids = [] if len(names) < 2 else sorted(
        (tid for tid in first if tid in last and math.isfinite(first[tid]) and math.isfinite(last[tid])),
        key=lambda tid: snap.number_of.get(tid, tid))
    a, b = [first[t] for t in ids], [last[t] for t in ids]
    return FidelityData(first_stage=first_name, last_stage=last_name, direction=direction,
                        numbers=tuple(snap.number_of.get(t, -1) for t in ids), first=tuple(a), last=tuple(b),
                        spearman=spearman(a, b) if ids else math.nan)


def draw_fidelity(data: FidelityData) -> Any:
    """Scatter of first-stage vs final-stage objective, the rank correlation in the title."""
    import plotly.graph_objects as go

    rho = "n/a" if math.isnan(data.spearman) else f"{data.spearman:.3f}"
    fig = go.Figure(go.Scatter(x=list(data.first), y=list(data.last), mode="markers", name="candidates",
                               text=[f"trial {n}" for n in data.numbers], marker=dict(color="#1f77b4", size=8),
                               hovertemplate="%{text}<br>" + data.first_stage + " %{x:.4g}<br>" + data.last_stage
                                             + " %{y:.4g}<extra></extra>"))
    if data.first:
        lo, hi = min(data.first + data.last), max(data.first + data.last)
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x",
                                 line=dict(color="#9aa5b1", dash="dot"), hoverinfo="skip"))
    fig.update_layout(
        title=f"Stage fidelity: Spearman rank correlation {rho} ({len(data.numbers)} candidates scored at both "
              f"{data.first_stage!r} and {data.last_stage!r})",
        xaxis_title=f"{data.first_stage} objective (cheap)", yaxis_title=f"{data.last_stage} objective (final)",
        template="plotly_white", hovermode="closest")
    return fig


def plot_fidelity(study: Any) -> Any:
    """First-stage vs final value of the candidates that reached the last stage."""
    return draw_fidelity(fidelity_data(study))
