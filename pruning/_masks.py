"""Wanda-style sparsity masks and a byte-bounded LRU cache for them.

Score of weight ``W[r, c]`` is ``|W[r, c]| * ||X[:, c]||_2`` (``X``: the linear's
calibration inputs; all ones without calibration, i.e. magnitude pruning).

Every row keeps :func:`evoprune.space.kept_per_row` weights, the rule the cost
model counts with:

* unstructured level ``s``: in every output row the ``floor(s * in_features)``
  lowest-scoring weights are pruned;
* ``"2:4"`` (level 0.5): in every run of 4 consecutive inputs of a row the 2
  lowest-scoring weights are pruned; ``in_features`` must be a multiple of 4
  (``ValueError`` otherwise).

Ties break deterministically towards the lower column index being pruned first
(stable sort), so the same weights always give the same mask.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable

import torch

from ..space import kept_per_row

__all__ = ["wanda_mask", "MaskCache", "pack_mask", "unpack_mask"]

_CHUNK = 1 << 16  # score elements sorted at once (keeps temporaries around 1 MiB)


@torch.no_grad()
def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor | None, level: float, pattern: str) -> torch.Tensor | None:
    """Boolean keep-mask (``True`` = kept) for a 2-D ``weight`` (out, in), or ``None`` if nothing is pruned.

    Rows are processed in chunks, so the temporary memory is a few MiB whatever the matrix size."""
    if weight.dim() != 2:
        raise ValueError(f"wanda_mask expects a 2-D weight, got shape {tuple(weight.shape)}.")
    out_f, in_f = weight.shape
    n_prune = in_f - kept_per_row(in_f, level, pattern)  # validates pattern, level and width
    if n_prune == 0:
        return None
    norm = None
    if input_norm is not None:
        norm = input_norm.to(device=weight.device, dtype=torch.float32).reshape(1, in_f)
    mask = torch.ones(out_f, in_f, dtype=torch.bool, device=weight.device)
    rows = max(1, _CHUNK // in_f)
    for start in range(0, out_f, rows):
        w = weight[start : start + rows]
        score = w.detach().abs().float()
        if norm is not None:
            score.mul_(norm)
        if pattern == "2:4":
            blocks = score.reshape(score.shape[0], in_f // 4, 4)
            order = torch.sort(blocks, dim=-1, stable=True).indices  # ascending: first two are pruned
            keep = torch.ones(blocks.shape, dtype=torch.bool, device=weight.device)
            keep.scatter_(-1, order[..., :2], False)
            mask[start : start + rows] = keep.reshape(score.shape[0], in_f)
        else:
            order = torch.sort(score, dim=1, stable=True).indices
            mask[start : start + rows].scatter_(1, order[:, :n_prune], False)
    return mask


_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    """Bit-pack a bool mask (8 entries per byte)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = _BITS.to(mask.device)
    return (flat.view(-1, 8).to(torch.uint8) * bits).sum(1, dtype=torch.uint8), mask.shape


def unpack_mask(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    bits = _BITS.to(packed.device)
    flat = (packed.view(-1, 1) & bits).ne(0).reshape(-1)
    return flat[: torch.Size(shape).numel()].reshape(shape)


def _nbytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


class MaskCache:
    """LRU keyed by anything hashable, bounded by the total bytes of the tensors it holds (values
    are tensors, tuples of tensors, or ``None``; store :func:`pack_mask` output to hold 8x more)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._data: collections.OrderedDict[Hashable, object] = collections.OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: Hashable) -> tuple[bool, object]:
        if key in self._data:
            self._data.move_to_end(key)
            self.hits += 1
            return True, self._data[key]
        self.misses += 1
        return False, None

    def put(self, key: Hashable, value: object) -> None:
        size = _nbytes(value)
        if key in self._data:
            self._bytes -= _nbytes(self._data.pop(key))
        if size > self.max_bytes:
            return
        self._data[key] = value
        self._bytes += size
        while self._bytes > self.max_bytes and self._data:
            _, old = self._data.popitem(last=False)
            self._bytes -= _nbytes(old)

    def clear(self) -> None:
        self._data.clear()
        self._bytes = 0
