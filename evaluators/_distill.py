"""Distillation healing: the fine-tune's loss against the dense teacher's logits, without a second model copy.

``finetune(..., loss="kl" | "ce" | "kl+ce", temperature=T)``. The teacher is the dense model that lives in
the same weights: before the first step the applied candidate is reverted once, the dense model's
next-token distribution on the fine-tune's own training windows is computed (at temperature ``T``) and
kept as a :class:`TeacherReference` in ``context.shared`` (every candidate of a stage trains on the same
windows, so it is computed once per stage and process), and the candidate is applied again. No copy of the
model is made and no teacher forward runs during training.

Memory: full distribution ``tokens * (vocab * 4 + 4)`` bytes while the vocabulary has at most
:data:`~evoprune.evaluators.AUTO_FULL_MAX_VOCAB` entries and that fits the dense-reference cache bound,
else the teacher's top ``k`` (default 256) log-probs (fp32) and indices (int32) plus the log-mass of the
rest: ``tokens * (k * 8 + 4)`` bytes -- 64k tokens of SmolLM2 (vocab 49,152) take 128 MiB at k = 256,
against 538 MB for a second fp32 copy of the 135M-parameter model (:func:`teacher_nbytes`).

The loss is ``T**2 * KL(p_T || q_T)`` per token (Hinton's scaling), on the (k+1)-way distribution "each of
the teacher's top k tokens, or anything else" (exact when k covers the vocabulary); ``"kl+ce"`` adds the
next-token cross-entropy at temperature 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .._logging import get_logger
from ._base import EvalContext
from ._kl import resolve_top_k
from ._tokens import TokenSet

__all__ = ["LOSSES", "TeacherReference", "check_distill", "distill_loss", "teacher_nbytes", "teacher_reference"]

_log = get_logger("evaluators.distill")

#: The fine-tune losses: next-token cross-entropy, KL to the dense teacher, or their sum.
LOSSES = ("ce", "kl", "kl+ce")


def check_distill(loss: Any, temperature: Any, top_k: Any = "auto", where: str = "finetune") -> None:
    """One-line errors for a bad ``loss`` / ``temperature`` / ``top_k`` of a fine-tune."""
    if loss not in LOSSES:
        raise ValueError(f"{where}: loss must be one of {', '.join(LOSSES)} (got {loss!r}).")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < float("inf"):
        raise ValueError(f"{where}: temperature must be a positive number such as 1.0 or 2.0 (got {temperature!r}).")
    if top_k != "auto" and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"{where}: top_k must be 'auto' or an integer >= 1 (got {top_k!r}).")


def teacher_nbytes(tokens: int, vocab: int, top_k: int | None) -> int:
    """Bytes of a teacher reference: ``tokens*(k*8+4)`` (top-k) or ``tokens*(vocab*4+4)`` (full).

    >>> teacher_nbytes(65536, 49152, 256) / 2**20
    128.25
    """
    if top_k is None or top_k >= vocab:
        return int(tokens) * (int(vocab) * 4 + 4)
    return int(tokens) * (int(top_k) * 8 + 4)


@dataclasses.dataclass
class TeacherReference:
    """The dense teacher's tempered log-probs on a token set: ``logprobs`` ``[n, seq, k]`` fp32, ``indices``
    ``[n, seq, k]`` int32 (``None`` when full: then k = vocab in vocabulary order) and ``rest`` ``[n, seq]`` fp32,
    the log-mass outside the top k (``None`` when full)."""

    logprobs: torch.Tensor
    indices: torch.Tensor | None
    rest: torch.Tensor | None
    temperature: float

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.logprobs, self.indices, self.rest) if t is not None)

    def rows(self, start: int, stop: int, device: torch.device) -> "TeacherReference":
        pick = (lambda t: None if t is None else t[start:stop].to(device))  # noqa: E731
        return TeacherReference(pick(self.logprobs), pick(self.indices), pick(self.rest), self.temperature)


def _vocab(model: torch.nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def _teacher_batch(logits: torch.Tensor, top_k: int | None, temperature: float) -> TeacherReference:
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    if top_k is None:
        return TeacherReference(logp, None, None, temperature)
    top, idx = torch.topk(logp, top_k, dim=-1)
    rest = torch.log1p(-top.exp().sum(-1).clamp(max=1.0 - 1e-7))
    rest = torch.where(top.exp().sum(-1) >= 1.0 - 1e-7, torch.full_like(rest, -float("inf")), rest)
    return TeacherReference(top, idx.to(torch.int32), rest, temperature)


def teacher_reference(
    model: torch.nn.Module, context: EvalContext, tokens: TokenSet, *, temperature: float = 1.0,
    top_k: int | str | None = "auto", batch_size: int = 4,
) -> TeacherReference:
    """The dense teacher's distribution on ``tokens``, from ``context.shared`` or computed now.

    Computing it reverts ``context.pruner``'s applied candidate (the dense weights are the live model's),
    runs the dense model in inference mode and applies the candidate again; it must therefore run before
    any fine-tune step has written into the shared weights (:func:`finetune` calls it first).
    """
    pruner = context.pruner
    if pruner is None or not hasattr(pruner, "revert"):
        raise ValueError("finetune: loss 'kl' and 'kl+ce' need the dense teacher, which evoprune gets by reverting "
                         "the candidate: give the EvalContext its pruner (pruner=...), or use loss: ce.")
    vocab = _vocab(model)
    k = resolve_top_k(top_k, vocab, tokens.num_tokens)
    k = None if k is None or k >= vocab else int(k)
    device = context.device_for(model)
    mem = context.shared.setdefault("teacher_reference", {})
    key = (tokens.key, k, float(temperature), device.type)
    if key in mem:
        return mem[key]
    if context.shared.get("model_modified"):
        raise RuntimeError("finetune: the teacher cannot be computed inside another fine-tune (the live weights "
                           "are no longer dense); compute it first or use loss: ce.")
    candidate = pruner.candidate
    was_training = model.training
    parts: list[TeacherReference] = []
    pruner.revert()
    try:
        model.eval()
        with torch.inference_mode():
            for batch in tokens.batches(batch_size):
                out = model(input_ids=batch.to(device), use_cache=False)
                part = _teacher_batch(out.logits if hasattr(out, "logits") else out[0], k, float(temperature))
                parts.append(TeacherReference(*(None if t is None else t.cpu() for t in
                                                (part.logprobs, part.indices, part.rest)), part.temperature))
    finally:
        model.train(was_training)
        if candidate is not None:
            pruner.apply(candidate)
    cat = (lambda name: None if getattr(parts[0], name) is None  # noqa: E731
           else torch.cat([getattr(p, name) for p in parts]))
    ref = TeacherReference(cat("logprobs"), cat("indices"), cat("rest"), float(temperature))
    _log.info("teacher reference", extra={"fields": {"tokens": tokens.num_tokens, "top_k": k or vocab,
                                                     "temperature": temperature, "mib": round(ref.nbytes / 2**20, 2)}})
    mem.clear()  # one teacher set per process: a stage's fine-tunes all train on the same windows
    mem[key] = ref
    return ref


def distill_loss(logits: torch.Tensor, teacher: TeacherReference) -> torch.Tensor:
    """Mean per-token ``T**2 * KL(p_T || q_T)`` of the student's ``logits`` against ``teacher`` (differentiable)."""
    t = teacher.temperature
    logq = torch.log_softmax(logits.float() / t, dim=-1)
    if teacher.indices is None:
        p = teacher.logprobs.exp()
        kl = (p * (teacher.logprobs - logq)).sum(-1)
    else:
        idx = teacher.indices.long()
        logq_top = logq.gather(-1, idx)
        logq_rest = torch.log1p(-logq_top.exp().sum(-1).clamp(max=1.0 - 1e-6))
        p_top = teacher.logprobs.exp()
        p_rest = teacher.rest.exp()
        safe_rest = torch.where(p_rest > 0, teacher.rest, torch.zeros_like(teacher.rest))
        kl = (p_top * (teacher.logprobs - logq_top)).sum(-1) + p_rest * (safe_rest - logq_rest)
    return kl.mean() * (t * t)
