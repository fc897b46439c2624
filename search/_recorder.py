"""The :class:`Recorder` protocol: where the search driver writes what it learns.

The :class:`~evoprune.search.Searcher` talks to an Optuna study for trials
(ask/tell, params, values, states) and to a *recorder* for everything Optuna has
no place for: the candidate of each trial, every stage result, the sampler's
state and duplicate claims among workers. A recorder is any object with these
nine methods (the typed :class:`Recorder` protocol; no base class needed; the
:class:`~evoprune.search.Searcher` refuses an object that lacks one)::

    record_candidate(trial_id, candidate, *, source)          -> None
    record_stage(trial_id, stage, evaluator, tokens, value, seconds, details) -> None
    record_stage_result(trial_id, stage, stage_index, objective, promoted) -> None
    stage_history(stage)                                      -> list[float]
    finished_trial(candidate_key)                             -> dict | None
    save_sampler_state(generation, state)                     -> None
    load_sampler_state()                                      -> (generation, state) | None
    claim(candidate_key)                                      -> bool
    release(candidate_key)                                    -> None

Conventions every implementation must keep:

* ``trial_id`` is Optuna's **storage** trial id (``trial._trial_id`` of a live
  :class:`optuna.trial.Trial` or :class:`~optuna.trial.FrozenTrial`), unique
  across all studies of one storage; ``trial.number`` is only unique per study.
  The driver calls ``record_candidate`` and ``record_stage`` while the trial is
  still RUNNING, before ``study.tell``.
* ``record_candidate`` receives a :class:`~evoprune.space.Candidate`; store
  ``candidate.to_json()`` and ``candidate.key`` (``Candidate.from_json`` restores it).
  ``source`` says where it came from: ``"sampler"`` (an Optuna sampler),
  ``"evolution"``, ``"seed"`` (a baseline or user seed) or ``"initial"``.
* ``record_stage`` is called once per evaluator per stage reached, in order;
  ``tokens`` is the number of evaluation tokens (``None`` for token-free
  evaluators), ``details`` a JSON-able dict (may be empty). A stage also has a
  pseudo-evaluator ``"finetune"`` when it fine-tunes.
* ``record_stage_result`` closes a stage for a trial: ``objective`` is the
  stage's promotion objective (the value of its objective evaluator),
  ``stage_index`` its position in the pipeline, ``promoted`` whether the
  candidate goes on (``None`` at the last stage).
* ``stage_history(stage)`` returns the stage objective of every candidate that
  has been scored at ``stage`` in this study so far, by any worker, in any
  order; trials that FAILed are left out (their candidate is retried and must
  not be counted twice). The driver uses it so that asynchronous promotion (``TopK`` /
  ``TopFraction`` over everything seen) agrees across workers.
* ``save_sampler_state(generation, state)``: ``state`` is the JSON-able dict of
  :meth:`EvolutionarySampler.state_dict` (or of any stateful sampler); save
  it atomically, replacing the previous one, and return only once it is
  durable. ``load_sampler_state()`` returns the last ``(generation, state)`` or
  ``None`` for a new study. The driver saves right after asking a generation
  (the state then holds the generation's pending candidates) and again after
  telling it, and loads once at the start of :meth:`Searcher.run`, so a resumed
  study continues the evolution exactly: an interrupted generation is replayed
  with the same candidates, and those whose trials already finished are reused
  through ``finished_trial(candidate_key)`` instead of being evaluated again.
* ``finished_trial(candidate_key)`` returns the first COMPLETE or PRUNED trial
  that evaluated the candidate (not a repeat told another trial's values, not
  an over-budget placeholder): ``{"trial_id", "number", "state", "stages":
  {stage: objective}}``, or ``None``.
* ``claim(candidate_key) -> bool`` atomically reserves a candidate for
  evaluation: ``True`` for the first caller in the whole study (any worker),
  ``False`` for every later one. A SQL recorder implements it as an ``INSERT``
  into a table with a unique ``(study_id, candidate_key)`` constraint;
  ``release(candidate_key)`` undoes a claim whose evaluation failed, so
  the candidate may be tried again.

:class:`OptunaRecorder` is the default implementation. It keeps everything in
Optuna trial and study *user attributes*, so it works with every Optuna storage,
in-memory included; its ``claim`` is atomic only within one process (for many
workers use a study from :func:`evoprune.create_study`, whose ``recorder`` is the
SQL recorder of :mod:`evoprune.storage`, with cross-process claims). Both behave
alike otherwise (same failed-trial handling, same replay). Keys it writes:

===============================  =============================================
trial user attr                  value
===============================  =============================================
``evoprune:candidate``           ``candidate.to_dict()``
``evoprune:candidate_key``       ``candidate.key``
``evoprune:source``              the ``source`` string
``evoprune:stage:<stage>``       ``{evaluator: {"value", "tokens", "seconds", "details"}}``
``evoprune:objective:<stage>``   the stage objective (``record_stage_result``)
``evoprune:promoted:<stage>``    promoted at that stage (``None`` at the last)
``evoprune:stage_reached``       name of the last stage recorded
``evoprune:stage_index``         its index in the pipeline
===============================  =============================================

and the study user attr ``evoprune:sampler_state`` = ``{"generation", "state"}``.

Example::

    >>> import optuna
    >>> from evoprune.search import OptunaRecorder, Recorder
    >>> study = optuna.create_study()
    >>> rec = OptunaRecorder(study)
    >>> isinstance(rec, Recorder)
    True
    >>> rec.claim("abc"), rec.claim("abc")
    (True, False)
    >>> rec.load_sampler_state() is None
    True
    >>> rec.save_sampler_state(3, {"population": []})
    >>> rec.load_sampler_state()
    (3, {'population': []})
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from .._optuna_private import study_storage, trial_id
from ..space import Candidate
from ..storage.internal import (
    CANDIDATE_ATTR,
    CANDIDATE_KEY_ATTR,
    DUPLICATE_OF_ATTR,
    INFEASIBLE_ATTR,
    OBJECTIVE_ATTR,
    PROMOTED_ATTR,
    SAMPLER_STATE_ATTR,
    SOURCE_ATTR,
    STAGE_ATTR,
    STAGE_INDEX_ATTR,
    STAGE_REACHED_ATTR,
)

__all__ = ["OptunaRecorder", "Recorder"]

_STATE_ATTR = SAMPLER_STATE_ATTR


@runtime_checkable
class Recorder(Protocol):
    """What the search driver needs from a study database besides Optuna itself.

    See the module docstring of :mod:`evoprune.search._recorder` for the exact
    contract of each method.
    """

    def record_candidate(self, trial_id: int, candidate: Candidate, *, source: str = "sampler") -> None:
        """Store the candidate evaluated by trial ``trial_id``."""
        ...

    def record_stage(
        self,
        trial_id: int,
        stage: str,
        evaluator: str,
        tokens: int | None,
        value: float,
        seconds: float,
        details: Mapping[str, Any],
    ) -> None:
        """Store one evaluator result of one stage."""
        ...

    def record_stage_result(
        self, trial_id: int, stage: str, stage_index: int, objective: float, promoted: bool | None
    ) -> None:
        """Close a stage: its promotion objective and decision."""
        ...

    def stage_history(self, stage: str) -> list[float]:
        """Objective values of every candidate scored at ``stage`` so far (all workers, failed excluded)."""
        ...

    def finished_trial(self, candidate_key: str) -> dict[str, Any] | None:
        """The first finished trial that evaluated ``candidate_key`` with its stage objectives, or ``None``."""
        ...

    def save_sampler_state(self, generation: int, state: Mapping[str, Any]) -> None:
        """Durably replace the saved sampler state."""
        ...

    def load_sampler_state(self) -> tuple[int, dict[str, Any]] | None:
        """The last saved ``(generation, state)``, or ``None``."""
        ...

    def claim(self, candidate_key: str) -> bool:
        """Reserve ``candidate_key``; ``True`` only for the first caller in the study."""
        ...

    def release(self, candidate_key: str) -> None:
        """Undo a claim (the evaluation failed and may be retried)."""
        ...


def _jsonable(value: Any) -> Any:
    """``value`` made JSON-able (non-finite floats become strings, unknown objects their repr)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return _jsonable(value.item())
        except (TypeError, ValueError):
            pass
    return repr(value)


