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

__all__ = ["WINDOW_CACHE_ENTRIES", "common_prefix", "remember_windows", "tail_batches", "window_cache",
           "window_cache_key", "window_hashes"]

#: Candidates whose per-window KL sums one context keeps (least recently used dropped first).
WINDOW_CACHE_ENTRIES = 100_000


def window_cache_key(context: EvalContext, candidate: Any, tokens: TokenSet, top_k: int | None) -> tuple | None:
    """The window-cache key of ``candidate`` on ``tokens``' stream (``None``: not cacheable -- no
    candidate key, or the model is being fine-tuned so it is not "dense + candidate"). An entry
    holds the digests of the windows it covers: only the windows a token set shares with it, from
    the first on, are reused, whatever the stream name says."""
    key = getattr(candidate, "key", None)
    if not isinstance(key, str) or context.shared.get("model_modified", 0):
        return None
    return (key, tokens.data_fingerprint, tokens.stage, tokens.seed, tokens.seq_len, top_k)


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
