"""Optimization history: best-so-far of each objective vs trial number and vs forward tokens spent, and
the hypervolume history of a multi-objective study.

Tokens are the sum of every stage record's tokens of a trial (evaluation and fine-tuning tokens),
accumulated in trial-number order over all trials, pruned ones included; a COMPLETE trial sits at
the tokens spent up to and including it. The hypervolume (:func:`evoprune.study.hypervolume`, the
one rule) is that of the front of the feasible COMPLETE trials so far, against a reference point 10 %
of the value range beyond the worst value of each objective (or one you pass).

>>> from evoprune.search import StudyConfig
>>> from evoprune.report import StudySnapshot, TrialView
>>> cfg = StudyConfig(model="reference:tiny", calibration={"num_sequences": 4, "seq_len": 32},
...                   stages=[{"name": "final", "evaluators": ["kl"], "eval_tokens": 256, "seq_len": 32}],
...                   objectives=["kl", "params"])
>>> pts = [(0.5, 0.5), (0.25, 0.75), (0.75, 0.25)]
>>> snap = StudySnapshot(name="d", url="sqlite://", config=cfg, directions=("minimize", "minimize"),
...     trials=[TrialView(number=i, trial_id=i + 1, state="COMPLETE", values=v) for i, v in enumerate(pts)])
>>> h = history_data(snap, reference=(1.0, 1.0))
>>> h.best
((0.5, 0.5), (0.25, 0.5), (0.25, 0.25))
>>> h.hypervolume
(0.25, 0.3125, 0.375)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..study import hypervolume, pareto_front
from ._snapshot import StudySnapshot, load_snapshot

__all__ = ["HistoryData", "history_data", "plot_history"]

#: hypervolume is computed at most at this many trials (evenly spaced, the last one included)
MAX_HV_POINTS = 250
#: trial values drawn at most per panel (an even sample beyond; the best-so-far lines are exact)
MAX_POINTS = 3000


@dataclasses.dataclass(frozen=True)
class HistoryData:
    """Per feasible COMPLETE trial in number order: ``numbers``, ``values`` and the best-so-far ``best``
    of each objective, ``tokens`` (cumulative forward tokens up to it). ``hypervolume`` at the trials
    ``hv_numbers`` (empty for one objective) against ``reference``. ``total_tokens``: every trial's."""

    objectives: tuple[str, ...]
    directions: tuple[str, ...]
    numbers: tuple[int, ...]
    values: tuple[tuple[float, ...], ...]
    best: tuple[tuple[float, ...], ...]
    tokens: tuple[int, ...]
    total_tokens: int
    hv_numbers: tuple[int, ...] = ()
    hypervolume: tuple[float, ...] = ()
    reference: tuple[float, ...] | None = None


