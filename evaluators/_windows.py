"""The per-(candidate, window) KL cache of one evaluation context.

Per (candidate, window stream) the per-window KL sums computed so far. Stages whose token sets come
from one stream (``Stage.extends``) hold nested windows (a larger set starts with the smaller one),
so a promoted candidate pays only for the windows it has not been scored on, and a candidate scored
again (the parent of a generation, a repeat) costs nothing. An entry keeps the digests of the
windows it covers, and only a common prefix of windows is ever reused.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from ._base import EvalContext
from ._tokens import TokenSet

__all__ = ["WINDOW_CACHE_ENTRIES", "common_prefix", "remember_windows", "reusable_windows", "tail_batches",
           "window_cache", "window_cache_key", "window_hashes"]

#: Candidates whose per-window KL sums one context keeps (least recently used dropped first).
WINDOW_CACHE_ENTRIES = 100_000


def window_cache_key(context: EvalContext, candidate: Any, tokens: TokenSet, top_k: int | None,
                     batch: int | None = None, fresh: bool = False) -> tuple | None:
    """The window-cache key of ``candidate`` on ``tokens``' stream (``None``: not cacheable -- no
    candidate key, or the model is being fine-tuned so it is not "dense + candidate"). An entry
    holds the digests of the windows it covers: only the windows a token set shares with it, from
    the first on, are reused, whatever the stream name says (see :func:`reusable_windows`).

    In a per-batch mode (the pruner's ``probe`` strategy) a window's value also depends on its
    batch-mates and on the session's history: the key then holds the strategy's
    ``cache_key()`` (settings, calibration, history updates so far -- none with ``fresh``, the state
    right after an apply, for reading back values) and the batch size ``batch``."""
    key = getattr(candidate, "key", None)
    if not isinstance(key, str) or context.shared.get("model_modified", 0):
        return None
    base = (key, tokens.data_fingerprint, tokens.stage, tokens.seed, tokens.seq_len, top_k)
    probe = getattr(context.pruner, "probe", None)
    if probe is None:
        return base
    return base + (probe.cache_key(fresh), batch)


def reusable_windows(context: EvalContext, shared: int, batch: int, total: int) -> int:
    """How many of the ``shared`` leading windows of a cache entry may be reused when the rest of
    ``total`` windows are computed in batches of ``batch``: all of them in static mode; in probe
    mode whole batches only (a window's units depend on its batch-mates), and, when the history
    moves with every batch, the entry only as a whole (the batches after a reused prefix would see
    a history that never saw it)."""
    probe = getattr(context.pruner, "probe", None)
    if probe is None:
        return shared
    if probe.history_moves:
        return shared if shared >= total else 0
    return shared if shared >= total else shared - shared % max(batch, 1)


def window_cache(context: EvalContext) -> dict:
    return context.shared.setdefault("kl_windows", {})


def window_hashes(context: EvalContext, tokens: TokenSet) -> tuple[bytes, ...]:
    """Digests of ``tokens``' windows (memoized per token set)."""
    memo = context.shared.setdefault("window_hashes", {})
    if tokens.key not in memo:
        rows = tokens.ids.to(torch.int64).numpy()
        memo[tokens.key] = tuple(hashlib.blake2b(r.tobytes(), digest_size=8).digest() for r in rows)
    return memo[tokens.key]


def common_prefix(a: tuple, b: tuple) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def remember_windows(context: EvalContext, key: tuple, hashes: tuple, sums: torch.Tensor) -> None:
    cache = window_cache(context)
    cache.pop(key, None)
    cache[key] = (tuple(hashes[: sums.numel()]), sums.detach().to("cpu", torch.float64).clone())
    while len(cache) > WINDOW_CACHE_ENTRIES:
        cache.pop(next(iter(cache)))


def tail_batches(tokens: TokenSet, bs: int, start: int):
    ids = tokens.ids[start:]
    for i in range(0, ids.shape[0], bs):
        yield ids[i : i + bs]
