"""Where a study stands: :func:`study_status` reads a running or finished study and returns a
:class:`StudyStatus` (``evoprune status``, ``EvoStudy.status()``). It only reads: no row is written.

What it reports: trials by state; for Optuna samplers (TPE, NSGA-II, ...) how many of their
suggestions were resampled without a trial (over budget, already seen) and their share; candidates entering and promoted at each stage (from the stage
outcomes) and the forward tokens each stage spent (from the stage records); the best value so far
(one objective) or the Pareto front's size (several); finished trials per second over a recent
window; every worker that has not stopped, whether it is alive and how old its heartbeat is; and,
for each stop condition of the stored config (``stop``), how far the study is and when it should
get there at the recent rate.

The stop conditions are counted over the whole study (all its trials, tokens and generations);
``evoprune search/resume --n-trials ...`` count them per run, so the ETA is that of the stored
config's run::

    >>> status = study.status()                      # doctest: +SKIP
    >>> print("\\n".join(status.lines()))            # doctest: +SKIP
    study 'demo' in sqlite:////work/out/demo.db
      trials: complete 34, pruned 96, running 16 (146 in all)
      ...
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as _dt
import math
from typing import Any

from optuna.trial import TrialState

from ..storage.internal import RESAMPLED_ATTR, RESAMPLED_REASONS, naive

__all__ = ["StageCount", "StopProgress", "StudyStatus", "WorkerStatus", "format_duration", "study_status"]

#: seconds of recent activity the evaluation rate is measured over
DEFAULT_WINDOW = 300.0
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclasses.dataclass(frozen=True)
class StageCount:
    """Candidates at one stage: how many entered (were scored), how many were promoted to the next
    stage (``None`` at the last stage) and the forward tokens the stage's evaluators spent."""

    stage: str
    entered: int
    promoted: int | None
    tokens: int


@dataclasses.dataclass(frozen=True)
class WorkerStatus:
    """A worker that has not stopped: ``alive`` (its process runs, or its heartbeat is younger than
    the grace period) and ``heartbeat_age`` (seconds since its last heartbeat, database clock)."""

    owner: str
    host: str
    pid: int
    command: str
    alive: bool
    heartbeat_age: float


@dataclasses.dataclass(frozen=True)
class StopProgress:
    """One stop condition of the stored config: its ``limit``, how much is ``done`` and the seconds
    left at the recent rate (``eta_seconds``; 0 once reached, ``None`` when no rate is known yet)."""

    condition: str
    limit: float
    done: float
    eta_seconds: float | None

    @property
    def reached(self) -> bool:
        return self.done >= self.limit


