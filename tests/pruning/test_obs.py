"""SparseGPT and OBS width removal as pure functions, against independent computations written here."""

from __future__ import annotations

import pytest
import torch

from evoprune.pruning._obs import magnitude_prune, obs_columns, sparsegpt, wanda_prune
from evoprune.space import kept_per_row


def _problem(out_f: int, in_f: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random weight and correlated, unevenly scaled inputs (as real activations are)."""
    g = torch.Generator().manual_seed(seed)
    rank = max(2, in_f // 4)  # inputs that live near a low-rank subspace, with uneven scales
    mix = torch.randn(rank, in_f, generator=g)
    x = torch.randn(n, rank, generator=g) @ mix + 0.1 * torch.randn(n, in_f, generator=g)
    x = x * torch.rand(in_f, generator=g).mul(3).add(0.2)
    w = torch.randn(out_f, in_f, generator=g)
    return w.double(), x.double()


def _err(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ w.T - x @ w_hat.double().T).pow(2).sum())


@pytest.mark.parametrize("pattern,level", [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", 0.5)])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude_at_the_same_count(pattern, level):
    w, x = _problem(48, 64, 512, seed=1)
    h = x.T @ x
    norms = x.pow(2).sum(0).sqrt()
    kept = kept_per_row(64, level, pattern)
    out = {"sparsegpt": sparsegpt(w, h, level, pattern),
           "wanda": wanda_prune(w, norms, level, pattern), "magnitude": magnitude_prune(w, level, pattern)}
    for name, w_hat in out.items():
        assert w_hat.dtype == torch.float32 and w_hat.shape == w.shape
        assert (w_hat != 0).sum(1).eq(kept).all(), name  # the cost model's count in every row
    if pattern == "2:4":
        assert (out["sparsegpt"].reshape(48, 16, 4) != 0).sum(-1).eq(2).all()
    errs = {k: _err(w, v, x) for k, v in out.items()}
    assert errs["sparsegpt"] < 0.7 * errs["wanda"] and errs["wanda"] < errs["magnitude"], errs
    block = sparsegpt(w, h, level, pattern, selection="block")  # masks over whole blocks (reference code)
    assert int((block != 0).sum()) == 48 * kept  # the linear's count is exact
    assert _err(w, block, x) < errs["wanda"]


def _plain_obs(w: torch.Tensor, h: torch.Tensor, level: float, pattern: str, selection: str) -> torch.Tensor:
    """OBS one weight at a time with the full inverse Hessian of the columns not yet fixed.

    Columns are fixed left to right; at column ``j`` the free set is ``F = {j, ...}``, ``Hinv =
    inv(H[F, F])``; a pruned weight ``w_j`` is removed with the optimal update ``-w_j / Hinv[0, 0] *
    Hinv[0, :]`` of the free weights. Which weights are pruned: per row the lowest saliency
    ``w_j^2 / Hinv_j[0, 0]`` (on the weights as they are at the start; for 2:4 on the group's weights
    when the group is reached). One block, no lazy updates, no Cholesky."""
    w = w.clone()
    n = w.shape[1]
    hinv0 = [torch.linalg.inv(h[j:, j:])[0, 0] for j in range(n)]
    prune = torch.zeros_like(w, dtype=torch.bool)
    if pattern != "2:4":
        k = n - kept_per_row(n, level, pattern)
        sal = torch.stack([w[:, j] ** 2 / hinv0[j] for j in range(n)], 1)
        if selection == "row":
            prune.scatter_(1, torch.sort(sal, dim=1, stable=True).indices[:, :k], True)
        else:  # the k * rows least salient weights of the whole matrix
            prune.view(-1)[torch.sort(sal.reshape(-1), stable=True).indices[: k * w.shape[0]]] = True
    for j in range(n):
        if pattern == "2:4" and j % 4 == 0:
            sal = torch.stack([w[:, c] ** 2 / hinv0[c] for c in range(j, j + 4)], 1)
            prune[:, j : j + 4].scatter_(1, torch.sort(sal, dim=1, stable=True).indices[:, :2], True)
        hinv = torch.linalg.inv(h[j:, j:])
        for r in range(w.shape[0]):
            if prune[r, j]:
                w[r, j:] -= w[r, j] / hinv[0, 0] * hinv[0, :]
                w[r, j] = 0.0
    return w


@pytest.mark.parametrize("pattern,level,selection", [("unstructured", 0.5, "row"), ("unstructured", 0.75, "row"),
                                                     ("unstructured", 0.5, "block"), ("unstructured", 0.75, "block"),
                                                     ("2:4", 0.5, "block")])
def test_sparsegpt_equals_plain_obs_on_a_tiny_layer(pattern, level, selection):
    w, x = _problem(6, 12, 64, seed=2)
    h = x.T @ x
    damped = h + 0.01 * torch.diagonal(h).mean() * torch.eye(12, dtype=h.dtype)
    got = sparsegpt(w, h, level, pattern, blocksize=12, dtype=torch.float64, selection=selection)
    want = _plain_obs(w, damped, level, pattern, selection)
    assert torch.equal(got == 0, want == 0)
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)


def test_sparsegpt_blocks_keep_the_exact_count_and_stay_close_to_one_block():
    w, x = _problem(32, 100, 400, seed=3)
    h = x.T @ x
    for bs in (8, 32, 100, 128):
        got = sparsegpt(w, h, 0.3, blocksize=bs)
        assert (got != 0).sum(1).eq(kept_per_row(100, 0.3)).all()
        assert int((sparsegpt(w, h, 0.3, blocksize=bs, selection="block") != 0).sum()) == 32 * kept_per_row(100, 0.3)
    wanda = _err(w, wanda_prune(w, x.pow(2).sum(0).sqrt(), 0.3), x)
    assert _err(w, sparsegpt(w, h, 0.3, blocksize=8), x) < wanda  # small blocks: less adaptive, still updated
    assert torch.equal(sparsegpt(w, h, 0.3, blocksize=8), sparsegpt(w, h, 0.3, blocksize=8))  # deterministic
    assert torch.equal(sparsegpt(w, h, 0.0), w.float())


def test_sparsegpt_handles_dead_inputs_and_rejects_bad_arguments():
    w, x = _problem(8, 16, 64, seed=4)
    x[:, 3] = 0  # never active: its column is dropped first
    got = sparsegpt(w, x.T @ x, 0.5)
    assert got[:, 3].eq(0).all() and torch.isfinite(got).all()
    with pytest.raises(ValueError, match="do not match"):
        sparsegpt(w, torch.eye(15), 0.5)
    with pytest.raises(ValueError):
        sparsegpt(w, x.T @ x, 0.5, "3:7")
    with pytest.raises(ValueError, match="blocksize"):
        sparsegpt(w, x.T @ x, 0.5, "2:4", blocksize=6)


def test_obs_columns_is_the_least_squares_solution():
    w, x = _problem(20, 40, 300, seed=5)
    kept = torch.tensor([0, 1, 2, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 38])
    got = obs_columns(w, x.T @ x, kept)
    want = torch.linalg.lstsq(x[:, kept], x @ w.T).solution.T
    assert got.shape == (20, len(kept))
    assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-4)
    sliced = _err(w, torch.zeros_like(w).index_copy(1, kept, w[:, kept]), x)
    comp = _err(w, torch.zeros_like(w).index_copy(1, kept, got.double()), x)
    assert comp < 0.8 * sliced
    damped = obs_columns(w, x.T @ x, kept, percdamp=0.01)  # dampening trades fit for stability
    assert not torch.equal(damped, got)
    assert comp <= _err(w, torch.zeros_like(w).index_copy(1, kept, damped.double()), x) < sliced


@pytest.mark.parametrize("pattern,selection", [("unstructured", "row"), ("2:4", "row"), ("unstructured", "block")])
def test_several_levels_at_once_equal_one_call_per_level_bit_for_bit(pattern, selection, monkeypatch):
    """The level database compresses a weight to all its levels in one stacked column loop (rows are
    independent); that is exactly one call per level, also when the stack is split in chunks."""
    from evoprune.pruning import _obs

    torch.manual_seed(3)
    x = torch.randn(512, 96)
    weight, hessian = torch.randn(40, 96), x.T @ x
    levels = [0.0, 0.5] if pattern == "2:4" else [0.25, 0.0, 0.5, 0.75]
    factor = _obs.sparsegpt_factor(hessian)
    one = [_obs.sparsegpt(weight, None, v, pattern, factor=factor, return_mask=True, selection=selection, blocksize=32)
           for v in levels]
    for stack_bytes in (_obs.STACK_BYTES, weight.numel() * 4 * 2):  # all levels in one loop; two at a time
        monkeypatch.setattr(_obs, "STACK_BYTES", stack_bytes)
        many = _obs.sparsegpt(weight, None, levels, pattern, factor=factor, return_mask=True, selection=selection,
                              blocksize=32)
        assert len(many) == len(levels)
        for (w1, k1), (w2, k2) in zip(one, many):
            assert torch.equal(w1, w2) and torch.equal(k1, k2)
    assert torch.equal(one[levels.index(0.0)][0], weight)  # level 0: an unchanged copy
