"""Loading exported (non-uniform) checkpoints.

A materialized export (every fixed-model strategy) loads through transformers inside
:func:`~evoprune.pruning.per_layer_modules`. An export whose ``evoprune`` section names a ``mode``
(written by a strategy without a fixed smaller model, e.g. the probe mode) holds the dense weights:
it loads as the dense model, a :class:`~evoprune.pruning.Pruner` in that mode (the strategy's
``load_export`` gives the settings and options) and the exported candidate applied.
"""

from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

from ..space import Candidate, ModelSpec
from ._auto import register_auto_classes
from ._importance import Importance
from ._modules import per_layer_modules
from ._pruner import STRATEGIES, Pruner
from ._serve import EXPORT_FORMAT_VERSION

__all__ = ["load_pruned"]


def load_pruned(
    path: str | os.PathLike[str],
    *,
    dtype: Any = None,
    device_map: Any = None,
    **kwargs: Any,
):
    """Load a checkpoint written by :meth:`Pruner.export` (in any process).

    transformers' ``LlamaModel`` & co. build every block from the global config, so this
    wraps ``AutoModelForCausalLM.from_pretrained`` in :func:`per_layer_modules`, which makes
    each block follow ``config.per_layer_config`` (sizes, skipped sublayers, compact
    KV-cache indices); the safetensors weights then load into right-sized modules.

    Loads every export format: ``evoprune_<type>`` model types (registered here, see
    :func:`~evoprune.pruning.register_auto_classes`; after ``import evoprune`` plain
    ``AutoModelForCausalLM.from_pretrained`` gives the same model) and the dense ``model_type``
    of exports that stock transformers builds exactly or that were written by format 1.

    Args:
        path: the export directory (or anything ``from_pretrained`` accepts).
        dtype: e.g. ``torch.bfloat16``; ``None`` keeps transformers' default.
        device_map: e.g. ``"auto"`` or ``"cuda:0"`` (needs ``accelerate`` for multi-device maps).
        **kwargs: passed on to ``from_pretrained`` (``attn_implementation=...`` etc.; choose the
            attention implementation here: each block keeps its own resolved config).

    A probe-mode export (``Pruner.set_mode("probe")``) loads as the dense model with Probe Pruning
    applied per batch (``model.evoprune_pruner`` holds its pruner).

    Example::

        from evoprune.pruning import load_pruned
        model = load_pruned("exported/", dtype=torch.bfloat16)
        model.config.evoprune["candidate"]      # the architecture that was exported
    """
    from transformers import AutoModelForCausalLM  # deferred: keeps `import evoprune.pruning` cheap

    register_auto_classes()
    _check_format(path, EXPORT_FORMAT_VERSION)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    section = _section(path)
    if section.get("mode") is not None:  # dense weights, pruned by that mode's strategy (e.g. per batch)
        return _load_mode_export(path, section, **kwargs)
    with per_layer_modules():
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def _load_mode_export(path: str | os.PathLike[str], section: dict[str, Any], **kwargs: Any) -> nn.Module:
    """The dense model of a mode export with its candidate applied (``model.evoprune_pruner`` holds the
    pruner: ``.revert()`` gives the dense model, e.g. ``.probe.hold()`` freezes the probe's units)."""
    from transformers import AutoModelForCausalLM  # deferred: keeps `import evoprune.pruning` cheap

    mode = section["mode"]
    strategy = STRATEGIES.get(mode)
    if strategy is None or not hasattr(strategy, "load_export"):
        raise ValueError(f"{path} was exported in pruning mode {mode!r}, which this evoprune cannot load "
                         f"(modes: {sorted(STRATEGIES)}); upgrade evoprune (pip install -U evoprune).")
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    spec = ModelSpec.from_config(model.config)
    pruner = Pruner(model, None, importance=Importance.identity(spec), model_fingerprint=section.get("model_fingerprint"))
    settings, options = strategy.load_export(path, section, model.get_input_embeddings().weight.device)
    pruner.set_mode(mode, settings, **options)
    pruner.apply(Candidate.from_dict(section["candidate"]))
    model.evoprune_pruner = pruner
    return model


def _section(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``evoprune`` section of a local export's config.json (``{}`` for a hub id or none)."""
    config = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(config):
        return {}
    with open(config, encoding="utf-8") as fh:
        return json.load(fh).get("evoprune") or {}


def _check_format(path: str | os.PathLike[str], supported: int) -> None:
    """Refuse a local export written by a newer evoprune (a hub id is not read ahead)."""
    config = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(config):
        return
    with open(config, encoding="utf-8") as fh:
        section = json.load(fh).get("evoprune") or {}
    version = section.get("format_version", 1)
    if isinstance(version, int) and version > supported:
        raise ValueError(
            f"{path} was exported by evoprune {section.get('evoprune_version', '?')} (export format {version}); "
            f"this evoprune reads formats up to {supported}: upgrade evoprune (pip install -U evoprune)."
        )
