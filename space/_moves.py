"""Budget moves on a :class:`~evoprune.space.SearchSpace`: uniform and random candidates,
exact cheapest/most expensive candidates, per-step savings, budget repair, slack filling and
enumeration of small spaces.

A mixin of ``SearchSpace``; every move works on level vectors and the additive
:class:`~evoprune.space.CostModel` (costs per block, per attention/MLP part; count
metrics such as ``dropped_blocks`` are additive over blocks too).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np

from ._candidate import ATTN_LINEARS, MLP_LINEARS, Candidate, LayerConfig
from ._cost import COUNT_METRICS


class MovesMixin:
    """Candidates by moving levels (uses the ``SearchSpace``'s genes, level mapping and cost model)."""

    def uniform(self, target: int | float, *, metric: str | None = None) -> Candidate:
        """A candidate that compresses every non-frozen block alike.

        ``target`` as an ``int``: every gene except ``Li.block`` at that level
        (``ValueError`` if some gene has fewer levels). As a ``float`` ratio in
        ``(0, 1]``: all genes advance together along their non-dropping levels
        (level ``round(t * last_non_drop_level)`` for a common ``t``) to the least
        compressed setting whose ``metric`` (default: the first cost budget's
        metric, else ``"params"``; not a count metric: nothing is dropped) is at
        most ``ratio`` of dense.
        """
        if isinstance(target, bool) or not isinstance(target, (int, float, np.integer, np.floating)):
            raise TypeError(f"uniform() takes a level (int) or a ratio (float), got {target!r}.")
        if isinstance(target, (int, np.integer)):
            level = int(target)
            lv = []
            for g in self.genes:
                if g.kind == "block":
                    lv.append(0)
                    continue
                if not 0 <= level <= g.top:
                    top = min(h.top for h in self.genes if h.kind != "block")
                    raise ValueError(f"uniform({level}): gene {g.name} has levels 0..{g.top}; use a level in 0..{top}.")
                lv.append(level)
            return self._candidate(lv)
        ratio = float(target)
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"uniform(ratio): ratio must be in (0, 1], got {ratio}.")
        if metric is None:
            metric = next((b.metric for b in self.budget if not b.is_count), "params")
        self.cost_model._check_metric(metric)
        if metric in COUNT_METRICS:
            raise ValueError(
                f"uniform(ratio, metric={metric!r}): a uniform candidate drops nothing, so it cannot target a count; "
                "use repair() or random() to meet count budgets."
            )
        limit = ratio * self.dense_cost(metric)
        reach = [0 if g.kind == "block" else g.top - (1 if g.drops else 0) for g in self.genes]
        ts = sorted({0.0, 1.0} | {(j - 0.5) / r for r in set(reach) if r for j in range(1, r + 1)})
        best = None
        for t in ts:
            lv = [math.floor(t * r + 0.5 + 1e-9) if r else 0 for r in reach]
            cand = self._candidate(lv)
            cost = self.cost(cand, metric)
            best = (cand, cost)
            if cost <= limit * (1 + 1e-12):
                return cand
        assert best is not None
        raise ValueError(
            f"uniform({ratio}): the most compressed uniform candidate costs {best[1] / self.dense_cost(metric):.1%} "
            f"of dense {metric}; use a larger ratio or a space that compresses more."
        )

    def random(
        self, rng: np.random.Generator | int | None = None, *, within_budget: bool = True, fill: bool = True
    ) -> Candidate:
        """A random candidate: every gene's level uniform, then fitted into the budget.

        With a budget (and ``within_budget``) the draw is :meth:`repair`-ed (count
        budgets first, so "drop exactly k" holds: the dropped set is uniform among
        the allowed ones) and, with ``fill`` (default), its slack is spent by
        :meth:`fill`: under an upper cost bound the candidate lands within one level
        step of the budget boundary (EvoPress-style budget-exact start) instead of
        far inside it. ``fill=False`` gives uniform levels, repaired only.
        ``within_budget=False``: uniform levels, budget ignored.

        Deterministic given ``rng`` (a ``numpy.random.Generator`` or a seed).
        """
        rng = np.random.default_rng(rng)
        for _ in range(1000):
            lv = [int(rng.integers(0, g.top + 1)) for g in self.genes]
            try:
                cand = self._candidate(lv)
            except ValueError:
                continue  # every block dropped; draw again
            if within_budget and self.budget:
                cand = self.repair(cand, rng)
                if fill:
                    cand = self.fill(cand, rng)
            return cand
        raise RuntimeError("random(): every draw dropped every block; freeze a layer (frozen_layers=(0,)).")

    def fill(self, candidate: Candidate, rng: np.random.Generator | int | None = None) -> Candidate:
        """Spend budget slack: move random genes one level down (less compression) while every budget holds.

        Each step draws uniformly among the one-level moves that change the
        candidate and keep every budget (count budgets included, so exact counts
        stay exact); it stops when none is left, so one more level of any gene
        would cross a budget. Only an upper bound on a cost metric (``params``,
        ``flops``, ...) has slack to fill: without one the candidate is returned
        unchanged, and a candidate outside the budget comes back canonical but
        otherwise unchanged. Deterministic given ``rng``.
        """
        bounds = self.budget_bounds()
        if not any(hi is not None and m not in COUNT_METRICS for m, _, hi in bounds):
            return candidate
        rng = np.random.default_rng(rng)
        lv = self._check_levels(self.levels_of(candidate), strict_missing=True, ignore_unknown=False)
        cm = self.cost_model
        layers = [self._layer_from(i, lv) for i in range(self.spec.num_layers)]
        base = {m: cm.base_cost(m) for m, _, _ in bounds}
        costs = {m: [cm.layer_cost(layer, m) for layer in layers] for m, _, _ in bounds}

        def holds(m: str, lo: float | None, hi: float | None, total: float) -> bool:
            return not ((hi is not None and total > hi) or (lo is not None and total < lo))

        if not all(holds(m, lo, hi, base[m] + sum(costs[m])) for m, lo, hi in bounds):
            return self._candidate(lv)
        by_layer: dict[int, list[int]] = {}
        for k, g in enumerate(self.genes):
            by_layer.setdefault(g.layer, []).append(k)
        # genes whose move may still fit: a move that does not fit never will (totals only grow, counts
        # only fall), unless a move in the same block changes what it costs, which re-adds the block's genes
        live = [k for k in range(len(self.genes)) if lv[k] > 0]
        while live:
            pos = int(rng.integers(len(live)))
            k = live[pos]
            i = self.genes[k].layer
            lv[k] -= 1
            layer = self._layer_from(i, lv)
            fits = layer != layers[i]
            if fits:
                new = {m: cm.layer_cost(layer, m) for m, _, _ in bounds}
                for m, lo, hi in bounds:
                    trial = list(costs[m])
                    trial[i] = new[m]
                    if not holds(m, lo, hi, base[m] + sum(trial)):
                        fits = False
                        break
            if not fits:
                lv[k] += 1
                live[pos] = live[-1]
                live.pop()
                continue
            layers[i] = layer
            for m in new:
                costs[m][i] = new[m]
            present = set(live)
            live.extend(j for j in by_layer[i] if lv[j] > 0 and j not in present)
            if lv[k] == 0:
                live.remove(k)
        return self._candidate(lv)

    def step_savings(self, metric: str) -> dict[str, tuple[float, ...]]:
        """Per gene, what each step ``level j -> j+1`` saves in ``metric`` with every other gene dense.

        For ``params``, ``flops``, ``kv_bytes`` and ``latency`` the saving of an
        ``attn`` or ``mlp`` step does not depend on the other genes (as long as
        the block is kept), and genes of the same kind have equal savings in every
        layer, so "one gene up, another of the same kind down" keeps the cost.
        ``nonzero_params`` savings of width and sparsity steps depend on each other.

        >>> from evoprune.space import ModelSpec, SearchSpace
        >>> spec = ModelSpec.from_config(dict(model_type="llama", num_hidden_layers=2, hidden_size=64,
        ...     num_attention_heads=8, num_key_value_heads=4, intermediate_size=128, vocab_size=97))
        >>> SearchSpace.from_model(spec, attention=None, mlp_step=32).step_savings("params")["L0.mlp"]
        (6144, 6144, 6144)
        """
        self.cost_model._check_metric(metric)
        out: dict[str, tuple[float, ...]] = {}
        for k, g in enumerate(self.genes):
            lv = [0] * len(self.genes)
            costs = []
            for j in range(g.top + 1):
                lv[k] = j
                costs.append(self.cost_model.layer_cost(self._layer_from(g.layer, lv), metric))
            out[g.name] = tuple(a - b for a, b in zip(costs, costs[1:]))
        return out

    def _part_options(self, i: int, probe: list[int], part: str, metric: str) -> list[tuple[float, int | None, bool]]:
        """``(cost, level, drops)`` of each level of block ``i``'s ``part`` ("attn"/"mlp") gene,
        the other genes as in ``probe``; one ``(cost, None, False)`` entry if the part has no gene."""
        cm = self.cost_model
        k = self._layer_genes[i].get(part)
        levels: list[int | None] = [None] if k is None else list(range(self.genes[k].top + 1))
        out = []
        for j in levels:
            lv = list(probe)
            if k is not None and j is not None:
                lv[k] = j
            layer = self._layer_from(i, lv)
            if part == "attn":
                sp = {n: layer.sparsity_of(n) for n in ATTN_LINEARS}
                cost = cm.attn_cost(layer.num_kv_heads, layer.q_per_kv, metric, sparsity=sp)
                cost += cm.linear_cost(layer.attn_linear, metric)
            else:
                sp = {n: layer.sparsity_of(n) for n in MLP_LINEARS}
                cost = cm.mlp_cost(layer.mlp_channels, metric, sparsity=sp)
                cost += cm.linear_cost(layer.mlp_linear, metric)
            drops = k is not None and self.genes[k].drops and j == self.genes[k].top
            out.append((cost, j, drops))
        return out

    def _extreme(self, metric: str, *, minimize: bool) -> tuple[list[int], float]:
        """Levels and cost of the cheapest (``minimize``) or most expensive candidate in ``metric``.

        Exact: costs are additive over blocks and over the attention/MLP parts of a
        block, and nonzero counts only fall with sparsity, so sparsity sits at its
        top level (minimize) or at 0 (maximize) and the widths are enumerated.
        Ties go to the less compressed level.
        """
        cm = self.cost_model
        key = (lambda o: (o[0], o[1] or 0)) if minimize else (lambda o: (-o[0], o[1] or 0))
        lv = [0] * len(self.genes)
        total = cm.base_cost(metric)
        rescue: list[tuple[float, int, list[tuple[int, int]]]] = []  # (extra cost, layer, assignment)
        for i in range(self.spec.num_layers):
            g = self._layer_genes[i]
            if not g:
                total += cm.layer_cost(self._dense_layer, metric)
                continue
            probe = [0] * len(self.genes)
            assign: list[tuple[int, int]] = []
            for kind, k in g.items():
                if kind.endswith("sparsity"):
                    probe[k] = self.genes[k].top if minimize else 0
                    assign.append((k, probe[k]))
            attn_opts = self._part_options(i, probe, "attn", metric)
            mlp_opts = self._part_options(i, probe, "mlp", metric)
            best_a, best_m = min(attn_opts, key=key), min(mlp_opts, key=key)

            def chosen(a: tuple[float, int | None, bool], m: tuple[float, int | None, bool]) -> list[tuple[int, int]]:
                out = list(assign)
                for part, opt in (("attn", a), ("mlp", m)):
                    if opt[1] is not None:
                        out.append((g[part], opt[1]))
                return out

            cost = best_a[0] + best_m[0]
            layer_assign = chosen(best_a, best_m)
            if "block" in g and minimize and cost > 0:
                cost, layer_assign = 0, [(g["block"], self.genes[g["block"]].top)]
            for k, level in layer_assign:
                lv[k] = level
            total += cost
            if minimize:  # the cheapest way to keep this block, in case every block ends up dropped
                keep_a = min((o for o in attn_opts if not o[2]), key=key)
                keep_m = min((o for o in mlp_opts if not o[2]), key=key)
                options = [(keep_a[0] + best_m[0], chosen(keep_a, best_m)), (best_a[0] + keep_m[0], chosen(best_a, keep_m))]
                keep_cost, keep_assign = min(options, key=lambda o: o[0])
                rescue.append((keep_cost - cost, i, keep_assign))
        if all(self._layer_from(i, lv).dropped for i in range(self.spec.num_layers)):
            extra, i, keep_assign = min(rescue, key=lambda r: (r[0], r[1]))
            for k in self._layer_genes[i].values():
                lv[k] = 0
            for k, level in keep_assign:
                lv[k] = level
            total += extra
        return lv, total

    def smallest(self, metric: str) -> Candidate:
        """The cheapest candidate of the space in ``metric`` (ties go to less compressed levels)."""
        _check_cost_metric(self, "smallest", metric)
        lv, _ = self._extreme(metric, minimize=True)
        return self._candidate(lv)

    def min_cost(self, metric: str) -> float:
        """Cost of :meth:`smallest` (exact; used to reject budgets no candidate can meet)."""
        _check_cost_metric(self, "min_cost", metric)
        return self._extreme(metric, minimize=True)[1]

    def repair(
        self, candidate: Candidate, rng: np.random.Generator | int | None = None, *, max_steps: int | None = None
    ) -> Candidate:
        """Move genes until every budget holds; deterministic given ``rng``.

        Count budgets (``dropped_blocks``, ...) are met first: while too many are
        dropped, a random dropped part comes back one level (at its narrowest
        width); while too few, a random drop gene jumps to its drop level; such a
        move never breaks another count budget that holds. Then the cost budgets:
        while an upper bound is exceeded, a random gene (order drawn from ``rng``)
        whose next level up strictly lowers that metric moves up one level; while a
        lower bound is undershot, a random gene whose next level down raises it
        moves down. A cost move never breaks a budget that already holds (counts
        included). Returns the canonical candidate unchanged if it already
        satisfies the budget.

        Raises ``ValueError`` when the budget cannot be reached by such moves
        (e.g. a band narrower than one level step, or a cost bound that the
        required drop counts rule out).
        """
        rng = np.random.default_rng(rng)
        lv = self._check_levels(self.levels_of(candidate), strict_missing=True, ignore_unknown=False)
        if not self.budget:
            return self._candidate(lv)
        cm = self.cost_model
        n_layers = self.spec.num_layers
        bounds = self.budget_bounds()
        count_bounds = [b for b in bounds if b[0] in COUNT_METRICS]
        order = count_bounds + [b for b in bounds if b[0] not in COUNT_METRICS]
        layers = [self._layer_from(i, lv) for i in range(n_layers)]
        costs = {m: [cm.layer_cost(layer, m) for layer in layers] for m, _, _ in bounds}
        totals = {m: cm.base_cost(m) + sum(costs[m]) for m, _, _ in bounds}
        kept = sum(not layer.dropped for layer in layers)
        if max_steps is None:
            max_steps = 4 * sum(g.top + 1 for g in self.genes) + 100

        def violation(metric: str, lo: float | None, hi: float | None, total: float) -> int:
            if hi is not None and total > hi:
                return 1
            if lo is not None and total < lo:
                return -1
            return 0

        for _ in range(max_steps):
            target = next(((m, lo, hi) for m, lo, hi in order if violation(m, lo, hi, totals[m])), None)
            if target is None:
                return self._candidate(lv)
            metric, lo, hi = target
            direction = violation(metric, lo, hi, totals[metric])
            is_count = metric in COUNT_METRICS
            # a count falls when a part comes back (level down) and rises when one is dropped (level up)
            step = -direction if is_count else direction
            guard = count_bounds if is_count else bounds
            moved = False
            for k in rng.permutation(len(self.genes)):
                g = self.genes[k]
                if is_count and not g.drops:
                    continue
                new = g.top if is_count and step > 0 else lv[k] + step
                if not 0 <= new <= g.top or new == lv[k]:
                    continue
                old = lv[k]
                lv[k] = new
                layer = self._layer_from(g.layer, lv)
                was_dropped = layers[g.layer].dropped
                if layer.dropped and not was_dropped and kept == 1:
                    lv[k] = old
                    continue
                new_costs = {m: cm.layer_cost(layer, m) for m, _, _ in bounds}
                new_totals = {m: totals[m] - costs[m][g.layer] + new_costs[m] for m, _, _ in bounds}
                improves = (new_totals[metric] - totals[metric]) * direction < 0
                keeps_others = all(
                    violation(m, l, h, new_totals[m]) == 0
                    for m, l, h in guard
                    if violation(m, l, h, totals[m]) == 0
                )
                if improves and keeps_others:
                    for m, _, _ in bounds:
                        costs[m][g.layer] = new_costs[m]
                    totals = new_totals
                    layers[g.layer] = layer
                    kept += int(was_dropped) - int(layer.dropped)
                    moved = True
                    break
                lv[k] = old
            if not moved:
                break
        for metric, _, _ in bounds:  # fall back to the cheapest candidates
            if metric in COUNT_METRICS:
                continue
            cand = self.smallest(metric)
            if self.satisfies_budget(cand):
                return cand
        counts = " or the drop counts rule out the cost bounds" if count_bounds else ""
        raise ValueError(
            f"repair could not meet the budget {self.budget} from this candidate; the budget band may be narrower "
            f"than one level step{counts}. Widen it or use finer levels."
        )

    def enumerate(self, *, limit: int = 100_000) -> Iterator[Candidate]:
        """Every distinct candidate of the space that satisfies its budget, in a fixed order.

        Blocks vary like the digits of a counter (the last block fastest), each
        over its distinct configurations in level order (dense first); widths of a
        dropped block are not repeated. Count budgets keep an exhaustive problem
        small: drop exactly 3 of 8 blocks gives 56 candidates, exactly 2 attention
        + 2 MLP sublayers of 8 layers 784, any 4 of 16 sublayers 1,820.

        Raises ``ValueError`` if more than ``limit`` candidates would come out
        (before the first one when it can tell: always, unless cost budgets prune
        the space), and ``TypeError``/``ValueError`` for a bad ``limit``.
        """
        if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit <= 0:
            raise ValueError(f"enumerate(limit=...) must be a positive int, got {limit!r}.")
        limit = int(limit)
        options = self._layer_options(limit)
        bounds = self.budget_bounds()
        cm = self.cost_model
        pattern = "2:4" if self.pattern_2_4 else "unstructured"
        upper = self._count_candidates(options)
        has_cost = any(m not in COUNT_METRICS for m, _, _ in bounds)
        if upper > limit and not has_cost:
            raise ValueError(_too_many(limit, f"{upper:,}"))
        n = len(options)
        cost = [[[cm.layer_cost(layer, m, pattern=pattern) for m, _, _ in bounds] for layer in opts]
                for opts in options]
        base = [cm.base_cost(m) for m, _, _ in bounds]
        # cheapest / dearest rest of the model from block i on, per budget metric (for pruning)
        lo_rest = [[0.0] * len(bounds) for _ in range(n + 1)]
        hi_rest = [[0.0] * len(bounds) for _ in range(n + 1)]
        for i in range(n - 1, -1, -1):
            for j in range(len(bounds)):
                lo_rest[i][j] = lo_rest[i + 1][j] + min(c[j] for c in cost[i])
                hi_rest[i][j] = hi_rest[i + 1][j] + max(c[j] for c in cost[i])

        def possible(i: int, partial: list[float]) -> bool:
            for j, (_, lo, hi) in enumerate(bounds):
                if hi is not None and partial[j] + lo_rest[i][j] > hi + 1e-9 * max(abs(hi), 1.0):
                    return False
                if lo is not None and partial[j] + hi_rest[i][j] < lo - 1e-9 * max(abs(lo), 1.0):
                    return False
            return True

        def walk() -> Iterator[Candidate]:
            chosen: list[LayerConfig] = []
            emitted = 0

            def visit(i: int, partial: list[float]) -> Iterator[Candidate]:
                nonlocal emitted
                if i == n:
                    if all(layer.dropped for layer in chosen):
                        return
                    cand = Candidate(layers=tuple(chosen), sparsity_pattern=pattern)
                    if bounds and not self.satisfies_budget(cand):
                        return
                    emitted += 1
                    if emitted > limit:
                        raise ValueError(_too_many(limit, f"more than {limit:,}"))
                    yield cand
                    return
                for layer, c in zip(options[i], cost[i]):
                    nxt = [a + b for a, b in zip(partial, c)]
                    if not possible(i + 1, nxt):
                        continue
                    chosen.append(layer)
                    yield from visit(i + 1, nxt)
                    chosen.pop()

            if possible(0, list(base)):
                yield from visit(0, list(base))

        return walk()

    def _layer_options(self, limit: int) -> list[list[LayerConfig]]:
        """Per block, its distinct configurations in level order (dense first)."""
        cache: dict[tuple[object, ...], list[LayerConfig]] = {}
        out = []
        probe = [0] * len(self.genes)
        for i in range(self.spec.num_layers):
            ks = sorted(self._layer_genes[i].values())
            key = tuple((self.genes[k].kind, self.genes[k].levels) for k in ks)
            if key not in cache:
                size = math.prod(self.genes[k].top + 1 for k in ks)
                if size > limit:
                    raise ValueError(_too_many(limit, f"at least {size:,}"))
                seen: dict[LayerConfig, None] = {}
                for levels in itertools.product(*(range(self.genes[k].top + 1) for k in ks)):
                    for k, level in zip(ks, levels):
                        probe[k] = level
                    seen.setdefault(self._layer_from(i, probe), None)
                for k in ks:
                    probe[k] = 0
                cache[key] = list(seen)
            out.append(cache[key])
        return out

    def _count_candidates(self, options: list[list[LayerConfig]]) -> int:
        """Number of option combinations meeting the count budgets (not every block dropped): exact when the
        space has no cost budget, an upper bound otherwise."""
        counts = [(m, lo, hi) for m, lo, hi in self.budget_bounds() if m in COUNT_METRICS]
        cm = self.cost_model
        states: dict[tuple[tuple[int, ...], bool], int] = {((0,) * len(counts), True): 1}
        for opts in options:
            nxt: dict[tuple[tuple[int, ...], bool], int] = {}
            for layer in opts:
                add = [int(cm.layer_cost(layer, m)) for m, _, _ in counts]
                for (vec, all_dropped), ways in states.items():
                    new = tuple(a + b for a, b in zip(vec, add))
                    if any(hi is not None and v > hi for v, (_, _, hi) in zip(new, counts)):
                        continue
                    key = (new, all_dropped and layer.dropped)
                    nxt[key] = nxt.get(key, 0) + ways
            states = nxt
        return sum(
            ways for (vec, all_dropped), ways in states.items()
            if not all_dropped and all(lo is None or v >= lo for v, (_, lo, _) in zip(vec, counts))
        )


def _too_many(limit: int, size: str) -> str:
    return (
        f"enumerate(): the space has {size} candidates within its budget, over limit={limit:,}; pass a larger "
        "limit= or narrow the space (count budgets such as Budget(metric='dropped_blocks', exactly=3), fewer "
        "levels, frozen_layers)."
    )


def _check_cost_metric(space: object, what: str, metric: str) -> None:
    space.cost_model._check_metric(metric)  # type: ignore[attr-defined]
    if metric in COUNT_METRICS:
        raise ValueError(f"{what}({metric!r}): a count metric has no cheapest candidate; use a cost metric.")
