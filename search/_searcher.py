"""The ask -> candidate -> apply -> staged evaluation -> tell driver.

:class:`Searcher` runs a search on an :class:`optuna.Study`, with either

* a *generation sampler* (:class:`~evoprune.search.EvolutionarySampler`,
  :class:`~evoprune.search.BudgetSweep`): each generation's candidates become
  Optuna trials with fixed params (:func:`fixed_trial`: created RUNNING, in one storage call), are
  scored together through the stage pipeline, and the best survive; or
* an Optuna sampler (TPE, NSGA-II, random, GP, QMC, your own ``BaseSampler``;
  the study's own when ``sampler`` is ``None``): one trial per candidate via
  :meth:`SearchSpace.suggest <evoprune.space.SearchSpace.suggest>`.

Staged evaluation and trial states (the decision, documented once):

* A candidate that reaches the **last stage** is told ``COMPLETE`` with its
  objective values (``objectives``, e.g. ``["kl"]`` or ``["kl", "params"]``).
* A candidate **not promoted** past stage ``i`` is told ``PRUNED``. In a
  single-objective study each stage objective was ``trial.report``-ed at step
  ``i`` first, so the trial carries its stage value and TPE ranks it by (stage
  reached, value) -- never above a completed trial; multi-objective studies
  cannot report (Optuna raises), and NSGA-II ignores pruned trials. Either way
  ``study.best_trial(s)`` only ever returns candidates scored on the last
  stage's token set, so a candidate judged on few tokens cannot beat one judged
  on many. ``user_attrs["evoprune:stage_reached"]`` / ``"evoprune:stage_index"``
  say how far every trial got.
* A NaN objective tells ``FAIL``; an exception during evaluation tells ``FAIL``,
  releases the candidate's claim and re-raises.

Budgets with Optuna samplers (``budget_mode``):

* ``"constrain"`` (default for TPE and NSGA-II): the budget violations are set
  with ``trial.set_constraint``; a suggestion outside the budget is **resampled**
  (below).
* ``"repair"`` (default for the others): the suggested candidate is moved into
  the budget by :meth:`SearchSpace.repair` (deterministically, seeded by the
  trial number) and the repaired one is evaluated
  (``user_attrs["evoprune:repaired"]``).

Resampled proposals (Optuna samplers): a suggestion that is over the budget, that
repeats a candidate already seen (claimed by any worker: evaluated, failed for
good, or running), or that gives no candidate is **not evaluated and not a
trial**: it costs no tokens, does not count against ``n_trials`` and is not in
:attr:`SearchStats.trials`; the sampler is asked again, at most
``max_resamples`` times per trial (then the run stops with
``stopped_by="exhausted"``: the sampler only proposes seen or over-budget
candidates). Its Optuna row stays, told at once, so the sampler learns from it,
and carries the system attribute ``"evoprune:resampled"`` (the reason) so that
status, show, report and check leave it out:

* over budget: ``COMPLETE`` with its constraint violations (set by
  :meth:`SearchSpace.suggest`) and placeholder values (cost objectives exact,
  evaluated objectives the worst feasible value seen so far, or ``1e6``;
  ``user_attrs["evoprune:infeasible"]``). TPE and NSGA-II rank an infeasible
  trial by its total violation, below every feasible one, so they learn where
  the budget boundary is and how far a suggestion missed it; ``FAIL`` would
  teach them nothing (both ignore failed trials) and they would propose the
  same region again.
* already seen (``user_attrs["evoprune:duplicate_of"]``: the earlier trial's
  number, if finished): with **one objective**, told like the earlier trial
  (``COMPLETE`` with its value, ``PRUNED`` with its intermediate values), so TPE
  keeps the known point where its value puts it; with **several objectives**,
  or while the earlier trial runs or failed, ``PRUNED`` without intermediate
  values: TPE ranks it below every evaluated trial and NSGA-II ignores it, so a
  generation fills only with distinct evaluated candidates. Copies of front
  points feed back on themselves in multi-objective samplers (identical points
  fill TPE's "good" group and NSGA-II's population, so the sampler repeats them
  ever more often), while in single-objective TPE the copy is what keeps it
  near the good region. Measured with TPE on a tiny 10-block Llama (60 trials
  asked, at most 100 resamples each): one objective, drop exactly 3 -- copies
  reached 60 trials in 5 of 5 seeds (about 17 suggestions per trial),
  ``PRUNED`` without values stopped exhausted at 8 trials in 1 of 3 seeds,
  ``PRUNED`` with the copied intermediate value at 9 in 1 of 5; objectives
  (kl, params), drop 2 to 4 -- copies stopped exhausted after 21-34 trials in 3
  of 3 seeds, ``PRUNED`` reached 60 (about 7 suggestions per trial); NSGA-II
  reached 60 either way, with fewer suggestions when told ``PRUNED`` (157-259
  against 218-558). A single-objective copy is ``COMPLETE``: the Pareto front of
  an evoprune study (:meth:`EvoStudy.pareto_front`, the report) leaves it out;
  Optuna's own ``study.best_trial`` may return it on a tie with the evaluated
  trial, whose number ``duplicate_of`` gives.
* no candidate (e.g. levels that drop every block): ``FAIL``.

:attr:`SearchStats.proposals` counts every suggestion, ``infeasible``,
``duplicates`` and ``invalid`` the resampled ones, ``wasted_share`` their share.
The evolutionary sampler never proposes a seen candidate (EvoPress's loop may: ``repeats``).

Interruption (generation samplers): the sampler state is saved right after a
generation is asked (it then holds the generation's candidates) and again after
it is told. A driver that starts on a state saved mid-generation -- the process
was killed, or ``run`` raised -- replays that generation: a candidate whose
trial already finished is reused through the recorder's ``finished_trial``
(its stored stage objectives take part in promotion; it is not evaluated or
told again), the others are claimed again and get new trials. With
bit-reproducible evaluation the study ends exactly as an uninterrupted run
(``bench/crash_resume.py``). A worker that finds the saved generation held by
live workers draws a generation of its own.

Stop conditions (any that is given; none: a sampler that stops by itself runs to its stop):
``n_trials`` (trials run by this call), ``n_generations`` (generation samplers), ``max_tokens``
(forward tokens: every stage's evaluation and fine-tuning tokens, close calls, re-scored parents),
``timeout`` (seconds). A generation always completes, so a generation sampler may run past
``n_trials``/``timeout`` by up to one generation; with ``max_tokens`` a new generation starts only
if the previous generation's token cost still fits (the first generation of a call always runs).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np

from .. import _stop
from .._logging import get_logger
from .._optuna_private import study_storage, trial_id
from ..space import Candidate, SearchSpace
from ..storage.internal import (
    CREATOR_ATTR,
    FAIL_REASON_ATTR,
    GROUP_ATTR,
    REPAIRED_ATTR,
    SOURCE_ATTR,
)
from ._evidence import fresh_draw, rescore, settle_entry
from ._generation import GenerationSampler
from ._objectives import objective_source
from ._recorder import OptunaRecorder, Recorder
from ._surrogate import gene_prior
from ._trials import (SamplerExhausted, SearchStats, _free_device_memory, _state, direction_name, discard, fixed_trial, is_taken,
                      is_out_of_memory, is_resampled, mark_resampled, own_stop, tell_duplicate, tell_infeasible,
                      trial_candidate)

__all__ = ["BUDGET_MODES", "SamplerExhausted", "SearchStats", "Searcher", "fixed_trial", "is_resampled",
           "trial_candidate"]

_log = get_logger("search")
BUDGET_MODES = ("constrain", "repair")
#: resampled suggestions allowed per Optuna-sampler trial before the run stops as "exhausted"
DEFAULT_MAX_RESAMPLES = 100


@dataclasses.dataclass
class _Entry:
    trial: Any
    candidate: Candidate
    space: SearchSpace
    stages: list[Any] = dataclasses.field(default_factory=list)
    done: bool = False
    final: float | None = None
    #: stage -> objective of an earlier finished trial of this candidate (replayed generation): its
    #: results are reused, not evaluated or told again.
    stored: dict[str, float] | None = None
    lost: bool = False  # another process finished its trial: results are discarded (_discard)


class Searcher:
    """Drive a search on an Optuna study and record every stage result.

    Args:
        runtime: a :class:`~evoprune.search.Runtime` (from :func:`build_runtime`,
            or built by hand) giving ``model`` (dense), ``space``, ``pipeline``,
            ``context`` and ``objectives``.
        study: the :class:`optuna.Study`; its directions must match
            :attr:`directions` (``optuna.create_study(directions=runtime.directions)``).
        sampler: an :class:`EvolutionarySampler` / :class:`BudgetSweep`, an Optuna
            ``BaseSampler`` (installed as ``study.sampler``), or ``None`` (the
            study's own sampler).
        recorder: a :class:`Recorder` (default :class:`OptunaRecorder` on ``study``).
        budget_mode: ``"constrain"`` or ``"repair"`` for Optuna samplers (see
            the module docstring); default ``"constrain"`` for TPE and NSGA-II,
            else ``"repair"``.
        max_resamples: Optuna samplers: how often one trial's suggestion may be resampled (over
            budget, already seen) before the run stops with ``stopped_by="exhausted"``.
        progress: show a tqdm bar with the best value so far.

    Example (see ``studies/reference_small.py`` for a full script)::

        runtime = build_runtime(StudyConfig.from_yaml("studies/reference_small.yaml"))
        study = optuna.create_study(directions=runtime.directions)
        searcher = Searcher(runtime, study, sampler=EvolutionarySampler(offspring=16, seed=0))
        stats = searcher.run(n_generations=20)
        best = runtime.space.candidate_from_params(study.best_trial.params)
    """

    def __init__(
        self,
        runtime: Any,
        study: Any,
        sampler: Any = None,
        recorder: Any = None,
        *,
        budget_mode: str | None = None,
        progress: bool = True,
        max_resamples: int = DEFAULT_MAX_RESAMPLES,
    ) -> None:
        import optuna

        for attr in ("model", "space", "pipeline", "context", "objectives"):
            if not hasattr(runtime, attr):
                raise TypeError(f"Searcher: runtime has no {attr!r}; build it with evoprune.search.build_runtime(config).")
        self.runtime = runtime
        self.study = study
        self.space: SearchSpace = runtime.space
        self.pipeline = runtime.pipeline
        self.context = runtime.context
        self.model = runtime.model
        self.objectives = list(runtime.objectives)
        if not self.objectives:
            raise ValueError("Searcher: runtime.objectives is empty; use e.g. ['kl'] or ['kl', 'params'].")
        self._sources = [objective_source(n, self.pipeline, self.space) for n in self.objectives]
        self.directions = [src.direction for src in self._sources]
        study_dirs = [direction_name(d) for d in study.directions]
        if study_dirs != self.directions:
            raise ValueError(
                f"Searcher: the study's directions {study_dirs} do not match the objectives {self.objectives} "
                f"({self.directions}); create it with optuna.create_study(directions={self.directions})."
            )
        self.generational = isinstance(sampler, GenerationSampler)
        if sampler is not None and not self.generational:
            if not isinstance(sampler, optuna.samplers.BaseSampler):
                raise TypeError(
                    "Searcher: sampler must be a GenerationSampler (EvolutionarySampler, BudgetSweep), "
                    f"an optuna.samplers.BaseSampler, or None; got {type(sampler).__name__}."
                )
            study.sampler = sampler
        self.sampler = sampler
        if self.generational:
            sampler.setup(self.space)
            importance = getattr(getattr(runtime, "pruner", None), "importance", None)
            if importance is not None and hasattr(sampler, "set_prior"):
                sampler.set_prior(gene_prior(self.space, importance))
        if budget_mode is None:
            constrained = (optuna.samplers.TPESampler, optuna.samplers.NSGAIISampler, optuna.samplers.NSGAIIISampler)
            budget_mode = "constrain" if isinstance(study.sampler, constrained) else "repair"
        if budget_mode not in BUDGET_MODES:
            raise ValueError(f"Searcher: budget_mode must be one of {BUDGET_MODES}, got {budget_mode!r}.")
        self.budget_mode = budget_mode
        if isinstance(max_resamples, bool) or not isinstance(max_resamples, int) or max_resamples < 0:
            raise ValueError(f"Searcher: max_resamples must be an int >= 0, got {max_resamples!r}.")
        self.max_resamples = max_resamples
        if recorder is not None and not isinstance(recorder, Recorder):
            raise TypeError(f"Searcher: recorder {type(recorder).__name__} does not implement the Recorder protocol "
                            "(evoprune.search.Recorder); use OptunaRecorder(study) or a study's .recorder.")
        self.recorder: Recorder = recorder if recorder is not None else OptunaRecorder(study)
        self.progress = progress
        self._distributions = self.space.optuna_distributions()
        self._prepared = False
        self._loaded_state = False
        self._worst: list[float | None] = [None] * len(self.objectives)
        self._last_generation_tokens = 0
        self.stats = SearchStats()

    # ------------------------------------------------------------------ public

    @property
    def single_objective(self) -> bool:
        return len(self.objectives) == 1

    def prepare(self) -> None:
        """Compute the dense references (the model must be dense) and load saved sampler state."""
        if not self._prepared:
            pruner = getattr(self.context, "pruner", None)
            if pruner is not None and getattr(pruner, "is_applied", False):
                pruner.revert()
            self.pipeline.prepare(self.model, self.context)
            self._prepared = True
        if self.generational and not self._loaded_state:
            saved = self.recorder.load_sampler_state()
            if saved is not None:
                generation, state = saved
                self.sampler.load_state_dict(state)
                _log.info("resumed sampler state", extra={"fields": {"generation": generation}})
            self._loaded_state = True

    def run(
        self,
        n_trials: int | None = None,
        n_generations: int | None = None,
        max_tokens: int | None = None,
        timeout: float | None = None,
    ) -> SearchStats:
        """Search until a stop condition holds; returns what this call did (:class:`SearchStats`).

        At least one of ``n_trials``, ``n_generations`` (generation samplers only), ``max_tokens`` or
        ``timeout`` must be given, unless the sampler stops by itself (then a safety cap: :func:`own_stop`).
        """
        if n_trials is None and n_generations is None and max_tokens is None and timeout is None:
            n_generations = own_stop(self.sampler if self.generational else None)
        if n_generations is not None and not self.generational:
            raise ValueError(
                "Searcher.run: n_generations needs a generation sampler (EvolutionarySampler or BudgetSweep); "
                "use n_trials with Optuna samplers."
            )
        for name, v in (("n_trials", n_trials), ("n_generations", n_generations), ("max_tokens", max_tokens)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"Searcher.run: {name} must be a non-negative int, got {v!r}.")
        if timeout is not None and timeout < 0:
            raise ValueError(f"Searcher.run: timeout must be >= 0 seconds, got {timeout!r}.")
        self.prepare()
        stats = SearchStats()
        self.stats = stats
        self._last_generation_tokens = 0
        start = time.monotonic()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_trials, desc="search", unit="trial", dynamic_ncols=True)
        self._bar = bar
        with _stop.cooperative():  # SIGTERM/SIGINT via the CLI stop at the next _stop.check()
            try:
                while True:
                    _stop.check()
                    reason = self._stop_reason(stats, start, n_trials, n_generations, max_tokens, timeout)
                    if reason is not None:
                        stats.stopped_by = reason
                        break
                    if self.generational:
                        if max_tokens is not None and stats.tokens + self._last_generation_tokens > max_tokens:
                            stats.stopped_by = "max_tokens"
                            break
                        before = stats.tokens
                        if not self._generation_step(stats):
                            stats.stopped_by = "converged" if getattr(self.sampler, "converged", False) \
                                else "exhausted"
                            break
                        self._last_generation_tokens = stats.tokens - before
                    else:
                        deadline = None if timeout is None else start + timeout
                        stopped = self._trial_step(stats, deadline)
                        if stopped is not None:
                            stats.stopped_by = stopped
                            break
                    stats.seconds = time.monotonic() - start
            finally:
                stats.seconds = time.monotonic() - start
                if bar is not None:
                    bar.close()
                self._bar = None
        _log.info("search stopped", extra={"fields": {**{k: v for k, v in stats.to_dict().items()
                                                              if k != "stage_evaluations"}}})
        return stats

    # ------------------------------------------------------------------ loop pieces

    def _stop_reason(self, stats, start, n_trials, n_generations, max_tokens, timeout) -> str | None:
        if n_trials is not None and stats.trials >= n_trials:
            return "n_trials"
        if n_generations is not None and stats.generations >= n_generations:
            return "n_generations"
        if max_tokens is not None and stats.tokens >= max_tokens:
            return "max_tokens"
        if timeout is not None and time.monotonic() - start >= timeout:
            return "timeout"
        return None

    def _new_trial(self, candidate: Candidate, source: str, group: str | None) -> Any:
        params = self.space.params_of(candidate)
        attrs = {SOURCE_ATTR: source}
        if group is not None:
            attrs[GROUP_ATTR] = group
        return fixed_trial(self.study, params, self._distributions, user_attrs=attrs,
                           system_attrs=self._creator_attrs())

    def _generation_step(self, stats: SearchStats) -> bool:
        sampler = self.sampler
        if getattr(sampler, "fresh_windows", False):  # EvoPress: new windows every generation (seeded)
            self.context = fresh_draw(self.context, int(sampler.generation))
        pending = bool(sampler.pending)
        entries = self._replay(sampler, stats) if pending else []
        if pending and not entries:
            # Every candidate of the saved generation is another worker's: draw a generation of our own.
            sampler.discard_pending()
        if not entries:
            proposals = sampler.ask_generation(self.recorder.claim)
            if not proposals:
                return False
            # Durable before the first trial exists: a process killed from here on replays exactly
            # this generation (same candidates, same promotion) instead of drawing a new one.
            self.recorder.save_sampler_state(sampler.generation, sampler.state_dict())
            entries = [self._start(p, stats) for p in proposals]
        incumbent = getattr(sampler, "incumbent", None)
        before = stats.tokens
        first_only, self._settled = bool(getattr(sampler, "first_stage_only", False)), {}
        results = self._evaluate(entries, stats, batch=True, min_final=sampler.min_finalists, reference=incumbent,
                                 first_only=first_only)
        parents = rescore(self, stats) if getattr(sampler, "rescore_parents", False) and not first_only else []
        if hasattr(sampler, "observe_generation"):
            first = self.pipeline.stages[0].name  # a reused trial (replayed generation) counts as scored too
            settled = {k: v["verdict"] for k, v in self._settled.items()}
            sampler.observe_generation(
                [(e.candidate, e.stages[0].objective) if e.stages else (e.candidate, e.stored.get(first))
                 for e in entries if e.stages or e.stored],
                close=None if incumbent is None or not results else any(
                    bool(r.close) and settled.get(r.candidate.key) != "lost" for r in results),
                tokens=stats.tokens - before, parents=parents, settled=settled,
            )
        told = [(e.candidate, e.final) for e in entries if not e.lost]
        if entries and not told:  # every trial was finished by another process (this one stalled): draw again
            sampler.discard_pending()
            self.recorder.save_sampler_state(sampler.generation, sampler.state_dict())
            return True
        sampler.tell_generation(told)
        stats.generations += 1
        self.recorder.save_sampler_state(sampler.generation, sampler.state_dict())
        return True

    def _start(self, p: Any, stats: SearchStats) -> _Entry:
        """A new trial for proposal ``p`` (its candidate is claimed); a repeat is scored without a trial."""
        space = p.space if p.space is not None else self.space
        if p.source == "repeat":  # (EvoPress's loop)
            return _Entry(trial=None, candidate=p.candidate, space=space)
        entry = _Entry(trial=self._new_trial(p.candidate, p.source, p.group), candidate=p.candidate,
                       space=space)
        stats.trials += 1
        try:  # a stall past the grace period right after the trial was created: another process failed it
            for key, value in space.constraints(p.candidate).items():
                entry.trial.set_constraint(key, value)
            self.recorder.record_candidate(trial_id(entry.trial), p.candidate, source=p.source)
        except Exception as exc:
            discard(entry, exc, stats)
            self.recorder.release(p.candidate.key)
        return entry

    def _replay(self, sampler: Any, stats: SearchStats) -> list[_Entry]:
        """Entries of the generation that was asked but not told (saved state of a process that
        stopped mid-generation): a candidate whose trial already finished is reused (its stored
        stage results take part in promotion; it is not evaluated or told again), the others are
        claimed again and get new trials. Candidates another worker holds are left out."""
        proposals = sampler.ask_generation(self.recorder.claim)  # the pending ones, not claimed again
        entries, skipped, reused = [], 0, 0
        for p in proposals:
            done = self.recorder.finished_trial(p.candidate.key)
            if done is not None and p.source != "repeat":
                space = p.space if p.space is not None else self.space
                entries.append(_Entry(trial=None, candidate=p.candidate, space=space,
                                      stored={k: float(v) for k, v in done["stages"].items()}))
                reused += 1
            elif p.source == "repeat" or self.recorder.claim(p.candidate.key):  # a repeat: scored, no trial
                entries.append(self._start(p, stats))
            else:
                skipped += 1
        log = _log.warning if skipped else _log.info
        log("replaying an interrupted generation",
            extra={"fields": {"generation": sampler.generation, "candidates": len(proposals),
                              "reused": reused, "not_claimable": skipped}})
        stats.replayed += reused
        return entries

    def _trial_step(self, stats: SearchStats, deadline: float | None = None) -> str | None:
        """One trial of an Optuna sampler: ask until a suggestion is a new candidate within the budget
        (the others are resampled: told at once, not evaluated, not trials), claim and evaluate it.
        Returns ``None``, or why the run stops: ``"exhausted"`` (``max_resamples`` resampled in a
        row), ``"timeout"`` (``deadline``, a ``time.monotonic()`` value, passed while resampling)."""
        constrain = self.budget_mode == "constrain"
        for attempt in range(self.max_resamples + 1):
            if attempt:
                _stop.check()
                if deadline is not None and time.monotonic() >= deadline:
                    return "timeout"
            try:
                trial = self.study.ask()
            except SamplerExhausted:  # before_trial: the trial row exists, RUNNING (the reaper fails it)
                return "exhausted"
            try:
                outcome = self._propose(trial, stats, constrain)
            except Exception as exc:  # this process stalled past the grace period: another one failed the trial
                if not is_taken(exc):
                    raise
                stats.discarded += 1
                _log.warning("trial %d was finished by another process (this worker stalled past the grace period, "
                             "or the study was deleted); it is dropped: %s", trial.number, str(exc)[:300])
                continue
            if outcome == "exhausted":
                return outcome
            if outcome is not None:
                self._evaluate([outcome], stats, batch=False, min_final=0)
                return None
        _log.warning("the sampler proposed only seen or over-budget candidates %d times in a row; search stopped",
                     self.max_resamples + 1,
                     extra={"fields": {"proposals": stats.proposals, "over_budget": stats.infeasible,
                                       "duplicates": stats.duplicates, "invalid": stats.invalid}})
        return "exhausted"

    def _propose(self, trial: Any, stats: SearchStats, constrain: bool) -> _Entry | str | None:
        """The asked ``trial``'s candidate, claimed and recorded (an entry to evaluate), ``None`` when the
        suggestion was resampled (told at once), or ``"exhausted"``."""
        for key, value in self._creator_attrs().items():  # at once: the reaper must know whose trial it is
            study_storage(self.study).set_trial_system_attr(trial_id(trial), key, value)
        stats.proposals += 1
        try:
            candidate = self.space.suggest(trial, set_constraints=constrain)
        except SamplerExhausted:
            stats.proposals -= 1
            mark_resampled(self.study, trial, "invalid")
            self.study.tell(trial, state=_state("FAIL"))
            return "exhausted"
        except ValueError as exc:  # e.g. levels that drop every block
            _log.debug("suggested params give no candidate (%s); resampled", exc)
            mark_resampled(self.study, trial, "invalid")
            self.study.tell(trial, state=_state("FAIL"))
            stats.invalid += 1
            return None
        source = trial.user_attrs.get(SOURCE_ATTR, "sampler")
        if self.space.budget and not self.space.satisfies_budget(candidate):
            if constrain:
                tell_infeasible(self, trial, candidate, stats)
                return None
            candidate = self.space.repair(candidate, np.random.default_rng([self._seed(), trial.number]))
            trial.set_user_attr(REPAIRED_ATTR, True)
        if not self.recorder.claim(candidate.key):
            tell_duplicate(self, trial, candidate, stats)
            return None
        stats.trials += 1
        try:
            self.recorder.record_candidate(trial_id(trial), candidate, source=source)
        except Exception:
            self.recorder.release(candidate.key)
            raise
        return _Entry(trial=trial, candidate=candidate, space=self.space)

    def _creator_attrs(self) -> dict[str, Any]:
        """System attributes that name this process as the creator of a new trial (the SQL
        recorder's ``owner``), so a reaper never takes a trial created but not yet recorded
        for an orphan."""
        owner = getattr(self.recorder, "owner", None)
        return {CREATOR_ATTR: owner} if isinstance(owner, str) and owner else {}

    def _seed(self) -> int:
        return int(getattr(self.context, "seed", 0) or 0)

    # ------------------------------------------------------------------ evaluation

    def _evaluate(self, entries: list[_Entry], stats: SearchStats, *, batch: bool, min_final: int,
                  reference: Candidate | None = None, first_only: bool = False) -> list[Any]:
        """Stage the entries through the pipeline's one promotion loop; record and tell as results come.
        ``reference``: the incumbent a racing promotion compares with (its scoring tokens count; close calls
        with it settled where the sampler asks). ``first_only``: the first stage only (``PRUNED`` there)."""
        pipeline = self.pipeline if not first_only else type(self.pipeline)(self.pipeline.stages[:1])
        stages = pipeline.stages
        factor = int(getattr(self.sampler, "settle", 0) or 0) if batch and not first_only else 0

        def scored(i: int, si: int, sr: Any) -> None:
            e = entries[i]
            e.stages.append(sr)
            stats.stage_evaluations[sr.stage] = stats.stage_evaluations.get(sr.stage, 0) + 1
            stats.tokens += sum(int(rec.tokens or 0) for rec in sr.records)
            try:
                if not e.lost and e.trial is not None:  # a repeat (EvoPress's loop) is scored again, not recorded
                    for rec in sr.records:
                        self.recorder.record_stage(trial_id(e.trial), rec.stage, rec.evaluator, rec.tokens,
                                                   rec.value, rec.seconds, rec.details)
                    if self.single_objective and not math.isnan(sr.objective):
                        e.trial.report(sr.objective, si)
            except Exception as exc:
                discard(e, exc, stats)
            _stop.check()  # a safe point: this stage's rows are written

        def decided(i: int, si: int, value: float, promoted: bool | None) -> None:
            e = entries[i]
            last = si == len(stages) - 1
            if e.stored is not None or e.trial is None:  # reused (already told) or a repeat (no trial)
                if last:
                    e.final = value
                if not promoted:
                    e.done = True
                return
            promoted = False if first_only else promoted
            try:
                if e.lost:
                    e.done = e.done or last or not promoted
                else:
                    if last and factor and reference is not None and e.candidate.key != reference.key and value == value:
                        settle_entry(self, pipeline, e, reference, factor, stats)
                    self.recorder.record_stage_result(trial_id(e.trial), stages[si].name, si, value, promoted)
                    if math.isnan(value):
                        self._finish(e, "FAIL", stats)
                    elif first_only:
                        e.final = value
                        self._finish(e, "PRUNED", stats)
                    elif last:
                        e.final = value
                        self._finish(e, "COMPLETE", stats)
                    elif not promoted:
                        self._finish(e, "PRUNED", stats)
            except Exception as exc:
                discard(e, exc, stats)
            _stop.check()

        def reference_tokens(tokens: int) -> None:
            stats.tokens += int(tokens)
            stats.reference_tokens += int(tokens)

        try:
            return pipeline.run_batch(
                [e.candidate for e in entries], self.model, self.context,
                history=None if batch else self.recorder.stage_history,
                known=[e.stored for e in entries], min_promoted=min_final if batch else 0,
                on_scored=scored, on_decided=decided, reference=reference, on_reference=reference_tokens,
            )
        except BaseException as exc:
            oom = is_out_of_memory(exc)
            for e in entries:
                if not e.done and e.trial is not None:
                    self.recorder.release(e.candidate.key)
                    try:  # why it failed: out of memory, a signal, or the error itself
                        why = "out of memory while evaluating" if oom else (
                            f"interrupted ({exc})" if isinstance(exc, KeyboardInterrupt) else str(exc)[:200])
                        study_storage(self.study).set_trial_system_attr(trial_id(e.trial), FAIL_REASON_ATTR,
                                                                        why or type(exc).__name__)
                        self.study.tell(e.trial, state=_state("FAIL"))
                    except Exception as tell_exc:  # the evaluation's own error is re-raised below
                        _log.warning("could not fail trial %s after an error: %s", e.trial.number, tell_exc)
                    e.done = True
                    stats.failed += 1
            if not oom:
                raise
            # A candidate too large for this device fails (its claim released: retried up to the attempt
            # limit, perhaps by a worker with more memory); the search goes on.
            _free_device_memory()
            _log.warning("out of memory while evaluating; the trials failed and the search goes on",
                         extra={"fields": {"trials": [e.trial.number for e in entries if e.trial is not None],
                                           "error": str(exc).splitlines()[0][:200] if str(exc) else ""}})
            return []

    def _values(self, entry: _Entry) -> list[float]:
        final = entry.stages[-1]
        out = []
        for src in self._sources:
            if src.kind == "evaluator":
                out.append(final.value(src.evaluator.name))
            else:
                out.append(self.space.ratio(entry.candidate, src.metric))
        return out

    def _finish(self, entry: _Entry, state: str, stats: SearchStats) -> None:
        trial = entry.trial
        if state == "COMPLETE":
            values = self._values(entry)
            self.study.tell(trial, values if len(values) > 1 else values[0])
            stats.complete += 1
            for i, (v, d) in enumerate(zip(values, self.directions)):
                if self._sources[i].kind == "evaluator" and math.isfinite(v):
                    w = self._worst[i]
                    self._worst[i] = v if w is None else (max(w, v) if d == "minimize" else min(w, v))
            self._tick(values[0] if len(values) == 1 else None)
        elif state == "PRUNED":
            self.study.tell(trial, state=_state("PRUNED"))
            stats.pruned += 1
            self._tick(None)
        else:
            self.recorder.release(entry.candidate.key)
            self.study.tell(trial, state=_state("FAIL"))
            stats.failed += 1
            self._tick(None)
        stats.evaluated += 1
        entry.done = True

    def _tick(self, value: float | None) -> None:
        bar = getattr(self, "_bar", None)
        if bar is None:
            return
        bar.update(1)
        if self.single_objective:
            try:
                best = self.study.best_value
            except ValueError:
                return
            bar.set_postfix({f"best {self.objectives[0]}": f"{best:.5g}"}, refresh=False)
        else:
            bar.set_postfix({"front": len(self.study.best_trials)}, refresh=False)
