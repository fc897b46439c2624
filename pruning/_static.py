"""The static strategy: a candidate keeps the top-k units of every block as prefix views, no copy.

The pruner has permuted the dense model so heads, KV groups and MLP channels are in descending
calibration importance; keeping the ``k`` most important is then a prefix slice. For every pruned
sublayer, :meth:`StaticStrategy.apply` swaps each linear's parameters for ``nn.Parameter`` views of
the kept slices of the dense weights (a strided 3-D view where the kept query heads of several KV
groups are not contiguous), and sparsity is a Wanda keep-mask (:func:`~._masks.wanda_mask`)
multiplied in the forward, bit-packed in a byte-bounded LRU. :meth:`StaticStrategy.revert` puts
the dense parameters and forwards back. See :mod:`._strategy` for the interface.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..space import Candidate, LayerConfig
from ._masks import MaskCache, pack_mask, unpack_mask, wanda_mask
from ._serve import export_format
from ._strategy import LiveModel, UndoLog

__all__ = ["StaticStrategy"]

_MISSING = object()


@dataclasses.dataclass
class _Part:
    """One logical slice of a (possibly fused) linear, as a view of the dense weight."""

    logical: str  # "q", "k", "v", "o", "gate", "up", "down"
    weight: torch.Tensor  # view of the dense weight (2-D, or 3-D for strided head selections)
    bias: torch.Tensor | None  # view of the dense bias following the kept rows (None: no bias / bias kept whole)
    shape2d: tuple[int, int]
    norm: torch.Tensor  # ||X||_2 of the kept input columns (CPU, fp32)
    key: tuple[Any, ...]  # identifies the kept slice for the mask cache


@dataclasses.dataclass
class _LinearPlan:
    sublayer: str  # "attn" or "mlp"
    name: str  # module attribute name inside the sublayer
    parts: list[_Part]
    bias_sliced: bool  # bias follows the parts' rows (False: kept whole, e.g. o_proj/down_proj)


def _head_view(t: torch.Tensor, off: int, dim: int, kv: int, m: int, G: int, Q: int, hd: int) -> torch.Tensor:
    """Rows (dim 0) or columns (dim 1) of the first ``m`` query heads of the first ``kv`` groups.

    A prefix slice when it is contiguous (``m == Q`` or ``kv == 1``), else a strided 3-D view
    ``[kv, m*hd, in]`` (rows) / ``[out, kv, m*hd]`` (columns)."""
    t = t.narrow(dim, off, G * Q * hd)
    if m == Q or kv == 1:
        return t.narrow(dim, 0, kv * m * hd)
    if dim == 0:
        return t.view(G, Q * hd, *t.shape[1:])[:kv, : m * hd]
    return t.view(t.shape[0], G, Q * hd)[:, :kv, : m * hd]


def _head_index(kv: int, m: int, Q: int, hd: int) -> torch.Tensor:
    """Flat channel indices (in the permuted head layout) of the kept query heads."""
    base = torch.arange(kv).view(kv, 1) * (Q * hd)
    return (base + torch.arange(m * hd).view(1, m * hd)).reshape(-1)


def _make_forward(module: nn.Module, wspecs: list[tuple[str, torch.Tensor | None, tuple[int, int]]],
                  bias_names: list[str] | None):
    """Forward of a sliced Linear: (masked) views, reshaped/concatenated, one ``F.linear``."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        params = module._parameters
        ws = []
        for wname, mask, shp in wspecs:
            w = params[wname]
            if mask is not None:
                w = w * mask
            if w.shape != shp:
                w = w.reshape(shp)
            ws.append(w)
        w = ws[0] if len(ws) == 1 else torch.cat(ws, 0)
        if bias_names is None:
            b = params.get("bias")
        elif not bias_names:
            b = None
        else:
            bs = [params[n].reshape(-1) for n in bias_names]
            b = bs[0] if len(bs) == 1 else torch.cat(bs, 0)
        return F.linear(x, w, b)

    return forward


