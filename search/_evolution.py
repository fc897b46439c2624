"""EvoPress / DarwinLM style evolutionary search with budget-preserving level switches.

The sampler keeps a parent population (``parents``, default 1: a (1+λ) strategy)
and, each generation, proposes ``offspring`` new candidates. An offspring is a
parent changed by ``min(U{1..3}, U{1..3})`` *level switches* (EvoPress): one gene
moves one level up (more compression) and another gene -- of the same kind by
default -- one level down, so what one saves the other spends. Where neighbouring
levels save the same amount in every layer (widths, block drops; see
:meth:`~evoprune.space.SearchSpace.step_savings`) the budget cost is preserved
exactly; a block swap hands the dropped block's widths to the restored one, which
is exact too; otherwise the partner whose move keeps the cost closest is chosen
among the moves that keep every budget, so a mutation never leaves the budget
and no repair is needed. Budget slack (coarse levels) is spent once on the
initial candidates and on offspring (:func:`fill_budget`). Candidates already
seen (by ``candidate.key``, over the whole run) are rejected and redrawn.

The driver (:class:`~evoprune.search.Searcher`) scores a generation through the
stage pipeline: every offspring at the first stage, the stage's promotion rule
(``TopK``) picks who goes on, and so on; only candidates that reach the last
stage compete with the parents (elitism: the parents keep their last-stage
fitness -- stage token sets are a deterministic function of data fingerprint,
stage and seed, so re-scoring a parent on them would reproduce the same number
and is skipped). The best ``parents`` of parents + finalists survive.

The whole state (generation, population with fitness, seen keys, RNG) is a JSON
dict (:meth:`EvolutionarySampler.state_dict`) so a study can be resumed exactly.

Example (no model needed to drive the sampler by hand)::

    >>> from evoprune.space import Budget, SearchSpace
    >>> from evoprune.search import EvolutionarySampler
    >>> space = SearchSpace.from_model(
    ...     dict(model_type="llama", num_hidden_layers=8, hidden_size=64, num_attention_heads=4,
    ...          num_key_value_heads=2, intermediate_size=128, vocab_size=100),
    ...     attention=None, mlp=False, drop_blocks=True, budget=Budget(metric="params", max_ratio=0.7))
    >>> evo = EvolutionarySampler(offspring=4, init="uniform", seed=0)
    >>> evo.setup(space)
    >>> gen0 = evo.ask_generation()                      # the initial parent
    >>> evo.tell_generation([(p.candidate, 1.0) for p in gen0])
    >>> kids = evo.ask_generation()
    >>> len(kids), all(space.cost(k.candidate, "params") == space.cost(gen0[0].candidate, "params") for k in kids)
    (4, True)
    >>> evo.tell_generation([(k.candidate, 0.5 + i) for i, k in enumerate(kids)])
    >>> evo.best[1], evo.generation
    (0.5, 2)
    >>> twin = EvolutionarySampler(offspring=4, init="uniform", seed=0)
    >>> twin.setup(space); twin.load_state_dict(evo.state_dict())
    >>> [k.candidate for k in twin.ask_generation()] == [k.candidate for k in evo.ask_generation()]
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .._logging import get_logger
from ..space import Candidate, SearchSpace
from ._evidence import check_evidence_options, settled_order
from ._generation import GenerationSampler, Proposal
from ._mutation import fill_budget, level_switch
from ._surrogate import Surrogate, prior_score
from ._state import rng_state, set_rng_state, uniform_in_budget
from ._unseen import explore_before_stop

__all__ = ["EvolutionarySampler"]

_log = get_logger("search.evolution")
_STATE_VERSION = 1
INIT_MODES = ("uniform", "random")


# --------------------------------------------------------------------------- the sampler


class EvolutionarySampler(GenerationSampler):
    """(μ+λ) evolutionary search with level-switch mutation (EvoPress / DarwinLM).

    All arguments are keyword-only.

    Args:
        offspring: λ, candidates proposed per generation (EvoPress: 16-64).
        parents: μ, size of the parent population (default 1).
        init: the first parent(s): ``"uniform"`` (every block compressed alike to
            the budget, see :meth:`SearchSpace.uniform`; repaired into the budget
            if needed), ``"random"`` (best of ``init_samples`` random candidates),
            a :class:`~evoprune.space.Candidate` or a list of them (e.g. from a
            baseline such as :func:`~evoprune.search.shortgpt`).
        init_samples: how many random candidates ``init="random"`` scores
            (default: ``offspring``); also fills up a short seed list.
        max_flips: flips per mutation are ``min(U{1..max_flips}, U{1..max_flips})``.
        same_kind: switch levels only between genes of the same kind (an MLP
            width against an MLP width, a block against a block).
        kinds: restrict mutation to these gene kinds (default: all).
        seed: seeds the sampler's RNG (same seed, same space, same scores:
            same run).
        fill: spend the budget slack of every initial candidate and offspring
            (:func:`fill_budget`): level switches keep the initial cost for the
            whole run, so slack left by coarse levels (or by switches between
            genes of different kinds, whose steps differ) would be wasted. Exact
            switches leave no slack, so this changes nothing for them.
        max_tries: redraws per offspring slot before giving up on it (all of a
            parent's neighbours may have been seen).
        patience: the convergence stop: after ``patience`` generations in a row in
            which the incumbent (best parent) stayed and no finalist came within the
            noise band of it, :meth:`ask_generation` returns nothing and
            :attr:`converged` is set (the search stops with ``stopped_by="converged"``).
            The noise band is the driver's paired test on the last stage's windows
            (:attr:`evoprune.evaluators.CandidateResult.close`: within one standard error of
            the per-window differences), or 0.5 % of the incumbent's value where the
            driver does not know per-window scores. ``None``: never stop by itself.
        patience_fraction: and, where the driver reports the forward tokens it spends
            (:meth:`observe_generation`), the tokens spent since the incumbent last
            changed must be at least this fraction of the tokens spent until then: a
            search that found its incumbent late waits longer, one that found it early
            stops early (0: generations only). A close finalist restarts the
            generation count, not this token count.
        explored: and at least this share of the incumbent's one-switch neighbours
            (one gene a level up, another a level down; :meth:`neighbourhood_seen`)
            must have been proposed already: a local optimum is only declared where
            its neighbourhood was looked at (0: no such condition).
        surrogate: rank ``surrogate * offspring`` distinct mutants by an additive
            per-gene model (ridge regression of the log first-stage score on one-hot
            gene levels, fitted to every candidate scored so far) and propose the
            ``offspring`` best; 1 = no surrogate (EvoPress). The model is used once
            it has at least as many scored candidates as genes; before that the pool
            is ranked by the importance prior where the driver gave one
            (:meth:`set_prior`; the :class:`~evoprune.search.Searcher` does, from the
            pruner's calibration influences).
        fresh_windows, rescore_parents, repeats: EvoPress's own loop (``preset: evopress``): windows
            drawn afresh every generation (``EvalContext.draw``, seeded: reproducible, resumable);
            parents scored again with the finalists on the last stage's fresh windows every
            generation (tokens count), the initial candidates on the first stage only; a candidate
            seen in an earlier generation may come again (scored without a new trial).
        settle, settle_z: close calls (0: off): a finalist within ``settle_z`` standard errors of the
            incumbent is scored with it on more nested windows, up to ``settle`` x the last stage's
            tokens, until separated; a tie keeps the incumbent (:mod:`evoprune.search._evidence`).
        unseen_chance: before the convergence stop, unseen candidates the surrogate gives more than
            this chance to beat the incumbent are proposed first (:mod:`evoprune.search._unseen`).

    The driver calls :meth:`setup` once, then alternately :meth:`ask_generation`
    and :meth:`tell_generation`. :attr:`min_finalists` tells it how many
    candidates of the current generation must reach the last stage (μ at
    generation 0, else whatever the stage promotion rules let through).
    """

    kind = "evolutionary"

    def __init__(
        self,
        *,
        offspring: int = 16,
        parents: int = 1,
        init: str | Candidate | Sequence[Candidate] = "uniform",
        init_samples: int | None = None,
        max_flips: int = 3,
        same_kind: bool = True,
        kinds: Sequence[str] | None = None,
        seed: int = 0,
        max_tries: int = 200,
        fill: bool = True,
        patience: int | None = 1,
        patience_fraction: float = 0.5,
        explored: float = 0.5,
        surrogate: int = 4,
        fresh_windows: bool = False,
        rescore_parents: bool = False,
        repeats: bool = False,
        settle: int = 0,
        settle_z: float = 2.0,
        unseen_chance: float | None = None,
    ) -> None:
        for name, value, low in (("offspring", offspring, 1), ("parents", parents, 1), ("max_flips", max_flips, 1),
                                 ("max_tries", max_tries, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"EvolutionarySampler: {name} must be an int >= {low}, got {value!r}.")
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
            raise ValueError(f"EvolutionarySampler: patience must be an int >= 1 or None, got {patience!r}.")
        if isinstance(patience_fraction, bool) or not isinstance(patience_fraction, (int, float)) \
                or not patience_fraction >= 0:
            raise ValueError(f"EvolutionarySampler: patience_fraction must be a number >= 0, got {patience_fraction!r}.")
        if isinstance(explored, bool) or not isinstance(explored, (int, float)) or not 0 <= explored <= 1:
            raise ValueError(f"EvolutionarySampler: explored must be a share in [0, 1], got {explored!r}.")
        if isinstance(surrogate, bool) or not isinstance(surrogate, int) or surrogate < 1:
            raise ValueError(f"EvolutionarySampler: surrogate must be an int >= 1 (1: off), got {surrogate!r}.")
        check_evidence_options(settle, settle_z, unseen_chance)
        if init_samples is not None and (not isinstance(init_samples, int) or init_samples < 1):
            raise ValueError(f"EvolutionarySampler: init_samples must be a positive int, got {init_samples!r}.")
        if isinstance(init, str):
            if init not in INIT_MODES:
                raise ValueError(
                    f"EvolutionarySampler: init must be one of {INIT_MODES}, a Candidate or a list of Candidates; "
                    f"got {init!r}."
                )
            seeds: tuple[Candidate, ...] = ()
        else:
            seeds = (init,) if isinstance(init, Candidate) else tuple(init)
            if not seeds or not all(isinstance(c, Candidate) for c in seeds):
                raise TypeError("EvolutionarySampler: init must be 'uniform', 'random', a Candidate or Candidates.")
            init = "seed"
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"EvolutionarySampler: seed must be an int, got {seed!r}.")
        self.offspring = offspring
        self.parents = parents
        self.init = init
        self.seeds = seeds
        self.init_samples = init_samples if init_samples is not None else offspring
        self.max_flips = max_flips
        self.same_kind = bool(same_kind)
        self.kinds = tuple(kinds) if kinds is not None else None
        self.seed = seed
        self.max_tries = max_tries
        self.fill = bool(fill)
        self.patience = patience
        self.patience_fraction = float(patience_fraction)
        self.explored = float(explored)
        self.surrogate = surrogate
        self.fresh_windows = bool(fresh_windows)
        self.rescore_parents = bool(rescore_parents)
        self.repeats = bool(repeats)
        self.settle = settle
        self.settle_z = float(settle_z)
        self.unseen_chance = None if unseen_chance is None else float(unseen_chance)
        self._repeated: set[str] = set()  # pending candidates seen in an earlier generation
        self.space: SearchSpace | None = None
        self.group: str | None = None
        self._rng = np.random.default_rng(seed)
        self._generation = 0
        self._population: list[tuple[Candidate, float]] = []
        self._seen: dict[str, None] = {}  # ordered set
        self._pending: list[Candidate] = []
        self._migrants: set[str] = set()
        self._stale = 0  # generations in a row without a new incumbent or a close finalist
        self._tokens = 0  # forward tokens the driver reported (observe_generation)
        self._tokens_at_reset = 0  # ... when the incumbent last changed
        self._close: bool | None = None  # the driver's verdict on the generation being told
        self._settled: dict[str, str] = {}  # ... and its close calls (observe_generation)
        self._scored: dict[str, tuple[list[int], float]] = {}  # key -> (gene levels, first-stage score)
        self._prior: dict[str, Sequence[float]] | None = None  # gene -> prior cost per level (set_prior)
        self._converged = False

    def __repr__(self) -> str:
        return (
            f"EvolutionarySampler(offspring={self.offspring}, parents={self.parents}, init={self.init!r}, "
            f"seed={self.seed})"
        )

    # -- setup ------------------------------------------------------------------------------
    def setup(self, space: SearchSpace) -> None:
        """Bind the search space (call once, before asking)."""
        if not isinstance(space, SearchSpace):
            raise TypeError(f"EvolutionarySampler.setup needs a SearchSpace, got {type(space).__name__}.")
        for c in self.seeds:
            space.validate(c)
        if self.kinds is not None:
            present = {g.kind for g in space.genes}
            missing = set(self.kinds) - present
            if missing:
                raise ValueError(
                    f"EvolutionarySampler: kinds {sorted(missing)} have no genes in this space (it has {sorted(present)})."
                )
        self.space = space

    def _need_space(self) -> SearchSpace:
        if self.space is None:
            raise RuntimeError("EvolutionarySampler: call setup(space) first (the Searcher does this).")
        return self.space

    # -- read-only views ---------------------------------------------------------------------
    @property
    def generation(self) -> int:
        """Generations told so far (0: the initial population has not been scored yet)."""
        return self._generation

    @property
    def population(self) -> list[tuple[Candidate, float]]:
        """Parents and their last-stage fitness, best first."""
        return list(self._population)

    @property
    def best(self) -> tuple[Candidate, float] | None:
        return self._population[0] if self._population else None

    @property
    def incumbent(self) -> Candidate | None:
        """The best parent (what a racing promotion compares offspring with), ``None`` before the
        first generation was told."""
        return self._population[0][0] if self._population else None

    @property
    def converged(self) -> bool:
        """Whether the convergence stop (``patience``) has ended the search."""
        return self._converged

    @property
    def min_finalists(self) -> int:
        """Candidates of the current generation that must reach the last stage."""
        return self.parents if self._generation == 0 else 0

    @property
    def stops_itself(self) -> bool:
        """Whether the search ends by itself (the convergence stop: ``patience`` is not ``None``)."""
        return self.patience is not None

    @property
    def first_stage_only(self) -> bool:
        """Whether the current generation is scored on the first stage only (EvoPress's initial
        population: ``rescore_parents``, generation 0)."""
        return self.rescore_parents and self._generation == 0

    @property
    def pending(self) -> list[Candidate]:
        """The asked but not yet told generation (empty between generations). A sampler restored
        from a state saved mid-generation returns exactly these from :meth:`ask_generation` again,
        without asking ``claim``: the driver replays the interrupted generation."""
        return list(self._pending)

    def discard_pending(self) -> None:
        """Forget the asked generation (its candidates stay seen, so they are not drawn again); the
        next :meth:`ask_generation` draws a new one. For a worker that finds the generation in the
        saved state taken by other workers."""
        self._pending = []
        self._migrants = set()
        self._repeated = set()

    def seen(self, key: str) -> bool:
        return key in self._seen

    # -- mutation ----------------------------------------------------------------------------
    def mutate(self, candidate: Candidate, rng: np.random.Generator | None = None) -> Candidate:
        """``min(U{1..k}, U{1..k})`` level switches of ``candidate`` (may return it unchanged if stuck)."""
        space = self._need_space()
        rng = self._rng if rng is None else rng
        lv = list(space.levels_of(candidate).values())
        flips = int(min(rng.integers(1, self.max_flips + 1), rng.integers(1, self.max_flips + 1)))
        for _ in range(flips):
            new = level_switch(space, lv, rng, same_kind=self.same_kind, kinds=self.kinds)
            if new is None:
                break
            lv = new
        return space.candidate_from_levels(dict(zip(space.gene_names, lv)))

    # -- ask / tell --------------------------------------------------------------------------
    def _initial(self, claim: Callable[[str], bool]) -> list[Candidate]:
        space = self._need_space()
        out: list[Candidate] = []

        def take(c: Candidate) -> None:
            c = space.canonical(c)
            if self.fill:
                c = fill_budget(space, c, self._rng)
            if c.key in self._seen or any(o.key == c.key for o in out):
                return
            if claim(c.key):
                out.append(c)

        if self.init == "seed":
            for c in self.seeds:
                if space.budget and not space.satisfies_budget(c):
                    _log.warning("seed candidate outside the budget; repairing it", extra={"fields": {"key": c.key}})
                    c = space.repair(c, self._rng)
                take(c)
            n_random = max(0, self.parents - len(out))
        elif self.init == "uniform":
            take(uniform_in_budget(space, self._rng))
            n_random = max(0, self.parents - len(out))
        else:
            n_random = self.init_samples
        tries = 0
        target = len(out) + n_random
        while len(out) < target and tries < self.max_tries * max(1, n_random):
            tries += 1
            take(space.random(self._rng))
        if len(out) < self.parents:
            raise RuntimeError(
                f"EvolutionarySampler: could only build {len(out)} distinct initial candidates for {self.parents} "
                "parents; lower parents or enlarge the space."
            )
        return out

    def ask_generation(
        self, claim: Callable[[str], bool] | None = None, migrants: Sequence[Candidate] = ()
    ) -> list[Proposal]:
        """The candidates of the current generation (initial population at generation 0).

        ``claim(key) -> bool`` (e.g. :meth:`Recorder.claim`) may veto candidates
        another worker already took; vetoed ones are redrawn. ``migrants`` are
        candidates from elsewhere (e.g. the best of a neighbouring budget level);
        after the offspring, each is fitted into this space's budget
        (:meth:`SearchSpace.repair`, then :func:`fill_budget`) and, if unseen,
        scored with the generation (source ``"migrant"``). Asking again before
        :meth:`tell_generation` returns the same proposals.
        """
        space = self._need_space()
        if self._pending:
            return [self._proposal(c) for c in self._pending]
        claim = claim or (lambda key: True)
        if self._generation == 0:
            batch = self._initial(claim)
            source = "seed" if self.init == "seed" else "initial"
        else:
            if not self._population:
                raise RuntimeError("EvolutionarySampler: no parents (no candidate of the first generation was scored).")
            explore = self._unseen() if self._stop_now() else None
            if explore is not None and not explore:
                self._converged = True
                _log.info("converged: the incumbent held for %d generations (%d tokens) with no finalist within the "
                          "noise band", self._stale, self._tokens - self._tokens_at_reset,
                          extra={"fields": {"generation": self._generation, "group": self.group}})
                return []
            ranker = self._ranker() if not explore else None
            pool_size = 0 if explore else self.offspring * (self.surrogate if ranker is not None else 1)
            batch, keys, repeated = [], set(), set()
            for child in (explore or [])[: self.offspring]:  # unseen candidates that may beat the incumbent
                if claim(child.key):
                    batch.append(child)
                    keys.add(child.key)
                else:
                    self._seen[child.key] = None
            for _slot in range(pool_size):
                for _try in range(self.max_tries):
                    parent = self._population[int(self._rng.integers(len(self._population)))][0]
                    child = self.mutate(parent)
                    if self.fill:
                        child = fill_budget(self.space, child, self._rng)
                    if child.key in keys or (child.key in self._seen and not self.repeats):
                        continue
                    if self.repeats and child.key in self._seen:
                        if any(child.key == p.key for p, _f in self._population):
                            continue
                        repeated.add(child.key)
                    elif ranker is None and not claim(child.key):
                        self._seen[child.key] = None
                        continue
                    batch.append(child)
                    keys.add(child.key)
                    break
                else:  # max_tries draws found nothing new: the neighbourhood is (nearly) exhausted
                    break
            if ranker is not None:  # the surrogate's (or prior's) best first; claim them in that order
                predicted = ranker(batch)
                order = sorted(range(len(batch)), key=lambda k: (predicted[k], k))
                ranked, batch = [batch[k] for k in order], []
                for child in ranked:
                    if len(batch) == self.offspring:
                        break
                    if claim(child.key):
                        batch.append(child)
                    else:
                        self._seen[child.key] = None
                keys = {c.key for c in batch}
            if not batch:
                _log.warning("no unseen offspring found; the neighbourhood of the parents is exhausted",
                             extra={"fields": {"generation": self._generation, "group": self.group}})
            source = "evolution"
            n_children = len(batch)
            for m in migrants if batch else ():
                m = space.canonical(m) if space.contains(m) else None
                if m is None:
                    continue
                if space.budget and not space.satisfies_budget(m):
                    m = space.repair(m, self._rng)
                m = fill_budget(space, m, self._rng)
                if m.key in self._seen or m.key in keys or not claim(m.key):
                    continue
                batch.append(m)
                keys.add(m.key)
            self._migrants = {c.key for c in batch[n_children:]}
            self._repeated = {c.key for c in batch if c.key in repeated}
        for c in batch:
            self._seen[c.key] = None
        self._pending = batch
        _log.debug("asked generation %d (%d candidates)", self._generation, len(batch))
        return [self._proposal(c, source) for c in batch]

    def _proposal(self, candidate: Candidate, source: str | None = None) -> Proposal:
        if source is None:
            source = "evolution" if self._generation else ("seed" if self.init == "seed" else "initial")
        if candidate.key in self._migrants:
            source = "migrant"
        if candidate.key in self._repeated:
            source = "repeat"
        return Proposal(candidate=candidate, source=source, group=self.group, space=self.space)

    def _stop_now(self) -> bool:
        if self.patience is None or self._stale < self.patience:
            return False
        if self._tokens - self._tokens_at_reset < self.patience_fraction * self._tokens_at_reset:
            return False
        return self.neighbourhood_seen() >= self.explored

    def _unseen(self) -> list[Candidate]:
        """Before the convergence stop: unseen candidates that may beat the incumbent (``unseen_chance``)."""
        return explore_before_stop(self)

    def neighbourhood_seen(self, samples: int = 64) -> float:
        """Share of the incumbent's one-switch neighbours (one gene up a level, one down) already seen,
        estimated from ``samples`` draws with an RNG of their own (the search's draws do not change)."""
        inc = self.incumbent
        if inc is None:
            return 0.0
        space = self._need_space()
        rng = np.random.default_rng([self.seed, self._generation, 7])
        lv = list(space.levels_of(inc).values())
        found: set[str] = set()
        for _ in range(samples):
            new = level_switch(space, lv, rng, same_kind=self.same_kind, kinds=self.kinds)
            if new is not None:
                found.add(space.candidate_from_levels(dict(zip(space.gene_names, new))).key)
        return sum(k in self._seen for k in found) / len(found) if found else 1.0

    def observe_generation(self, screened: Sequence[tuple[Candidate, float]], *, close: bool | None = None,
                           tokens: int | None = None, parents: Sequence[tuple[Candidate, float]] = (),
                           settled: Mapping[str, str] | None = None) -> None:
        """What the driver saw of the generation before :meth:`tell_generation`: the first-stage score
        of every candidate scored (the surrogate's data) and whether any finalist came within the
        noise band of the incumbent (``None``: unknown; the convergence rule then uses 0.5 %), and the
        forward tokens the generation cost (for ``patience_fraction``); ``parents``: the parents'
        last-stage scores on this generation's windows (``rescore_parents``), which replace their
        fitness; ``settled``: finalist key -> ``"won"``, ``"lost"`` or ``"tie"``, the verdict of a close
        call against the incumbent on more tokens (:meth:`Searcher <evoprune.search.Searcher>`):
        only a finalist that won may take the incumbent's place."""
        space = self._need_space()
        for cand, value in screened:
            if value is not None and math.isfinite(float(value)) and float(value) > 0:
                self._scored[cand.key] = (list(space.levels_of(cand).values()), float(value))
        self._close = close
        if parents:
            fresh = {c.key: float(v) for c, v in parents if v is not None and not math.isnan(float(v))}
            self._population = sorted(((c, fresh.get(c.key, f)) for c, f in self._population), key=lambda cf: cf[1])
        self._settled = dict(settled or {})
        if tokens is not None:
            self._tokens += int(tokens)

    # -- surrogate and prior --------------------------------------------------------------------
    def set_prior(self, prior: Mapping[str, Sequence[float]] | None) -> None:
        """Per gene, the prior cost of each level (:func:`~evoprune.search._surrogate.gene_prior`: the
        calibration importance of what a level removes). With ``surrogate > 1`` it ranks the offspring
        pool while too few candidates are scored to fit the surrogate. Not part of the saved state:
        the driver sets it from the runtime each time (the calibration is deterministic)."""
        self._prior = dict(prior) if prior else None

    def _surrogate_model(self) -> Surrogate | None:
        """The fitted additive surrogate, or ``None`` (off, or fewer scored candidates than genes)."""
        if self.surrogate <= 1 or self.space is None:
            return None
        data = list(self._scored.values())
        if len(data) < max(8, len(self.space.genes)):
            return None
        return Surrogate(self.space, [lv for lv, _v in data], [v for _lv, v in data])

    def _ranker(self) -> Callable[[Sequence[Candidate]], list[float]] | None:
        """How the offspring pool is ranked before paying for it: the surrogate once fitted, else the
        importance prior, else not at all (``None``)."""
        model = self._surrogate_model()
        if model is not None:
            return model.predict
        if self.surrogate > 1 and self._prior is not None:
            space, prior = self._need_space(), self._prior
            return lambda cands: [prior_score(space, prior, c) for c in cands]
        return None

    def tell_generation(self, results: Sequence[tuple[Candidate, float | None]]) -> None:
        """Last-stage fitness of the generation's candidates (``None`` or NaN: did not reach it).

        The best ``parents`` of the current parents and the finalists become the
        next parents (ties go to the newcomer). Candidates not in the pending
        generation are ignored.
        """
        pending = {c.key: c for c in self._pending}
        finalists = []
        for cand, value in results:
            if cand.key not in pending or value is None:
                continue
            value = float(value)
            if math.isnan(value):
                continue
            finalists.append((pending[cand.key], value))
        before = self._population[0] if self._population else None
        pool = finalists + list(self._population)  # newcomers first: stable sort gives them ties
        pool.sort(key=settled_order(self._settled, before[1] if before is not None else math.inf))
        if not pool and self._generation == 0:
            raise RuntimeError(
                "EvolutionarySampler: no initial candidate reached the last stage; check the stage promotion rules."
            )
        self._population = pool[: self.parents]
        if before is not None:
            close = self._close
            if close is None:
                close = any(v <= before[1] * 1.005 for _c, v in finalists if _c.key != before[0].key)
            new_best = self._population[0][0].key != before[0].key
            if new_best:
                self._tokens_at_reset = self._tokens
            self._stale = 0 if new_best or close else self._stale + 1
        else:
            self._tokens_at_reset = self._tokens
        self._close = None
        self._settled = {}
        self._repeated = set()
        self._pending = []
        self._generation += 1
        if self._population:
            _log.info(
                "generation %d done: best %.6g",
                self._generation,
                self._population[0][1],
                extra={"fields": {"group": self.group, "finalists": len(finalists)}},
            )

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: JSON-able (``json.dumps`` works on it)."""
        return {
            "version": _STATE_VERSION,
            "kind": self.kind,
            "settings": self._settings(),
            "generation": self._generation,
            "population": [{"candidate": c.to_dict(), "fitness": f} for c, f in self._population],
            "pending": [c.to_dict() for c in self._pending],
            "migrants": sorted(self._migrants),
            "repeated": sorted(self._repeated),
            "seen": list(self._seen),
            "rng": rng_state(self._rng),
            "stale": self._stale,
            "tokens": self._tokens,
            "tokens_at_reset": self._tokens_at_reset,
            "converged": self._converged,
            "scored": [[k, lv, v] for k, (lv, v) in self._scored.items()],
        }

    def _settings(self) -> dict[str, Any]:
        return {
            "offspring": self.offspring,
            "parents": self.parents,
            "init": self.init,
            "seeds": [c.to_dict() for c in self.seeds],
            "init_samples": self.init_samples,
            "max_flips": self.max_flips,
            "same_kind": self.same_kind,
            "kinds": None if self.kinds is None else list(self.kinds),
            "seed": self.seed,
            "fill": self.fill,
            "patience": self.patience,
            "patience_fraction": self.patience_fraction,
            "explored": self.explored,
            "surrogate": self.surrogate,
            "fresh_windows": self.fresh_windows,
            "rescore_parents": self.rescore_parents,
            "repeats": self.repeats,
            "settle": self.settle,
            "settle_z": self.settle_z,
            "unseen_chance": self.unseen_chance,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the sampler must be set up with the same settings."""
        if state.get("version") != _STATE_VERSION or state.get("kind") != self.kind:
            raise ValueError(
                f"not an {type(self).__name__} state (version {state.get('version')}, kind {state.get('kind')!r})."
            )
        settings = state.get("settings", {})
        mine = self._settings()
        diff = {k: (settings.get(k), v) for k, v in mine.items() if k in settings and settings.get(k) != v}
        if diff:
            raise ValueError(
                f"{type(self).__name__}: the saved state was made with other settings {diff} (saved, current); "
                "rebuild the sampler with the study's settings to resume it."
            )
        self._generation = int(state["generation"])
        self._population = [(Candidate.from_dict(p["candidate"]), float(p["fitness"])) for p in state["population"]]
        self._pending = [Candidate.from_dict(c) for c in state.get("pending", [])]
        self._migrants = set(state.get("migrants", []))
        self._repeated = set(state.get("repeated", []))
        self._seen = dict.fromkeys(state["seen"])
        set_rng_state(self._rng, state["rng"])
        self._stale = int(state.get("stale", 0))
        self._tokens = int(state.get("tokens", 0))
        self._tokens_at_reset = int(state.get("tokens_at_reset", 0))
        self._converged = bool(state.get("converged", False))
        self._scored = {k: ([int(x) for x in lv], float(v)) for k, lv, v in state.get("scored", [])}
