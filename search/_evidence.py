"""Scoring beyond the stage pipeline: close calls settled by evidence, and parents scored again.

**Close calls** at the last stage are settled by evidence instead of by the last stage's windows' luck.

A finalist within the noise band of the incumbent (the paired per-window difference on the last
stage's windows is within ``z`` standard errors, widened to Student's t: :func:`t_critical`) is not
decided there. Exactly those two are scored on more windows of the same stream, doubling the
tokens each round (nested windows: a larger set starts with the smaller one, so each round pays
only for the new windows, and the comparison stays paired), until the difference is ``z``
standard errors away from zero or the cap (``factor`` times the last stage's tokens, at most the
evaluation split) is reached. The verdict is ``"won"`` (the challenger is better), ``"lost"``, or
``"tie"`` at the cap; a tie keeps the incumbent. Every forward token counts (both candidates).

The trial's told objective stays its last-stage value (every completed trial is scored on the same
token set, so the study's ranking and Pareto front compare like with like); the verdict is
recorded on the challenger's trial (``user_attrs["evoprune:close_call"]``) and decides the
evolutionary sampler's incumbent (:meth:`EvolutionarySampler.observe_generation
<evoprune.search.EvolutionarySampler.observe_generation>`).

**Parents scored again** (:func:`rescore`): EvoPress's loop (``rescore_parents``) scores its parents
with the finalists on the last stage's fresh windows every generation; their tokens count.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .._logging import get_logger
from ..storage.internal import CLOSE_CALL_ATTR

__all__ = ["CLOSE_CALL_ATTR", "check_evidence_options", "fresh_draw", "rescore", "settle", "settle_entry",
           "settled_order"]

_log = get_logger("search.evidence")


def _within(w: Any, ref: Any, z: float, direction: str) -> tuple[bool, float, float]:
    from ..evaluators import paired_gap, t_critical  # deferred: the evaluators load torch; reading a study must not

    gap, se = paired_gap(w, ref, direction=direction)
    n = min(len(w), len(ref))
    return not (abs(gap) > t_critical(z, n) * se), gap, se


def settle(pipeline: Any, model: Any, context: Any, candidate: Any, reference: Any, *, z: float = 2.0,
           factor: int = 8) -> dict[str, Any] | None:
    """Settle a close call between ``candidate`` and the incumbent ``reference`` at the last stage.

    Both must have been scored on the last stage's windows in this process (per-window scores in the
    window cache). Returns ``None`` where there is no close call (separated already, or no
    per-window scores), else ``{"incumbent", "verdict", "tokens", "eval_tokens", "gap", "se"}``:
    ``tokens`` the forward tokens spent settling (both candidates), ``eval_tokens`` the size of
    the largest token set they were compared on. The model must be dense when this is called.
    """
    last = pipeline.stages[-1]
    w = pipeline.window_values(last, model, candidate, context)
    ref = pipeline.window_values(last, model, reference, context)
    if w is None or ref is None or not last.eval_tokens:
        return None
    close, gap, se = _within(w, ref, z, last.direction)
    if not close:
        return None
    ids = getattr(context, "eval_ids", None)
    available = (ids.numel() // last.seq_len) * last.seq_len if ids is not None else last.eval_tokens
    cap = min(int(factor) * last.eval_tokens, available)
    tokens, size, verdict = 0, last.eval_tokens, "tie"
    stream = pipeline.stream(last)
    while size * 2 <= cap:
        size *= 2
        st = dataclasses.replace(last, eval_tokens=size, extends=stream, promote=None, finetune_tokens=0)
        ctx = pipeline.stage_context(st, dataclasses.replace(context, cache_dir=False))
        for ev in st.evaluators:  # the dense reference of the larger set (the model is dense here), in memory only
            if hasattr(ev, "prepare"):
                ev.prepare(model, ctx)
        for c in (candidate, reference):
            sr = pipeline.run_stage(st, model, c, context)
            tokens += sum(int(r.tokens or 0) for r in sr.records)
        w = pipeline.window_values(st, model, candidate, context)
        ref = pipeline.window_values(st, model, reference, context)
        if w is None or ref is None:
            break
        close, gap, se = _within(w, ref, z, st.direction)
        if not close:
            verdict = "won" if gap < 0 else "lost"
            break
    return {"incumbent": reference.key, "verdict": verdict, "tokens": tokens, "eval_tokens": size,
            "gap": float(gap), "se": float(se) if math.isfinite(se) else None}


def settle_entry(searcher: Any, pipeline: Any, entry: Any, reference: Any, factor: int, stats: Any) -> None:
    """The driver's part of a close call: settle ``entry``'s candidate against ``reference``, count the
    tokens, record the verdict on its (still running) trial and keep it for the sampler
    (``searcher._settled``)."""
    verdict = settle(pipeline, searcher.model, searcher.context, entry.candidate, reference,
                     z=float(getattr(searcher.sampler, "settle_z", 2.0)), factor=factor)
    if verdict is None:
        return
    stats.tokens += verdict["tokens"]
    stats.close_call_tokens += verdict["tokens"]
    searcher._settled[entry.candidate.key] = verdict
    entry.trial.set_user_attr(CLOSE_CALL_ATTR, verdict)
    _log.info("close call settled: %s", verdict["verdict"], extra={"fields": verdict})


def rescore(searcher: Any, stats: Any) -> list[tuple[Any, float]]:
    """The sampler's parents with their last-stage objective on the searcher's current windows (EvoPress:
    the parents join the last selection step); the tokens count (as the incumbent's reference scoring)."""
    pipeline = searcher.pipeline
    out = []
    for cand, _fitness in searcher.sampler.population:
        sr = pipeline.run_stage(pipeline.stages[-1], searcher.model, cand, searcher.context)
        spent = sum(int(r.tokens or 0) for r in sr.records)
        stats.tokens += spent
        stats.reference_tokens += spent
        out.append((cand, sr.objective))
    return out


def fresh_draw(context: Any, draw: int) -> Any:
    """``context`` with evaluation windows drawn afresh for ``draw`` (EvoPress: one draw per generation);
    what the shared caches hold for other draws is dropped."""
    context = dataclasses.replace(context, draw=int(draw))
    context.forget_draws(keep=context.draw)
    return context


def settled_order(settled: dict[str, str], top: float) -> Any:
    """Sort key of (candidate, fitness) pairs for the sampler's survivor selection: a finalist that won its
    close call ranks ahead of the incumbent (fitness ``top``), one that lost or tied behind it; the
    others by fitness."""

    def key(cv: tuple[Any, float]) -> tuple[float, int]:
        verdict = settled.get(cv[0].key)
        if verdict == "won":
            return min(cv[1], top), -1
        if verdict in ("lost", "tie"):
            return max(cv[1], top), 1
        return cv[1], 0

    return key


def check_evidence_options(settle: Any, settle_z: Any, unseen_chance: Any) -> None:
    """The evolutionary sampler's ``settle``, ``settle_z`` and ``unseen_chance``, checked (one-line errors)."""
    if isinstance(settle, bool) or not isinstance(settle, int) or settle < 0:
        raise ValueError(f"EvolutionarySampler: settle must be an int >= 0 (0: off), got {settle!r}.")
    if isinstance(settle_z, bool) or not isinstance(settle_z, (int, float)) or not settle_z > 0:
        raise ValueError(f"EvolutionarySampler: settle_z must be a number > 0, got {settle_z!r}.")
    if unseen_chance is not None and (isinstance(unseen_chance, bool) or not isinstance(unseen_chance, (int, float))
                                      or not 0 < unseen_chance < 1):
        raise ValueError(f"EvolutionarySampler: unseen_chance must be a probability in (0, 1) or None, "
                         f"got {unseen_chance!r}.")