@dataclasses.dataclass(frozen=True)
class StudyStatus:
    """A study's state at one moment (see the module docs). :meth:`lines` renders it as text."""

    study: str
    url: str
    objectives: tuple[str, ...]
    directions: tuple[str, ...]
    trials: dict[str, int]
    stages: tuple[StageCount, ...]
    best_value: float | None
    best_trial: int | None
    front_size: int
    tokens: int
    generations: int | None
    evaluations_per_second: float | None
    window_seconds: float  # the span the rate was measured over (at most the requested window)
    last_finished_age: float | None
    workers: tuple[WorkerStatus, ...]
    stopped_workers: int
    stops: tuple[StopProgress, ...]
    #: an Optuna sampler's suggestions resampled without a trial, by reason (``"over_budget"``,
    #: ``"duplicate"``, ``"invalid"``); not in :attr:`trials`
    resampled: dict[str, int] = dataclasses.field(default_factory=dict)
    #: the study's sampler is an Optuna sampler (its suggestions can be resampled)
    optuna_sampler: bool = False
    #: why the most recently stopped worker stopped (e.g. ``"finished (converged)"``), ``None``: none yet
    last_stop: str | None = None

    @property
    def proposals(self) -> int:
        """Suggestions of the study's Optuna sampler: its trials plus the resampled ones."""
        return sum(self.trials.values()) + sum(self.resampled.values())

    @property
    def wasted_share(self) -> float | None:
        """Share of the suggestions that were resampled (``None`` before the first)."""
        return sum(self.resampled.values()) / self.proposals if self.proposals else None

    @property
    def finished(self) -> int:
        """Trials that are COMPLETE, PRUNED or FAIL (evaluated candidates)."""
        return sum(self.trials.get(s.name, 0) for s in _FINISHED)

    @property
    def workers_alive(self) -> int:
        return sum(w.alive for w in self.workers)

    @property
    def eta_seconds(self) -> float | None:
        """Seconds until the first stop condition is met (0: met), ``None``: no condition or no rate."""
        etas = [s.eta_seconds for s in self.stops if s.eta_seconds is not None]
        return min(etas) if etas else None

    def lines(self) -> list[str]:
        """The status as text lines (what ``evoprune status`` prints)."""
        out = [f"study {self.study!r} in {self.url}"]
        counts = ", ".join(f"{k.lower()} {v}" for k, v in sorted(self.trials.items())) or "none yet"
        out.append(f"  trials: {counts} ({sum(self.trials.values())} in all)")
        if self.optuna_sampler or any(self.resampled.values()):
            n = sum(self.resampled.values())
            share = "" if self.wasted_share is None else f" ({100 * self.wasted_share:.1f} %)"
            why = ", ".join(f"{_REASON_TEXT.get(k, k)} {v:,}" for k, v in sorted(self.resampled.items()) if v)
            out.append(f"  sampler proposals: {self.proposals:,}; resampled without a trial {n:,}{share}"
                       + (f": {why}" if why else ""))
        if self.stages:
            parts = []
            for s in self.stages:
                moved = "" if s.promoted is None else f", {s.promoted} promoted"
                parts.append(f"{s.stage} {s.entered} entered{moved} ({s.tokens:,} tokens)")
            out.append("  stages: " + "; ".join(parts))
        if len(self.objectives) == 1:
            best = ("none yet" if self.best_value is None
                    else f"{self.objectives[0]} {self.best_value:.6g} (trial {self.best_trial})")
            out.append(f"  best so far: {best}")
        else:
            plural = "" if self.front_size == 1 else "s"
            out.append(f"  Pareto front: {self.front_size} trial{plural} (objectives {', '.join(self.objectives)}; "
                       f"directions {', '.join(self.directions)})")
        gens = "" if self.generations is None else f"; {self.generations} generations done"
        out.append(f"  tokens spent: {self.tokens:,} forward tokens{gens}")
        if self.evaluations_per_second is None:
            out.append("  evaluations/s: - (no finished trial yet)")
        else:
            out.append(f"  evaluations/s: {self.evaluations_per_second:.3g} (finished trials, last "
                       f"{format_duration(self.window_seconds)} of activity); last finished "
                       f"{format_duration(self.last_finished_age or 0.0)} ago")
        dead = len(self.workers) - self.workers_alive
        out.append(f"  workers: {self.workers_alive} alive, {dead} presumed dead, {self.stopped_workers} stopped"
                   + (f"; last stop: {self.last_stop}" if self.last_stop else ""))
        for w in self.workers:
            out.append(f"    {'alive' if w.alive else 'DEAD '}  {w.owner}  {w.command or '-'}  "
                       f"heartbeat {format_duration(w.heartbeat_age)} ago")
        if not self.stops:
            out.append("  ETA: no stop condition in the stored config (the search runs until stopped)")
            return out
        for s in self.stops:
            eta = ("reached" if s.reached else "ETA unknown (no rate yet)" if s.eta_seconds is None
                   else f"ETA {format_duration(s.eta_seconds)}")
            out.append(f"  stop {s.condition}: {_number(s.done)} / {_number(s.limit)} -> {eta}")
        if self.eta_seconds is not None and not any(s.reached for s in self.stops):
            note = "" if self.workers_alive else " (no worker alive: resume the study to get there)"
            out.append(f"  ETA: {format_duration(self.eta_seconds)}{note}")
        return out


_REASON_TEXT = {"over_budget": "over budget", "duplicate": "already seen", "invalid": "no candidate"}


def format_duration(seconds: float) -> str:
    """``42`` -> ``"42 s"``, ``750`` -> ``"12 min 30 s"``, ``7500`` -> ``"2 h 05 min"``.

    >>> format_duration(42.4), format_duration(750), format_duration(7500), format_duration(200000)
    ('42 s', '12 min 30 s', '2 h 05 min', '2 d 07 h')
    """
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600:02d} h"


def _number(v: float) -> str:
    return f"{int(v):,}" if float(v).is_integer() else f"{v:,.0f}"


def _seconds(a: _dt.datetime, b: _dt.datetime) -> float:
    return (a - b).total_seconds()