class StaticStrategy:
    """Top-k prefix views of the permuted dense weights, sparsity as cached Wanda keep-masks.

    Args:
        live: the pruner's :class:`~._strategy.LiveModel`.
        settings: ``None`` (the static mode has no settings).
        mask_cache_bytes: bound of the sparsity-mask LRU; masks are stored bit-packed (default: a
            quarter byte per dense decoder weight, i.e. two dense-sized sets of masks).
    """

    mode: ClassVar[str] = "static"

    def __init__(self, live: LiveModel, settings: Any = None, *, mask_cache_bytes: int | None = None) -> None:
        if settings is not None:
            raise ValueError(f"the static mode has no settings, got {settings!r}.")
        self.live = live
        self.settings = None
        dense_numel = sum(w.numel() for r in live.refs for w in r.weight.values())
        self.mask_cache = MaskCache(mask_cache_bytes if mask_cache_bytes is not None else dense_numel // 4)
        self._undo = UndoLog()
        self._masks: dict[nn.Parameter, torch.Tensor] = {}

    # -- the interface -----------------------------------------------------------------------------
    def check(self, candidate: Candidate) -> None:
        """Every candidate that fits the model applies (the pruner checked the fit)."""

    def apply(self, candidate: Candidate) -> None:
        pattern = candidate.sparsity_pattern
        for i, sublayer, lc in self.live.pruned_sublayers(candidate):
            r = self.live.refs[i]
            for plan in self._plans(i, sublayer, lc):
                self._install(r.linears[plan.name], plan, lc, pattern)

    def revert(self) -> None:
        self._undo.undo()
        self._masks.clear()

    @property
    def masks(self) -> dict[nn.Parameter, torch.Tensor]:
        return dict(self._masks)

    def materialized_linears(self, i: int, sublayer: str, lc: LayerConfig,
                             pattern: str) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """The kept slices of block ``i``'s ``sublayer`` as fresh contiguous tensors, sparsity zeros baked in."""
        r = self.live.refs[i]
        out: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for plan in self._plans(i, sublayer, lc):
            ws, bs = [], []
            for part in plan.parts:
                w, mask = self._kept(part, lc, pattern)
                w = w * mask if mask is not None else w
                ws.append(w.reshape(part.shape2d))
                if part.bias is not None:
                    bs.append(part.bias.reshape(-1))
            weight = torch.cat(ws, 0).contiguous() if len(ws) > 1 else ws[0].clone().contiguous()
            if plan.bias_sliced:
                bias = (torch.cat(bs, 0).contiguous() if len(bs) > 1 else bs[0].clone()) if bs else None
            else:
                dense_bias = r.bias[plan.name]
                bias = None if dense_bias is None else dense_bias.detach().clone().contiguous()
            out[plan.name] = (weight, bias)
        return out

    def export(self, pruner: Any, candidate: Candidate, path: str | os.PathLike[str], *, tokenizer: Any = None,
               format: str = "hf", dtype: str | None = None, **save_kwargs: Any) -> Path:
        """The materialized candidate in ``format`` (see :func:`~._serve.export_format`)."""
        return export_format(pruner, candidate, path, fmt=format, tokenizer=tokenizer, dtype=dtype, **save_kwargs)

    # -- planning ----------------------------------------------------------------------------------
    def _plans(self, i: int, sublayer: str, lc: LayerConfig) -> list[_LinearPlan]:
        """How each linear of block ``i``'s ``sublayer`` is sliced under ``lc``."""
        s, a, r, norms = self.live.spec, self.live.adapter, self.live.refs[i], self.live.input_norms
        G, Q, hd, I = s.num_kv_heads, s.q_per_kv, s.head_dim, s.intermediate_size
        plans: list[_LinearPlan] = []
        if sublayer == "attn":
            kv, m = lc.num_kv_heads, lc.q_per_kv
            nq, nkv = G * Q * hd, G * hd
            x_in = norms["attn_in"][i]

            def q_part(w, b, off):
                return _Part("q", _head_view(w, off, 0, kv, m, G, Q, hd),
                             None if b is None else _head_view(b, off, 0, kv, m, G, Q, hd),
                             (kv * m * hd, w.shape[1]), x_in, (i, "q", kv, m))

            def kv_part(name, w, b, off):
                return _Part(name, w.narrow(0, off, kv * hd), None if b is None else b.narrow(0, off, kv * hd),
                             (kv * hd, w.shape[1]), x_in, (i, name, kv))

            if a.qkv:
                w, b = r.weight[a.qkv].detach(), r.bias[a.qkv]
                b = None if b is None else b.detach()
                plans.append(_LinearPlan("attn", a.qkv, [q_part(w, b, 0), kv_part("k", w, b, nq),
                                                         kv_part("v", w, b, nq + nkv)], True))
            else:
                for name, maker in ((a.q, None), (a.k, "k"), (a.v, "v")):
                    w, b = r.weight[name].detach(), r.bias[name]
                    b = None if b is None else b.detach()
                    part = q_part(w, b, 0) if maker is None else kv_part(maker, w, b, 0)
                    plans.append(_LinearPlan("attn", name, [part], True))
            wo = r.weight[a.o].detach()
            cols = _head_index(kv, m, Q, hd)
            plans.append(_LinearPlan("attn", a.o, [_Part(
                "o", _head_view(wo, 0, 1, kv, m, G, Q, hd), None, (wo.shape[0], kv * m * hd),
                norms["o_in"][i][cols], (i, "o", kv, m))], False))
        else:
            mc = lc.mlp_channels
            x_in = norms["mlp_in"][i]

            def row_part(name, w, b, off):
                return _Part(name, w.narrow(0, off, mc), None if b is None else b.narrow(0, off, mc),
                             (mc, w.shape[1]), x_in, (i, name, mc))

            if a.gate_up:
                w, b = r.weight[a.gate_up].detach(), r.bias[a.gate_up]
                b = None if b is None else b.detach()
                plans.append(_LinearPlan("mlp", a.gate_up, [row_part("gate", w, b, 0), row_part("up", w, b, I)], True))
            else:
                for name, logical in ((a.gate, "gate"), (a.up, "up")):
                    w, b = r.weight[name].detach(), r.bias[name]
                    b = None if b is None else b.detach()
                    plans.append(_LinearPlan("mlp", name, [row_part(logical, w, b, 0)], True))
            wd = r.weight[a.down].detach()
            plans.append(_LinearPlan("mlp", a.down, [_Part(
                "down", wd.narrow(1, 0, mc), None, (wd.shape[0], mc), norms["down_in"][i][:mc],
                (i, "down", mc))], False))
        return plans

    def _kept(self, part: _Part, lc: LayerConfig, pattern: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What a kept slice holds: ``(weight, keep-mask or None)``, the weight shaped like ``part.weight``
        or ``part.shape2d``. Here the dense view and its Wanda mask; the one place to override for
        other weights of the same slices (e.g. stored, compensated ones)."""
        return part.weight, self._mask(part, lc.sparsity_of(part.logical), pattern)

    def _mask(self, part: _Part, level: float, pattern: str) -> torch.Tensor | None:
        """Keep-mask of ``part`` (shaped like ``part.weight``) at ``level``; bit-packed in an LRU."""
        if level <= 0:
            return None
        key = part.key + (float(level), pattern, str(part.weight.device))
        hit, packed = self.mask_cache.get(key)
        if hit:
            return None if packed is None else unpack_mask(*packed)
        mask = wanda_mask(part.weight.reshape(part.shape2d), part.norm, level, pattern)
        if mask is not None:
            mask = mask.reshape(part.weight.shape)
        self.mask_cache.put(key, None if mask is None else pack_mask(mask))
        return mask

    def _install(self, module: nn.Module, plan: _LinearPlan, lc: LayerConfig, pattern: str) -> None:
        """Swap ``module``'s parameters for views of the kept slices (+ masks in the forward)."""
        old_params = dict(module._parameters)
        old_forward = module.__dict__.get("forward", _MISSING)
        old_features = (module.in_features, module.out_features)
        dense_w = old_params["weight"]
        single = len(plan.parts) == 1
        new_params: dict[str, nn.Parameter | None] = {}
        wspecs: list[tuple[str, torch.Tensor | None, tuple[int, int]]] = []
        bias_names: list[str] | None = [] if plan.bias_sliced else None
        needs_forward = not single
        for part in plan.parts:
            wname = "weight" if single else f"weight_{part.logical}"
            weight, mask = self._kept(part, lc, pattern)
            p = nn.Parameter(weight, requires_grad=dense_w.requires_grad)
            new_params[wname] = p
            if mask is not None:
                self._masks[p] = mask
                needs_forward = True
            if tuple(weight.shape) != part.shape2d:
                needs_forward = True
            wspecs.append((wname, mask, part.shape2d))
            if plan.bias_sliced and part.bias is not None:
                bname = "bias" if single else f"bias_{part.logical}"
                bp = old_params["bias"]
                new_params[bname] = nn.Parameter(part.bias, requires_grad=bp.requires_grad)
                bias_names.append(bname)  # type: ignore[union-attr]
                if part.bias.dim() != 1:
                    needs_forward = True
        if plan.bias_sliced:
            if not bias_names:
                new_params["bias"] = None
        else:
            new_params["bias"] = old_params.get("bias")
        module._parameters.clear()
        module._parameters.update(new_params)
        module.out_features = sum(p.shape2d[0] for p in plan.parts) if plan.bias_sliced else plan.parts[0].shape2d[0]
        module.in_features = plan.parts[0].shape2d[1]
        if needs_forward:
            module.forward = _make_forward(module, wspecs, bias_names)

        def undo() -> None:
            for p in list(module._parameters.values()):
                self._masks.pop(p, None)
            module._parameters.clear()
            module._parameters.update(old_params)
            module.in_features, module.out_features = old_features
            if old_forward is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.forward = old_forward

        self._undo.push(undo)
