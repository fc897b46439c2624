"""One-shot baselines, usable as methods or as seeds of a search.

Every function returns a :class:`~evoprune.space.Candidate` of ``space`` that
meets its budget (or ``num_blocks`` for the depth methods without a budget).
Seed a study with one::

    study.enqueue_trial(space.params_of(shortgpt(space, pruner)))          # Optuna samplers
    EvolutionarySampler(init=[shortgpt(space, pruner), uniform(space)])   # evolution

* :func:`uniform`: every non-frozen block compressed alike.
* :func:`shortgpt`: ShortGPT -- drop the blocks with the lowest block influence
  ``1 - cos(block input, block output)`` (``pruner.importance.block_influence``).
* :func:`sleb`: SLEB -- greedily drop the block whose removal raises the
  calibration loss least, one at a time; the first and last blocks are never
  dropped. Candidates are applied in place with ``pruner.apply``/``revert``.
* :func:`flap`: FLAP-style width allocation (An et al. 2024, "AL-AM"
  structure) -- per-channel fluctuation scores (input variance x squared
  weight-column norm of ``o_proj`` / ``down_proj``; squared again for attention,
  as FLAP does), standardized per layer *over channels*; an attention unit's
  score is the mean of its channels' standardized scores; one global threshold
  for all layers and both modules -> non-uniform widths meeting the budget.
* :func:`owl`: OWL (Yin et al. 2023, "Outlier Weighed Layerwise sparsity") --
  per-block sparsity ``target - lambda * (normalized outlier ratio - mean)``,
  the outlier ratio being the share of a block's Wanda scores ``|W| * ||X||``
  above ``M`` times their mean (:func:`owl_scores`), mapped to the space's
  sparsity levels under the budget.

How it differs from FLAP's own code, and why:

* FLAP standardizes channel scores and then averages them per head. Standardizing
  the per-unit sums instead (what this module did before) turns the 3 KV groups of
  a SmolLM2 layer into z-scores of about -1.2 / 0 / +1.2 in *every* layer, on a
  scale unrelated to the 1,536 MLP channel z-scores they compete with: at 70 %
  params most layers kept 1 of 3 groups (perplexity 192 vs 52 for uniform). With
  FLAP's rule a group's score is a mean of 192 channel z-scores, near 0 unless
  the whole group is unusually (un)important, as in FLAP.
* FLAP weighs each attention unit by its parameter cost when placing the
  threshold; here the threshold is bisected against the real cost model, which
  counts every unit's parameters exactly.
* Which heads/channels are kept inside a layer follows the pruner's importance
  order (candidates keep a prefix), not FLAP's score; FLAP only sets the widths.
* No bias compensation: FLAP adds ``mean(x_removed) @ W_removed^T`` as a new
  ``o_proj`` / ``down_proj`` bias. Llama-family blocks have no such bias, and a
  candidate (and its export, which must stay a standard checkpoint whose
  parameter count equals the cost model's) has no place for one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._logging import get_logger
from ..evaluators import sequence_nll
from ..space import Candidate, SearchSpace

__all__ = ["calibration_loss", "flap", "flap_scores", "owl", "owl_allocation", "owl_scores", "shortgpt", "sleb",
           "uniform"]

_log = get_logger("baselines")


def _budget_ratio(space: SearchSpace) -> tuple[float, str]:
    bounds = space.budget_bounds()
    for metric, _lo, hi in bounds:
        if hi is not None:
            return hi / space.dense_cost(metric), metric
    raise ValueError("this baseline needs an upper budget (Budget(metric=..., max_ratio=...)) or an explicit target.")


def uniform(space: SearchSpace, ratio: float | None = None, *, metric: str | None = None) -> Candidate:
    """Every non-frozen block compressed alike to ``ratio`` of dense ``metric`` (default: the budget).

    Uses :meth:`SearchSpace.uniform`; if the result misses another budget it is
    repaired (seeded, deterministic).

    >>> from evoprune.space import Budget, SearchSpace
    >>> space = SearchSpace.from_model(dict(model_type="llama", num_hidden_layers=4, hidden_size=64,
    ...     num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=100),
    ...     attention=None, mlp_step=16, budget=Budget(metric="params", max_ratio=0.8))
    >>> c = uniform(space)
    >>> space.satisfies_budget(c), len({layer.mlp_channels for layer in c.layers})
    (True, 1)
    """
    if ratio is None:
        ratio, budget_metric = _budget_ratio(space)
        metric = metric or budget_metric
    cand = space.uniform(float(ratio), metric=metric)
    if space.budget and not space.satisfies_budget(cand):
        cand = space.repair(cand, np.random.default_rng(0))
    return cand


def _block_genes(space: SearchSpace, what: str) -> dict[int, str]:
    genes = {g.layer: g.name for g in space.genes_of_kind("block")}
    if not genes:
        raise ValueError(f"{what} drops whole blocks: build the space with drop_blocks=True.")
    return genes


def _drop_until(space: SearchSpace, order: Sequence[int], num_blocks: int | None, what: str) -> Candidate:
    genes = _block_genes(space, what)
    levels: dict[str, int] = {}
    cand = space.dense()
    if num_blocks is None and not space.budget:
        raise ValueError(f"{what}: give num_blocks=... or a space with a budget.")
    for n, layer in enumerate(order):
        if num_blocks is not None and n >= num_blocks:
            break
        if num_blocks is None and space.satisfies_budget(cand):
            break
        levels[genes[layer]] = 1
        cand = space.candidate_from_levels(levels)
    if num_blocks is None and not space.satisfies_budget(cand):
        raise ValueError(
            f"{what}: dropping blocks alone cannot meet the budget {space.budget} (after dropping {len(levels)}); "
            "loosen the budget or use a width baseline."
        )
    if num_blocks is not None and len(levels) < num_blocks:
        raise ValueError(f"{what}: only {len(levels)} droppable blocks, asked for {num_blocks}.")
    return cand


def shortgpt(space: SearchSpace, influence: Any, *, num_blocks: int | None = None) -> Candidate:
    """ShortGPT: drop the droppable blocks with the lowest block influence until the budget holds.

    Args:
        space: a space with ``drop_blocks=True`` (frozen layers are never dropped).
        influence: a :class:`~evoprune.pruning.Pruner`, its ``importance``, or a
            sequence of per-block ``1 - cos`` values.
        num_blocks: drop exactly this many instead of "until the budget holds".

    >>> from evoprune.space import SearchSpace
    >>> space = SearchSpace.from_model(dict(model_type="llama", num_hidden_layers=4, hidden_size=64,
    ...     num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=100),
    ...     attention=None, mlp=False, drop_blocks=True)
    >>> shortgpt(space, [0.9, 0.1, 0.5, 0.2], num_blocks=2).kept_layers
    (0, 2)
    """
    if hasattr(influence, "importance"):
        influence = influence.importance
    if hasattr(influence, "block_influence"):
        influence = influence.block_influence
    values = [float(v) for v in (influence.tolist() if hasattr(influence, "tolist") else influence)]
    if len(values) != space.spec.num_layers:
        raise ValueError(f"shortgpt: {len(values)} influence values for {space.spec.num_layers} blocks.")
    if any(math.isnan(v) for v in values):
        raise ValueError("shortgpt: block influence is NaN (importance computed without calibration tokens).")
    genes = _block_genes(space, "shortgpt")
    order = sorted(genes, key=lambda i: (values[i], i))
    return _drop_until(space, order, num_blocks, "shortgpt")


def calibration_loss(model: Any, calib_ids: Any, *, batch_size: int = 8) -> tuple[float, int]:
    """Mean next-token cross-entropy of ``model`` on ``calib_ids [n, seq_len]``; returns ``(loss, tokens)``
    (the perplexity rule is :func:`evoprune.evaluators.sequence_nll`; this only batches and averages)."""
    batches = (calib_ids[start : start + batch_size] for start in range(0, calib_ids.shape[0], batch_size))
    nll, count = sequence_nll(model, batches)
    return nll / max(count, 1), int(calib_ids.numel())


def sleb(
    space: SearchSpace,
    pruner: Any,
    calib_ids: Any,
    *,
    num_blocks: int | None = None,
    batch_size: int = 8,
    report: dict[str, Any] | None = None,
) -> Candidate:
    """SLEB: greedy block removal by calibration loss; first and last blocks are never removed.

    Each round applies (``pruner.apply``, in place, no copy) every candidate that
    drops one more droppable block, measures the calibration loss, keeps the
    best, and stops when the budget holds (or after ``num_blocks`` drops).
    ``pruner.revert()`` leaves the model dense afterwards. If ``report`` is a
    dict it receives ``tokens`` (forward tokens used), ``order`` and ``losses``.
    """
    genes = _block_genes(space, "sleb")
    n = space.spec.num_layers
    droppable = [i for i in sorted(genes) if i not in (0, n - 1)]
    if num_blocks is None and not space.budget:
        raise ValueError("sleb: give num_blocks=... or a space with a budget.")
    levels: dict[str, int] = {}
    cand = space.dense()
    order: list[int] = []
    losses: list[float] = []
    tokens = 0
    try:
        while True:
            if num_blocks is not None and len(order) >= num_blocks:
                break
            if num_blocks is None and space.satisfies_budget(cand):
                break
            best = None
            for i in droppable:
                if i in order:
                    continue
                trial = space.candidate_from_levels({**levels, genes[i]: 1})
                pruner.apply(trial)
                loss, used = calibration_loss(pruner.model, calib_ids, batch_size=batch_size)
                tokens += used
                if best is None or loss < best[0]:
                    best = (loss, i, trial)
            if best is None:
                raise ValueError(
                    f"sleb: no droppable block left after {order} (first/last and frozen blocks stay); "
                    "loosen the budget or allow width pruning."
                )
            losses.append(best[0])
            order.append(best[1])
            levels[genes[best[1]]] = 1
            cand = best[2]
            _log.debug("sleb drops block %d (loss %.4f)", best[1], best[0])
    finally:
        pruner.revert()
    if report is not None:
        report.update({"tokens": tokens, "order": order, "losses": losses})
    _log.info("sleb", extra={"fields": {"dropped": order, "tokens": tokens}})
    return cand


# --------------------------------------------------------------------------- FLAP


def flap_scores(pruner: Any, calib_ids: Any, *, batch_size: int = 8) -> dict[str, Any]:
    """Per-layer fluctuation scores ``var(x_j) * ||W[:, j]||^2`` of ``o_proj`` and ``down_proj`` inputs.

    Returns ``{"head_channel": [L, heads * head_dim] (per ``o_proj`` input
    channel), "head": [L, heads] (summed over head_dim), "channel": [L,
    intermediate], "tokens": int}``, all in the live model's head/channel order.
    The model must be dense (the pruner is reverted first).
    """
    import torch

    from ..pruning import calibration_pass  # deferred, as torch: importing the baselines stays cheap

    pruner.revert()
    model, adapter, spec = pruner.model, pruner.adapter, pruner.spec
    layers = model.get_submodule(adapter.layers)
    stats: dict[tuple[int, str], list[torch.Tensor]] = {}
    inputs = []

    def hook(key: tuple[int, str]):
        def fn(x):
            x = x.detach().float().reshape(-1, x.shape[-1])
            s = stats.setdefault(key, [torch.zeros(x.shape[-1], dtype=torch.float64), torch.zeros(x.shape[-1],
                                        dtype=torch.float64), 0])
            s[0] += x.sum(0).double().cpu()
            s[1] += x.pow(2).sum(0).double().cpu()
            s[2] += x.shape[0]

        return fn

    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, adapter.attn), getattr(layer, adapter.mlp)
        inputs += [(getattr(attn, adapter.o), hook((i, "o"))), (getattr(mlp, adapter.down), hook((i, "down")))]
    calibration_pass(model, calib_ids, inputs, batch_size=batch_size)
    heads, head_channels, channels = [], [], []
    hd = spec.head_dim
    with torch.no_grad():
        for i, layer in enumerate(layers):
            attn, mlp = getattr(layer, adapter.attn), getattr(layer, adapter.mlp)
            for key, w, out in (("o", getattr(attn, adapter.o).weight, heads),
                                ("down", getattr(mlp, adapter.down).weight, channels)):
                s1, s2, n = stats[(i, key)]
                var = (s2 / n - (s1 / n) ** 2).clamp_min(0)
                col = w.detach().double().pow(2).sum(0).cpu()
                score = var * col
                if key == "o":
                    head_channels.append(score)
                    score = score.reshape(-1, hd).sum(-1)
                out.append(score)
    return {"head": torch.stack(heads).numpy(), "head_channel": torch.stack(head_channels).numpy(),
            "channel": torch.stack(channels).numpy(), "tokens": int(calib_ids.numel())}


def _standardize(x: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    std = x.std(axis=-1, keepdims=True)
    return (x - mean) / np.where(std > 0, std, 1.0)


def _level_at_least(levels: tuple[int, ...], count: int, drops: bool) -> int:
    """Index of the smallest level value >= count (levels descend; a trailing 0 is the drop level)."""
    if count <= 0 and drops:
        return len(levels) - 1
    best = 0
    for k, v in enumerate(levels):
        if v >= max(count, 1) and not (drops and k == len(levels) - 1):
            best = k
    return best


def flap(
    space: SearchSpace,
    pruner: Any,
    calib_ids: Any = None,
    *,
    scores: dict[str, Any] | None = None,
    batch_size: int = 8,
) -> Candidate:
    """FLAP-style non-uniform widths meeting the budget.

    Channel scores (see :func:`flap_scores`; ``o_proj`` ones squared, as in
    FLAP) are standardized per layer over the channels of each module; an
    attention unit scores the mean standardized score of its ``o_proj`` input
    channels. One global threshold ``t`` keeps, in every layer, the units whose
    score exceeds ``t``; the counts are rounded up to the space's levels, and
    ``t`` is the smallest threshold whose candidate meets every budget
    (bisection). Attention units follow the space: KV groups (all channels of
    the group's query heads) or query heads per group (the r-th best head of
    every group, averaged). Sparsity genes stay at level 0; if the widths alone
    cannot meet the budget the candidate is repaired. See the module docstring
    for the differences from FLAP (no bias compensation).
    """
    if scores is None:
        if calib_ids is None:
            raise ValueError("flap: pass calib_ids (or precomputed scores=flap_scores(...)).")
        scores = flap_scores(pruner, calib_ids, batch_size=batch_size)
    spec = space.spec
    if "head_channel" not in scores:
        raise ValueError("flap: scores lack 'head_channel' (made by an older evoprune); recompute them with flap_scores.")
    head_channel = np.asarray(scores["head_channel"], dtype=float)
    chan = np.asarray(scores["channel"], dtype=float)
    attn_genes = {g.layer: g for g in space.genes_of_kind("attn")}
    mlp_genes = {g.layer: g for g in space.genes_of_kind("mlp")}
    if not attn_genes and not mlp_genes:
        raise ValueError("flap allocates widths: build the space with attention widths and/or mlp=True.")
    G, Q = spec.num_kv_heads, spec.q_per_kv
    z_head = _standardize(head_channel ** 2).reshape(spec.num_layers, G, Q, -1).mean(-1)  # [L, G, Q]
    if space.attention == "kv_groups":
        z_attn = z_head.mean(-1)
    elif space.attention == "q_per_group":
        z_attn = -np.sort(-z_head, axis=-1).mean(axis=1)
    else:
        z_attn = np.zeros((spec.num_layers, 1))
    z_mlp = _standardize(chan)
    pool = []
    if attn_genes:
        pool.append(z_attn[sorted(attn_genes)].ravel())
    if mlp_genes:
        pool.append(z_mlp[sorted(mlp_genes)].ravel())
    thresholds = np.unique(np.concatenate(pool))

    def candidate_at(t: float) -> Candidate:
        levels = {}
        for i, g in attn_genes.items():
            levels[g.name] = _level_at_least(g.levels, int((z_attn[i] > t).sum()), g.drops)
        for i, g in mlp_genes.items():
            levels[g.name] = _level_at_least(g.levels, int((z_mlp[i] > t).sum()), g.drops)
        return space.candidate_from_levels(levels)

    if not space.budget:
        raise ValueError("flap needs a budget to allocate widths against (e.g. Budget(metric='params', max_ratio=0.5)).")
    bounds = space.budget_bounds()

    def under_caps(c: Candidate) -> bool:  # monotone in t (a lower bound is not: check it last)
        return all(hi is None or space.cost(c, metric) <= hi for metric, _lo, hi in bounds)

    lo, hi = 0, len(thresholds) - 1
    if not under_caps(candidate_at(thresholds[hi])):
        cand = candidate_at(thresholds[hi])
        _log.warning("flap: widths alone miss the budget; repairing")
        return space.repair(cand, np.random.default_rng(0))
    while lo < hi:  # smallest threshold index whose candidate stays under every upper bound
        mid = (lo + hi) // 2
        if under_caps(candidate_at(thresholds[mid])):
            hi = mid
        else:
            lo = mid + 1
    cand = candidate_at(thresholds[lo])
    if not space.satisfies_budget(cand):  # below a lower bound (or another budget): the nearest valid one
        _log.warning("flap: the allocation misses a lower budget bound; repairing")
        cand = space.repair(cand, np.random.default_rng(0))
    _log.info("flap", extra={"fields": {"threshold": float(thresholds[lo]), "tokens": scores.get("tokens", 0)}})
    return cand


# --------------------------------------------------------------------------- OWL


def owl_scores(pruner: Any, calib_ids: Any, *, m: float = 5.0, batch_size: int = 8) -> dict[str, Any]:
    """Per-block outlier ratios of OWL (Yin et al. 2023, "Outlier Weighed Layerwise sparsity").

    The Wanda score of weight ``W[r, c]`` of a linear is ``|W[r, c]| * ||X[:, c]||_2`` (``X``: the
    linear's inputs on ``calib_ids``, the score :func:`~evoprune.pruning.wanda_mask` prunes by).
    A block's outlier ratio is the share of the scores of all its linears (q, k, v, o, gate, up,
    down together) above ``m`` times their mean (OWL's ``M``; 5 in the paper).

    Returns ``{"outlier_ratio": [num_layers] (fractions in [0, 1]), "m": m, "tokens": int}``. The
    input norms are taken by hooks on the live dense model (the pruner is reverted first), so they
    follow the pruner's head/channel order; the ratio does not depend on that order.
    """
    import torch

    from ..pruning import calibration_pass  # deferred, as torch: importing the baselines stays cheap

    pruner.revert()
    model, adapter = pruner.model, pruner.adapter
    layers = model.get_submodule(adapter.layers)
    linears: list[list[Any]] = []
    sq: dict[int, Any] = {}
    inputs = []

    def hook(key: int):
        def fn(x):
            x = x.detach().float().reshape(-1, x.shape[-1])
            s = x.pow(2).sum(0).double().cpu()
            sq[key] = s if key not in sq else sq[key] + s

        return fn

    for layer in layers:
        attn, mlp = getattr(layer, adapter.attn), getattr(layer, adapter.mlp)
        mods = [getattr(attn, n) for n in adapter.attn_linears] + [getattr(mlp, n) for n in adapter.mlp_linears]
        linears.append(mods)
        for mod in mods:
            inputs.append((mod, hook(id(mod))))
    calibration_pass(model, calib_ids, inputs, batch_size=batch_size)
    def wanda(mod: Any) -> Any:  # one linear's scores at a time (two passes: mean, then count)
        w = mod.weight.detach()
        return w.abs().float() * sq[id(mod)].sqrt().to(device=w.device, dtype=torch.float32).reshape(1, -1)

    ratios = []
    with torch.no_grad():
        for mods in linears:
            total = sum(float(wanda(mod).sum(dtype=torch.float64)) for mod in mods)
            count = sum(mod.weight.numel() for mod in mods)
            thr = float(m) * total / count
            ratios.append(sum(int((wanda(mod) > thr).sum()) for mod in mods) / count)
    return {"outlier_ratio": np.asarray(ratios), "m": float(m), "tokens": int(calib_ids.numel())}


def owl_allocation(outlier_ratio: Sequence[float], target: float, *, lam: float = 0.08) -> np.ndarray:
    """OWL's layer sparsities: ``target - (d - mean(d))`` with ``d = 2 * lam * (r - min r) / (max r - min r)``.

    More outliers -> lower sparsity, spread over ``[target - lam, target + lam]`` at most, mean
    ``target`` (OWL's code: density ``1 - target + d - mean(d)``). All ratios equal -> uniform.

    >>> owl_allocation([0.01, 0.03, 0.02], 0.5).round(3).tolist()
    [0.58, 0.42, 0.5]
    """
    r = np.asarray(outlier_ratio, dtype=float)
    span = r.max() - r.min() if r.size else 0.0
    d = 2.0 * lam * (r - r.min()) / span if span > 0 else np.zeros_like(r)
    return float(target) - (d - d.mean())


def owl(
    space: SearchSpace,
    pruner: Any,
    calib_ids: Any = None,
    *,
    scores: dict[str, Any] | None = None,
    m: float = 5.0,
    lam: float = 0.08,
    target: float | None = None,
    batch_size: int = 8,
    report: dict[str, Any] | None = None,
) -> Candidate:
    """OWL: per-block sparsity from outlier ratios (Yin et al. 2023), on the space's sparsity levels.

    Layer sparsities follow :func:`owl_allocation` of :func:`owl_scores` (``m``, ``lam``: OWL's ``M``
    and ``lambda``). With a budget, a common shift ``delta`` is added to every layer's sparsity and
    each gene takes the level nearest to ``s_i + delta``; ``delta`` is the smallest shift whose
    candidate stays under every upper bound (bisection), so the allocation hits the budget as closely
    as the levels allow (repaired if a lower bound is missed). Without a budget pass ``target`` (mean
    sparsity over the searched blocks). Every linear of a block gets the block's level (also with
    ``sparsity_granularity="linear"``); widths stay dense. If ``report`` is a dict it receives
    ``outlier_ratio``, ``sparsity`` (the unrounded allocation), ``delta`` and ``tokens``.

    >>> from evoprune.space import SearchSpace
    >>> space = SearchSpace.from_model(dict(model_type="llama", num_hidden_layers=3, hidden_size=64,
    ...     num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=100),
    ...     attention=None, mlp=False, sparsity_levels=(0, .4, .5, .6))
    >>> c = owl(space, None, scores={"outlier_ratio": [0.01, 0.03, 0.02]}, target=0.5)
    >>> [lc.sparsity for lc in c.layers]
    [0.6, 0.4, 0.5]
    """
    genes: dict[int, list[Any]] = {}
    for g in space.genes:
        if g.kind == "sparsity" or g.kind.endswith(".sparsity"):
            genes.setdefault(g.layer, []).append(g)
    if not genes:
        raise ValueError("owl allocates sparsity: build the space with sparsity_levels=(0, ..., 0.7).")
    if scores is None:
        if calib_ids is None:
            raise ValueError("owl: pass calib_ids (or precomputed scores=owl_scores(...)).")
        scores = owl_scores(pruner, calib_ids, m=m, batch_size=batch_size)
    ratio = np.asarray(scores["outlier_ratio"], dtype=float)
    if ratio.shape != (space.spec.num_layers,):
        raise ValueError(f"owl: {ratio.shape} outlier ratios for {space.spec.num_layers} blocks.")
    layers = sorted(genes)
    levels = np.asarray(space.sparsity_levels, dtype=float)
    if target is None:
        if not space.budget:
            raise ValueError("owl needs a budget (e.g. Budget(metric='nonzero_params', max_ratio=0.6)) or target=.")
        alloc = owl_allocation(ratio[layers], 0.0, lam=lam)
    else:
        alloc = owl_allocation(ratio[layers], float(target), lam=lam)

    def candidate_at(delta: float) -> Candidate:
        out = {}
        for i, s in zip(layers, alloc):
            k = int(np.abs(levels - np.clip(s + delta, 0.0, levels[-1])).argmin())
            out.update({g.name: k for g in genes[i]})
        return space.candidate_from_levels(out)

    delta = 0.0
    if target is None:
        bounds = space.budget_bounds()

        def under_caps(c: Candidate) -> bool:  # monotone in delta
            return all(hi is None or space.cost(c, metric) <= hi for metric, _lo, hi in bounds)

        lo, hi = -float(levels[-1]) - 1.0, float(levels[-1]) + 1.0 - float(alloc.min())
        if not under_caps(candidate_at(hi)):
            _log.warning("owl: sparsity alone misses the budget; repairing")
            return space.repair(candidate_at(hi), np.random.default_rng(0))
        for _ in range(60):  # smallest delta under the caps
            mid = (lo + hi) / 2
            if under_caps(candidate_at(mid)):
                hi = mid
            else:
                lo = mid
        delta = hi
    cand = candidate_at(delta)
    if space.budget and not space.satisfies_budget(cand):
        _log.warning("owl: the allocation misses a lower budget bound; repairing")
        cand = space.repair(cand, np.random.default_rng(0))
    if report is not None:
        report.update({"outlier_ratio": ratio, "sparsity": alloc + delta, "delta": delta,
                       "tokens": int(scores.get("tokens", 0))})
    _log.info("owl", extra={"fields": {"delta": delta, "tokens": scores.get("tokens", 0)}})
    return cand
