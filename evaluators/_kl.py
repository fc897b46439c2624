"""KL divergence to the dense model, and perplexity, on a deterministic token set.

Dense reference memory (per token set, held in CPU memory and cached on disk):

- full distribution: ``tokens * vocab * 4`` bytes of fp32 probabilities, plus
  8 bytes per token (the dense model's fp64 neg-entropy), i.e.
  ``tokens * (vocab * 4 + 8)``; 64k tokens of a 128k-vocabulary model would
  need 31 GiB, 64k tokens at vocab 4096 need 1 GiB.
- ``top_k=k``: ``tokens * (k * (4 + 4) + 4)`` bytes (fp32 log-prob and int32
  index of the dense model's k most likely tokens, plus the fp32 log-mass of
  the rest); 64k tokens at k=256 need 128 MiB.

With ``top_k`` the KL is computed on the (k+1)-way distribution "each of the
dense model's top k tokens, or anything else", for dense and candidate alike:
with ``S`` the dense model's k most likely tokens at a position,
``KL_k = sum_{v in S} p_v log(p_v / q_v) + p_rest log(p_rest / q_rest)``,
``p_rest = 1 - sum_{v in S} p_v`` and ``q_rest = 1 - sum_{v in S} q_v``.
That coarsening can only lower the KL (data-processing inequality), by the
divergence hidden inside the tail. With k = vocab it equals the full KL; on the
tiny reference model (vocab 768, perplexity ~50, a flat distribution) k = 128
keeps >= 80 % of the full KL and ranks candidates identically (see
tests/evaluators/test_kl.py); peakier distributions of larger models lose less.

Default (``top_k="auto"``): the full distribution while the vocabulary has at
most :data:`AUTO_FULL_MAX_VOCAB` (16,384) entries and the full reference fits
the cache bound; otherwise top-k with ``k =`` :data:`AUTO_TOP_K` (256). A
49,152-entry vocabulary (SmolLM2) thus stores 2 KiB per token instead of 196 KiB.

The in-memory dense references of one context (``context.shared``) are bounded
in bytes (:data:`DEFAULT_CACHE_BYTES`, 2 GiB, or ``$EVOPRUNE_DENSE_CACHE_BYTES``,
or ``KLToDense(max_cache_bytes=...)``): the least recently used ones are dropped
and reloaded (memory-mapped) from the disk cache when needed again.

Per candidate token the full KL costs a ``log_softmax`` into one reused buffer
and an in-place product with the dense probabilities (no fresh
``[tokens, vocab]`` temporaries); sums over the vocabulary are fp32, per-token
and per-set sums fp64.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .._logging import get_logger
from .._paths import cache_write_failed
from ._base import EvalContext, EvalResult
from ._tokens import TokenSet
from ._windows import (common_prefix, remember_windows, reusable_windows, tail_batches, window_cache, window_cache_key,
                       window_hashes)

__all__ = ["AUTO_FULL_MAX_VOCAB", "AUTO_TOP_K", "DEFAULT_CACHE_BYTES", "DenseReference", "KLToDense", "Perplexity", "dense_reference", "perplexity", "reference_nbytes", "sequence_nll"]

_log = get_logger("evaluators.kl")

_FORMAT = "v3"

#: ``top_k="auto"``: full-vocabulary KL up to this vocabulary size, top-k above it.
AUTO_FULL_MAX_VOCAB = 16_384
#: ``top_k="auto"``: the k used above :data:`AUTO_FULL_MAX_VOCAB` (or when full would exceed the cache bound).
AUTO_TOP_K = 256
#: Default bound of the in-memory dense references of one context, in bytes (``$EVOPRUNE_DENSE_CACHE_BYTES``).
DEFAULT_CACHE_BYTES = 2 * 2**30


def cache_bytes_limit(explicit: int | None = None) -> int:
    """The in-memory dense-reference bound: ``explicit``, else ``$EVOPRUNE_DENSE_CACHE_BYTES``, else 2 GiB."""
    if explicit is not None:
        return int(explicit)
    env = os.environ.get("EVOPRUNE_DENSE_CACHE_BYTES")
    if env:
        try:
            return int(float(env))
        except ValueError:
            raise ValueError(f"EVOPRUNE_DENSE_CACHE_BYTES must be a number of bytes, got {env!r}.") from None
    return DEFAULT_CACHE_BYTES


def resolve_top_k(top_k: int | str | None, vocab: int, num_tokens: int, limit: int | None = None) -> int | None:
    """The concrete ``top_k`` (``None`` = full) of a setting for a vocabulary and token count.

    >>> resolve_top_k("auto", 768, 4096), resolve_top_k("auto", 49152, 4096), resolve_top_k(None, 49152, 4096)
    (None, 256, None)
    >>> resolve_top_k("auto", 4096, 2**20, limit=2**30)  # full would need 16 GiB: top-k instead
    256
    """
    if top_k != "auto":
        return top_k
    if vocab <= AUTO_FULL_MAX_VOCAB and reference_nbytes(num_tokens, vocab) <= cache_bytes_limit(limit):
        return None
    return min(AUTO_TOP_K, int(vocab))


def _vocab_of(model: torch.nn.Module) -> int:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is not None:
        return int(out.weight.shape[0])
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab:
        raise ValueError("KLToDense(top_k='auto') needs the model's vocabulary size (config.vocab_size); "
                         "pass top_k=None or an integer.")
    return int(vocab)


#: Working-memory bound of one KL forward's fp32 logits; larger batches are split (large vocabularies).
LOGITS_BYTES_PER_FORWARD = 64 * 2**20


def _logit_batch(bs: int, seq_len: int, model: torch.nn.Module) -> int:
    """``bs`` capped so one forward's ``[bs, seq_len, vocab]`` fp32 logits stay within
    :data:`LOGITS_BYTES_PER_FORWARD` (SmolLM2, seq_len 128: 2 sequences of 25 MiB; small vocabularies: ``bs``)."""
    try:
        per_seq = int(seq_len) * _vocab_of(model) * 4
    except ValueError:
        return bs
    return max(1, min(bs, LOGITS_BYTES_PER_FORWARD // per_seq))


def _remember(mem: dict, key: Any, ref: "DenseReference", limit: int) -> None:
    """Put ``ref`` in the LRU memory cache ``mem``, dropping the oldest entries to stay within ``limit`` bytes."""
    mem.pop(key, None)
    total = sum(r.nbytes for r in mem.values())
    while mem and total + ref.nbytes > limit:
        old_key = next(iter(mem))
        total -= mem.pop(old_key).nbytes
        _log.info("dropped dense reference %s from memory (cache bound %.1f MiB)", old_key[0], limit / 2**20)
    if ref.nbytes > limit:
        _log.warning("one dense reference (%.1f MiB) exceeds the cache bound (%.1f MiB); lower eval_tokens or use "
                     "top_k", ref.nbytes / 2**20, limit / 2**20)
    mem[key] = ref


def reference_nbytes(tokens: int, vocab: int, top_k: int | None = None) -> int:
    """Bytes a dense reference takes: ``tokens*(vocab*4+8)`` (full) or ``tokens*(k*8+4)`` (top-k).

    >>> reference_nbytes(65536, 128256) / 2**30  # full, 64k tokens, Llama-3 vocabulary
    31.31298828125
    >>> reference_nbytes(65536, 128256, top_k=256) / 2**20
    128.25
    """
    if top_k is None:
        return int(tokens) * (int(vocab) * 4 + 8)
    return int(tokens) * (int(top_k) * (4 + 4) + 4)


@dataclasses.dataclass
class DenseReference:
    """The dense model's next-token distributions on one token set.

    Full: ``probs`` ``[n, seq_len, vocab]`` fp32 and ``neg_entropy``
    ``[n, seq_len]`` fp64 (``sum p log p``, computed exactly as the evaluator
    computes ``sum p log q``, so equal logits give a KL of exactly 0). Top-k: ``logprobs`` and ``indices`` ``[n, seq_len, k]``
    (fp32, int32) and ``rest`` ``[n, seq_len]`` fp32, the log of the mass
    outside the top k.
    """

    probs: torch.Tensor | None = None
    neg_entropy: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    rest: torch.Tensor | None = None

    @property
    def top_k(self) -> int | None:
        return None if self.indices is None else int(self.indices.shape[-1])

    @property
    def num_sequences(self) -> int:
        return int((self.probs if self.probs is not None else self.logprobs).shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def rows(self, sl: slice, device: torch.device) -> "DenseReference":
        return DenseReference(**{k: v[sl].to(device, non_blocking=True) for k, v in self.tensors().items()})

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


# --------------------------------------------------------------------------- kernels
# Both the dense reference and the candidate go through the same functions, so a
# candidate whose logits equal the dense logits has a KL of exactly 0.


def _forward_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float()


def _cross_full(probs: torch.Tensor, logits: torch.Tensor, buf: torch.Tensor | None):
    """``sum_v p_v log q_v`` per token (fp64) for ``q = softmax(logits)``.

    ``log_softmax`` is written into the reused ``buf`` and multiplied by ``p`` in
    place: two fused passes, no fresh ``[tokens, vocab]`` allocations. The sum
    over the vocabulary is fp32 (pairwise, ~1e-7 relative); per-token terms are
    combined in fp64.
    """
    if buf is None or buf.shape != logits.shape or buf.dtype != logits.dtype or buf.device != logits.device:
        buf = torch.empty_like(logits)
    torch.log_softmax(logits, dim=-1, out=buf)
    return buf.mul_(probs).sum(-1).double(), buf


def _topk_logq(logits: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (fp32) of the ``idx`` tokens and of everything else; consumes ``logits``.

    The rest mass is summed over the exp'd logits with the top entries zeroed in
    place, so neither a masked copy nor a cancelling subtraction is needed.
    """
    z_top = logits.gather(-1, idx)
    m = logits.amax(-1, keepdim=True)
    e = logits.sub_(m).exp_()
    top = e.gather(-1, idx).double().sum(-1)
    rest = e.scatter_(-1, idx, 0.0).sum(-1).double()
    log_total = (top + rest).log()
    logq_rest = rest.clamp_min(1e-300).log() - log_total
    logq_top = (z_top - m).double() - log_total.unsqueeze(-1)
    return logq_top.float(), logq_rest.float()


