"""The pruning backend: score once, permute once, then apply candidates in place.

:class:`Pruner` keeps scoring, permutation, planning and applied mode here;
``materialize``/``export`` come from :mod:`._export`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._logging import get_logger
from .._paths import cache_write_failed
from ..space import Candidate, ModelSpec
from . import _importance as imp
from ._adapters import ArchAdapter, get_adapter
from ._export import EXPORT_FORMAT_VERSION, ExportMixin
from ._masks import MaskCache, pack_mask, unpack_mask, wanda_mask
from ._modules import DroppedAttention, DroppedMLP

__all__ = ["Pruner", "EXPORT_FORMAT_VERSION"]

_log = get_logger("pruning")
_MISSING = object()


@dataclasses.dataclass
class _LayerRefs:
    """The dense modules and parameters of one block, captured before any apply."""

    layer: nn.Module
    attn: nn.Module
    mlp: nn.Module
    attn_norm: nn.Module
    mlp_norm: nn.Module
    linears: dict[str, nn.Module]  # module attribute name -> Linear (attention and MLP)
    weight: dict[str, nn.Parameter]
    bias: dict[str, nn.Parameter | None]


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


class Pruner(ExportMixin):
    """Importance-ordered, copy-free pruning of a dense causal LM.

    On construction the pruner scores KV groups, query heads and MLP channels (from
    calibration tokens, or from weight magnitudes without them), caches the scores on
    disk when ``cache_dir`` is given, and then **permutes the dense model in place**
    (function-preserving) so that heads and channels are in descending importance:
    keeping the top ``k`` is then a prefix slice.

    Args:
        model: a transformers causal LM of a supported architecture (see
            :func:`~evoprune.pruning.get_adapter`), on any device(s) and dtype.
        calib_ids: calibration tokens, a ``LongTensor [n_sequences, seq_len]``; the sequence
            length is whatever you pass (never the model's maximum). ``None`` falls back to
            magnitude scores.
        method: ``"activation"`` (default), ``"magnitude"`` or ``"taylor"``.
        cache_dir: directory for the score cache (``None``: no disk cache). Entries are keyed by
            the model and data fingerprints, the method and the calibration shape.
        model_fingerprint, data_fingerprint: identities of the model and the calibration data
            (e.g. the study's fingerprints); computed cheaply from the model/tokens when omitted.
        calib_batch_size: sequences per calibration forward.
        mask_cache_bytes: bound of the sparsity-mask LRU; masks are stored bit-packed (default:
            a quarter byte per dense decoder weight, i.e. two dense-sized sets of masks).
        importance: precomputed scores to use instead of computing them (no cache).

    :meth:`set_mode` ``("probe", ProbeSettings(...))`` switches to Probe Pruning: the candidate's widths
    are then applied per batch, the kept units chosen by PP (see :mod:`evoprune.pruning._probe`).

    Example::

        pruner = Pruner(model, calib_ids, cache_dir="~/.cache/evoprune")
        with pruner.applied(candidate):          # in place, no copy
            logits = model(ids).logits
        small = pruner.materialize(candidate)    # a new, physically smaller model
        pruner.export(candidate, "out/", tokenizer=tok)
        again = load_pruned("out/")              # in any process
    """

    def __init__(
        self,
        model: nn.Module,
        calib_ids: torch.Tensor | None = None,
        *,
        method: str = "activation",
        cache_dir: str | os.PathLike[str] | None = None,
        model_fingerprint: str | None = None,
        data_fingerprint: str | None = None,
        calib_batch_size: int = 8,
        mask_cache_bytes: int | None = None,
        importance: imp.Importance | None = None,
    ) -> None:
        if method not in imp.IMPORTANCE_METHODS:
            raise ValueError(f"Pruner: method must be one of {imp.IMPORTANCE_METHODS}, got {method!r}.")
        if calib_batch_size < 1:
            raise ValueError(f"Pruner: calib_batch_size must be >= 1, got {calib_batch_size}.")
        if getattr(model, "_evoprune_permuted", False):
            raise ValueError(
                "Pruner: this model was already permuted by another Pruner; reuse that Pruner "
                "(a model is scored and reordered once)."
            )
        if getattr(getattr(model, "config", None), "is_heterogeneous", False):
            raise ValueError(
                "Pruner: this model is already non-uniform (its config has a per_layer_config, e.g. an "
                "evoprune export); prune the dense model instead."
            )
        self.adapter: ArchAdapter = get_adapter(model)
        self.model = model
        self.spec = ModelSpec.from_config(model.config)
        if calib_ids is None and method == "activation":
            _log.info("no calibration tokens: using magnitude importance")
            method = "magnitude"
        if calib_ids is None and method == "taylor":
            raise ValueError("Pruner: method='taylor' needs calib_ids.")
        self.method = method
        calib_shape = tuple(calib_ids.shape) if calib_ids is not None else None
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        if model_fingerprint is None:  # of the dense model, before the permutation (exports record it)
            model_fingerprint = imp.model_fingerprint(model)
        if calib_ids is not None and data_fingerprint is None:
            data_fingerprint = imp.data_fingerprint(calib_ids)
        self.model_fingerprint = model_fingerprint
        self.data_fingerprint = data_fingerprint if calib_ids is not None else None
        self.cache_hit = False
        self.cache_path: Path | None = None
        self._calib_ids, self._calib_batch_size = calib_ids, calib_batch_size  # for the probe mode's history
        self.mode = "static"
        self._probe: Any = None
        if importance is not None:  # given scores (e.g. a loaded probe export: identity order)
            self.cache_dir = None
        if self.cache_dir is not None:
            key = imp.cache_key(
                model_fp=str(model_fingerprint), data_fp=str(self.data_fingerprint or "none"),
                method=method, calib_shape=calib_shape,
            )
            self.cache_path = self.cache_dir / f"importance-{key}.safetensors"
            if self.cache_path.exists():
                try:
                    importance = imp.Importance.load(self.cache_path)
                    self.cache_hit = True
                    _log.info("importance cache hit", extra={"fields": {"path": str(self.cache_path)}})
                except Exception as exc:  # a corrupt or foreign file: recompute and overwrite
                    _log.warning("ignoring unreadable importance cache %s (%s)", self.cache_path, exc)
        if importance is None:
            importance = imp.compute_importance(model, self.adapter, self.spec, calib_ids, method, calib_batch_size)
            if self.cache_path is not None:
                try:
                    importance.save(self.cache_path, metadata={"model_fingerprint": str(model_fingerprint),
                                                               "data_fingerprint": str(self.data_fingerprint)})
                except Exception as exc:  # a full or read-only cache: the scores are in memory
                    if not cache_write_failed(exc):
                        raise
                    _log.warning("could not write the importance cache %s (%s); continuing without it",
                                 self.cache_path, str(exc).strip().splitlines()[0][:200])
        self._check_importance(importance)
        self.importance: imp.Importance = importance

        layers = imp.decoder_layers(model, self.adapter)
        self._layers_parent, _, self._layers_attr = self.adapter.layers.rpartition(".")
        self._refs = [self._collect(layer) for layer in layers]
        types = getattr(model.config, "layer_types", None)
        self._dense_layer_types = tuple(types) if types is not None else None
        self._permute()
        model._evoprune_permuted = True
        dense_numel = sum(w.numel() for r in self._refs for w in r.weight.values())
        self._mask_cache = MaskCache(mask_cache_bytes if mask_cache_bytes is not None else dense_numel // 4)
        self._undo: list[Any] = []
        self._candidate: Candidate | None = None
        self._masks: dict[nn.Parameter, torch.Tensor] = {}

    # -- setup -------------------------------------------------------------------------------------
    def _check_importance(self, importance: imp.Importance) -> None:
        s = self.spec
        want = {
            "kv_group": (s.num_layers, s.num_kv_heads),
            "q_head": (s.num_layers, s.num_kv_heads, s.q_per_kv),
            "mlp_channel": (s.num_layers, s.intermediate_size),
        }
        for name, shape in want.items():
            got = tuple(getattr(importance, name).shape)
            if got != shape:
                raise ValueError(f"importance {name} has shape {got}, the model needs {shape}.")

    def _collect(self, layer: nn.Module) -> _LayerRefs:
        a = self.adapter
        attn, mlp = getattr(layer, a.attn), getattr(layer, a.mlp)
        linears: dict[str, nn.Module] = {}
        for n in a.attn_linears:
            linears[n] = getattr(attn, n)
        for n in a.mlp_linears:
            linears[n] = getattr(mlp, n)
        for n, mod in linears.items():
            if not isinstance(mod, nn.Linear):
                raise TypeError(f"expected {n} to be an nn.Linear, got {type(mod).__name__}.")
        return _LayerRefs(
            layer=layer,
            attn=attn,
            mlp=mlp,
            attn_norm=getattr(layer, a.attn_norm),
            mlp_norm=getattr(layer, a.mlp_norm),
            linears=linears,
            weight={n: m.weight for n, m in linears.items()},
            bias={n: m.bias for n, m in linears.items()},
        )

    @torch.no_grad()
    def _permute(self) -> None:
        """Reorder heads and channels by descending importance (in place, storage kept)."""
        s, a = self.spec, self.adapter
        G, Q, hd, I = s.num_kv_heads, s.q_per_kv, s.head_dim, s.intermediate_size
        nq, nkv = G * Q * hd, G * hd
        kv_order, q_order, mlp_order = self.importance.orders()
        ar = torch.arange(hd)
        norms = {k: v.clone() for k, v in self.importance.input_norms.items()}
        for i, r in enumerate(self._refs):
            heads = (kv_order[i].view(G, 1) * Q + q_order[i][kv_order[i]]).reshape(-1)  # new head -> old head
            q_rows = (heads.view(-1, 1) * hd + ar).reshape(-1)
            kv_rows = (kv_order[i].view(-1, 1) * hd + ar).reshape(-1)
            ch = mlp_order[i]
            if a.qkv:
                self._index_(r, a.qkv, 0, torch.cat([q_rows, nq + kv_rows, nq + nkv + kv_rows]))
            else:
                self._index_(r, a.q, 0, q_rows)
                self._index_(r, a.k, 0, kv_rows)
                self._index_(r, a.v, 0, kv_rows)
            self._index_(r, a.o, 1, q_rows)
            if a.gate_up:
                self._index_(r, a.gate_up, 0, torch.cat([ch, I + ch]))
            else:
                self._index_(r, a.gate, 0, ch)
                self._index_(r, a.up, 0, ch)
            self._index_(r, a.down, 1, ch)
            norms["o_in"][i] = norms["o_in"][i][q_rows]
            norms["down_in"][i] = norms["down_in"][i][ch]
        self._norms = norms  # in the permuted order

    @staticmethod
    def _index_(r: _LayerRefs, name: str, dim: int, idx: torch.Tensor) -> None:
        w = r.weight[name]
        w.data.copy_(w.data.index_select(dim, idx.to(w.device)))
        b = r.bias[name]
        if b is not None and dim == 0:
            b.data.copy_(b.data.index_select(0, idx.to(b.device)))

    # -- planning ----------------------------------------------------------------------------------
    def _plans(self, i: int, sublayer: str, lc: Any) -> list[_LinearPlan]:
        """How each linear of block ``i``'s ``sublayer`` is sliced under ``lc``."""
        s, a, r = self.spec, self.adapter, self._refs[i]
        G, Q, hd, I = s.num_kv_heads, s.q_per_kv, s.head_dim, s.intermediate_size
        plans: list[_LinearPlan] = []
        if sublayer == "attn":
            kv, m = lc.num_kv_heads, lc.q_per_kv
            nq, nkv = G * Q * hd, G * hd
            x_in = self._norms["attn_in"][i]

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
                self._norms["o_in"][i][cols], (i, "o", kv, m))], False))
        else:
            mc = lc.mlp_channels
            x_in = self._norms["mlp_in"][i]

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
                "down", wd.narrow(1, 0, mc), None, (wd.shape[0], mc), self._norms["down_in"][i][:mc],
                (i, "down", mc))], False))
        return plans

    def _mask(self, part: _Part, level: float, pattern: str) -> torch.Tensor | None:
        """Keep-mask of ``part`` (shaped like ``part.weight``) at ``level``; bit-packed in an LRU."""
        if level <= 0:
            return None
        key = part.key + (float(level), pattern, str(part.weight.device))
        hit, packed = self._mask_cache.get(key)
        if hit:
            return None if packed is None else unpack_mask(*packed)
        mask = wanda_mask(part.weight.reshape(part.shape2d), part.norm, level, pattern)
        if mask is not None:
            mask = mask.reshape(part.weight.shape)
        self._mask_cache.put(key, None if mask is None else pack_mask(mask))
        return mask

    def _is_dense(self, lc: Any, sublayer: str) -> bool:
        s = self.spec
        if sublayer == "attn":
            return (lc.num_kv_heads == s.num_kv_heads and lc.q_per_kv == s.q_per_kv
                    and all(lc.sparsity_of(n) == 0 for n in ("q", "k", "v", "o")))
        return lc.mlp_channels == s.intermediate_size and all(lc.sparsity_of(n) == 0 for n in ("gate", "up", "down"))

    # -- applied mode ------------------------------------------------------------------------------
    @property
    def candidate(self) -> Candidate | None:
        """The applied candidate (``None`` when the dense model is live)."""
        return self._candidate

    @property
    def is_applied(self) -> bool:
        return self._candidate is not None

    @property
    def masks(self) -> dict[nn.Parameter, torch.Tensor]:
        """After :meth:`apply`: ``{live weight parameter: bool keep-mask of the same shape}`` for every
        sparse linear part (fine-tuning code multiplies gradients/weights by these)."""
        return dict(self._masks)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The live parameters of the applied model, by name: the kept slices (views sharing the dense
        storage) of pruned linears plus every untouched parameter of kept structure (norms,
        embeddings, head). Dropped sublayers and blocks contribute nothing.

        Updating them in place changes the dense weights' storage: back them up before
        fine-tuning and restore them before :meth:`revert` (``evoprune.evaluators`` does).
        Without an applied candidate these are the dense model's parameters.
        """
        return dict(self.model.named_parameters())

    def _set(self, obj: Any, name: str, value: Any) -> None:
        """``setattr`` with an undo record (restores the exact previous state)."""
        if isinstance(obj, nn.Module) and name in obj._modules:
            old_mod = obj._modules[name]
            obj._modules[name] = value
            self._undo.append(lambda: obj._modules.__setitem__(name, old_mod))
            return
        if isinstance(obj, nn.Module):
            old = obj.__dict__.get(name, _MISSING)  # instance attribute, not a class default
        else:
            old = getattr(obj, name, _MISSING)
        setattr(obj, name, value)

        def undo() -> None:
            if old is _MISSING:
                try:
                    delattr(obj, name)
                except AttributeError:
                    pass
            else:
                setattr(obj, name, old)

        self._undo.append(undo)

    def apply(self, candidate: Candidate) -> nn.Module:
        """Turn the live model into ``candidate`` in place (reverting any previous candidate).

        No weight is copied: pruned linears get ``nn.Parameter`` views of their kept prefix
        slices, sparsity is a keep-mask applied in the forward, dropped sublayers are replaced
        by zero-returning modules, dropped blocks are taken out of the layer list, and
        attention attributes (``num_key_value_groups``, KV-cache ``layer_idx``, ...) are set.
        Returns the model. Raises ``ValueError`` when ``candidate`` does not fit the model
        (see :meth:`ModelSpec.check_candidate`, e.g. 2:4 sparsity on a width not divisible by 4).
        """
        if not isinstance(candidate, Candidate):
            raise TypeError(f"Pruner.apply expects a Candidate, got {type(candidate).__name__}.")
        self.spec.check_candidate(candidate)
        if self._probe is not None and candidate.has_sparsity:
            raise ValueError("Pruner.apply: the probe mode prunes heads and channels per batch and has no sparsity "
                             "masks; use a candidate without sparsity or pruner.set_mode('static').")
        self.revert()
        try:
            self._apply(candidate)
        except BaseException:
            self._candidate = candidate
            self.revert()
            raise
        self._candidate = candidate
        return self.model

    def _apply(self, candidate: Candidate) -> None:
        a, pattern = self.adapter, candidate.sparsity_pattern
        kept_layers = []
        attn_index = 0
        for i, (r, lc) in enumerate(zip(self._refs, candidate.layers)):
            if lc.dropped:
                continue
            kept_layers.append(r.layer)
            if lc.attn_dropped:
                self._set(r.layer, a.attn, DroppedAttention())
                self._set(r.layer, a.attn_norm, nn.Identity())
            else:
                if getattr(r.attn, "layer_idx", attn_index) != attn_index:
                    self._set(r.attn, "layer_idx", attn_index)
                attn_index += 1
                if not self._is_dense(lc, "attn"):
                    if self._probe is not None:
                        self._probe.install(i, "attn", lc)
                    else:
                        for plan in self._plans(i, "attn", lc):
                            self._install(r.linears[plan.name], plan, lc, pattern)
                    self._set_head_attrs(r.attn, lc)
            if lc.mlp_dropped:
                self._set(r.layer, a.mlp, DroppedMLP())
                self._set(r.layer, a.mlp_norm, nn.Identity())
            elif not self._is_dense(lc, "mlp"):
                if self._probe is not None:
                    self._probe.install(i, "mlp", lc)
                else:
                    for plan in self._plans(i, "mlp", lc):
                        self._install(r.linears[plan.name], plan, lc, pattern)
        if len(kept_layers) != len(self._refs):
            parent = self.model.get_submodule(self._layers_parent)
            self._set(parent, self._layers_attr, nn.ModuleList(kept_layers))
            cfg = self.model.config
            kept = candidate.kept_layers
            self._set(cfg, "num_hidden_layers", len(kept))
            types = getattr(cfg, "layer_types", None)
            if types is not None:
                self._set(cfg, "layer_types", [types[i] for i in kept])
        if self._probe is not None:
            self._probe.start(candidate)

    def _set_head_attrs(self, attn: nn.Module, lc: Any) -> None:
        values = {
            "num_key_value_groups": lc.q_per_kv,
            "num_key_value_heads": lc.num_kv_heads,
            "num_heads": lc.num_q_heads,
        }
        for attr in self.adapter.attn_head_attrs:
            if hasattr(attn, attr):
                self._set(attn, attr, values[attr])
        if self.adapter.attn_reads_config_heads:
            cfg = copy.copy(attn.config)
            cfg.num_attention_heads = lc.num_q_heads
            cfg.num_key_value_heads = lc.num_kv_heads
            self._set(attn, "config", cfg)

    def _install(self, module: nn.Module, plan: _LinearPlan, lc: Any, pattern: str) -> None:
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
            p = nn.Parameter(part.weight, requires_grad=dense_w.requires_grad)
            new_params[wname] = p
            mask = self._mask(part, lc.sparsity_of(part.logical), pattern)
            if mask is not None:
                self._masks[p] = mask
                needs_forward = True
            if tuple(part.weight.shape) != part.shape2d:
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

        self._undo.append(undo)

    # -- modes -------------------------------------------------------------------------------------
    def set_mode(self, mode: str, probe: Any = None, *, history: Any = None) -> None:
        """``"static"`` (default: keep the top-k units by calibration importance) or ``"probe"``
        (choose the kept units per batch by Probe Pruning, see :mod:`evoprune.pruning._probe`; ``probe``
        is a :class:`~evoprune.space.ProbeSettings` or its dict). Reverts any applied candidate; the
        probe mode computes its calibration history here (one dense pass over the calibration tokens)."""
        from ..space._mode import resolve_mode
        from ._probe import ProbeMode

        settings = resolve_mode(mode, probe if mode == "probe" else None, sparsity=False)
        self.revert()
        if mode == "static":
            self._probe = None
        else:  # the last probe mode is kept: switching back with the same settings reuses its history
            last = getattr(self, "_last_probe", None)
            if last is None or last.settings != settings or history is not None:
                last = ProbeMode(self, settings, history, batch_size=self._calib_batch_size)
            self._probe = self._last_probe = last
        self.mode = mode

    @property
    def probe(self) -> Any:
        """The :class:`~evoprune.pruning._probe.ProbeMode` in probe mode (``hold()``, ``selections()``), else ``None``."""
        return self._probe

    def materialize(self, candidate: Candidate) -> nn.Module:
        if self._probe is not None:
            raise ValueError("Pruner.materialize: a probe-mode candidate has no fixed smaller model (its units change "
                             "per batch); export it (dense weights + widths + PP settings) or set_mode('static').")
        return super().materialize(candidate)

    materialize.__doc__ = ExportMixin.materialize.__doc__

    def export(self, candidate: Candidate, path: str | os.PathLike[str], tokenizer: Any = None, **save_kwargs: Any) -> Path:
        if self._probe is not None:  # dense weights + candidate + PP settings + history; load_pruned prunes per batch
            from .. import __version__
            from ._probe import export_probe

            if save_kwargs.pop("format", "hf") != "hf" or save_kwargs.pop("dtype", None) is not None:
                raise ValueError("Pruner.export: a probe-mode candidate exports as an HF folder with the dense weights "
                                 "(format='hf', no dtype); GGUF / Nemotron-NAS need a static candidate (set_mode('static')).")

            return export_probe(self, candidate, path, tokenizer=tokenizer, format_version=EXPORT_FORMAT_VERSION,
                                evoprune_version=__version__, **save_kwargs)
        return super().export(candidate, path, tokenizer=tokenizer, **save_kwargs)

    export.__doc__ = ExportMixin.export.__doc__

    def revert(self) -> nn.Module:
        """Restore the dense (permuted) model exactly; a no-op when nothing is applied."""
        while self._undo:
            self._undo.pop()()
        self._masks.clear()
        self._candidate = None
        return self.model

    @contextlib.contextmanager
    def applied(self, candidate: Candidate) -> Iterator[nn.Module]:
        """``with pruner.applied(candidate) as model: ...`` -- always reverts on exit."""
        self.apply(candidate)
        try:
            yield self.model
        finally:
            self.revert()

    def __repr__(self) -> str:
        state = f"applied={self._candidate.key}" if self._candidate is not None else "dense"
        return f"Pruner(model_type={self.spec.model_type!r}, method={self.method!r}, {state})"

