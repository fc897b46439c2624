"""Deterministic token sets: which windows of the reference text a stage scores on.

A token set is a pure function of (data fingerprint, stage, seed, seq_len): two
workers that hold the same data draw the same windows, so their stage values
are comparable. For one (fingerprint, stage, seed, seq_len) a larger
``num_tokens`` extends a smaller one (the windows come from one permutation).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import torch

from .._fingerprint import ids_fingerprint

__all__ = ["TokenSet", "make_token_set"]


def _generator(*parts: object) -> torch.Generator:
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return gen


@dataclasses.dataclass(frozen=True, eq=False)
class TokenSet:
    """``ids`` (``[n, seq_len]`` LongTensor on CPU) plus where it came from.

    ``key`` is a digest of the ids themselves, so caches keyed by it can never
    serve logits for other tokens.
    """

    ids: torch.Tensor
    stage: str
    seed: int
    data_fingerprint: str
    key: str

    @property
    def num_sequences(self) -> int:
        return int(self.ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.ids.shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.ids.numel())

    def batches(self, batch_size: int):
        """Yield ``[<=batch_size, seq_len]`` slices in order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        for start in range(0, self.num_sequences, batch_size):
            yield self.ids[start : start + batch_size]

    def __repr__(self) -> str:
        return (
            f"TokenSet(stage={self.stage!r}, seed={self.seed}, n={self.num_sequences}, "
            f"seq_len={self.seq_len}, key={self.key!r})"
        )


def make_token_set(
    ids: torch.Tensor,
    *,
    num_tokens: int,
    seq_len: int,
    stage: str | int,
    seed: int = 0,
    data_fingerprint: str | None = None,
) -> TokenSet:
    """Draw ``ceil(num_tokens / seq_len)`` non-overlapping windows of ``ids``.

    The windows are chosen by a ``torch.Generator`` seeded from
    ``sha256(data_fingerprint, stage, seed, seq_len)``, so the result depends on
    nothing else (not on global RNG state, not on the process).

    Args:
        ids: 1-D LongTensor of token ids (the whole evaluation or training split).
        num_tokens: tokens wanted; rounded up to whole sequences.
        seq_len: tokens per sequence.
        stage: stage name or index; different stages draw different windows.
        seed: study seed; different seeds draw different windows.
        data_fingerprint: identifies ``ids``; computed from the values if omitted.

    Example::

        >>> import torch
        >>> ids = torch.arange(10_000)
        >>> a = make_token_set(ids, num_tokens=1000, seq_len=100, stage="s1", seed=0)
        >>> b = make_token_set(ids, num_tokens=1000, seq_len=100, stage="s1", seed=0)
        >>> a.ids.shape, torch.equal(a.ids, b.ids), a.key == b.key
        (torch.Size([10, 100]), True, True)
        >>> c = make_token_set(ids, num_tokens=1000, seq_len=100, stage="s2", seed=0)
        >>> torch.equal(a.ids, c.ids)
        False
    """
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
        raise ValueError(
            "make_token_set needs a 1-D tensor of token ids (concatenate your documents first); "
            f"got {type(ids).__name__} with shape {getattr(ids, 'shape', None)}."
        )
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"token ids must be an integer tensor, got dtype {ids.dtype}.")
    if seq_len < 1 or num_tokens < 1:
        raise ValueError(f"num_tokens and seq_len must be >= 1, got {num_tokens} and {seq_len}.")
    n = math.ceil(num_tokens / seq_len)
    windows = ids.numel() // seq_len
    if n > windows:
        raise ValueError(
            f"asked for {n} sequences of {seq_len} tokens ({n * seq_len} tokens) but the data "
            f"has only {ids.numel()} tokens ({windows} windows); use fewer tokens, a shorter seq_len "
            "or more data."
        )
    fp = data_fingerprint if data_fingerprint is not None else ids_fingerprint(ids)
    stage = str(stage)
    gen = _generator("evoprune-token-set-v1", fp, stage, int(seed), int(seq_len))
    order = torch.randperm(windows, generator=gen)[:n]
    cpu_ids = ids.detach().to("cpu", torch.long)
    index = order[:, None] * seq_len + torch.arange(seq_len)[None, :]
    out = cpu_ids[index].contiguous()
    key = hashlib.sha256(
        f"{fp}|{stage}|{int(seed)}|{seq_len}|".encode() + out.numpy().tobytes()
    ).hexdigest()[:16]
    return TokenSet(ids=out, stage=stage, seed=int(seed), data_fingerprint=fp, key=key)
