"""What the evolutionary sampler knows before it pays for a candidate: an importance prior and an
additive surrogate.

- :func:`gene_prior`: per gene and level, the calibration importance of what that level removes
  -- ShortGPT's influence ``1 - cos(input, output)`` of a block or sublayer (recorded by the
  pruner's calibration pass, :class:`~evoprune.pruning.Importance`), times the share of the
  sublayer's units removed for a width level. A candidate's prior is the sum over its genes. It
  costs no search tokens (the calibration pass runs anyway) and ranks offspring while too few
  candidates are scored to fit the surrogate. Sparsity genes carry no prior (0).
- :class:`Surrogate`: ridge regression of the log first-stage score on one-hot gene levels (an
  additive per-gene model), fitted to every candidate scored so far.

>>> from evoprune.space import ModelSpec, SearchSpace
>>> spec = ModelSpec.from_config(dict(model_type="llama", num_hidden_layers=3, hidden_size=64,
...     num_attention_heads=8, num_key_value_heads=4, intermediate_size=256, vocab_size=100))
>>> space = SearchSpace.from_model(spec, attention=None, mlp=False, drop_blocks=True)
>>> prior = gene_prior(space, {"block_influence": [0.9, 0.01, 0.2], "attn_influence": [0.5] * 3,
...                            "mlp_influence": [0.5] * 3})
>>> prior["L1.block"], prior["L2.block"]
((0.0, 0.01), (0.0, 0.2))
>>> prior_score(space, prior, space.candidate_from_levels({"L1.block": 1}))
0.01
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..space import Candidate, SearchSpace

__all__ = ["Surrogate", "gene_prior", "prior_score"]

_INFLUENCE = {"block": "block_influence", "attn": "attn_influence", "mlp": "mlp_influence"}


def _values(influence: Any, name: str) -> list[float] | None:
    v = influence.get(name) if isinstance(influence, Mapping) else getattr(influence, name, None)
    if v is None:
        return None
    return [float(x) for x in (v.tolist() if hasattr(v, "tolist") else v)]


def gene_prior(space: SearchSpace, influence: Any) -> dict[str, tuple[float, ...]] | None:
    """Per gene name, the prior cost of each level (level 0: 0), from ``influence`` (an
    :class:`~evoprune.pruning.Importance` or a mapping with ``block_influence``, ``attn_influence``
    and ``mlp_influence`` per layer). ``None`` where there is nothing to go on: no calibration
    (NaN influences) or only sparsity genes."""
    out: dict[str, tuple[float, ...]] = {}
    for g in space.genes:
        name = _INFLUENCE.get(g.kind)
        vals = _values(influence, name) if name else None
        if vals is None or g.layer >= len(vals) or not math.isfinite(vals[g.layer]):
            if name is not None:
                return None
            continue
        full = g.levels[0]
        h = space.spec.hidden_size
        out[g.name] = tuple(vals[g.layer] * (_linear_share(-lv, h) if lv < 0 else 1.0 - lv / full) if full else 0.0
                            for lv in g.levels)
    return out if any(any(v) for v in out.values()) else None


#: The prior share of a part's influence that a full-rank fitted linear replacement leaves unexplained (a
#: fixed guess, not the fit's residual: the prior costs no fit); a rank-r map leaves ``1 - (1 - share) * r / h``.
LINEAR_PRIOR_SHARE = 0.5


def _linear_share(rank: int, hidden: int) -> float:
    """Prior share of a linear level of ``rank``: between :data:`LINEAR_PRIOR_SHARE` (full rank) and 1 (a drop)."""
    return 1.0 - (1.0 - LINEAR_PRIOR_SHARE) * min(rank, hidden) / hidden


def prior_score(space: SearchSpace, prior: Mapping[str, Sequence[float]], candidate: Candidate) -> float:
    """The candidate's prior cost: the sum of its genes' level priors (lower: less removed that matters)."""
    return float(sum(prior[name][lv] for name, lv in space.levels_of(candidate).items() if name in prior))


class Surrogate:
    """Ridge regression of log score on one-hot gene levels (intercept unpenalized)."""

    def __init__(self, space: SearchSpace, rows: Sequence[Sequence[int]], scores: Sequence[float]) -> None:
        self.space = space
        x = np.hstack([self.features(rows), np.ones((len(rows), 1))])
        y = np.log(np.asarray(scores, dtype=float))
        reg = 1e-2 * np.eye(x.shape[1])
        reg[-1, -1] = 0.0
        self.coef = np.linalg.solve(x.T @ x + reg, x.T @ y)

    def features(self, levels: Sequence[Sequence[int]]) -> np.ndarray:
        offsets, width = [], 0
        for g in self.space.genes:
            offsets.append(width)
            width += g.top
        x = np.zeros((len(levels), width))
        for r, lvs in enumerate(levels):
            for k, lv in enumerate(lvs):
                if lv:
                    x[r, offsets[k] + lv - 1] = 1.0
        return x

    def predict(self, cands: Sequence[Candidate]) -> list[float]:
        x = self.features([list(self.space.levels_of(c).values()) for c in cands])
        return [float(v) for v in x @ self.coef[:-1] + self.coef[-1]]