def _kl_topk(ref: DenseReference, logits: torch.Tensor) -> torch.Tensor:
    idx = ref.indices.long()
    logq_top, logq_rest = _topk_logq(logits, idx)
    logp_top, logp_rest = ref.logprobs.double(), ref.rest.double()
    p_top, p_rest = logp_top.exp(), logp_rest.exp()
    d_top = torch.where(p_top > 0, p_top * (logp_top - logq_top.double()), torch.zeros_like(p_top)).sum(-1)
    d_rest = torch.where(p_rest > 0, p_rest * (logp_rest - logq_rest.double()), torch.zeros_like(p_rest))
    return d_top + d_rest


def _kl_full_exact(probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Slow, allocation-heavy fallback for logits with infinities."""
    logq = torch.log_softmax(logits, dim=-1)
    logp = probs.log()
    return torch.where(probs > 0, probs * (logp - logq), torch.zeros_like(probs)).sum(-1, dtype=torch.float64)


def _reference_batch(logits: torch.Tensor, top_k: int | None) -> DenseReference:
    if top_k is None:
        probs = torch.softmax(logits, dim=-1)
        neg_entropy, _ = _cross_full(probs, logits, None)
        return DenseReference(probs=probs, neg_entropy=neg_entropy)
    k = min(int(top_k), logits.shape[-1])
    idx = torch.topk(logits, k, dim=-1).indices
    logp_top, rest = _topk_logq(logits, idx)
    return DenseReference(logprobs=logp_top, indices=idx.to(torch.int32), rest=rest)


def kl_kernel(logits: torch.Tensor, top_k: int | None):
    """A zero-argument callable that runs the KL evaluator's kernel once on ``logits`` against a dense
    reference made from them (full or top-k), for timing it (:func:`evoprune.plan`)."""
    ref = _reference_batch(logits.clone(), top_k)
    if top_k is None:
        return lambda: _cross_full(ref.probs, logits, None)
    return lambda: _kl_topk(ref, logits.clone())


# --------------------------------------------------------------------------- reference cache


def _cache_path(directory: Path, model_fp: str, tokens: TokenSet, top_k: int | None, device: torch.device) -> Path:
    mode = "full" if top_k is None else f"top{int(top_k)}"
    return directory / f"dense-{_FORMAT}-{model_fp}-{tokens.key}-{mode}-{device.type}.pt"


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _progress(it, context: EvalContext, desc: str, tokens: TokenSet, bs: int):
    if not context.progress:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=math.ceil(tokens.num_sequences / bs), leave=False)


def dense_reference(
    model: torch.nn.Module,
    context: EvalContext,
    tokens: TokenSet,
    *,
    top_k: int | None = None,
    batch_size: int | None = None,
    compute: bool = True,
    max_cache_bytes: int | None = None,
) -> DenseReference | None:
    """The dense reference for ``tokens``: from memory, else disk, else computed.

    Computing requires ``model`` to be the dense model (call it before any
    candidate is applied; :class:`Pipeline` does so in ``prepare``). With
    ``compute=False`` returns ``None`` when nothing is cached in memory or on disk.
    The memory cache (``context.shared["dense_reference"]``) holds at most
    :func:`cache_bytes_limit` bytes (least recently used dropped first). Disk files live in ``context.resolved_cache_dir()`` under a name made of the
    dense model's fingerprint, the token set's key, the mode and the device type.
    """
    device = context.device_for(model)
    mem = context.shared.setdefault("dense_reference", {})
    mem_key = (tokens.key, top_k, device.type)
    limit = cache_bytes_limit(max_cache_bytes)
    if mem_key in mem:
        mem[mem_key] = mem.pop(mem_key)  # most recently used last
        return mem[mem_key]
    directory = context.resolved_cache_dir() if context.draw is None else None  # drawn sets: memory only
    path = None
    if directory is not None and (compute or "model_fingerprint" in context.shared or context.model_fingerprint):
        # the fingerprint (one pass over the weights, on the dense model) is only needed for the file name
        path = _cache_path(directory, context.fingerprint_of(model), tokens, top_k, device)
    if not compute and (path is None or not path.exists()):
        return None
    if path is not None and path.exists():
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            ref = DenseReference(**data)
            first = ref.probs if ref.probs is not None else ref.logprobs
            if first is None or tuple(first.shape[:2]) != tuple(tokens.ids.shape) or ref.top_k != (
                None if top_k is None else min(top_k, first.shape[-1])
            ):
                raise ValueError("contents do not match the token set")
            _remember(mem, mem_key, ref, limit)
            _log.info("loaded dense reference %s (%.1f MiB)", path.name, ref.nbytes / 2**20)
            return ref
        except Exception as exc:  # a truncated/corrupt/foreign file: recompute
            _log.warning("ignoring unreadable dense reference cache %s (%s)", path, exc)
            if not compute:
                return None
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab:
        _log.info(
            "computing dense reference on %d tokens (%s, %.1f MiB)",
            tokens.num_tokens,
            "full" if top_k is None else f"top-{top_k}",
            reference_nbytes(tokens.num_tokens, vocab, top_k) / 2**20,
        )
    bs = _logit_batch(batch_size or context.batch_size, tokens.seq_len, model)
    parts: list[DenseReference] = []
    was_training = model.training
    if was_training:
        model.eval()
    try:
        with torch.inference_mode():
            for batch in _progress(tokens.batches(bs), context, "dense reference", tokens, bs):
                part = _reference_batch(_forward_logits(model, batch.to(device)), top_k)
                parts.append(DenseReference(**{k: v.cpu() for k, v in part.tensors().items()}))
    finally:
        if was_training:
            model.train()
    names = parts[0].tensors().keys()
    ref = DenseReference(**{k: torch.cat([getattr(p, k) for p in parts]) for k in names})
    if device.type == "cuda":  # page-locked host memory: faster per-batch copies to the GPU
        ref = DenseReference(**{k: v.pin_memory() for k, v in ref.tensors().items()})
    _remember(mem, mem_key, ref, limit)
    if path is not None:
        try:
            _atomic_save(ref.tensors(), path)
        except (OSError, RuntimeError) as exc:  # a full or read-only cache: the reference is in memory
            if not cache_write_failed(exc):
                raise
            _log.warning("could not write dense reference cache %s (%s)", path, str(exc).strip().splitlines()[0][:200])
    return ref


# --------------------------------------------------------------------------- evaluators


class KLToDense:
    """Mean per-token ``KL(dense || candidate)`` on the stage's token set (minimize).

    The dense next-token distributions are computed once per token set (in
    :meth:`prepare`, while the model is dense), kept in CPU memory and cached on
    disk under ``context.cache_dir`` keyed by the dense model's fingerprint and
    the token set's key. Forward passes are batched (``batch_size`` sequences)
    and run under ``torch.inference_mode``; per-token sums over the vocabulary
    accumulate in fp64, the mean over tokens too.

    Args:
        top_k: store only the dense model's top ``k`` log-probs per token plus
            the mass of the rest, and compute the KL on that (k+1)-way
            distribution (see the module docstring for memory and accuracy).
            ``None`` keeps the full distribution (``tokens*(vocab*4+8)`` bytes).
            ``"auto"`` (default): full up to a vocabulary of
            :data:`AUTO_FULL_MAX_VOCAB` while it fits ``max_cache_bytes``, else
            top-:data:`AUTO_TOP_K` (:func:`resolve_top_k`).
        max_cache_bytes: bound of the in-memory dense references (default
            :func:`cache_bytes_limit`: ``$EVOPRUNE_DENSE_CACHE_BYTES`` or 2 GiB).
        batch_size: sequences per forward pass (default ``context.batch_size``),
            lowered so one forward's fp32 logits stay within
            :data:`LOGITS_BYTES_PER_FORWARD` (64 MiB); use the same value for
            ``prepare`` and ``evaluate``. Peak working memory is about
            ``2 * batch_size * seq_len * vocab * 4`` bytes (the fp32 logits and
            one reused product buffer).
        num_tokens, seq_len: draw an own token set for the current stage instead
            of using the stage's ``context.tokens``.

    Details hold the token set key, ``top_k`` and the standard error of the mean
    over sequences.

    Example::

        kl = KLToDense(top_k=256)
        ctx = EvalContext(eval_ids=ids).for_stage("s1", eval_tokens=2048, seq_len=256)
        kl.prepare(model, ctx)                      # dense model
        with pruner.applied(candidate):
            result = kl.evaluate(model, candidate, ctx)
        result.value, result.tokens
    """

    direction = "minimize"

    def __init__(
        self,
        *,
        top_k: int | str | None = "auto",
        batch_size: int | None = None,
        num_tokens: int | None = None,
        seq_len: int | None = None,
        name: str = "kl",
        max_cache_bytes: int | None = None,
    ) -> None:
        if top_k != "auto" and top_k is not None and (isinstance(top_k, (str, bool)) or top_k < 1):
            raise ValueError(f"KLToDense: top_k must be 'auto', None (full) or an integer >= 1, got {top_k!r}.")
        if max_cache_bytes is not None and max_cache_bytes < 1:
            raise ValueError(f"KLToDense: max_cache_bytes must be a positive number of bytes, got {max_cache_bytes}.")
        self.max_cache_bytes = max_cache_bytes
        if (num_tokens is None) != (seq_len is None):
            raise ValueError("KLToDense: give num_tokens and seq_len together (or neither).")
        self.top_k = top_k
        self.batch_size = batch_size
        self.num_tokens = num_tokens
        self.seq_len = seq_len
        self.name = name

    def __repr__(self) -> str:
        return f"KLToDense(top_k={self.top_k}, num_tokens={self.num_tokens}, seq_len={self.seq_len})"

    def _tokens(self, context: EvalContext) -> TokenSet:
        if self.num_tokens is not None:
            return context.token_set(self.num_tokens, self.seq_len)
        return context.require_tokens(self.name)

    def resolved_top_k(self, model: torch.nn.Module, tokens: TokenSet) -> int | None:
        """The concrete ``top_k`` (``None`` = full) this evaluator uses for ``model`` on ``tokens``."""
        if self.top_k != "auto":
            return self.top_k
        return resolve_top_k("auto", _vocab_of(model), tokens.num_tokens, self.max_cache_bytes)

    def prepare(self, model: torch.nn.Module, context: EvalContext) -> None:
        """Compute (or load) the dense reference; ``model`` must be dense."""
        tokens = self._tokens(context)
        dense_reference(model, context, tokens, top_k=self.resolved_top_k(model, tokens), batch_size=self.batch_size,
                        max_cache_bytes=self.max_cache_bytes)

    def evaluate(self, model: torch.nn.Module, candidate: Any, context: EvalContext) -> EvalResult:
        tokens = self._tokens(context)
        top_k = self.resolved_top_k(model, tokens)
        ref = dense_reference(model, context, tokens, top_k=top_k, batch_size=self.batch_size, compute=False,
                              max_cache_bytes=self.max_cache_bytes)
        if ref is None:
            raise RuntimeError(
                f"{self.name}: no dense reference for token set {tokens.key} (stage {context.stage!r}); "
                "call prepare(model, context) while the model is dense (Pipeline.run_batch does this)."
            )
        start = time.perf_counter()
        device = context.device_for(model)
        bs = _logit_batch(self.batch_size or context.batch_size, tokens.seq_len, model)
        wkey = window_cache_key(context, candidate, tokens, top_k, bs)
        cached = window_cache(context).get(wkey) if wkey is not None else None
        hashes = window_hashes(context, tokens) if wkey is not None else ()
        done = 0 if cached is None else reusable_windows(context, common_prefix(cached[0], hashes), bs,
                                                         tokens.num_sequences)
        per_seq: list[torch.Tensor] = [] if not done else [cached[1][:done]]
        # On CPU a fresh [batch, seq_len, vocab] buffer costs page faults on every call; keep one.
        buf = context.shared.get("kl_buffer") if device.type == "cpu" else None
        was_training = model.training
        if was_training:
            model.eval()
        try:
            with torch.inference_mode():
                for i, batch in enumerate(_progress(tail_batches(tokens, bs, done), context, self.name, tokens, bs)):
                    part = ref.rows(slice(done + i * bs, done + i * bs + batch.shape[0]), device)
                    batch = batch.to(device)
                    logits = _forward_logits(model, batch)
                    if part.probs is not None:
                        cross, buf = _cross_full(part.probs, logits, buf)
                        seq = (part.neg_entropy - cross).sum(-1)
                        if not bool(torch.isfinite(seq).all()):
                            # infinite logits (0 * inf in the fast path): redo this batch the slow, exact way
                            seq = _kl_full_exact(part.probs, _forward_logits(model, batch)).sum(-1)
                    else:
                        seq = _kl_topk(part, logits).sum(-1)
                    per_seq.append(seq.cpu())
        finally:
            if was_training:
                model.train()
        if device.type == "cpu" and buf is not None:
            context.shared["kl_buffer"] = buf
        seq_sums = torch.cat(per_seq)
        if wkey is not None and (cached is None or seq_sums.numel() >= cached[1].numel()):
            remember_windows(context, wkey, hashes, seq_sums)
        value = float(seq_sums.sum()) / tokens.num_tokens
        per_seq_mean = seq_sums / tokens.seq_len
        computed = (tokens.num_sequences - done) * tokens.seq_len
        details = {
            "token_set": tokens.key,
            "top_k": top_k,
            "seq_len": tokens.seq_len,
            "stderr": float(per_seq_mean.std() / math.sqrt(len(per_seq_mean))) if len(per_seq_mean) > 1 else None,
        }
        if done:
            details["reused_tokens"] = done * tokens.seq_len
        return EvalResult(value=value, details=details, tokens=computed, seconds=time.perf_counter() - start)

    def window_values(self, model: torch.nn.Module, candidate: Any, context: EvalContext) -> torch.Tensor | None:
        """Per-window mean KL (fp64, ``[num_sequences]``) of ``candidate`` on the stage's token set, from
        the window cache of an earlier :meth:`evaluate` in this process; ``None`` if not all are known."""
        tokens = self._tokens(context)
        bs = _logit_batch(self.batch_size or context.batch_size, tokens.seq_len, model)
        wkey = window_cache_key(context, candidate, tokens, self.resolved_top_k(model, tokens), bs, fresh=True)
        cached = window_cache(context).get(wkey) if wkey is not None else None
        if cached is None or common_prefix(cached[0], window_hashes(context, tokens)) < tokens.num_sequences:
            return None
        return cached[1][: tokens.num_sequences] / tokens.seq_len


# --------------------------------------------------------------------------- perplexity
# The one perplexity rule of evoprune: the Perplexity evaluator and the reference
# model's validation perplexity (evoprune.data) both call these.


def sequence_nll(
    model: torch.nn.Module, batches: Iterable[torch.Tensor], *, device: torch.device | str | None = None
) -> tuple[float, int]:
    """Summed next-token NLL (nats) of ``model`` over ``[b, seq_len]`` batches, and the prediction count.

    Each sequence's first token is context only: a batch contributes
    ``b * (seq_len - 1)`` predictions. Runs in eval mode under
    ``torch.inference_mode`` and restores training mode afterwards.
    ``device`` defaults to the model's.
    """
    if device is None:
        device = next(iter(model.parameters())).device
    nll, count = 0.0, 0
    was_training = model.training
    if was_training:
        model.eval()
    try:
        with torch.inference_mode():
            for batch in batches:
                batch = batch.to(device)
                logits = _forward_logits(model, batch)[:, :-1]
                loss = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
                )
                nll += float(loss.double())
                count += batch[:, 1:].numel()
    finally:
        if was_training:
            model.train()
    return nll, count


def perplexity(
    model: torch.nn.Module, windows: torch.Tensor, *, batch_size: int = 8, device: torch.device | str | None = None
) -> float:
    """``exp(mean next-token NLL)`` of ``model`` on ``windows`` (``[n, seq_len]`` token ids, ``seq_len >= 2``).

    >>> import torch
    >>> class Uniform(torch.nn.Module):  # equal logits over 10 tokens: perplexity 10
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = torch.nn.Parameter(torch.zeros(10))
    ...     def forward(self, input_ids, use_cache=False):
    ...         return (self.w.expand(*input_ids.shape, 10),)
    >>> round(perplexity(Uniform(), torch.randint(0, 10, (3, 16))), 4)
    10.0
    """
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"perplexity needs [n >= 1, seq_len >= 2] windows, got shape {tuple(windows.shape)}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    batches = (windows[i : i + batch_size] for i in range(0, windows.shape[0], batch_size))
    nll, count = sequence_nll(model, batches, device=device)
    return math.exp(nll / count)


class Perplexity:
    """Perplexity ``exp(mean next-token NLL)`` on the stage's token set (minimize).

    Each sequence of ``seq_len`` tokens contributes ``seq_len - 1`` predictions.

    Example::

        ppl = Perplexity()
        ppl.evaluate(model, None, EvalContext(eval_ids=ids).for_stage("s", eval_tokens=4096, seq_len=256))
    """

    direction = "minimize"

    def __init__(
        self,
        *,
        batch_size: int | None = None,
        num_tokens: int | None = None,
        seq_len: int | None = None,
        name: str = "ppl",
    ) -> None:
        if (num_tokens is None) != (seq_len is None):
            raise ValueError("Perplexity: give num_tokens and seq_len together (or neither).")
        self.batch_size = batch_size
        self.num_tokens = num_tokens
        self.seq_len = seq_len
        self.name = name

    def __repr__(self) -> str:
        return f"Perplexity(num_tokens={self.num_tokens}, seq_len={self.seq_len})"

    def evaluate(self, model: torch.nn.Module, candidate: Any, context: EvalContext) -> EvalResult:
        tokens = (
            context.token_set(self.num_tokens, self.seq_len)
            if self.num_tokens is not None
            else context.require_tokens(self.name)
        )
        if tokens.seq_len < 2:
            raise ValueError("Perplexity needs seq_len >= 2.")
        start = time.perf_counter()
        bs = self.batch_size or context.batch_size
        batches = _progress(tokens.batches(bs), context, self.name, tokens, bs)
        nll, count = sequence_nll(model, batches, device=context.device_for(model))
        mean = nll / count
        return EvalResult(
            value=math.exp(mean),
            details={"nll": mean, "token_set": tokens.key, "seq_len": tokens.seq_len},
            tokens=tokens.num_tokens,
            seconds=time.perf_counter() - start,
        )
