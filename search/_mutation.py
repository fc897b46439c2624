"""EvoPress's budget-preserving mutation: :func:`level_switch`, and :func:`fill_budget` for slack.

A *level switch* moves one gene one level up (more compression) and another gene -- of the same
kind by default -- one level down, so what one saves the other spends; a mutation never leaves
the budget and no repair is needed (see :mod:`evoprune.search._evolution` for how the sampler uses it).
Count budgets (``Budget(metric="dropped_blocks", exactly=3)``, ...) are budgets like the others: a
switch between two drop genes drops one part and restores another, so an exact count stays exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..space import Candidate, SearchSpace

__all__ = ["fill_budget", "level_switch"]


def _metrics(space: SearchSpace) -> list[tuple[str, float | None, float | None]]:
    bounds = list(space.budget_bounds())
    return bounds if bounds else [("params", None, None)]


def level_switch(
    space: SearchSpace,
    levels: Sequence[int],
    rng: np.random.Generator,
    *,
    same_kind: bool = True,
    kinds: Sequence[str] | None = None,
) -> list[int] | None:
    """One EvoPress level switch on a level vector (``space.genes`` order); ``None`` if no move exists.

    A gene ``a`` (uniform among genes with a valid partner) moves one level up
    and a gene ``b`` one level down; ``b`` is drawn among the partners that keep
    every budget of ``space`` and, among those, change the budget costs the least
    (an exact zero whenever equal-saving partners exist; with ``same_kind=False``
    the partner's kind is drawn first, uniformly among the kinds that have a
    valid partner). A block swap (one block dropped, another restored) gives
    the restored block the widths and sparsities the dropped one had, which
    keeps the cost exactly. If no switch exists at all (every gene at its top level,
    say), one gene moves one level down if the budget has room for it. Moves
    that do not change the candidate (the widths of a dropped block) are never used. With
    ``same_kind`` (default) ``a`` and ``b`` have the same gene kind; ``kinds``
    restricts which kinds may move. Count budgets (``dropped_blocks``, ...) are checked like cost
    budgets, so from a candidate that meets an exact count every switch keeps it (one part dropped,
    one restored).

    >>> from evoprune.space import Budget, SearchSpace
    >>> space = SearchSpace.from_model(dict(model_type="llama", num_hidden_layers=4, hidden_size=64,
    ...     num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=100),
    ...     attention=None, mlp_step=32, budget=Budget(metric="params", max_ratio=0.8))
    >>> lv = list(space.levels_of(space.uniform(0.8)).values())
    >>> new = level_switch(space, lv, np.random.default_rng(0))
    >>> sorted(int(a - b) for a, b in zip(new, lv)), sum(new) == sum(lv)
    ([-1, 0, 0, 1], True)
    """
    genes = space.genes
    lv = list(int(v) for v in levels)
    names = [g.name for g in genes]
    base = space.candidate_from_levels(dict(zip(names, lv)))
    bounds = _metrics(space)
    cm = space.cost_model
    dense = np.array([space.dense_cost(m) for m, _, _ in bounds], dtype=float)
    totals = np.array([cm.cost(base, m) for m, _, _ in bounds], dtype=float)
    layer_cost = {}

    def lcost(layer_cfg: Any) -> np.ndarray:
        key = layer_cfg
        if key not in layer_cost:
            layer_cost[key] = np.array([cm.layer_cost(layer_cfg, m) for m, _, _ in bounds], dtype=float)
        return layer_cost[key]

    allowed = set(kinds) if kinds is not None else None
    ups: list[tuple[int, np.ndarray, Any]] = []
    downs: list[tuple[int, np.ndarray, Any]] = []
    for k, g in enumerate(genes):
        if allowed is not None and g.kind not in allowed:
            continue
        for step, bucket in ((1, ups), (-1, downs)):
            new = lv[k] + step
            if not 0 <= new <= g.top:
                continue
            moved = list(lv)
            moved[k] = new
            try:
                cand = space.candidate_from_levels(dict(zip(names, moved)))
            except ValueError:  # would drop every block
                continue
            old_layer, new_layer = base.layers[g.layer], cand.layers[g.layer]
            if old_layer == new_layer:
                continue  # inert (e.g. the width of a dropped block)
            bucket.append((k, lcost(new_layer) - lcost(old_layer), new_layer))
    lo = np.array([-np.inf if b is None else b for _, b, _ in bounds], dtype=float)
    hi = np.array([np.inf if b is None else b for _, _, b in bounds], dtype=float)

    def single_down() -> list[int] | None:
        """No switch exists (e.g. every gene at its top level): spend budget slack on one gene instead."""
        fits = [k for k, d, _ in downs if np.all(totals + d <= hi + np.maximum(np.abs(hi), 1.0) * 1e-12)
                and np.all(totals + d >= lo)]
        if not fits:
            return None
        out = list(lv)
        out[fits[int(rng.integers(len(fits)))]] -= 1
        return out

    if not ups or not downs:
        return single_down()
    feasible_now = bool(np.all(totals <= hi * (1 + 1e-12)) and np.all(totals >= lo * (1 - 1e-12)))
    up_idx = [u[0] for u in ups]
    down_idx = [d[0] for d in downs]
    d_up = np.stack([u[1] for u in ups])  # [U, M]
    d_down = np.stack([d[1] for d in downs])  # [D, M]
    net = d_up[:, None, :] + d_down[None, :, :]  # [U, D, M]
    after = totals[None, None, :] + net
    tol = np.maximum(np.abs(hi), 1.0) * 1e-12
    ok = np.all(after <= hi + tol, axis=-1) & np.all(after >= lo - np.maximum(np.abs(lo), 1.0) * 1e-12, axis=-1)
    if not feasible_now:  # outside the budget already: only moves that do not worsen it
        ok = np.all(net <= 0, axis=-1) | ok
    layer_of_up = [genes[k].layer for k in up_idx]
    ok &= np.array(up_idx)[:, None] != np.array(down_idx)[None, :]
    if same_kind:
        ok &= np.array([genes[k].kind for k in up_idx])[:, None] == np.array([genes[k].kind for k in down_idx])[None, :]
    # same-layer pairs (cross-kind only): the layer's cost is not the sum of both deltas
    if not same_kind:
        for i, a in enumerate(up_idx):
            for j, b in enumerate(down_idx):
                if ok[i, j] and genes[b].layer == layer_of_up[i]:
                    moved = list(lv)
                    moved[a] += 1
                    moved[b] -= 1
                    try:
                        cand = space.candidate_from_levels(dict(zip(names, moved)))
                    except ValueError:
                        ok[i, j] = False
                        continue
                    li = genes[a].layer
                    exact = lcost(cand.layers[li]) - lcost(base.layers[li])
                    net[i, j] = exact
                    t = totals + exact
                    ok[i, j] = bool(np.all(t <= hi + tol) and np.all(t >= lo - 1e-12 * np.maximum(np.abs(lo), 1.0)))
                    if ok[i, j] and cand == base:
                        ok[i, j] = False
    # block swaps: the restored block takes over the widths/sparsities of the block being dropped, so
    # the cost is unchanged exactly (restoring it dense would rarely fit the budget)
    index = {g.name: k for k, g in enumerate(genes)}
    transfer: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, a in enumerate(up_idx):
        if genes[a].kind != "block":
            continue
        la = genes[a].layer
        for j, b in enumerate(down_idx):
            if genes[b].kind != "block" or a == b or lv[b] != lv[a] + 1:  # an exchange of the same two levels
                continue  # (keep <-> drop, or between linear ranks); others cost what their deltas say
            lb = genes[b].layer
            moves = []
            for g in genes:
                if g.layer == la and g.kind != "block":
                    other = index.get(f"L{lb}.{g.kind}")
                    if other is not None:
                        moves.append((other, lv[index[g.name]]))
            transfer[(i, j)] = moves
            net[i, j] = 0.0
            ok[i, j] = feasible_now or bool(np.all(totals <= hi + tol) and np.all(totals >= lo))
    rows = np.flatnonzero(ok.any(axis=1))
    if rows.size == 0:
        return single_down()
    i = int(rows[rng.integers(rows.size)])
    change = np.abs(net[i] / dense).sum(-1)
    change = np.where(ok[i], change, np.inf)
    if not same_kind:  # the partner's kind first (uniform among kinds with a valid partner), then the closest
        down_kinds = np.array([genes[k].kind for k in down_idx])
        options = sorted({str(k) for k in down_kinds[ok[i]]})
        kind = options[int(rng.integers(len(options)))]
        change = np.where(down_kinds == kind, change, np.inf)
    best = change.min()
    cols = np.flatnonzero(ok[i] & (change <= best + 1e-12))
    j = int(cols[rng.integers(cols.size)])
    out = list(lv)
    out[up_idx[i]] += 1
    out[down_idx[j]] -= 1
    for k, level in transfer.get((i, j), ()):
        out[k] = level
    return out


def fill_budget(space: SearchSpace, candidate: Candidate, rng: np.random.Generator | int | None = None) -> Candidate:
    """Spend budget slack: move random genes one level down (less compression) while every budget holds.

    Level switches keep the cost of the initial candidate for the whole run, so
    slack left by coarse levels (e.g. a uniform candidate a few percent under the
    budget) would never be used; this fills it first. Without an upper bound on a
    cost metric (count budgets such as ``dropped_blocks`` have no slack to fill) the
    candidate is returned unchanged. The rule lives in :meth:`SearchSpace.fill`.

    >>> from evoprune.space import Budget, SearchSpace
    >>> space = SearchSpace.from_model(dict(model_type="llama", num_hidden_layers=4, hidden_size=64,
    ...     num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=100),
    ...     attention=None, mlp_step=16, budget=Budget(metric="params", max_ratio=0.8))
    >>> u = space.uniform(0.8)
    >>> f = fill_budget(space, u, 0)
    >>> space.satisfies_budget(f), space.ratio(u, "params") <= space.ratio(f, "params") <= 0.8
    (True, True)
    """
    return space.fill(candidate, rng)
