"""Second-order (OBS) compression of one linear: SparseGPT sparsity and least-squares width removal.

Both are pure functions of a weight ``W`` (``[out, in]``) and the Hessian of its layer-wise
reconstruction loss ``H = X^T X`` (``[in, in]``, ``X`` the linear's calibration inputs, one row per
token); the scale of ``H`` does not matter.

:func:`sparsegpt` (Frantar & Alistarh 2023, written from the algorithm): ``H`` is dampened by
``percdamp`` times its mean diagonal, ``U`` is the upper Cholesky factor of ``H^-1``; columns are
processed left to right in blocks of ``blocksize`` with lazy batched updates. Inside a block the
pruned weights are chosen adaptively by ``w^2 / U_jj^2`` (OBS saliency, on the weights as the
earlier blocks left them): per row for unstructured sparsity (``selection="block"``: over the whole
block, as the reference code), per group of 4 for ``"2:4"``. Each
weight of a processed column that is pruned has its error ``w / U_jj`` propagated to the columns not
yet processed (``W[:, j:] -= err * U[j, j:]``), which is exactly the optimal OBS update over the
remaining columns. The linear keeps exactly ``out * kept_per_row(in)`` weights (what the cost model
counts; with ``selection="row"`` every row keeps ``kept_per_row``): the pruned count ``n`` per row is
spread over the blocks in proportion to their widths (``floor(n * end / in) - floor(n * start / in)``
per row in the block ``[start, end)``).

:func:`obs_columns` removes whole input columns and updates the kept ones by the closed-form
least-squares compensation ``W_K = W H[:, K] H[K, K]^-1`` (minimises ``||X W^T - X_K W_K^T||^2``;
the structured OBS of ZipLM / SlimGPT), optionally dampened the same way.

Ties break towards the lower column index (stable sorts), so equal inputs give equal outputs.
"""

from __future__ import annotations

from typing import Any

import torch

from ..space import kept_per_row
from ._masks import wanda_mask

__all__ = ["obs_columns", "sparsegpt", "sparsegpt_factor", "magnitude_prune", "wanda_prune"]


def _dampen(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H + percdamp * mean(diag H) * I`` in float64, the dead-input mask)``; a dead input (zero
    diagonal: never active on the calibration tokens) gets diagonal 1, so ``H`` stays invertible."""
    if percdamp < 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}.")
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    diag = torch.diagonal(h)
    diag += percdamp * diag.mean()
    return h, dead


@torch.no_grad()
def sparsegpt_factor(hessian: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: the upper Cholesky factor of the dampened ``H^-1`` (float64) and the dead inputs;
    pass it as ``factor=`` to :func:`sparsegpt` to compress one weight to several levels with one
    factorisation."""
    h, dead = _dampen(hessian, percdamp)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True), dead


