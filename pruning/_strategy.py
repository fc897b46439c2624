"""How a pruning mode changes the live model: the :class:`Strategy` interface that the Pruner calls.

A :class:`~evoprune.pruning.Pruner` owns what every mode shares: scoring and permuting the dense
model once, and a candidate's *structure* (dropped blocks and sublayers, compact KV-cache
``layer_idx``, the head counts of pruned attention modules). Every kept sublayer whose widths or
sparsity differ from dense goes to the **strategy** of the pruner's mode. Each mode has one
strategy, and no strategy has branches for another:

=========  ======================================  ===================================================
mode       strategy                                a pruned sublayer becomes
=========  ======================================  ===================================================
``static`` :class:`~._static.StaticStrategy`       prefix views of the dense weights (+ keep-masks)
``probe``  :class:`~._probe.ProbeStrategy`         per batch: probe, PP scores, gathered kept units
=========  ======================================  ===================================================

The interface (:class:`Strategy`, a ``typing.Protocol``: a strategy needs no base class)::

    class Strategy(Protocol):
        mode: ClassVar[str]        # its name in evoprune.space.PRUNING_MODES (the space's ``mode``)
        settings: Any              # the mode's settings (resolve_mode's value; None for static)

        def __init__(self, live: LiveModel, settings: Any, **options: Any) -> None: ...
        def check(self, candidate: Candidate) -> None: ...      # ValueError before anything changes
        def apply(self, candidate: Candidate) -> None: ...      # prune live.pruned_sublayers(candidate)
        def revert(self) -> None: ...                           # exactly undo apply (bit for bit)
        @property
        def masks(self) -> dict[nn.Parameter, torch.Tensor]: ...  # keep-masks of live parameters
        def materialized_linears(self, i: int, sublayer: str, lc: LayerConfig,
                                 pattern: str) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]: ...
        def export(self, pruner: Any, candidate: Candidate, path: str | os.PathLike[str], *,
                   tokenizer: Any = None, format: str = "hf", dtype: str | None = None,
                   **save_kwargs: Any) -> Path: ...

The Pruner's calls, in order:

* ``Pruner.set_mode(mode, settings, **options)``: ``STRATEGIES[mode](live, settings, **options)``
  (kept per mode and reused while the settings are the same; the static one is made at
  construction). ``options`` are the strategy's own (the probe's ``history=``).
* ``Pruner.apply(candidate)``: ``check(candidate)``, then ``apply(candidate)`` **on the dense
  model** (before the Pruner's structural changes), then the structure.
* ``Pruner.revert()``: the structure is undone first, then ``revert()``. A strategy records every
  change it makes in its own :class:`UndoLog`, so its ``apply``/``revert`` pair is exact on its
  own, whatever the Pruner does around it.
* ``Pruner.masks``: ``masks`` (``{}`` where nothing is masked); fine-tuning keeps masked weights
  at zero.
* ``Pruner.materialize(candidate)``: ``materialized_linears(i, sublayer, lc, pattern)`` for every
  kept sublayer of every kept block: ``{linear attribute name: (weight, bias or None)}``, fresh
  tensors of the smaller model (raise ``ValueError`` when the mode has no fixed smaller model).
* ``Pruner.export(candidate, path, ...)``: ``export(pruner, candidate, path, ...)``. A strategy
  with a fixed smaller model calls :func:`~._serve.export_format` (every format, written from
  ``pruner.materialize``); one without writes its own folder with ``{"mode": mode}`` in the config's
  ``evoprune`` section and provides ``load_export(path, section, device) -> (settings, options)``:
  :func:`~evoprune.pruning.load_pruned` then rebuilds the dense model, a pruner in that mode, and
  applies the exported candidate.

A strategy reads the model only through :class:`LiveModel`: the permuted dense model, its adapter
and :class:`~evoprune.space.ModelSpec`, the dense modules and parameters of every block
(:class:`LayerRefs`, captured before any change), the calibration input norms and tokens.

A new strategy is a new module with a class that satisfies this protocol, one entry in
:data:`~._pruner.STRATEGIES` and its mode in ``evoprune.space.PRUNING_MODES``; the other
strategies do not change. One that keeps the static mode's slices (the first ``k`` units) with other
weights in them can subclass :class:`~._static.StaticStrategy` and override ``_kept`` (what a kept
slice holds: its weight and keep-mask), which both its ``apply`` and ``materialized_linears`` use;
:class:`~._levels.LevelStrategy` (stored SparseGPT / OBS levels from a level database) does that.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from ..space import Candidate, LayerConfig, ModelSpec
from ._adapters import ArchAdapter

__all__ = ["LayerRefs", "LiveModel", "Strategy", "UndoLog", "collect_refs"]

_MISSING = object()


@runtime_checkable
class Strategy(Protocol):
    """One pruning mode's way of turning the kept, non-dense sublayers into a candidate's (see the module docs)."""

    mode: ClassVar[str]
    settings: Any

    def check(self, candidate: Candidate) -> None: ...

    def apply(self, candidate: Candidate) -> None: ...

    def revert(self) -> None: ...

    @property
    def masks(self) -> dict[nn.Parameter, torch.Tensor]: ...

    def materialized_linears(self, i: int, sublayer: str, lc: LayerConfig,
                             pattern: str) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]: ...

    def export(self, pruner: Any, candidate: Candidate, path: str | os.PathLike[str], *, tokenizer: Any = None,
               format: str = "hf", dtype: str | None = None, **save_kwargs: Any) -> Path: ...


class UndoLog:
    """Changes to shared objects, undone in reverse order; :meth:`undo` restores the exact previous state."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self._undo)

    def push(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` on :meth:`undo` (e.g. a hook handle's ``remove``)."""
        self._undo.append(fn)

    def set(self, obj: Any, name: str, value: Any) -> None:
        """``setattr(obj, name, value)``, recorded: a child module, an instance attribute (an attribute
        that was only a class default is deleted again) or a plain object's attribute."""
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

    def undo(self) -> None:
        """Undo every recorded change, the last first (a no-op when empty)."""
        while self._undo:
            self._undo.pop()()


@dataclasses.dataclass
class LayerRefs:
    """The dense modules and parameters of one block, captured before any apply."""

    layer: nn.Module
    attn: nn.Module
    mlp: nn.Module
    attn_norm: nn.Module
    mlp_norm: nn.Module
    linears: dict[str, nn.Module]  # module attribute name -> Linear (attention and MLP)
    weight: dict[str, nn.Parameter]
    bias: dict[str, nn.Parameter | None]


def collect_refs(layer: nn.Module, adapter: ArchAdapter) -> LayerRefs:
    """The :class:`LayerRefs` of a dense block (``TypeError`` when a projection is not an ``nn.Linear``)."""
    a = adapter
    attn, mlp = getattr(layer, a.attn), getattr(layer, a.mlp)
    linears: dict[str, nn.Module] = {}
    for n in a.attn_linears:
        linears[n] = getattr(attn, n)
    for n in a.mlp_linears:
        linears[n] = getattr(mlp, n)
    for n, mod in linears.items():
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"expected {n} to be an nn.Linear, got {type(mod).__name__}.")
    return LayerRefs(
        layer=layer,
        attn=attn,
        mlp=mlp,
        attn_norm=getattr(layer, a.attn_norm),
        mlp_norm=getattr(layer, a.mlp_norm),
        linears=linears,
        weight={n: m.weight for n, m in linears.items()},
        bias={n: m.bias for n, m in linears.items()},
    )


@dataclasses.dataclass(eq=False)
class LiveModel:
    """What a strategy reads: the pruner's permuted dense model and its facts.

    Args:
        model: the causal LM (permuted by importance: keeping the top ``k`` units is a prefix).
        adapter: its :class:`~evoprune.pruning.ArchAdapter`.
        spec: its :class:`~evoprune.space.ModelSpec`.
        refs: the dense modules and parameters of every block (:class:`LayerRefs`).
        input_norms: ``||X||_2`` per input column of every linear, in the permuted order
            (``"attn_in"``, ``"o_in"``, ``"mlp_in"``, ``"down_in"``; ``[L, columns]``).
        calib_ids: the calibration tokens (``None`` without them).
        calib_batch_size: sequences per calibration forward.
        model_fingerprint, data_fingerprint: identities of the dense model and the calibration
            tokens (``data_fingerprint`` is ``None`` without them): keys of anything a strategy
            computes once and stores.
        cache_dir: the pruner's cache folder (``None``: nothing on disk).
    """

    model: nn.Module
    adapter: ArchAdapter
    spec: ModelSpec
    refs: list[LayerRefs]
    input_norms: dict[str, torch.Tensor]
    calib_ids: torch.Tensor | None = None
    calib_batch_size: int = 8
    model_fingerprint: str | None = None
    data_fingerprint: str | None = None
    cache_dir: Path | None = None

    @property
    def backbone(self) -> nn.Module:
        """The module that holds the block list (``model.model`` for Llama-like models)."""
        parent = self.adapter.layers.rpartition(".")[0]
        return self.model.get_submodule(parent) if parent else self.model

    @property
    def device(self) -> torch.device:
        """The device of the input embeddings (where token batches go)."""
        return self.model.get_input_embeddings().weight.device

    def is_dense(self, lc: LayerConfig, sublayer: str) -> bool:
        """Whether ``sublayer`` (``"attn"``/``"mlp"``) keeps every unit and weight under ``lc``."""
        s = self.spec
        if sublayer == "attn":
            return (lc.num_kv_heads == s.num_kv_heads and lc.q_per_kv == s.q_per_kv
                    and all(lc.sparsity_of(n) == 0 for n in ("q", "k", "v", "o")))
        return lc.mlp_channels == s.intermediate_size and all(lc.sparsity_of(n) == 0 for n in ("gate", "up", "down"))

    def pruned_sublayers(self, candidate: Candidate) -> Iterator[tuple[int, str, LayerConfig]]:
        """``(block index, "attn" | "mlp", layer config)`` of every kept, non-dense sublayer of
        ``candidate``: what a strategy's ``apply`` prunes (attention before MLP, blocks in order)."""
        for i, lc in enumerate(candidate.layers):
            if lc.dropped:
                continue
            if not lc.attn_dropped and not self.is_dense(lc, "attn"):
                yield i, "attn", lc
            if not lc.mlp_dropped and not self.is_dense(lc, "mlp"):
                yield i, "mlp", lc
