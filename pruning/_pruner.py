"""The pruning backend: score once, permute once, then apply candidates in place.

:class:`Pruner` keeps scoring, permutation and a candidate's structure (dropped blocks and
sublayers, KV-cache ``layer_idx``, head counts) here; the pruned sublayers go to the strategy of
the pruner's mode (:data:`STRATEGIES`, the interface in :mod:`._strategy`);
``materialize``/``export`` come from :mod:`._export`.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._logging import get_logger
from .._paths import cache_folder, cache_write_failed
from ..space import Candidate, ModelSpec, resolve_mode
from . import _importance as imp
from ._adapters import ArchAdapter, get_adapter
from ._export import ExportMixin
from ._levels import LevelSettings, LevelStrategy
from ._linear import DEFAULT_RIDGE, LinearFits, fitted_linear
from ._modules import DroppedAttention, DroppedMLP, LinearReplacement
from ._probe import ProbeStrategy
from ._static import StaticStrategy
from ._strategy import LayerRefs, LiveModel, Strategy, UndoLog, collect_refs

__all__ = ["Pruner", "STRATEGIES"]

_log = get_logger("pruning")

STRATEGIES: dict[str, type] = {StaticStrategy.mode: StaticStrategy, ProbeStrategy.mode: ProbeStrategy}
"""The strategy of every pruning mode (``evoprune.space.PRUNING_MODES``): its class, made by
:meth:`Pruner.set_mode` as ``cls(live_model, settings, **options)``."""


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
        linear_ridge: ridge of the fitted linear replacements (``linear`` levels, :mod:`._linear`), relative
            to the mean diagonal of ``X^T X``; 0 is plain least squares.

    :meth:`set_mode` ``("probe", ProbeSettings(...))`` switches to Probe Pruning: the candidate's widths
    are then applied per batch, the kept units chosen by PP (see :mod:`evoprune.pruning._probe`).
    Each mode is a strategy (:data:`STRATEGIES`; the interface is in :mod:`evoprune.pruning._strategy`).

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
        linear_ridge: float = DEFAULT_RIDGE,
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
        self._refs: list[LayerRefs] = [collect_refs(layer, self.adapter) for layer in layers]
        types = getattr(model.config, "layer_types", None)
        self._dense_layer_types = tuple(types) if types is not None else None
        norms = self._permute()
        model._evoprune_permuted = True
        self._live = LiveModel(model=model, adapter=self.adapter, spec=self.spec, refs=self._refs, input_norms=norms,
                               calib_ids=calib_ids, calib_batch_size=calib_batch_size,
                               model_fingerprint=self.model_fingerprint, data_fingerprint=self.data_fingerprint,
                               cache_dir=Path(cache_dir).expanduser() if cache_dir is not None else None)
        self._linear = LinearFits(model, self.adapter, self._refs, calib_ids, batch_size=calib_batch_size,
                                  ridge=linear_ridge,
                                  key={"model_fingerprint": str(self.model_fingerprint),
                                       "data_fingerprint": str(self.data_fingerprint)},
                                  folder=cache_folder("levels", self.cache_dir.parent)
                                  if self.cache_dir is not None else None)
        self._linear_modules: dict[tuple[int, str, int], LinearReplacement] = {}
        self._undo = UndoLog()  # the structure of the applied candidate (the strategy keeps its own)
        self._candidate: Candidate | None = None
        self.mode = "static"
        self._strategy: Strategy = StaticStrategy(self._live, None, mask_cache_bytes=mask_cache_bytes)
        self._strategies: dict[str, Strategy] = {self.mode: self._strategy}  # one per mode, reused
        self._level_strategies: list[LevelStrategy] = []  # every level database opened (use_levels)

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

    @torch.no_grad()
    def _permute(self) -> dict[str, torch.Tensor]:
        """Reorder heads and channels by descending importance (in place, storage kept); the input
        norms in the new order."""
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
        return norms

    @staticmethod
    def _index_(r: LayerRefs, name: str, dim: int, idx: torch.Tensor) -> None:
        w = r.weight[name]
        w.data.copy_(w.data.index_select(dim, idx.to(w.device)))
        b = r.bias[name]
        if b is not None and dim == 0:
            b.data.copy_(b.data.index_select(0, idx.to(b.device)))

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
        sparse linear part (fine-tuning code multiplies gradients/weights by these); the strategy's."""
        return self._strategy.masks

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The live parameters of the applied model, by name: the kept slices (views sharing the dense
        storage) of pruned linears plus every untouched parameter of kept structure (norms,
        embeddings, head). Dropped sublayers and blocks contribute nothing.

        Updating them in place changes the dense weights' storage: back them up before
        fine-tuning and restore them before :meth:`revert` (``evoprune.evaluators`` does).
        Without an applied candidate these are the dense model's parameters.
        """
        return dict(self.model.named_parameters())

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
        self._strategy.check(candidate)
        if candidate.has_linear and self.mode != "static":
            raise ValueError(f"Pruner.apply: linear levels need the static mode (this pruner is in {self.mode!r} mode).")
        self.revert()
        if candidate.has_linear:  # fitted on the dense model, once per block and part
            self._linear.ensure(self.linear_parts(candidate))
        try:
            self._strategy.apply(candidate)  # on the dense model, then the structure
            self._apply_structure(candidate)
        except BaseException:
            self._candidate = candidate
            self.revert()
            raise
        self._candidate = candidate
        return self.model

    def _apply_structure(self, candidate: Candidate) -> None:
        """Dropped blocks and sublayers, compact attention ``layer_idx``, head counts of pruned attention."""
        a, live = self.adapter, self._live
        kept_layers = []
        attn_index = 0
        for i, (r, lc) in enumerate(zip(self._refs, candidate.layers)):
            if lc.dropped:
                continue
            kept_layers.append(r.layer)
            slot = ("block", lc.block_linear) if lc.block_linear else ("attn", lc.attn_linear)
            if slot[1]:  # the attention slot holds a fitted map of the attention-normed input
                self._undo.set(r.layer, a.attn, self.linear_module(i, *slot))
            elif lc.attn_dropped:
                self._undo.set(r.layer, a.attn, DroppedAttention())
                self._undo.set(r.layer, a.attn_norm, nn.Identity())
            else:
                if getattr(r.attn, "layer_idx", attn_index) != attn_index:
                    self._undo.set(r.attn, "layer_idx", attn_index)
                attn_index += 1
                if not live.is_dense(lc, "attn"):
                    self._set_head_attrs(r.attn, lc)
            if lc.mlp_linear:
                self._undo.set(r.layer, a.mlp, self.linear_module(i, "mlp", lc.mlp_linear))
            elif lc.mlp_dropped:
                self._undo.set(r.layer, a.mlp, DroppedMLP())
                self._undo.set(r.layer, a.mlp_norm, nn.Identity())
        if len(kept_layers) != len(self._refs):
            parent = self.model.get_submodule(self._layers_parent)
            self._undo.set(parent, self._layers_attr, nn.ModuleList(kept_layers))
            cfg = self.model.config
            kept = candidate.kept_layers
            self._undo.set(cfg, "num_hidden_layers", len(kept))
            types = getattr(cfg, "layer_types", None)
            if types is not None:
                self._undo.set(cfg, "layer_types", [types[i] for i in kept])

    # -- linear replacements -----------------------------------------------------------------------
    @staticmethod
    def linear_parts(candidate: Candidate) -> list[tuple[int, str]]:
        """``(block, part)`` of every fitted linear map of ``candidate`` (part ``"attn"``, ``"mlp"``, ``"block"``)."""
        out = []
        for i, lc in enumerate(candidate.layers):
            out += [(i, part) for part in ("attn", "mlp", "block") if getattr(lc, f"{part}_linear")]
        return out

    def linear_module(self, i: int, part: str, rank: int) -> LinearReplacement:
        """The :class:`LinearReplacement` of block ``i``'s ``part`` at ``rank`` (fitted on first use, reused)."""
        key = (i, part, rank)
        mod = self._linear_modules.get(key)
        if mod is None:
            ref = self._refs[i].weight[next(iter(self._refs[i].weight))]
            weights = fitted_linear(self._linear, i, part, rank, dtype=ref.dtype, device=ref.device)
            mod = LinearReplacement.from_weights(weights, attention=part != "mlp")
            self._linear_modules[key] = mod
        return mod

    def linear_residual_share(self, i: int, part: str) -> float:
        """The full-rank fit's residual share ``|Y - XA|^2 / |Y|^2`` on the calibration tokens (fits it if needed)."""
        self._linear.ensure([(i, part)])
        return self._linear.residual_share(i, part)

    def _set_head_attrs(self, attn: nn.Module, lc: Any) -> None:
        values = {
            "num_key_value_groups": lc.q_per_kv,
            "num_key_value_heads": lc.num_kv_heads,
            "num_heads": lc.num_q_heads,
        }
        for attr in self.adapter.attn_head_attrs:
            if hasattr(attn, attr):
                self._undo.set(attn, attr, values[attr])
        if self.adapter.attn_reads_config_heads:
            cfg = copy.copy(attn.config)
            cfg.num_attention_heads = lc.num_q_heads
            cfg.num_key_value_heads = lc.num_kv_heads
            self._undo.set(attn, "config", cfg)

    # -- modes -------------------------------------------------------------------------------------
    def set_mode(self, mode: str, settings: Any = None, **options: Any) -> None:
        """Switch the pruning mode: ``"static"`` (default: keep the top-k units by calibration importance)
        or ``"probe"`` (choose the kept units per batch by Probe Pruning, see :mod:`evoprune.pruning._probe`;
        ``settings`` is a :class:`~evoprune.space.ProbeSettings` or its dict, default settings when ``None``).

        Reverts any applied candidate. ``options`` go to the mode's strategy (the probe's ``history=``:
        per-block calibration history, e.g. from an export). A mode's strategy is kept and reused while
        its settings stay the same (the probe mode computes its calibration history once, with one
        dense pass over the calibration tokens)."""
        settings = resolve_mode(mode, settings, sparsity=False)
        self.revert()
        strategy = self._strategies.get(mode)
        if strategy is None or strategy.settings != settings or options:
            strategy = STRATEGIES[mode](self._live, settings, **options)
            self._strategies[mode] = strategy
        self._strategy = strategy
        self.mode = mode

    def use_levels(self, settings: LevelSettings | None, *, cache_dir: str | os.PathLike[str] | None = None,
                   progress: bool = False) -> None:
        """Take the static mode's kept slices from a level database (:class:`~._levels.LevelSettings`:
        SparseGPT / Wanda / magnitude sparsity, OBS-compensated widths), built now unless it is already
        in ``cache_dir`` (the folder of level databases; ``None``: in memory); ``None`` goes back to
        the plain static strategy. Switches to the static mode and reverts any applied candidate."""
        self.revert()
        if settings is None:
            strategy: Strategy = self._strategies.get("static:plain") or self._strategies["static"]
        else:  # a database opened before (same levels, same folder) is reused: no second check or mapping
            root = None if cache_dir is None else str(Path(cache_dir).expanduser())
            strategy = next((s for s in self._level_strategies if s.levels == settings and s.cache_dir == root), None)
            if strategy is None:
                strategy = LevelStrategy(self._live, settings, progress=progress, cache_dir=cache_dir)
                self._level_strategies.append(strategy)
        if "static:plain" not in self._strategies and not isinstance(self._strategies["static"], LevelStrategy):
            self._strategies["static:plain"] = self._strategies["static"]
        self._strategies["static"] = strategy
        self._strategy = strategy
        self.mode = "static"

    @property
    def levels(self) -> dict[str, Any] | None:
        """The level database in use (path, digest, dtype, bytes, build seconds, methods), else ``None``."""
        strategy = self._strategies.get("static")
        return strategy.info() if isinstance(strategy, LevelStrategy) else None

    @property
    def strategy(self) -> Strategy:
        """The strategy of the current mode (see :mod:`evoprune.pruning._strategy`)."""
        return self._strategy

    @property
    def probe(self) -> ProbeStrategy | None:
        """The :class:`~evoprune.pruning._probe.ProbeStrategy` in probe mode (``hold()``, ``selections()``), else ``None``."""
        return self._strategy if isinstance(self._strategy, ProbeStrategy) else None

    def revert(self) -> nn.Module:
        """Restore the dense (permuted) model exactly; a no-op when nothing is applied."""
        self._undo.undo()
        self._strategy.revert()
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

