"""The evolutionary sampler's saved state helpers: its RNG as JSON, and its uniform first parent."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..space import Candidate, SearchSpace

__all__ = ["rng_state", "set_rng_state", "uniform_in_budget"]


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """JSON-able bit generator state (128-bit integers as decimal strings)."""

    def enc(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: enc(x) for k, x in v.items()}
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return str(int(v))
        return v

    return enc(rng.bit_generator.state)


def set_rng_state(rng: np.random.Generator, state: Mapping[str, Any]) -> None:
    def dec(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: dec(x) for k, x in v.items()}
        if isinstance(v, str) and (v.isdigit() or (v.startswith("-") and v[1:].isdigit())):
            return int(v)
        return v

    if state.get("bit_generator") != type(rng.bit_generator).__name__:
        raise ValueError(
            f"sampler state was saved with bit generator {state.get('bit_generator')!r}, "
            f"this sampler uses {type(rng.bit_generator).__name__}."
        )
    rng.bit_generator.state = dec(dict(state))


def uniform_in_budget(space: SearchSpace, rng: np.random.Generator) -> Candidate:
    """``space.uniform`` at the (first) budget ratio, repaired into every budget; repaired dense otherwise."""
    bounds = space.budget_bounds()
    cand = None
    if bounds:
        metric, _lo, hi = bounds[0]
        if hi is not None:
            try:
                cand = space.uniform(min(1.0, hi / space.dense_cost(metric)), metric=metric)
            except ValueError:
                cand = None
    if cand is None:
        cand = space.dense()
    if space.budget and not space.satisfies_budget(cand):
        cand = space.repair(cand, rng)
    return cand