def _float(value: Any) -> float:
    if isinstance(value, str):
        return float(value)  # "nan", "inf"
    return float(value)


class OptunaRecorder:
    """A :class:`Recorder` that writes Optuna user attributes (any Optuna storage).

    Args:
        study: the :class:`optuna.Study` the driver asks and tells.

    Stage results and candidates go to trial user attributes, the sampler state
    to a study user attribute (with MySQL's 64 KiB ``TEXT`` limit, very long
    evolutionary runs should use the SQL recorder of :mod:`evoprune.storage`).
    ``claim`` is atomic within this process only: it checks the candidate keys of
    the study's trials plus its own claims.
    """

    def __init__(self, study: Any) -> None:
        self.study = study
        self._storage = study_storage(study)  # Optuna keeps the storage private; the user-attr API needs it
        self._claimed: set[str] = set()
        self._released: set[str] = set()
        self._lock = threading.Lock()

    # -- trials -------------------------------------------------------------------------
    def record_candidate(self, trial_id: int, candidate: Candidate, *, source: str = "sampler") -> None:
        set_attr = self._storage.set_trial_user_attr
        set_attr(trial_id, CANDIDATE_ATTR, candidate.to_dict())
        set_attr(trial_id, CANDIDATE_KEY_ATTR, candidate.key)
        set_attr(trial_id, SOURCE_ATTR, str(source))

    def record_stage(
        self,
        trial_id: int,
        stage: str,
        evaluator: str,
        tokens: int | None,
        value: float,
        seconds: float,
        details: Mapping[str, Any],
    ) -> None:
        key = STAGE_ATTR + stage
        current = dict(self._storage.get_trial_user_attrs(trial_id).get(key, {}))
        current[str(evaluator)] = {
            "value": _jsonable(float(value)),
            "tokens": None if tokens is None else int(tokens),
            "seconds": float(seconds),
            "details": _jsonable(dict(details or {})),
        }
        self._storage.set_trial_user_attr(trial_id, key, current)
        self._storage.set_trial_user_attr(trial_id, STAGE_REACHED_ATTR, str(stage))

    def record_stage_result(
        self, trial_id: int, stage: str, stage_index: int, objective: float, promoted: bool | None
    ) -> None:
        set_attr = self._storage.set_trial_user_attr
        set_attr(trial_id, OBJECTIVE_ATTR + stage, _jsonable(float(objective)))
        set_attr(trial_id, PROMOTED_ATTR + stage, promoted)
        set_attr(trial_id, STAGE_REACHED_ATTR, str(stage))
        set_attr(trial_id, STAGE_INDEX_ATTR, int(stage_index))

    def stage_history(self, stage: str) -> list[float]:
        from optuna.trial import TrialState

        key = OBJECTIVE_ATTR + stage
        return [
            _float(t.user_attrs[key]) for t in self.study.get_trials(deepcopy=False)
            if key in t.user_attrs and t.state != TrialState.FAIL
        ]

    def finished_trial(self, candidate_key: str) -> dict[str, Any] | None:
        """The first COMPLETE or PRUNED trial of ``candidate_key``: ``{"trial_id", "number", "state",
        "stages": {stage: objective}}``, or ``None``."""
        from optuna.trial import TrialState

        key_attr, prefix = CANDIDATE_KEY_ATTR, OBJECTIVE_ATTR
        for t in sorted(self.study.get_trials(deepcopy=False), key=lambda t: t.number):
            if t.user_attrs.get(key_attr) != candidate_key or t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
                continue
            if t.user_attrs.get(INFEASIBLE_ATTR) or DUPLICATE_OF_ATTR in t.user_attrs:
                continue
            stages = {k[len(prefix):]: _float(v) for k, v in t.user_attrs.items() if k.startswith(prefix)}
            return {"trial_id": trial_id(t), "number": t.number, "state": t.state.name, "stages": stages}
        return None

    # -- sampler state --------------------------------------------------------------------
    def save_sampler_state(self, generation: int, state: Mapping[str, Any]) -> None:
        payload = {"generation": int(generation), "state": _jsonable(dict(state))}
        json.dumps(payload)  # fail here, not in the storage, if something is not JSON-able
        self.study.set_user_attr(_STATE_ATTR, payload)

    def load_sampler_state(self) -> tuple[int, dict[str, Any]] | None:
        payload = self.study.user_attrs.get(_STATE_ATTR)
        if not payload:
            return None
        return int(payload["generation"]), dict(payload["state"])

    # -- duplicates -----------------------------------------------------------------------
    def claim(self, candidate_key: str) -> bool:
        with self._lock:
            if candidate_key in self._claimed:
                return False
            if candidate_key not in self._released:
                key_attr = CANDIDATE_KEY_ATTR
                for t in self.study.get_trials(deepcopy=False):
                    if t.user_attrs.get(key_attr) == candidate_key and t.state.is_finished():
                        self._claimed.add(candidate_key)
                        return False
            self._released.discard(candidate_key)
            self._claimed.add(candidate_key)
            return True

    def release(self, candidate_key: str) -> None:
        with self._lock:
            self._claimed.discard(candidate_key)
            self._released.add(candidate_key)
