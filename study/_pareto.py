"""The Pareto front and the hypervolume: the one home of both rules.

:func:`pareto_front` has Optuna's ``Study.best_trials`` semantics: a point is on the front when
no other point is at least as good in every objective and better in one, so **equal points are
all kept** (ties are never broken here). NaN counts as the worst value.

>>> pts = [(0.1, 0.9), (0.2, 0.5), (0.3, 0.6), (0.5, 0.2), (0.2, 0.5)]
>>> pareto_front(pts)
[0, 1, 3, 4]
>>> round(hypervolume([pts[i] for i in pareto_front(pts)], reference=(1.0, 1.0)), 4)
0.56
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .._optuna_private import compute_hypervolume

__all__ = ["hypervolume", "pareto_front", "study_front"]


def _signed(points: Any, directions: Sequence[str] | None) -> np.ndarray:
    """``points`` as a float array [n, m] to minimize (maximized columns negated, NaN -> +inf)."""
    arr = np.asarray(points, dtype=float)
    if arr.size == 0:
        return arr.reshape(0, len(directions) if directions is not None else 0)
    if arr.ndim != 2:
        raise ValueError(f"points must be a 2-D array [n, objectives], got shape {arr.shape}.")
    if directions is not None:
        if len(directions) != arr.shape[1]:
            raise ValueError(f"{len(directions)} directions for {arr.shape[1]} objectives.")
        arr = arr * np.array([-1.0 if str(d).lower().endswith("maximize") else 1.0 for d in directions])
    return np.where(np.isnan(arr), np.inf, arr)


def pareto_front(points: Any, directions: Sequence[str] | None = None) -> list[int]:
    """Indices (ascending) of the non-dominated rows of ``points`` [n, objectives]; every objective
    is minimized unless ``directions`` (``"minimize"``/``"maximize"`` per column) says otherwise.

    O(n log n + n * front): sweeping the points in lexicographic order, a point can only be
    dominated by one before it, and if it is dominated at all, a front member dominates it.
    """
    arr = _signed(points, directions)
    if len(arr) == 0:
        return []
    front = np.empty((0, arr.shape[1]))
    keep: list[int] = []
    for i in np.lexsort(arr.T[::-1]):
        p = arr[i]
        if len(front) and np.any(np.all(front <= p, axis=1) & np.any(front < p, axis=1)):
            continue
        keep.append(int(i))
        front = np.vstack([front, p])
    return sorted(keep)


def hypervolume(points: Any, reference: Sequence[float], directions: Sequence[str] | None = None) -> float:
    """Hypervolume dominated by ``points`` and bounded by ``reference`` (after ``directions``, all
    minimized). Points that do not strictly dominate the reference contribute nothing. Exact
    (Optuna's WFG implementation)."""
    arr = _signed(points, directions)
    ref = _signed([reference], directions)[0]
    if arr.size == 0:
        return 0.0
    arr = arr[np.all(arr < ref, axis=1)]
    if arr.size == 0:
        return 0.0
    arr = np.unique(arr[pareto_front(arr)], axis=0)
    return compute_hypervolume(arr, ref)


def study_front(study: Any) -> list[Any]:
    """The study's Pareto-optimal feasible COMPLETE trials (``study.best_trials``, ties kept: the same
    trials as :meth:`EvoStudy.pareto_front <evoprune.study.EvoStudy.pareto_front>`), sorted by
    values, then trial number."""
    return sorted(study.best_trials, key=lambda t: (tuple(t.values), t.number))
