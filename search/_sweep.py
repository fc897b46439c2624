"""Multi-objective evolution: :class:`BudgetSweep`, one evolutionary run per budget level."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any


from .._logging import get_logger
from ..space import Budget, Candidate, SearchSpace
from ._evolution import _STATE_VERSION, EvolutionarySampler
from ._generation import GenerationSampler, Proposal

__all__ = ["BudgetSweep"]

_log = get_logger("search.evolution")


# --------------------------------------------------------------------------- budget sweep


class BudgetSweep(GenerationSampler):
    """Multi-objective evolution: one evolutionary run per budget level in one study.

    Each level ``r`` of ``levels`` gets its own :class:`EvolutionarySampler`
    (seeded ``seed + index``) on the space with budget ``metric <= r * dense``;
    generations go round-robin over the levels, so a study stopped at any time
    has results for every level. Told with objectives such as ``["kl",
    "params"]``, the study's Pareto front (``study.best_trials``) collects the
    best of every level.

    Args:
        levels: budget ratios, e.g. ``(0.8, 0.6, 0.4)``.
        metric: the budget metric (default ``"params"``).
        migrate: each generation of a level also scores the best candidates of
            the neighbouring levels, fitted into its budget (an island model:
            a good architecture at 60 % is a good start at 55 % and 65 %).
        **options: :class:`EvolutionarySampler` arguments shared by every level.

    The budgets of the space passed to :meth:`setup` on other metrics are kept;
    a budget on ``metric`` is replaced by each level's.
    """

    kind = "budget_sweep"

    def __init__(self, *, levels: Sequence[float], metric: str = "params", migrate: bool = True,
                 **options: Any) -> None:
        levels = tuple(float(r) for r in levels)
        if not levels or any(not 0.0 < r <= 1.0 for r in levels):
            raise ValueError(f"BudgetSweep: levels must be ratios in (0, 1], got {levels!r}.")
        if len(set(levels)) != len(levels):
            raise ValueError(f"BudgetSweep: levels has duplicates: {levels}.")
        self.levels = levels
        self.metric = metric
        self.migrate = bool(migrate)
        self.options = dict(options)
        seed = int(self.options.pop("seed", 0))
        self.seed = seed
        self.runs = [EvolutionarySampler(seed=seed + i, **self.options) for i in range(len(levels))]
        for r, run in zip(levels, self.runs):
            run.group = f"{metric}<={r:g}"
        self._turn = 0
        self._exhausted: set[int] = set()
        self.space: SearchSpace | None = None

    def __repr__(self) -> str:
        return f"BudgetSweep(levels={self.levels}, metric={self.metric!r})"

    def setup(self, space: SearchSpace) -> None:
        keep = tuple(b for b in space.budget if b.metric != self.metric)
        for r, run in zip(self.levels, self.runs):
            sub = dataclasses.replace(space, budget=keep + (Budget(metric=self.metric, max_ratio=r),))
            run.setup(sub)
        self.space = space

    @property
    def current(self) -> EvolutionarySampler:
        return self.runs[self._turn % len(self.runs)]

    @property
    def generation(self) -> int:
        """Generations told so far, summed over levels."""
        return sum(run.generation for run in self.runs)

    @property
    def min_finalists(self) -> int:
        return self.current.min_finalists

    @property
    def pending(self) -> list[Candidate]:
        """The current level's asked but not yet told generation (see :attr:`EvolutionarySampler.pending`)."""
        return self.current.pending

    def discard_pending(self) -> None:
        self.current.discard_pending()

    def seen(self, key: str) -> bool:
        return any(run.seen(key) for run in self.runs)

    def ask_generation(self, claim: Callable[[str], bool] | None = None) -> list[Proposal]:
        """The current level's generation; a level whose neighbourhood is exhausted is skipped for good."""
        for _ in range(len(self.runs)):
            index = self._turn % len(self.runs)
            if index not in self._exhausted:
                migrants = []
                if self.migrate:
                    for nb in (index - 1, index + 1):
                        if 0 <= nb < len(self.runs) and self.runs[nb].best is not None:
                            migrants.append(self.runs[nb].best[0])
                props = self.runs[index].ask_generation(claim, migrants)
                if props:
                    return props
                self._exhausted.add(index)
                _log.info("budget level exhausted", extra={"fields": {"group": self.runs[index].group}})
            self._turn += 1
        return []

    def tell_generation(self, results: Sequence[tuple[Candidate, float | None]]) -> None:
        self.current.tell_generation(results)
        self._turn += 1

    @property
    def stops_itself(self) -> bool:
        """Whether every budget level's run ends by itself (then the sweep does)."""
        return all(getattr(r, "stops_itself", False) for r in self.runs)

    @property
    def best(self) -> list[tuple[str, Candidate, float]]:
        """Best candidate of every level that has one: ``(group, candidate, fitness)``."""
        return [(run.group or "", *run.best) for run in self.runs if run.best is not None]

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "kind": self.kind,
            "settings": {"levels": list(self.levels), "metric": self.metric, "seed": self.seed,
                         "migrate": self.migrate},
            "turn": self._turn,
            "exhausted": sorted(self._exhausted),
            "runs": [run.state_dict() for run in self.runs],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION or state.get("kind") != self.kind:
            raise ValueError(f"not a BudgetSweep state (kind {state.get('kind')!r}).")
        s = state["settings"]
        if list(s["levels"]) != list(self.levels) or s["metric"] != self.metric or s["seed"] != self.seed:
            raise ValueError(
                f"BudgetSweep: the saved state has levels={s['levels']}, metric={s['metric']!r}, seed={s['seed']}; "
                "rebuild the sampler with the study's settings to resume it."
            )
        self._turn = int(state["turn"])
        self._exhausted = {int(i) for i in state.get("exhausted", ())}
        for run, sub in zip(self.runs, state["runs"]):
            run.load_state_dict(sub)
