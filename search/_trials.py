"""Trial-level pieces of the search driver: what a run did (:class:`SearchStats`), making a trial
with fixed params, recognising resampled suggestions and out-of-memory errors, and the exception a
sampler raises when it has nothing left."""

from __future__ import annotations

import dataclasses
from typing import Any

from .._logging import get_logger
from .._optuna_private import distribution_contains, study_id, study_storage, trial_id
from ..space import Candidate, SearchSpace
from ..storage.internal import (CANDIDATE_ATTR, DUPLICATE_OF_ATTR, INFEASIBLE_ATTR, RESAMPLED_ATTR,
                                TrialNotRunningError, is_resampled)

_log = get_logger("search")

__all__ = ["SamplerExhausted", "SearchStats", "discard", "fixed_trial", "is_out_of_memory", "is_resampled", "is_taken",
           "own_stop", "trial_candidate", "direction_name", "mark_resampled", "tell_duplicate", "tell_infeasible"]


class SamplerExhausted(Exception):
    """Raised by an Optuna sampler (from ``before_trial`` or ``sample_*``) that has nothing left to
    propose: the driver tells the asked trial as a resampled proposal and the run stops with
    ``stopped_by="exhausted"``."""


@dataclasses.dataclass
class SearchStats:
    """What a :meth:`Searcher.run` call did."""

    trials: int = 0
    evaluated: int = 0
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    #: Optuna samplers: suggestions asked (``trials`` plus the resampled ones below)
    proposals: int = 0
    #: resampled suggestions (not evaluated, not trials): over the budget, already seen, no candidate
    infeasible: int = 0
    duplicates: int = 0
    invalid: int = 0
    generations: int = 0
    replayed: int = 0
    tokens: int = 0
    #: forward tokens spent scoring the incumbent for racing promotion (included in ``tokens``)
    reference_tokens: int = 0
    #: forward tokens spent settling close calls at the last stage (included in ``tokens``)
    close_call_tokens: int = 0
    seconds: float = 0.0
    stage_evaluations: dict[str, int] = dataclasses.field(default_factory=dict)
    stopped_by: str | None = None
    #: results discarded because another process had finished their trial meanwhile (see :func:`is_taken`)
    discarded: int = 0

    @property
    def resampled(self) -> int:
        """Suggestions resampled without a trial (over budget, already seen, no candidate)."""
        return self.infeasible + self.duplicates + self.invalid

    @property
    def wasted_share(self) -> float:
        """Share of the Optuna sampler's suggestions that were resampled (0.0 when none was asked).

        >>> SearchStats(proposals=20, infeasible=3, duplicates=2).wasted_share
        0.25
        """
        return self.resampled / self.proposals if self.proposals else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "resampled": self.resampled, "wasted_share": self.wasted_share}


def is_taken(exc: BaseException) -> bool:
    """Did recording fail because another process finished the trial meanwhile? (A reaper failed it
    while this process stalled past the grace period, or the study was deleted.) The driver then
    discards that trial's result with one warning and goes on; it never crashes on it."""
    import optuna

    if isinstance(exc, ValueError) and str(exc).startswith("Cannot tell a "):  # study.tell of a finished trial
        return True
    return isinstance(exc, (optuna.exceptions.UpdateFinishedTrialError, TrialNotRunningError))


def discard(entry: Any, exc: Exception, stats: SearchStats) -> None:
    """Another process finished ``entry``'s trial (:func:`is_taken`): warn once, drop its result, go on
    (any other error is raised again)."""
    if not is_taken(exc):
        raise exc
    entry.lost = entry.done = True
    entry.final = None
    stats.discarded += 1
    _log.warning("trial %d was finished by another process (this worker stalled past the grace period, or the "
                 "study was deleted); its result is discarded: %s", entry.trial.number, str(exc)[:300])


def is_out_of_memory(exc: BaseException) -> bool:
    """Did ``exc`` come from running out of device or host memory (CUDA/MPS OOM, a failed CPU allocation)?

    >>> is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"))
    True
    >>> is_out_of_memory(ValueError("shapes do not match"))
    False
    """
    import torch

    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fixed_trial(study: Any, params: dict[str, Any], distributions: dict[str, Any], *,
                user_attrs: dict[str, Any] | None = None, system_attrs: dict[str, Any] | None = None) -> Any:
    """A new RUNNING :class:`optuna.Trial` of ``study`` with ``params`` already set.

    One storage call creates it (a RUNNING template trial), so workers creating trials at the same
    moment can never swap them -- unlike ``enqueue_trial`` + ``ask``, where ``ask`` pops the
    study's oldest WAITING trial, whoever enqueued it -- and a process killed in between leaves
    nothing half-made. The study's sampler is not asked for these params.

    >>> import optuna
    >>> from optuna.distributions import IntDistribution
    >>> study = optuna.create_study()
    >>> trial = fixed_trial(study, {"L0.mlp": 2}, {"L0.mlp": IntDistribution(0, 4)})
    >>> trial.params, trial.number
    ({'L0.mlp': 2}, 0)
    >>> _ = study.tell(trial, 0.5)
    >>> study.best_trial.params
    {'L0.mlp': 2}
    """
    import optuna
    from optuna.trial import TrialState, create_trial

    unknown = sorted(set(params) - set(distributions))
    if unknown:
        raise ValueError(f"fixed_trial: no distribution for params {unknown}.")
    dists = {k: distributions[k] for k in params}
    for k, v in params.items():
        if not distribution_contains(dists[k], v):
            raise ValueError(f"fixed_trial: param {k}={v!r} is outside its distribution {dists[k]}.")
    template = create_trial(state=TrialState.RUNNING, params=dict(params), distributions=dists,
                            user_attrs=dict(user_attrs or {}), system_attrs=dict(system_attrs or {}))
    new_id = study_storage(study).create_new_trial(study_id(study), template_trial=template)
    return optuna.Trial(study, new_id)