@torch.no_grad()
def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor | None, level: Any, pattern: str = "unstructured", *,
              blocksize: int = 128, percdamp: float = 0.01, return_mask: bool = False,
              dtype: torch.dtype = torch.float32,
              factor: tuple[torch.Tensor, torch.Tensor] | None = None, selection: str = "row") -> Any:
    """SparseGPT: ``weight`` pruned to ``level`` with the remaining weights updated (a new float32
    tensor of the same shape; exactly ``in - kept_per_row(in, level, pattern)`` zeros per row, see
    the module docs).

    Args:
        weight: ``[out, in]``.
        hessian: ``[in, in]``, ``X^T X`` of the calibration inputs.
        level: the sparsity (``0`` returns a float32 copy), or a sequence of levels: then a list, one
            result per level, computed stacked (one column loop over the rows of every level, at most
            :data:`STACK_BYTES` at a time; rows are independent, so each equals its own call).
        pattern: ``"unstructured"`` or ``"2:4"``.
        blocksize: columns per lazy-update block (a multiple of 4 for ``"2:4"``).
        percdamp: dampening, a fraction of the mean Hessian diagonal.
        return_mask: return ``(weight, keep-mask)`` (the mask also marks kept weights that are 0).
        dtype: the dtype the updates are computed in (float32, as the reference code; float64 for exactness).
        factor: :func:`sparsegpt_factor` of ``hessian`` (then ``hessian`` may be ``None``).
        selection: unstructured masks chosen per ``"row"`` (default: every row keeps exactly
            ``kept_per_row``) or per ``"block"`` (the reference code's choice: the block's least salient
            weights over all rows; the linear's total count is exact, rows differ). On SmolLM2 ``"block"``
            has 10-25 % lower layer error but a worse model (70 %: test ppl 244.5 vs 195.7 per row,
            ``bench/levels.py``), so per row is the default.
    """
    if selection not in ("block", "row"):
        raise ValueError(f"sparsegpt: selection must be 'block' or 'row', got {selection!r}.")
    if factor is None:
        if hessian is None:
            raise ValueError("sparsegpt: give hessian or factor.")
        factor = None if hessian.shape != (weight.shape[-1],) * 2 else sparsegpt_factor(hessian, percdamp)
    if weight.dim() != 2 or factor is None or factor[0].shape != (weight.shape[1], weight.shape[1]):
        shape = tuple((hessian if hessian is not None else factor[0]).shape)  # type: ignore[index]
        raise ValueError(f"sparsegpt: weight {tuple(weight.shape)} and hessian {shape} do not match.")
    if blocksize < 1 or (pattern == "2:4" and blocksize % 4):
        raise ValueError(f"sparsegpt: blocksize must be a positive multiple of 4 for 2:4, got {blocksize}.")
    out_f, in_f = weight.shape
    several = not isinstance(level, (int, float))
    levels = [float(v) for v in level] if several else [float(level)]
    counts = [in_f - kept_per_row(in_f, v, pattern) for v in levels]  # validates level, pattern and width
    results: list[Any] = [None] * len(levels)
    todo = [j for j, n in enumerate(counts) if n]
    for j, n in enumerate(counts):
        if not n:  # nothing to prune: a copy
            results[j] = (weight.detach().to(dtype).clone(), torch.ones(weight.shape, dtype=torch.bool,
                                                                         device=weight.device))
    # rows are independent under per-row (and 2:4) selection: the levels run stacked, one column loop
    # for all of them (at most STACK_BYTES at a time); block selection couples a level's rows
    per = max(1, STACK_BYTES // max(1, weight.numel() * dtype.itemsize)) if selection == "row" or pattern == "2:4" else 1
    for c in range(0, len(todo), per):
        chunk = todo[c : c + per]
        n_rows = torch.tensor([counts[j] for j in chunk], device=weight.device).repeat_interleave(out_f)
        w, keep = _sparsegpt_rows(weight.detach().to(dtype).repeat(len(chunk), 1), factor, n_rows, pattern,
                                  blocksize, selection, dtype)
        for k, j in enumerate(chunk):
            results[j] = (w[k * out_f : (k + 1) * out_f], keep[k * out_f : (k + 1) * out_f])
    results = [(w.float(), keep) if return_mask else w.float() for w, keep in results]
    return results if several else results[0]


#: the most bytes of stacked weights :func:`sparsegpt` runs through one column loop (several levels)
STACK_BYTES = 256 * 2**20


def _sparsegpt_rows(w: torch.Tensor, factor: tuple[torch.Tensor, torch.Tensor], n_rows: torch.Tensor, pattern: str,
                    blocksize: int, selection: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's column loop on ``w`` (modified in place) with ``n_rows[r]`` weights pruned in row ``r``
    (unstructured; ignored for 2:4); ``(w, keep-mask)``."""
    out_f, in_f = w.shape
    keep = torch.ones(w.shape, dtype=torch.bool, device=w.device)
    u, dead = factor
    u, dead = u.to(w.device, dtype), dead.to(w.device)
    w[:, dead] = 0.0  # row j: the OBS update over columns j.. once 0..j-1 are fixed
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        d = torch.diagonal(u1)
        err = torch.zeros_like(w1)
        prune1 = torch.zeros_like(w1, dtype=torch.bool)
        if pattern != "2:4":
            k = (n_rows * i2) // in_f - (n_rows * i1) // in_f  # this block's share of every row's count
            if selection == "row" and bool(k.any()):
                order = torch.sort(w1.pow(2) / d.pow(2), dim=1, stable=True).indices
                prune1.scatter_(1, order, torch.arange(i2 - i1, device=w.device).unsqueeze(0) < k.unsqueeze(1))
            elif bool(k.any()):  # the block's k * out least salient weights, whichever rows they are in
                order = torch.sort((w1.pow(2) / d.pow(2)).reshape(-1), stable=True).indices
                prune1.view(-1)[order[: int(k[0]) * out_f]] = True
        for j in range(i2 - i1):
            if pattern == "2:4" and j % 4 == 0:
                score = w1[:, j : j + 4].pow(2) / d[j : j + 4].pow(2)
                order = torch.sort(score, dim=1, stable=True).indices
                prune1[:, j : j + 4].scatter_(1, order[:, :2], True)
            col = w1[:, j]
            e = torch.where(prune1[:, j], col, torch.zeros_like(col)) / d[j]
            w1[:, j:] -= e.unsqueeze(1) * u1[j, j:].unsqueeze(0)
            w1[:, j] = torch.where(prune1[:, j], torch.zeros_like(col), w1[:, j])
            err[:, j] = e
        w[:, i1:i2] = w1
        keep[:, i1:i2] = ~prune1
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return w, keep


@torch.no_grad()
def obs_columns(weight: torch.Tensor, hessian: torch.Tensor, kept: torch.Tensor, *,
                percdamp: float = 0.0) -> torch.Tensor:
    """The kept input columns of ``weight`` (``kept``: their indices, in the order wanted) updated to
    reconstruct the full layer output: ``W H[:, K] (H[K, K] + damp I)^-1`` (float32, ``[out, len(kept)]``).

    ``percdamp`` dampens ``H[K, K]`` by that fraction of its mean diagonal (``0``: the exact
    least-squares solution)."""
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"obs_columns: weight {tuple(weight.shape)} and hessian {tuple(hessian.shape)} do not match.")
    kept = torch.as_tensor(kept, dtype=torch.long, device=hessian.device).reshape(-1)
    h = hessian.detach().to(torch.float64)
    hkk, _ = _dampen(h[kept][:, kept], percdamp)
    rhs = h[kept] @ weight.detach().to(torch.float64).T  # H[K, :] W^T  ->  solve H[K, K] W_K^T = H[K, :] W^T
    sol = torch.linalg.solve(hkk, rhs)
    return sol.T.contiguous().float()


def _masked(weight: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    w = weight.detach().float().clone()
    return w if keep is None else w * keep


@torch.no_grad()
def wanda_prune(weight: torch.Tensor, input_norm: torch.Tensor | None, level: float,
                pattern: str = "unstructured") -> torch.Tensor:
    """Wanda (no weight update): ``weight`` with the lowest ``|W| * ||X||`` per row zeroed (float32)."""
    return _masked(weight, wanda_mask(weight, input_norm, level, pattern))


def magnitude_prune(weight: torch.Tensor, level: float, pattern: str = "unstructured") -> torch.Tensor:
    """Magnitude pruning (no weight update): the lowest ``|W|`` per row zeroed (float32)."""
    return wanda_prune(weight, None, level, pattern)
