"""Staged evaluation: cheap scores for everyone, expensive ones for the promoted few.

A :class:`Pipeline` is a list of :class:`Stage` objects. Each stage scores its
candidates with its evaluators on its own deterministic token set (optionally
after a brief fine-tune) and a promotion rule decides who reaches the next
stage. Rules are decidable from a history of values (``rule.promotes(value,
history)``), so asynchronous workers that share a study database promote
consistently without a batch barrier.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from .._logging import get_logger
from ._base import EvalContext, as_result
from ._distill import check_distill
from ._finetune import FineTuned

__all__ = [
    "CandidateResult",
    "EvalRecord",
    "Pipeline",
    "PromotionRule",
    "Race",
    "Stage",
    "StageResult",
    "TopFraction",
    "TopK",
]

_log = get_logger("evaluators.pipeline")


def _key(value: float, direction: str) -> float:
    """Smaller is better; NaN is worst."""
    if value is None or math.isnan(value):
        return math.inf
    return value if direction == "minimize" else -value


def _check_direction(direction: str) -> None:
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction must be 'minimize' or 'maximize', got {direction!r}.")


@runtime_checkable
class PromotionRule(Protocol):
    """Decides from stage values who goes on to the next stage."""

    def limit(self, total: int) -> int:
        """How many of ``total`` candidates seen at a stage may be promoted."""
        ...

    def promotes(self, value: float, history: Sequence[float], *, direction: str = "minimize") -> bool: ...

    def select(
        self, values: Sequence[float], *, direction: str = "minimize", history: Sequence[float] = ()
    ) -> list[bool]: ...


class _RankRule:
    def limit(self, total: int) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def promotes(self, value: float, history: Sequence[float], *, direction: str = "minimize") -> bool:
        """Is ``value`` within the rule's limit among ``history`` (other candidates
        seen at this stage so far) plus itself? Ties go to the newcomer.

        >>> TopFraction(0.25).promotes(0.1, [0.3, 0.2, 0.5])     # best of 4, limit 1
        True
        >>> TopFraction(0.25).promotes(0.4, [0.3, 0.2, 0.5])
        False
        """
        _check_direction(direction)
        k = _key(value, direction)
        better = sum(1 for h in history if _key(h, direction) < k)
        return better < self.limit(len(history) + 1)

    def select(
        self, values: Sequence[float], *, direction: str = "minimize", history: Sequence[float] = ()
    ) -> list[bool]:
        """Promotion of each of a batch of ``values``, ranked together with ``history``.

        Within the batch, ties are broken by position, so with no history
        ``TopK(k)`` promotes exactly ``min(k, len(values))``.

        >>> TopK(2).select([0.3, 0.1, 0.2, 0.1])
        [False, True, False, True]
        >>> TopK(2).select([0.3, 0.1], history=[0.05, 0.5])
        [False, True]
        """
        _check_direction(direction)
        keys = [_key(v, direction) for v in values]
        hist = [_key(h, direction) for h in history]
        limit = self.limit(len(hist) + len(keys))
        out = []
        for i, k in enumerate(keys):
            better = sum(1 for h in hist if h < k)
            better += sum(1 for j, kj in enumerate(keys) if kj < k or (kj == k and j < i))
            out.append(better < limit)
        return out


@dataclasses.dataclass(frozen=True)
class TopK(_RankRule):
    """Promote the ``k`` best candidates (of the batch, or of all seen with a history)."""

    k: int

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"TopK.k must be a positive int, got {self.k!r}.")

    def limit(self, total: int) -> int:
        return self.k


@dataclasses.dataclass(frozen=True)
class TopFraction(_RankRule):
    """Promote the best ``fraction`` of all candidates seen at the stage (at least ``min_count``).

    The limit is ``max(min_count, ceil(fraction * total))``.
    """

    fraction: float
    min_count: int = 1

    def __post_init__(self) -> None:
        if not (0.0 < float(self.fraction) <= 1.0):
            raise ValueError(f"TopFraction.fraction must be in (0, 1], got {self.fraction!r}.")
        if self.min_count < 0:
            raise ValueError(f"TopFraction.min_count must be >= 0, got {self.min_count!r}.")

    def limit(self, total: int) -> int:
        return max(self.min_count, math.ceil(self.fraction * total - 1e-9))


def t_critical(z: float, windows: int) -> float:
    """``z`` (a normal quantile, in standard errors) widened to Student's t with ``windows - 1`` degrees
    of freedom (Cornish-Fisher expansion; ``inf`` below 3 windows, where a standard error of the
    per-window differences says nothing): what a paired test on few windows must exceed.

    >>> round(t_critical(2.0, 8), 2), round(t_critical(2.0, 64), 2), t_critical(2.0, 2)
    (2.42, 2.04, inf)
    """
    df = windows - 1
    if df < 2:
        return math.inf
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_gap(values: Any, reference: Any, *, direction: str = "minimize") -> tuple[float, float]:
    """``(mean, standard error)`` of the per-window differences ``values - reference`` on the windows
    both were scored on (the shorter prefix), signed so that a positive mean is *worse* than the
    reference. One window gives a standard error of ``inf``.

    >>> import torch
    >>> paired_gap(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 1.5, 2.5]))
    (0.5, 0.0)
    """
    _check_direction(direction)
    n = min(len(values), len(reference))
    d = (values[:n].double() - reference[:n].double()) * (1.0 if direction == "minimize" else -1.0)
    mean = float(d.mean()) if n else math.nan
    se = float(d.std() / math.sqrt(n)) if n > 1 else math.inf
    return mean, se


@dataclasses.dataclass(frozen=True)
class Race:
    """Promote every candidate that is not *clearly worse* than the reference: racing, as in
    successive halving with a statistical test instead of a fixed quota.

    The reference is the leader: the driver's incumbent (an evolutionary search's parent: its
    per-window scores on the stage's windows are known from the window cache, see :class:`Stage`
    ``extends``) or the best of the batch where that is ahead of it (or there is no incumbent).
    A candidate is clearly worse when the mean of its
    per-window differences to the reference (paired: the same windows) exceeds ``z`` standard
    errors, widened to Student's t for the number of windows (:func:`t_critical`; with fewer than
    3 windows nobody is clearly worse and the rule ranks by value). Of those not clearly worse at
    most ``max_count`` go on (best first; ``None``: all),
    and at least ``min_count`` (best first) do. Without per-window scores (an evaluator other
    than :class:`~evoprune.evaluators.KLToDense`, or values replayed from storage) it ranks like
    ``TopK(max_count)`` (every candidate with ``max_count=None``).

    Candidates clearly worse after the cheap stage stop there; close calls earn more tokens.
    Decisions are a deterministic function of the scores.

    >>> import torch
    >>> ref = torch.tensor([1.0, 1.1, 0.9, 1.0])
    >>> Race(z=2.0).select_paired([1.0, 2.0], [ref + 0.01 * torch.tensor([1, -1, 1, -1.]), ref + 1.0], ref)
    [True, False]
    """

    z: float = 2.0
    max_count: int | None = None
    min_count: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.z, (int, float)) or isinstance(self.z, bool) or not self.z >= 0:
            raise ValueError(f"Race.z must be a number >= 0 (standard errors), got {self.z!r}.")
        if self.max_count is not None and (isinstance(self.max_count, bool) or not isinstance(self.max_count, int)
                                           or self.max_count < 1):
            raise ValueError(f"Race.max_count must be a positive int or None, got {self.max_count!r}.")
        if isinstance(self.min_count, bool) or not isinstance(self.min_count, int) or self.min_count < 0:
            raise ValueError(f"Race.min_count must be an int >= 0, got {self.min_count!r}.")

    def limit(self, total: int) -> int:
        return total if self.max_count is None else min(total, self.max_count)

    def promotes(self, value: float, history: Sequence[float], *, direction: str = "minimize") -> bool:
        return TopK(self.limit(len(history) + 1)).promotes(value, history, direction=direction)

    def select(
        self, values: Sequence[float], *, direction: str = "minimize", history: Sequence[float] = ()
    ) -> list[bool]:
        return TopK(max(1, self.limit(len(history) + len(values)))).select(values, direction=direction,
                                                                          history=history)

    def select_paired(
        self, values: Sequence[float], windows: Sequence[Any], reference: Any, *, direction: str = "minimize"
    ) -> list[bool]:
        """Promotion of each candidate from its per-window scores ``windows[i]`` (``None``: unknown,
        judged by value against the reference's mean) against the reference's per-window scores."""
        ref_mean = float(reference.double().mean())
        worse = []
        for v, w in zip(values, windows):
            if w is None:
                gap, se, crit = (v - ref_mean) * (1.0 if direction == "minimize" else -1.0), 0.0, self.z
            else:
                gap, se = paired_gap(w, reference, direction=direction)
                crit = t_critical(self.z, min(len(w), len(reference)))
            worse.append(math.isnan(v) or (gap > 0 and gap - crit * se > 0))
        order = sorted(range(len(values)), key=lambda k: (_key(values[k], direction), k))
        out = [False] * len(values)
        taken = 0
        for k in order:
            if math.isnan(values[k]):
                continue
            if taken < self.min_count or (not worse[k] and (self.max_count is None or taken < self.max_count)):
                out[k] = True
                taken += 1
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
    """One evaluation stage.

    Args:
        name: unique within the pipeline; also selects the stage's token sets.
        evaluators: scored in order; their ``name``s must be distinct.
        eval_tokens: evaluation tokens (the stage's token set; 0 for stages
            without token-based evaluators, e.g. cost or latency only).
        seq_len: tokens per sequence of the stage's token sets.
        finetune_tokens: if > 0, fine-tune the candidate on this many training
            tokens before the evaluators run (undone afterwards).
        finetune: options for :func:`evoprune.evaluators.finetune` (``lr``,
            ``train``, ``layers``, ``batch_size``, ...).
        promote: :class:`TopK` / :class:`TopFraction` deciding who reaches the
            next stage (``None``: everyone).
        objective: name of the evaluator whose value the promotion ranks
            (default: the first evaluator).
        extends: the name of an earlier stage (same ``seq_len``, no more tokens) whose windows
            this stage's token set starts with: both come from one stream, so a candidate
            promoted from there is scored only on the windows it has not seen (KL reuses its
            per-window scores) and a paired comparison on the shared windows is possible.
            ``None`` (default): the stage draws its own windows.
    """

    name: str
    evaluators: tuple[Any, ...]
    eval_tokens: int = 0
    seq_len: int = 512
    finetune_tokens: int = 0
    finetune: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    promote: PromotionRule | None = None
    objective: str | None = None
    extends: str | None = None

    def __post_init__(self) -> None:
        evs = tuple(self.evaluators) if isinstance(self.evaluators, (list, tuple)) else (self.evaluators,)
        object.__setattr__(self, "evaluators", evs)
        if not self.name or not isinstance(self.name, str):
            raise ValueError("Stage.name must be a non-empty string.")
        if not evs:
            raise ValueError(f"Stage {self.name!r} needs at least one evaluator.")
        names = [ev.name for ev in evs]
        if len(set(names)) != len(names):
            raise ValueError(f"Stage {self.name!r}: evaluator names must be distinct, got {names}.")
        if "finetune" in names:
            raise ValueError(f"Stage {self.name!r}: 'finetune' is reserved for the fine-tune record.")
        for ev in evs:
            _check_direction(getattr(ev, "direction", None))
        if self.eval_tokens < 0 or self.finetune_tokens < 0 or self.seq_len < 1:
            raise ValueError(f"Stage {self.name!r}: token counts must be >= 0 and seq_len >= 1.")
        if self.objective is not None and self.objective not in names:
            raise ValueError(f"Stage {self.name!r}: objective {self.objective!r} is not one of {names}.")
        if self.promote is not None and not isinstance(self.promote, PromotionRule):
            raise TypeError(f"Stage {self.name!r}: promote must be TopK(k), TopFraction(f), Race(z) or None.")
        unknown = set(self.finetune) - {
            "lr", "train", "layers", "batch_size", "seq_len", "weight_decay", "betas", "max_grad_norm", "verify",
            "loss", "temperature", "top_k",
        }
        if unknown:
            raise ValueError(f"Stage {self.name!r}: unknown finetune options {sorted(unknown)}.")
        check_distill(self.finetune.get("loss", "ce"), self.finetune.get("temperature", 1.0),
                      self.finetune.get("top_k", "auto"), where=f"Stage {self.name!r}: finetune")

    @property
    def objective_evaluator(self) -> Any:
        if self.objective is None:
            return self.evaluators[0]
        return next(ev for ev in self.evaluators if ev.name == self.objective)

    @property
    def direction(self) -> str:
        return self.objective_evaluator.direction


@dataclasses.dataclass
class EvalRecord:
    """One evaluator's result at one stage: what storage writes per candidate."""

    stage: str
    evaluator: str
    tokens: int | None
    value: float
    seconds: float
    direction: str | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class StageResult:
    """All records of one candidate at one stage, its objective and promotion."""

    stage: str
    records: list[EvalRecord]
    objective: float
    direction: str
    seconds: float
    promoted: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "objective": self.objective,
            "direction": self.direction,
            "seconds": self.seconds,
            "promoted": self.promoted,
            "records": [r.to_dict() for r in self.records],
        }

    def value(self, evaluator: str) -> float:
        for r in self.records:
            if r.evaluator == evaluator:
                return r.value
        raise KeyError(f"no result of evaluator {evaluator!r} at stage {self.stage!r}.")


