"""Pareto front plots: any two axes (objectives, last-stage evaluators, cost ratios), and a pairwise
view for three or more objectives.

The front on the chosen axes is :func:`evoprune.study.pareto_front` (the one front rule) over every
feasible COMPLETE trial; the dense model and the baseline trials (candidate source ``"seed"``) are
marked; each point's hover shows every metric and the architecture summary.

>>> from evoprune.search import StudyConfig
>>> from evoprune.space import Candidate, LayerConfig
>>> from evoprune.report import StudySnapshot, TrialView
>>> cfg = StudyConfig(model="reference:tiny", calibration={"num_sequences": 4, "seq_len": 32},
...                   stages=[{"name": "final", "evaluators": ["kl"], "eval_tokens": 256, "seq_len": 32}],
...                   objectives=["kl", "params"])
>>> c = Candidate(layers=(LayerConfig(num_kv_heads=1, q_per_kv=2, mlp_channels=64),)).to_json()
>>> pts = [(0.1, 0.9), (0.2, 0.5), (0.3, 0.6), (0.5, 0.2)]
>>> snap = StudySnapshot(name="demo", url="sqlite://", config=cfg, directions=("minimize", "minimize"),
...     trials=[TrialView(number=i, trial_id=i + 1, state="COMPLETE", source="seed" if i == 3 else "evolution",
...                       candidate_json=c, values=v) for i, v in enumerate(pts)])
>>> data = pareto_plot_data(snap)
>>> data.x, data.y, data.front, data.seeds, data.dense
('params', 'kl', (3, 1, 0), (3,), (1.0, 0.0))
>>> pareto_plot_data(snap, x="latency")
Traceback (most recent call last):
...
ValueError: unknown axis 'latency' for study 'demo'; use one of ['kl', 'params'] (objectives, last-stage evaluators, cost ratios to the dense model).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import numpy as np

from ..space import METRICS
from ..study import pareto_front
from ._snapshot import StudySnapshot, load_snapshot

__all__ = ["ParetoPlotData", "pareto_matrix_data", "pareto_plot_data", "plot_pareto", "plot_pareto_matrix"]

#: dominated points drawn at most (the front, baselines and dense model are always drawn)
MAX_POINTS = 2000


@dataclasses.dataclass(frozen=True)
class ParetoPlotData:
    """The points of one Pareto plot.

    ``numbers``/``xs``/``ys``/``hover``: every feasible COMPLETE trial with finite values on both axes;
    ``front``: trial numbers on the front of these two axes, sorted by x; ``seeds``: baseline trials
    among the points; ``dense``: the dense model's ``(x, y)`` where known; ``total``: feasible COMPLETE
    trials in the study.
    """

    x: str
    y: str
    directions: tuple[str, str]
    numbers: tuple[int, ...]
    xs: tuple[float, ...]
    ys: tuple[float, ...]
    hover: tuple[str, ...]
    front: tuple[int, ...]
    seeds: tuple[int, ...]
    dense: tuple[float, float] | None
    total: int


def _default_axes(snap: StudySnapshot) -> tuple[str, str]:
    objs = list(snap.objectives)
    metrics = [m for m in ("params", "flops", "kv_bytes") if m in snap.axes and m not in objs]
    pair = objs[:2] if len(objs) >= 2 else objs + (metrics[:1] or [a for a in snap.axes if a not in objs][:1])
    if len(pair) < 2:
        raise ValueError(f"study {snap.name!r} has a single axis {pair}; a Pareto plot needs two (cost ratios need "
                         f"the model's config: {snap.space_note or 'unavailable'}).")
    x, y = pair
    if y in METRICS and x not in METRICS:  # size on x, quality on y
        x, y = y, x
    return x, y


def pareto_plot_data(study: Any, x: str | None = None, y: str | None = None, *,
                     max_points: int | None = None) -> ParetoPlotData:
    """The data of :func:`plot_pareto`: ``x``/``y`` are axis names (default: the first two objectives, a
    cost ratio on x; for a single-objective study the objective vs the params ratio). See
    :attr:`StudySnapshot.axes` for the names; an unknown one raises a ``ValueError`` listing them.

    ``max_points``: keep at most that many dominated points (an even sample, in trial order; the front
    is computed on all of them first, and front and baseline points are always kept); ``total`` still
    counts every feasible COMPLETE trial."""
    snap = load_snapshot(study)
    dx, dy = _default_axes(snap) if x is None or y is None else (x, y)
    x, y = snap.check_axis(x or dx), snap.check_axis(y or dy)
    directions = (snap.direction(x), snap.direction(y))
    numbers, xs, ys = [], [], []
    for n in snap.complete_numbers():
        vx, vy = snap.value(n, x), snap.value(n, y)
        if math.isfinite(vx) and math.isfinite(vy):
            numbers.append(n)
            xs.append(vx)
            ys.append(vy)
    keep = pareto_front(np.column_stack([xs, ys]) if numbers else np.empty((0, 2)), list(directions))
    front = tuple(numbers[i] for i in sorted(keep, key=lambda i: (xs[i], ys[i], numbers[i])))
    seeds = tuple(n for n in numbers if snap.trials[n].source == "seed")
    if max_points is not None:
        marked = set(front) | set(seeds)
        rest = [i for i, n in enumerate(numbers) if n not in marked]
        if len(rest) > max_points:
            drop = set(rest) - {rest[int(k)] for k in np.linspace(0, len(rest) - 1, max(0, max_points))}
            kept = [i for i in range(len(numbers)) if i not in drop]
            numbers, xs, ys = [numbers[i] for i in kept], [xs[i] for i in kept], [ys[i] for i in kept]
    dense_x, dense_y = snap.dense_value(x), snap.dense_value(y)
    return ParetoPlotData(
        x=x, y=y, directions=directions, numbers=tuple(numbers), xs=tuple(xs), ys=tuple(ys),
        hover=tuple(snap.hover(n) for n in numbers), front=front, seeds=seeds,
        dense=None if dense_x is None or dense_y is None else (dense_x, dense_y),
        total=len(snap.complete_numbers()),
    )


def pareto_matrix_data(study: Any, *, max_points: int | None = None) -> tuple[ParetoPlotData, ...]:
    """One :class:`ParetoPlotData` per pair of objectives (for three or more objectives)."""
    snap = load_snapshot(study)
    if len(snap.objectives) < 3:
        raise ValueError(f"study {snap.name!r} has {len(snap.objectives)} objectives; the pairwise view needs 3 or "
                         "more (use plot_pareto for two axes).")
    return tuple(pareto_plot_data(snap, a, b, max_points=max_points)
                 for a, b in itertools.combinations(snap.objectives, 2))


def axis_title(name: str, direction: str) -> str:
    """``"params (ratio to dense), lower is better"``."""
    arrow = "lower is better" if direction == "minimize" else "higher is better"
    unit = " (ratio to dense)" if name in METRICS else ""
    return f"{name}{unit}, {arrow}"


def _traces(data: ParetoPlotData, go: Any, *, legend: bool) -> list[Any]:
    index = {n: i for i, n in enumerate(data.numbers)}
    traces = []

    def scatter(idx: list[int], name: str, **kw: Any) -> Any:
        return go.Scatter(x=np.array([data.xs[i] for i in idx], dtype=float),
                          y=np.array([data.ys[i] for i in idx], dtype=float),
                          text=[data.hover[i] for i in idx], hovertemplate="%{text}<extra>" + name + "</extra>",
                          name=name, legendgroup=name, showlegend=legend, **kw)

    marked = set(data.front) | set(data.seeds)
    rest = [i for i, n in enumerate(data.numbers) if n not in marked]
    label = "trials" if len(data.numbers) == data.total else f"trials (a sample: {len(data.numbers)} of {data.total})"
    traces.append(scatter(rest, label, mode="markers", marker=dict(color="#9aa5b1", size=6, opacity=0.6)))
    traces.append(scatter([index[n] for n in data.front], "Pareto front", mode="lines+markers",
                          line=dict(color="#d62728", width=2), marker=dict(color="#d62728", size=9)))
    if data.seeds:
        traces.append(scatter([index[n] for n in data.seeds], "baselines (seed)", mode="markers",
                              marker=dict(symbol="diamond", size=12, color="rgba(0,0,0,0)",
                                          line=dict(color="#1f77b4", width=2))))
    if data.dense is not None:
        traces.append(go.Scatter(x=[data.dense[0]], y=[data.dense[1]], mode="markers", name="dense model",
                                 legendgroup="dense model", showlegend=legend,
                                 marker=dict(symbol="star", size=15, color="#2ca02c"),
                                 hovertemplate=f"dense model<br>{data.x} %{{x:.4g}} · {data.y} %{{y:.4g}}"
                                               "<extra></extra>"))
    return traces


def _import_go() -> Any:
    import plotly.graph_objects as go

    return go


def draw_pareto(data: ParetoPlotData, *, title: str | None = None) -> Any:
    """The plotly figure of a :class:`ParetoPlotData`."""
    go = _import_go()
    fig = go.Figure(_traces(data, go, legend=True))
    fig.update_layout(
        title=title or f"Pareto front: {data.y} vs {data.x} ({len(data.front)} on the front of {data.total} "
                       "complete trials)",
        xaxis_title=axis_title(data.x, data.directions[0]),
        yaxis_title=axis_title(data.y, data.directions[1]),
        hovermode="closest", template="plotly_white", legend=dict(orientation="h", y=-0.2),
    )
    return fig


def plot_pareto(study: Any, x: str | None = None, y: str | None = None, *, max_points: int = MAX_POINTS) -> Any:
    """Pareto front of two axes (see :func:`pareto_plot_data`) as a plotly figure; beyond ``max_points``
    dominated trials an even sample of them is drawn (the front, baselines and dense model always)."""
    return draw_pareto(pareto_plot_data(study, x, y, max_points=max_points))


def draw_pareto_matrix(datas: tuple[ParetoPlotData, ...]) -> Any:
    """Side-by-side Pareto plots, one per pair of objectives (each with its own 2-D front)."""
    go = _import_go()
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(datas), subplot_titles=[f"{d.y} vs {d.x}" for d in datas],
                        horizontal_spacing=0.08)
    for col, d in enumerate(datas, start=1):
        for tr in _traces(d, go, legend=col == 1):
            fig.add_trace(tr, row=1, col=col)
        fig.update_xaxes(title_text=axis_title(d.x, d.directions[0]), row=1, col=col)
        fig.update_yaxes(title_text=axis_title(d.y, d.directions[1]), row=1, col=col)
    fig.update_layout(title="Pairwise Pareto fronts of the objectives", template="plotly_white",
                      hovermode="closest", legend=dict(orientation="h", y=-0.25))
    return fig


def plot_pareto_matrix(study: Any, *, max_points: int = MAX_POINTS) -> Any:
    """The pairwise view of a study with three or more objectives (see :func:`pareto_matrix_data`)."""
    return draw_pareto_matrix(pareto_matrix_data(study, max_points=max_points))
