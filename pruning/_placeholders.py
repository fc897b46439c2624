"""Placeholder tensors for the dropped sublayers of an export, so that no stock class loads it wrong.

An export that drops attention or MLP sublayers has ``model_type = "evoprune_<type>"``: the Auto
classes reject it without evoprune (:mod:`._auto`). An explicit class does not look at the type:
``LlamaForCausalLM.from_pretrained(folder)`` would build every block whole, find the dropped
sublayers' weights missing, initialise them at random and only warn -- a silently wrong model.
So for each dropped sublayer the export also writes one tensor under the name of that sublayer's
output projection (``model.layers.3.self_attn.o_proj.weight``, ``...mlp.down_proj.weight``) with
the shape ``[1]``, which no stock class accepts for a matrix: every stock class (``*ForCausalLM``,
``*Model``, ...) then fails with a size-mismatch error instead of loading. evoprune's own class
(which has no module there) ignores exactly these names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ._adapters import get_adapter

__all__ = ["PLACEHOLDER_SHAPE", "add_placeholders", "placeholder_keys", "unexpected_patterns"]

#: no stock class has a one-element vector where a sublayer's output projection (a matrix) goes
PLACEHOLDER_SHAPE = (1,)
_INDEX = "model.safetensors.index.json"
_SHARD = "evoprune-placeholders.safetensors"


def placeholder_keys(config: dict[str, Any]) -> list[str]:
    """The checkpoint names of the placeholders for the dropped sublayers of an export's ``config.json``."""
    dense = (config.get("evoprune") or {}).get("dense_model_type")
    per_layer = config.get("per_layer_config") or {}
    if dense is None or not per_layer:
        return []
    a = get_adapter(dense)
    keys = []
    for j, over in sorted(((int(k), v) for k, v in dict(per_layer).items()), key=lambda kv: kv[0]):
        skip = (over or {}).get("skip") or []
        if "attention" in skip:
            keys.append(f"{a.layers}.{j}.{a.attn}.{a.o}.weight")
        if "mlp" in skip:
            keys.append(f"{a.layers}.{j}.{a.mlp}.{a.down}.weight")
    return keys


def unexpected_patterns(dense_type: str) -> list[str]:
    """Regexes of the placeholder names, for evoprune's class to ignore (it has no module there)."""
    a = get_adapter(dense_type)
    return [rf"\.{re.escape(a.attn)}\.{re.escape(a.o)}\.weight$",
            rf"\.{re.escape(a.mlp)}\.{re.escape(a.down)}\.weight$"]


def add_placeholders(folder: str | Path) -> list[str]:
    """Add the placeholders to the saved checkpoint in ``folder`` (one file, or a shard of their own
    listed in the index of a sharded one); returns their names."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    keys = placeholder_keys(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    if not keys:
        return []
    single = folder / "model.safetensors"
    if single.is_file():
        tensors = load_file(str(single))
        dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
        tensors.update({k: torch.zeros(PLACEHOLDER_SHAPE, dtype=dtype) for k in keys})
        save_file(tensors, str(single), metadata={"format": "pt"})
        return keys
    index_file = folder / _INDEX
    if not index_file.is_file():
        raise FileNotFoundError(f"{folder} has neither model.safetensors nor {_INDEX}: cannot add the placeholders.")
    index = json.loads(index_file.read_text(encoding="utf-8"))
    save_file({k: torch.zeros(PLACEHOLDER_SHAPE) for k in keys}, str(folder / _SHARD), metadata={"format": "pt"})
    index.setdefault("weight_map", {}).update({k: _SHARD for k in keys})
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return keys
