"""Before the convergence stop: the chance that a better candidate is still unseen.

The incumbent's stability says nothing about candidates never proposed: a search can settle on the
third-best configuration of a small space without ever proposing the best. Before the evolutionary
sampler stops by itself (``unseen_chance``) it looks at unseen candidates near the incumbent (one
and two level switches away) and across the space (random in-budget candidates), and asks the
additive surrogate (fitted to every first-stage score) how likely each is to beat the incumbent:
``P = Phi((mu_incumbent - mu_candidate) / sigma)`` on the log first-stage score, ``sigma`` the
surrogate's leave-one-out prediction error (so an overfitted surrogate is not trusted). Candidates
whose chance exceeds the bound are proposed (most likely first) instead of stopping; the search
stops only when no unseen candidate looked at has more than that chance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._logging import get_logger
from ..space import Candidate, SearchSpace
from ._mutation import fill_budget, level_switch
from ._surrogate import Surrogate

__all__ = ["explore_before_stop", "unseen_threats"]

_log = get_logger("search.unseen")


def _loo_sigma(model: Surrogate, rows: Sequence[Sequence[int]], scores: Sequence[float]) -> float:
    """Root mean square leave-one-out residual of the ridge fit (closed form: ``e_i / (1 - h_ii)``)."""
    x = np.hstack([model.features(rows), np.ones((len(rows), 1))])
    y = np.log(np.asarray(scores, dtype=float))
    reg = 1e-2 * np.eye(x.shape[1])
    reg[-1, -1] = 0.0
    inv = np.linalg.inv(x.T @ x + reg)
    h = np.einsum("ij,jk,ik->i", x, inv, x)
    e = (y - x @ model.coef) / np.clip(1.0 - h, 1e-3, None)
    return float(math.sqrt(float(np.mean(e**2))))


def unseen_threats(space: SearchSpace, scored: Mapping[str, tuple[Sequence[int], float]], incumbent: Candidate,
                   seen: Any, rng: np.random.Generator, *, bound: float, samples: int = 128,
                   same_kind: bool = True, kinds: Sequence[str] | None = None,
                   fill: bool = True) -> list[tuple[Candidate, float]]:
    """Unseen candidates (not in ``seen``) whose chance to beat ``incumbent`` exceeds ``bound``, most
    likely first, with that chance. ``scored``: key -> (gene levels, first-stage score) of every
    candidate scored. Looks at ``samples`` one-switch and two-switch neighbours of the incumbent and
    ``samples`` random candidates. Empty where the surrogate cannot be fitted (fewer scored
    candidates than genes) or the incumbent has no first-stage score."""
    data = list(scored.values())
    if len(data) < max(8, len(space.genes)) or incumbent.key not in scored:
        return []
    rows, values = [lv for lv, _v in data], [v for _lv, v in data]
    model = Surrogate(space, rows, values)
    sigma = max(_loo_sigma(model, rows, values), 1e-9)
    found: dict[str, Candidate] = {}
    lv0 = list(space.levels_of(incumbent).values())
    for hops in (1, 2):
        for _ in range(samples):
            lv = lv0
            for _h in range(hops):
                new = level_switch(space, lv, rng, same_kind=same_kind, kinds=kinds)
                lv = new if new is not None else lv
            cand = space.candidate_from_levels(dict(zip(space.gene_names, lv)))
            if cand.key not in found and cand.key not in seen:
                found[cand.key] = cand
    for _ in range(samples):
        cand = space.random(rng)
        if fill:
            cand = fill_budget(space, cand, rng)
        if cand.key not in found and cand.key not in seen and (not space.budget or space.satisfies_budget(cand)):
            found[cand.key] = cand
    if not found:
        return []
    cands = list(found.values())
    mu_inc = model.predict([incumbent])[0]
    mu = model.predict(cands)
    out = []
    for cand, m in zip(cands, mu):
        p = 0.5 * math.erfc((m - mu_inc) / (sigma * math.sqrt(2.0)))
        if p > bound:
            out.append((cand, p))
    out.sort(key=lambda cp: -cp[1])
    return out


def explore_before_stop(sampler: Any) -> list[Candidate]:
    """What an :class:`~evoprune.search.EvolutionarySampler` about to stop by itself proposes instead:
    the unseen candidates (most likely first) the surrogate gives more than ``unseen_chance`` to beat
    the incumbent; empty (stop) where none, or where ``unseen_chance`` is ``None``. Drawn with an RNG
    of its own (seeded by the sampler's seed and generation), so the search's draws do not change."""
    if sampler.unseen_chance is None or sampler.incumbent is None:
        return []
    rng = np.random.default_rng([sampler.seed, sampler.generation, 11])
    threats = unseen_threats(sampler.space, sampler._scored, sampler.incumbent, sampler._seen, rng,
                             bound=sampler.unseen_chance, same_kind=sampler.same_kind, kinds=sampler.kinds,
                             fill=sampler.fill)
    if threats:
        _log.info("not stopping yet: %d unseen candidates may beat the incumbent (best chance %.3f)", len(threats),
                  threats[0][1], extra={"fields": {"generation": sampler.generation, "group": sampler.group}})
    return [c for c, _p in threats]
