"""Pareto-front helpers for multi-objective studies.

>>> pts = [(0.1, 0.9), (0.2, 0.5), (0.3, 0.6), (0.5, 0.2)]
>>> pareto_front(pts)
[0, 1, 3]
>>> round(hypervolume([pts[i] for i in pareto_front(pts)], reference=(1.0, 1.0)), 4)
0.56
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["hypervolume", "pareto_front", "study_front"]


def _signed(points: Any, directions: Sequence[str] | None) -> np.ndarray:
    arr = np.asarray(points, dtype=float)
    if arr.ndim != 2:
        raise ValueError(f"points must be a 2-D array [n, objectives], got shape {arr.shape}.")
    if directions is not None:
        if len(directions) != arr.shape[1]:
            raise ValueError(f"{len(directions)} directions for {arr.shape[1]} objectives.")
        arr = arr * np.array([-1.0 if str(d).lower().endswith("maximize") else 1.0 for d in directions])
    return arr


def pareto_front(points: Any, directions: Sequence[str] | None = None) -> list[int]:
    """Indices of the non-dominated points (all objectives minimized unless ``directions`` says otherwise).

    Duplicated points are kept once (the first).
    """
    arr = _signed(points, directions)
    out = []
    for i, p in enumerate(arr):
        dominated = np.any(np.all(arr <= p, axis=1) & np.any(arr < p, axis=1))
        duplicate = any(np.array_equal(arr[j], p) for j in out)
        if not dominated and not duplicate:
            out.append(i)
    return out


def hypervolume(points: Any, reference: Sequence[float], directions: Sequence[str] | None = None) -> float:
    """Hypervolume dominated by ``points`` and bounded by ``reference`` (minimization after ``directions``).

    Points that do not strictly dominate the reference contribute nothing. Uses
    Optuna's exact WFG implementation (``optuna._hypervolume.compute_hypervolume``)
    when it exists, else an exact 2-D sweep.
    """
    arr = _signed(points, directions)
    ref = _signed([reference], directions)[0]
    if arr.size == 0:
        return 0.0
    arr = arr[np.all(arr < ref, axis=1)]
    if arr.size == 0:
        return 0.0
    arr = arr[pareto_front(arr)]
    try:
        from optuna._hypervolume import compute_hypervolume

        return float(compute_hypervolume(arr, ref, assume_pareto=True))
    except (ImportError, TypeError):
        if arr.shape[1] != 2:
            raise
    order = np.argsort(arr[:, 0])
    hv, y_prev = 0.0, ref[1]
    for x, y in arr[order]:
        hv += (ref[0] - x) * (y_prev - y)
        y_prev = y
    return float(hv)


def study_front(study: Any) -> list[Any]:
    """The study's Pareto-optimal, feasible COMPLETE trials (``study.best_trials``), one per distinct point
    (duplicates of an evaluated candidate carry its values; the first trial is kept), sorted by the first value."""
    seen: set[tuple[float, ...]] = set()
    out = []
    for t in sorted(study.best_trials, key=lambda t: (tuple(t.values), t.number)):
        if tuple(t.values) not in seen:
            seen.add(tuple(t.values))
            out.append(t)
    return out
