"""Loading exported (non-uniform) checkpoints."""

from __future__ import annotations

import os
from typing import Any

from ._modules import per_layer_modules

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

    Args:
        path: the export directory (or anything ``from_pretrained`` accepts).
        dtype: e.g. ``torch.bfloat16``; ``None`` keeps transformers' default.
        device_map: e.g. ``"auto"`` or ``"cuda:0"`` (needs ``accelerate`` for multi-device maps).
        **kwargs: passed on to ``from_pretrained`` (``attn_implementation=...`` etc.; choose the
            attention implementation here: each block keeps its own resolved config).

    Example::

        from evoprune.pruning import load_pruned
        model = load_pruned("exported/", dtype=torch.bfloat16)
        model.config.evoprune["candidate"]      # the architecture that was exported
    """
    from transformers import AutoModelForCausalLM

    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    with per_layer_modules():
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