def study_status(study: Any, *, window: float = DEFAULT_WINDOW, now: _dt.datetime | None = None) -> StudyStatus:
    """The :class:`StudyStatus` of an :class:`~evoprune.study.EvoStudy` (reads only).

    Args:
        study: the study (``load_study(...)``).
        window: seconds of recent activity over which finished trials per second are measured.
        now: the wall clock (naive local time, as Optuna stamps trials); default: now.
    """
    if not window > 0:
        raise ValueError(f"status window must be > 0 seconds, got {window!r}.")
    now = now or _dt.datetime.now()
    try:
        rows = study.trials(resampled=True)
    except TypeError:  # a duck-typed study whose trials() knows no resampled suggestions
        rows = study.trials()
    reasons = [getattr(t, "system_attrs", {}).get(RESAMPLED_ATTR) for t in rows]
    trials = [t for t, why in zip(rows, reasons) if why is None]
    states = collections.Counter(t.state.name for t in trials)
    resampled = collections.Counter(str(why) for why in reasons if why is not None)
    for reason in RESAMPLED_REASONS:
        resampled.setdefault(reason, 0)

    stage_names = [s.name for s in study.config.stages]
    last = stage_names[-1] if stage_names else None
    entered: collections.Counter[str] = collections.Counter()
    promoted: collections.Counter[str] = collections.Counter()
    for o in study.stage_outcomes():
        entered[o.stage] += 1
        promoted[o.stage] += bool(o.promoted)
        if o.stage not in stage_names:
            stage_names.append(o.stage)
    tokens: collections.Counter[str] = collections.Counter()
    for r in study.stage_records():
        tokens[r.stage] += int(r.tokens or 0)
    stages = tuple(StageCount(stage=n, entered=entered[n], promoted=None if n == last else promoted[n],
                              tokens=tokens[n]) for n in stage_names)

    front = study.pareto_front()
    best_value = best_trial = None
    if len(study.directions) == 1 and front:
        best_value, best_trial = front[0].values[0], front[0].number

    gens = study.db.sampler_generations()
    generations = max(gens) if gens else None

    # recent rate: trials finished in the last `window` seconds before the latest finish
    done_at = sorted(t.datetime_complete for t in trials if t.state in _FINISHED and t.datetime_complete)
    starts = [t.datetime_start for t in trials if t.datetime_start]
    rate = last_age = None
    span = 0.0
    if done_at:
        end = done_at[-1]
        since = max(end - _dt.timedelta(seconds=window), min(starts) if starts else end)
        span = _seconds(end, since)
        if span > 0:
            rate = sum(1 for d in done_at if d >= since) / span
        last_age = max(0.0, _seconds(now, end))

    liveness = dict(study.db.worker_liveness(study.grace_period))  # every worker but this process
    me = study.db.owner.name
    workers, stopped = [], 0
    last_stop: tuple[Any, str] | None = None
    for w in study.db.workers():
        if w["stopped_at"] is not None:
            stopped += 1
            if w.get("stop_reason") and (last_stop is None or naive(w["stopped_at"]) >= last_stop[0]):
                last_stop = (naive(w["stopped_at"]), str(w["stop_reason"]))
            continue
        age = max(0.0, _seconds(naive(w["db_now"]), naive(w["last_seen"])))
        workers.append(WorkerStatus(owner=w["owner"], host=w["host"], pid=int(w["pid"]), command=w["command"],
                                    alive=bool(liveness.get(w["owner"], w["owner"] == me)), heartbeat_age=age))

    finished = sum(states.get(s.name, 0) for s in _FINISHED)
    total_tokens = sum(tokens.values())
    alive = any(w.alive for w in workers)
    stops = []
    for cond, limit in study.config.stop.kwargs().items():
        eta: float | None = None
        if cond == "n_trials":
            done: float = finished
            if rate:
                eta = (limit - done) / rate
        elif cond == "n_generations":
            done = generations or 0
            if rate and done:
                eta = (limit - done) * (finished / done) / rate
        elif cond == "max_tokens":
            done = total_tokens
            if rate and finished and total_tokens:
                eta = (limit - done) / (rate * total_tokens / finished)
        else:  # timeout: wall time since the first trial started
            end = now if alive or not done_at else done_at[-1]
            done = round(_seconds(end, min(starts)), 1) if starts else 0.0
            eta = limit - done
        stops.append(StopProgress(condition=cond, limit=limit, done=done,
                                  eta_seconds=None if eta is None or not math.isfinite(eta) else max(0.0, eta)))

    return StudyStatus(
        study=study.name, url=study.url, objectives=tuple(study.config.objectives),
        directions=tuple(study.directions), trials=dict(states), stages=stages, best_value=best_value,
        best_trial=best_trial, front_size=len(front), tokens=total_tokens, generations=generations,
        evaluations_per_second=rate, window_seconds=span, last_finished_age=last_age,
        workers=tuple(workers), stopped_workers=stopped, stops=tuple(stops),
        last_stop=None if last_stop is None else last_stop[1],
        resampled=dict(resampled), optuna_sampler=study.config.sampler.name != "evolutionary",
    )