@dataclasses.dataclass
class CandidateResult:
    """One candidate's results, stage by stage, up to the last stage it reached."""

    candidate: Any
    stages: list[StageResult] = dataclasses.field(default_factory=list)
    #: at the last stage, with a ``reference``: not clearly worse than it (paired), else ``None``
    close: bool | None = None

    @property
    def last_stage(self) -> str | None:
        return self.stages[-1].stage if self.stages else None

    def stage(self, name: str) -> StageResult | None:
        return next((s for s in self.stages if s.stage == name), None)

    @property
    def records(self) -> list[EvalRecord]:
        return [r for s in self.stages for r in s.records]

    def to_dict(self) -> dict[str, Any]:
        cand = self.candidate.to_dict() if hasattr(self.candidate, "to_dict") else self.candidate
        return {"candidate": cand, "stages": [s.to_dict() for s in self.stages]}


@contextlib.contextmanager
def _applied(context: EvalContext, candidate: Any) -> Iterator[None]:
    pruner = context.pruner
    if pruner is None or candidate is None:
        yield
    elif hasattr(pruner, "applied"):
        with pruner.applied(candidate):
            yield
    else:
        pruner.apply(candidate)
        try:
            yield
        finally:
            pruner.revert()


class Pipeline:
    """Runs candidates through stages with promotion.

    Example (EvoPress-like schedule)::

        pipe = Pipeline([
            Stage(name="s1", evaluators=[KLToDense()], eval_tokens=2048, seq_len=256, promote=TopK(8)),
            Stage(name="s2", evaluators=[KLToDense(top_k=256)], eval_tokens=16384, seq_len=512,
                  promote=TopK(2)),
            Stage(name="final", evaluators=[KLToDense(top_k=256), Cost(metric="params")],
                  eval_tokens=65536, seq_len=512),
        ])
        ctx = EvalContext(eval_ids=ids, train_ids=train, pruner=pruner, cost_model=cost)
        results = pipe.run_batch(candidates, model, ctx)
        [(r.last_stage, r.stages[-1].objective) for r in results]

    Without ``context.pruner`` the model is scored as it is (the candidate is
    only passed to the evaluators).
    """

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = list(stages)
        if not self.stages:
            raise ValueError("Pipeline needs at least one Stage.")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"Pipeline: stage names must be distinct, got {names}.")
        for i, st in enumerate(self.stages):
            if st.extends is None:
                continue
            base = next((b for b in self.stages[:i] if b.name == st.extends), None)
            if base is None:
                raise ValueError(f"Stage {st.name!r} extends {st.extends!r}, which is not an earlier stage; "
                                 f"name one of {names[:i]}.")
            if base.seq_len != st.seq_len or base.eval_tokens > st.eval_tokens or not base.eval_tokens:
                raise ValueError(
                    f"Stage {st.name!r} extends {base.name!r}: give it the same seq_len ({base.seq_len}) and at "
                    f"least its eval_tokens ({base.eval_tokens}); got seq_len {st.seq_len}, eval_tokens "
                    f"{st.eval_tokens}.")

    def stream(self, stage: str | int | Stage) -> str:
        """The name of the window stream of ``stage``: the first stage of its ``extends`` chain."""
        st = self.stage(stage)
        while st.extends is not None:
            st = self.stage(st.extends)
        return st.name

    def __repr__(self) -> str:
        return f"Pipeline({[s.name for s in self.stages]})"

    def stage(self, stage: str | int | Stage) -> Stage:
        if isinstance(stage, Stage):
            return stage
        if isinstance(stage, int):
            return self.stages[stage]
        for s in self.stages:
            if s.name == stage:
                return s
        raise KeyError(f"no stage {stage!r}; stages are {[s.name for s in self.stages]}.")

    def stage_context(self, stage: str | int | Stage, context: EvalContext) -> EvalContext:
        st = self.stage(stage)
        if st.eval_tokens:
            if st.extends is None:
                return context.for_stage(st.name, eval_tokens=st.eval_tokens, seq_len=st.seq_len)
            tokens = context.token_set(st.eval_tokens, st.seq_len, stage=self.stream(st))
            return dataclasses.replace(context.for_stage(st.name), tokens=tokens)
        return context.for_stage(st.name)

    def window_values(self, stage: str | int | Stage, model: torch.nn.Module, candidate: Any,
                      context: EvalContext) -> Any:
        """Per-window objective scores of ``candidate`` at ``stage`` if its objective evaluator keeps them
        (:meth:`KLToDense.window_values`) and they are known in this process, else ``None``."""
        st = self.stage(stage)
        ev = st.objective_evaluator
        if not hasattr(ev, "window_values"):
            return None
        return ev.window_values(model, candidate, self.stage_context(st, context))

    def _reference_windows(self, st: Stage, model: torch.nn.Module, reference: Any, context: EvalContext,
                           on_reference: Callable[[int], None] | None) -> Any:
        """The reference's per-window scores at ``st``: from the window cache, else scored now (the
        tokens go to ``on_reference``)."""
        w = self.window_values(st, model, reference, context)
        if w is None and hasattr(st.objective_evaluator, "window_values") and not st.finetune_tokens:
            sr = self.run_stage(st, model, reference, context)
            if on_reference is not None:
                on_reference(sum(int(r.tokens or 0) for r in sr.records))
            w = self.window_values(st, model, reference, context)
        return w

    def prepare(self, model: torch.nn.Module, context: EvalContext) -> None:
        """Let every evaluator cache its dense reference (``model`` must be dense). Idempotent."""
        done = context.shared.setdefault("prepared", set())
        for st in self.stages:
            ctx = self.stage_context(st, context)
            for ev in st.evaluators:
                key = (st.name, st.eval_tokens, st.seq_len, id(ev), context.draw)
                if key in done or not hasattr(ev, "prepare"):
                    continue
                ev.prepare(model, ctx)
                done.add(key)

    def run_stage(
        self, stage: str | int | Stage, model: torch.nn.Module, candidate: Any, context: EvalContext
    ) -> StageResult:
        """Score one candidate at one stage (applies and reverts it). No promotion decision."""
        st = self.stage(stage)
        ctx = self.stage_context(st, context)
        start = time.perf_counter()
        with _applied(context, candidate):
            if st.finetune_tokens:
                pairs = FineTuned(list(st.evaluators), tokens=st.finetune_tokens, **dict(st.finetune)).evaluate_all(
                    model, candidate, ctx
                )
            else:
                pairs = []
                for ev in st.evaluators:
                    t0 = time.perf_counter()
                    res = as_result(ev.evaluate(model, candidate, ctx))
                    if not res.seconds:
                        res.seconds = time.perf_counter() - t0
                    pairs.append((ev.name, res))
        directions = {ev.name: ev.direction for ev in st.evaluators}
        records = [
            EvalRecord(
                stage=st.name,
                evaluator=name,
                tokens=res.tokens,
                value=float(res.value),
                seconds=float(res.seconds),
                direction=directions.get(name, "minimize"),
                details=res.details,
            )
            for name, res in pairs
        ]
        obj_name = st.objective_evaluator.name
        objective = next(r.value for r in records if r.evaluator == obj_name)
        return StageResult(
            stage=st.name,
            records=records,
            objective=objective,
            direction=st.direction,
            seconds=time.perf_counter() - start,
        )

    def run_batch(
        self,
        candidates: Sequence[Any],
        model: torch.nn.Module,
        context: EvalContext,
        *,
        history: Mapping[str, Sequence[float]] | Callable[[str], Sequence[float]] | None = None,
        known: Sequence[Mapping[str, float] | None] | None = None,
        min_promoted: int = 0,
        on_scored: Callable[[int, int, StageResult], None] | None = None,
        on_decided: Callable[[int, int, float, bool | None], None] | None = None,
        reference: Any = None,
        on_reference: Callable[[int], None] | None = None,
        close_z: float = 1.0,
    ) -> list[CandidateResult]:
        """Run ``candidates`` through the stages; promoted ones go on. The one staged promotion loop
        (the search driver runs its generations and single trials through it).

        Args:
            candidates: what to score; ``model`` must be dense when this is called (it calls
                :meth:`prepare`).
            history: objective values of candidates already seen at each stage (a mapping, or a
                function ``stage name -> values`` asked once per stage, e.g. the study database);
                with it, promotion ranks the batch among all of them, otherwise within the batch.
            known: per candidate, ``None`` or ``{stage: objective}`` recorded by an earlier run (an
                interrupted generation being replayed): such a candidate is not evaluated; its known
                value takes part in the ranking and it goes on exactly when a value for the next
                stage is known.
            min_promoted: at every stage but the last, promote at least this many (best first).
            on_scored: ``(index, stage index, StageResult)`` after each evaluation (not for known).
            on_decided: ``(index, stage index, objective, promoted)`` once the stage's promotion is
                decided; ``promoted`` is ``None`` at the last stage and ``False`` for a NaN objective.
            reference: the incumbent a :class:`Race` compares with (paired, per window); it is
                scored where its per-window scores are not known yet (the tokens go to
                ``on_reference``). At the last stage each candidate's :attr:`CandidateResult.close`
                says whether it is within ``close_z`` standard errors of the reference.

        Returns one :class:`CandidateResult` per candidate, in order. A NaN objective is never
        promoted. If an evaluation raises, the exception propagates (candidates already decided
        got their ``on_decided`` call).
        """
        self.prepare(model, context)
        known = list(known) if known is not None else [None] * len(candidates)
        if len(known) != len(candidates):
            raise ValueError(f"run_batch: {len(known)} known entries for {len(candidates)} candidates.")
        results = [CandidateResult(candidate=c) for c in candidates]
        active = list(range(len(candidates)))
        names = [st.name for st in self.stages]
        for si, st in enumerate(self.stages):
            if not active:
                break
            last = si == len(self.stages) - 1
            it = active
            if context.progress and len(active) > 1:
                from tqdm.auto import tqdm

                it = tqdm(active, desc=f"stage {st.name}", leave=False)
            for i in it:
                if known[i] is not None:
                    value = float(known[i].get(st.name, math.nan))
                    results[i].stages.append(StageResult(stage=st.name, records=[], objective=value,
                                                         direction=st.direction, seconds=0.0))
                    continue
                sr = self.run_stage(st, model, candidates[i], context)
                results[i].stages.append(sr)
                if on_scored is not None:
                    on_scored(i, si, sr)
            values = [results[i].stages[-1].objective for i in active]
            race = isinstance(st.promote, Race) and not last
            ref_w = None
            if reference is not None and (race or last) and any(known[i] is None for i in active):
                ref_w = self._reference_windows(st, model, reference, context, on_reference)
            if last and ref_w is not None:
                for k, i in enumerate(active):
                    w = self.window_values(st, model, candidates[i], context)
                    if w is not None and not math.isnan(values[k]):
                        gap, se = paired_gap(w, ref_w, direction=st.direction)
                        results[i].close = gap - t_critical(close_z, min(len(w), len(ref_w))) * se <= 0
            if last:
                promoted: list[bool | None] = [None] * len(active)
            elif st.promote is None:
                promoted = [True] * len(active)
            elif race and (ref_w is not None or (history is None and len(active) > 1)):
                wins = [self.window_values(st, model, candidates[i], context) if known[i] is None else None
                        for i in active]
                # the leader: the incumbent, or the batch's best where that is ahead of it on these windows
                best = min(range(len(active)), key=lambda k: (_key(values[k], st.direction), k))
                if wins[best] is not None and (ref_w is None or _key(float(wins[best].mean()), st.direction)
                                               < _key(float(ref_w.mean()), st.direction)):
                    ref_w = wins[best]
                if ref_w is None:
                    promoted = list(st.promote.select(values, direction=st.direction))
                else:
                    promoted = list(st.promote.select_paired(values, wins, ref_w, direction=st.direction))
                if sum(promoted) < min_promoted:
                    order = sorted(range(len(values)), key=lambda k: (_key(values[k], st.direction), k))
                    for k in order[:min_promoted]:
                        promoted[k] = True
            else:
                past = history(st.name) if callable(history) else (history or {}).get(st.name, ())
                promoted = list(st.promote.select(values, direction=st.direction, history=past))
                if sum(promoted) < min_promoted:
                    order = sorted(range(len(values)), key=lambda k: (_key(values[k], st.direction), k))
                    for k in order[:min_promoted]:
                        promoted[k] = True
            for k, i in enumerate(active):
                if not last and math.isnan(values[k]):
                    promoted[k] = False
                if known[i] is not None and not last:
                    goes_on = names[si + 1] in known[i]
                    if st.promote is not None and bool(promoted[k]) != goes_on:
                        _log.warning(
                            "a replayed candidate's recorded promotion differs from the one computed now "
                            "(evaluation is not bit-reproducible here); the recorded outcome is kept",
                            extra={"fields": {"stage": st.name, "recorded": goes_on}},
                        )
                    promoted[k] = goes_on
                results[i].stages[-1].promoted = promoted[k]
                if on_decided is not None:
                    on_decided(i, si, values[k], promoted[k])
            finite = [v for v in values if not math.isnan(v)]
            best = (min(finite) if st.direction == "minimize" else max(finite)) if finite else math.nan
            _log.info(
                "stage %s: %d candidates, best %s %.6g, %d promoted",
                st.name,
                len(active),
                st.objective_evaluator.name,
                best,
                sum(bool(p) for p in promoted),
            )
            active = [i for i, p in zip(active, promoted) if p]
        return results