def _state(name: str) -> Any:
    from optuna.trial import TrialState

    return getattr(TrialState, name)


#: generations a run without a stop condition may take at most, where the sampler stops by itself
SAFETY_GENERATIONS = 1000


def own_stop(sampler: Any) -> int:
    """The generation cap of a run given no stop condition: :data:`SAFETY_GENERATIONS` (logged) where the
    generation ``sampler`` stops by itself (``stops_itself``: the evolutionary convergence stop); else the
    one-line error that asks for a stop condition."""
    if not getattr(sampler, "stops_itself", False):
        raise ValueError("Searcher.run: give a stop condition: n_trials, n_generations, max_tokens or timeout.")
    _log.info("no stop condition given: searching until the sampler stops by itself (safety cap: %d generations)",
              SAFETY_GENERATIONS)
    return SAFETY_GENERATIONS


def trial_candidate(trial: Any, space: SearchSpace | None = None) -> Candidate:
    """The candidate a (frozen) trial evaluated: the recorded one (``evoprune:candidate``, which is the
    repaired candidate in ``"repair"`` mode), else ``space.candidate_from_params(trial.params)``."""
    data = trial.user_attrs.get(CANDIDATE_ATTR)
    if data is not None:
        return Candidate.from_dict(data)
    if space is None:
        raise ValueError(f"trial {trial.number} has no recorded candidate; pass the space to decode its params.")
    return space.candidate_from_params(trial.params)


def direction_name(d: Any) -> str:
    return "maximize" if str(d).lower().endswith("maximize") else "minimize"


#: the placeholder value of an over-budget suggestion before any trial finished (see the driver's docstring)
_PLACEHOLDER = 1e6


def mark_resampled(study: Any, trial: Any, reason: str) -> None:
    """Mark ``trial`` as a resampled suggestion (before it is told: a told row is always marked)."""
    study_storage(study).set_trial_system_attr(trial_id(trial), RESAMPLED_ATTR, reason)


def tell_infeasible(searcher: Any, trial: Any, candidate: Candidate, stats: SearchStats) -> None:
    """The driver's answer to an over-budget suggestion (resampled, not evaluated): ``COMPLETE`` with its constraint
    violations (already set) and placeholder values (see :mod:`evoprune.search._searcher`)."""
    values = []
    for i, src in enumerate(searcher._sources):
        if src.kind == "cost":
            values.append(searcher.space.ratio(candidate, src.metric))
        else:
            worst = searcher._worst[i]
            if worst is None:
                worst = _PLACEHOLDER if searcher.directions[i] == "minimize" else -_PLACEHOLDER
            values.append(worst)
    trial.set_user_attr(INFEASIBLE_ATTR, True)
    mark_resampled(searcher.study, trial, "over_budget")
    searcher.study.tell(trial, values if len(values) > 1 else values[0])
    stats.infeasible += 1


def tell_duplicate(searcher: Any, trial: Any, candidate: Candidate, stats: SearchStats) -> None:
    """The driver's answer to ``trial``, whose candidate another trial holds (claimed: evaluated, running or failed for
    good), as a resampled suggestion (see :mod:`evoprune.search._searcher`): one objective -- like the
    earlier trial (``COMPLETE`` with its value, or ``PRUNED`` with its intermediate values);
    several objectives, or no finished earlier trial -- ``PRUNED`` without values. No candidate
    row is written: it is not a trial of the search."""
    import optuna

    stats.duplicates += 1
    # the recorder's one rule (an indexed lookup, not a scan of the study on this hot path); resampled
    # rows never have a candidate row, so only evaluated trials are found
    done = searcher.recorder.finished_trial(candidate.key)
    t = None if done is None else study_storage(searcher.study).get_trial(done["trial_id"])
    if t is not None:
        trial.set_user_attr(DUPLICATE_OF_ATTR, t.number)
    mark_resampled(searcher.study, trial, "duplicate")
    if t is not None and searcher.single_objective and t.state == optuna.trial.TrialState.COMPLETE:
        searcher.study.tell(trial, t.values[0])
        return
    if t is not None and searcher.single_objective:
        for step, v in sorted(t.intermediate_values.items()):
            trial.report(v, step)
    searcher.study.tell(trial, state=_state("PRUNED"))
