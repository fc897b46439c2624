"""The generation-sampler protocol: what the search driver needs from an evolution.

A *generation sampler* proposes a whole generation of candidates at once (:meth:`ask_generation`),
is told their final scores together (:meth:`tell_generation`), and saves and restores its whole
state as JSON, so a study resumes it exactly. :class:`~evoprune.search.EvolutionarySampler` and
:class:`~evoprune.search.BudgetSweep` are the built-in ones; subclass :class:`GenerationSampler`
for your own. (Optuna samplers propose one trial at a time and need none of this.)
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..space import Candidate, SearchSpace

__all__ = ["GenerationSampler", "Proposal"]


@dataclasses.dataclass(frozen=True)
class Proposal:
    """One candidate the sampler wants scored.

    Attributes:
        candidate: the candidate.
        source: ``"initial"``, ``"seed"`` or ``"evolution"`` (recorded by the driver).
        group: label of the sub-run it belongs to (e.g. ``"params<=0.5"`` in a
            :class:`BudgetSweep`), ``None`` for a plain run.
        space: the space (and budget) the candidate was made for.
    """

    candidate: Candidate
    source: str
    group: str | None = None
    space: SearchSpace | None = None


class GenerationSampler(abc.ABC):
    """Base class of samplers that the :class:`~evoprune.search.Searcher` drives generation by generation.

    The driver calls :meth:`setup` once, then alternately :meth:`ask_generation` and
    :meth:`tell_generation`; it saves :meth:`state_dict` right after each ask (the state then holds
    the :attr:`pending` candidates) and after each tell, and calls :meth:`load_state_dict` on resume.
    """

    #: short name stored with the sampler state
    kind: str = "generation"

    @abc.abstractmethod
    def setup(self, space: SearchSpace) -> None:
        """Bind the search space (called once, before the first ask)."""

    @property
    @abc.abstractmethod
    def generation(self) -> int:
        """Generations told so far."""

    @property
    @abc.abstractmethod
    def min_finalists(self) -> int:
        """How many candidates of the current generation must reach the last stage."""

    @property
    @abc.abstractmethod
    def pending(self) -> list[Candidate]:
        """Candidates asked but not yet told (a generation interrupted mid-way)."""

    @abc.abstractmethod
    def discard_pending(self) -> None:
        """Forget the pending generation (its candidates stay seen)."""

    @abc.abstractmethod
    def ask_generation(self, claim: Callable[[str], bool] | None = None) -> list[Proposal]:
        """The next generation's proposals; ``claim(key)`` reserves a candidate study-wide (``False``:
        someone else has it, propose another). With :attr:`pending` set, the pending ones again."""

    @abc.abstractmethod
    def tell_generation(self, results: Sequence[tuple[Candidate, float | None]]) -> None:
        """Each proposed candidate with its final objective (``None``: did not reach the last stage)."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The whole state, JSON-able."""

    @abc.abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