def _best_so_far(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    out = np.empty_like(values)
    for j, d in enumerate(directions):
        col = np.where(np.isnan(values[:, j]), np.inf if d == "minimize" else -np.inf, values[:, j])
        out[:, j] = np.minimum.accumulate(col) if d == "minimize" else np.maximum.accumulate(col)
    return np.where(np.isinf(out), np.nan, out)


def default_reference(values: np.ndarray, directions: Sequence[str]) -> tuple[float, ...]:
    """10 % of each objective's range beyond its worst finite value (1 beyond it when all are equal)."""
    ref = []
    for j, d in enumerate(directions):
        col = values[:, j][np.isfinite(values[:, j])]
        if col.size == 0:
            ref.append(math.nan)
            continue
        worst, best = (col.max(), col.min()) if d == "minimize" else (col.min(), col.max())
        span = abs(worst - best) * 0.1 or 1.0
        ref.append(float(worst + span if d == "minimize" else worst - span))
    return tuple(ref)


def _hypervolume_history(values: np.ndarray, directions: Sequence[str], reference: Sequence[float],
                         max_points: int) -> tuple[list[int], list[float]]:
    """``(indices, hypervolumes)``: the hypervolume of the first ``i + 1`` points at up to ``max_points``
    indices; the front is carried from checkpoint to checkpoint (front of a union = front of the
    previous front and the new points), so each step only looks at a few points."""
    n = len(values)
    checkpoints = list(range(n)) if n <= max_points else sorted(set(np.linspace(0, n - 1, max_points).astype(int)))
    finite = np.all(np.isfinite(values), axis=1)
    front = np.empty((0, values.shape[1]))
    out, start = [], 0
    for i in checkpoints:
        new = values[start:i + 1][finite[start:i + 1]]
        start = i + 1
        if len(new):
            pool = np.vstack([front, new])
            front = pool[pareto_front(pool, directions)]
        out.append(hypervolume(front, reference, directions) if len(front) else 0.0)
    return checkpoints, out


def history_data(study: Any, *, reference: Sequence[float] | None = None,
                 max_hv_points: int = MAX_HV_POINTS) -> HistoryData:
    """The data of :func:`plot_history` (see the module docstring)."""
    snap: StudySnapshot = load_snapshot(study)
    numbers = snap.complete_numbers()
    m = len(snap.objectives)
    values = np.array([snap.trials[n].values for n in numbers], dtype=float).reshape(len(numbers), m)
    best = _best_so_far(values, snap.directions)
    per_trial = snap.tokens_by_trial()
    cumulative, running = {}, 0
    for n in sorted(set(per_trial) | set(numbers)):
        running += per_trial.get(n, 0)
        cumulative[n] = running
    hv_numbers: tuple[int, ...] = ()
    hv: tuple[float, ...] = ()
    ref = None
    if m >= 2 and numbers:
        ref = tuple(float(r) for r in reference) if reference is not None else default_reference(values,
                                                                                                   snap.directions)
        if len(ref) != m:
            raise ValueError(f"reference has {len(ref)} values; study {snap.name!r} has {m} objectives.")
        idx, vols = _hypervolume_history(values, snap.directions, ref, max_hv_points)
        hv_numbers, hv = tuple(numbers[i] for i in idx), tuple(float(v) for v in vols)
    return HistoryData(
        objectives=snap.objectives, directions=snap.directions, numbers=tuple(numbers),
        values=tuple(tuple(float(v) for v in row) for row in values),
        best=tuple(tuple(float(v) for v in row) for row in best),
        tokens=tuple(cumulative[n] for n in numbers), total_tokens=running,
        hv_numbers=hv_numbers, hypervolume=hv, reference=ref,
    )


def _changes(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The points of a step line where it changes, plus its last point."""
    if len(y) == 0:
        return x, y
    keep = np.ones(len(y), dtype=bool)
    keep[1:] = ~((y[1:] == y[:-1]) | (np.isnan(y[1:]) & np.isnan(y[:-1])))
    keep[-1] = True
    return x[keep], y[keep]


def draw_history(data: HistoryData, *, max_points: int = MAX_POINTS) -> Any:
    """The plotly figure of a :class:`HistoryData`: one row per objective (and one for the hypervolume),
    left column against trial number, right column against forward tokens spent."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = list(data.objectives) + (["hypervolume"] if data.hypervolume else [])
    fig = make_subplots(rows=len(rows), cols=2, shared_xaxes="columns", vertical_spacing=0.08,
                        horizontal_spacing=0.08,
                        subplot_titles=[f"{r} vs {x}" for r in rows for x in ("trial number", "forward tokens")])
    numbers, tokens = np.array(data.numbers, dtype=float), np.array(data.tokens, dtype=float)
    values = np.array(data.values, dtype=float).reshape(len(numbers), len(data.objectives))
    best = np.array(data.best, dtype=float).reshape(values.shape)
    sample = np.arange(len(numbers)) if len(numbers) <= max_points else np.unique(
        np.linspace(0, len(numbers) - 1, max_points).astype(int))
    text = [f"trial {int(n)}" for n in numbers[sample]]
    for r, name in enumerate(data.objectives, start=1):
        for c, xs in ((1, numbers), (2, tokens)):
            first = r == 1 and c == 1
            fig.add_trace(go.Scatter(x=xs[sample], y=values[sample, r - 1], mode="markers", name="trial value",
                                     legendgroup="value", showlegend=first, text=text,
                                     marker=dict(color="#9aa5b1", size=5, opacity=0.6),
                                     hovertemplate="%{text}<br>%{y:.4g}<extra></extra>"), row=r, col=c)
            bx, by = _changes(xs, best[:, r - 1])
            fig.add_trace(go.Scatter(x=bx, y=by, mode="lines", line_shape="hv", name="best so far",
                                     legendgroup="best", showlegend=first, line=dict(color="#d62728", width=2),
                                     hovertemplate="best %{y:.4g}<extra></extra>"), row=r, col=c)
        arrow = "lower is better" if data.directions[r - 1] == "minimize" else "higher is better"
        fig.update_yaxes(title_text=f"{name} ({arrow})", row=r, col=1)
    if data.hypervolume:
        r = len(rows)
        pos = {n: i for i, n in enumerate(data.numbers)}
        hv_tokens = np.array([data.tokens[pos[n]] for n in data.hv_numbers], dtype=float)
        for c, xs in ((1, np.array(data.hv_numbers, dtype=float)), (2, hv_tokens)):
            fig.add_trace(go.Scatter(x=xs, y=np.array(data.hypervolume), mode="lines", line_shape="hv",
                                     name="hypervolume", legendgroup="hv", showlegend=c == 1,
                                     line=dict(color="#1f77b4", width=2),
                                     hovertemplate="hypervolume %{y:.4g}<extra></extra>"), row=r, col=c)
        ref = ", ".join(f"{v:.4g}" for v in data.reference or ())
        fig.update_yaxes(title_text=f"hypervolume (ref {ref})", row=r, col=1)
    fig.update_xaxes(title_text="trial number", row=len(rows), col=1)
    fig.update_xaxes(title_text="forward tokens spent", row=len(rows), col=2)
    fig.update_layout(title=f"Optimization history ({len(data.numbers)} complete trials, "
                            f"{data.total_tokens:,} forward tokens)",
                      template="plotly_white", height=280 * len(rows) + 120, hovermode="closest",
                      legend=dict(orientation="h", y=-0.08))
    return fig


def plot_history(study: Any, *, reference: Sequence[float] | None = None, max_points: int = MAX_POINTS) -> Any:
    """Best-so-far vs trial number and vs forward tokens (and the hypervolume of a multi-objective study)."""
    return draw_history(history_data(study, reference=reference), max_points=max_points)
