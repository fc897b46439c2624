"""Materialize and export: a candidate as a new, physically smaller model or an HF checkpoint.

A mixin of :class:`~evoprune.pruning.Pruner` (it reads the pruner's permuted dense model and asks
the pruner's strategy for the pruned linears' weights, see :mod:`._strategy`). The exported ``config.json`` writes the
per-layer differences in transformers' ``per_layer_config`` field plus an ``evoprune``
section; :func:`~evoprune.pruning.load_pruned` reads it back.

An export never loads silently wrong through stock transformers: when stock transformers
builds it exactly (no dropped sublayer and the same widths in every kept block, accepted by
the dense config class) it keeps the dense ``model_type``; otherwise its ``model_type`` is
``evoprune_<dense>`` (see :mod:`._auto`), which transformers without evoprune rejects.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__ as _evoprune_version
from ..space import Candidate
from ._auto import pruned_config_class, pruned_model_class
from ._modules import per_layer_modules, quiet_heterogeneous_warnings
from ._serve import EXPORT_FORMAT_VERSION

__all__ = ["ExportMixin"]


class ExportMixin:
    """``pruned_config``, ``materialize`` and ``export`` of a :class:`~evoprune.pruning.Pruner`."""

    def pruned_config(self, candidate: Candidate) -> Any:
        """The transformers config of ``candidate``'s materialized model (``per_layer_config`` +
        an ``evoprune`` section).

        Its class is the dense config class when stock transformers builds the model exactly from
        it (no dropped sublayer, one set of widths for every kept block, written as the global
        values), else the registered ``evoprune_<dense type>`` subclass (global values = dense).
        """
        self.spec.check_candidate(candidate)
        dense_cfg = self.model.config
        dense_type = self.adapter.model_type
        d = dense_cfg.to_dict()
        d.pop("per_layer_config", None)
        # applied mode edits num_hidden_layers/layer_types on the live config: use the dense values
        types = list(self._dense_layer_types) if self._dense_layer_types is not None else None
        kept = candidate.kept_layers
        d["num_hidden_layers"] = len(kept)
        d["head_dim"] = self.spec.head_dim
        if types is not None:
            d["layer_types"] = [types[i] for i in kept]
            _check_cache_layer_types(d["layer_types"], [not candidate.layers[i].attn_dropped for i in kept])
        per_layer: dict[int, dict[str, Any]] = {}
        for j, i in enumerate(kept):
            lc = candidate.layers[i]
            over: dict[str, Any] = {}
            skip = []
            if lc.attn_dropped:
                skip.append("attention")
            else:
                over["num_attention_heads"] = lc.num_q_heads
                over["num_key_value_heads"] = lc.num_kv_heads
            if lc.mlp_dropped:
                skip.append("mlp")
            else:
                over["intermediate_size"] = lc.mlp_channels
            if skip:
                over["skip"] = skip
            linear = {"attention": lc.block_linear or lc.attn_linear, "mlp": lc.mlp_linear}
            if candidate.has_linear:  # a skipped sublayer replaced by a fitted map (a block's: in the attention
                # slot); transformers wants a per-layer attribute in every block
                over["linear"] = {k: v for k, v in linear.items() if v}
            per_layer[j] = over
        d["per_layer_config"] = per_layer
        d["allow_global_per_layer_attribute_access"] = True
        d["serialize_explicit_per_layer_config"] = True
        d["evoprune"] = {
            "dense_model_type": dense_type,
            "format_version": EXPORT_FORMAT_VERSION,
            "evoprune_version": _evoprune_version,
            "candidate": candidate.to_dict(),
            "candidate_key": candidate.key,
            "dense_layers": list(kept),
            "dense_num_layers": self.spec.num_layers,
            "dense_num_attention_heads": self.spec.num_heads,
            "dense_num_key_value_heads": self.spec.num_kv_heads,
            "dense_intermediate_size": self.spec.intermediate_size,
            "dense_name_or_path": getattr(dense_cfg, "_name_or_path", "") or None,
            "importance_method": self.method,
            "model_fingerprint": self.model_fingerprint,
            "data_fingerprint": self.data_fingerprint,
        }
        cfg = _stock_config(type(dense_cfg), d, _uniform_widths(candidate))
        if cfg is None:
            d["model_type"] = pruned_config_class(dense_type).model_type
            d["architectures"] = [pruned_model_class(dense_type).__name__]
            with quiet_heterogeneous_warnings():
                cfg = pruned_config_class(dense_type).from_dict(d)
        cfg._attn_implementation = dense_cfg._attn_implementation
        return cfg

    @torch.no_grad()
    def materialize(self, candidate: Candidate) -> nn.Module:
        """A new, physically smaller model of ``candidate`` (works whether or not something is applied).

        Linear and norm modules are sliced (fresh contiguous tensors on each source
        parameter's device), dropped blocks removed, dropped sublayers replaced by
        parameter-free :class:`DroppedAttention`/:class:`DroppedMLP` (+ ``nn.Identity`` norms),
        sparsity zeros baked in, and attention ``layer_idx`` renumbered compactly so that
        ``generate()`` with a KV cache works. The config carries ``per_layer_config``.
        """
        self.spec.check_candidate(candidate)
        a = self.adapter
        pattern = candidate.sparsity_pattern
        linears = {}  # first: a mode without a fixed smaller model refuses before anything is copied
        for i in candidate.kept_layers:
            lc = candidate.layers[i]
            for sub, dropped in (("attn", lc.attn_dropped), ("mlp", lc.mlp_dropped)):
                if not dropped:
                    linears[(i, sub)] = self._strategy.materialized_linears(i, sub, lc, pattern)
        config = self.pruned_config(candidate)
        sd: dict[str, torch.Tensor] = {}
        memo: dict[int, torch.Tensor] = {}

        def take(t: torch.Tensor) -> torch.Tensor:
            key = id(t)
            if key not in memo:
                memo[key] = t.detach().clone().contiguous()
            return memo[key]

        prefix = a.layers + "."
        for name, t in self.model.state_dict(keep_vars=True).items():
            if not name.startswith(prefix):
                sd[name] = take(t)
        for j, i in enumerate(candidate.kept_layers):
            r, lc = self._refs[i], candidate.layers[i]
            pfx = f"{a.layers}.{j}."
            subs = {a.attn, a.mlp, a.attn_norm, a.mlp_norm}
            for name, t in r.layer._parameters.items():
                if t is not None:
                    sd[pfx + name] = take(t)
            for name, t in r.layer._buffers.items():
                if t is not None and name not in r.layer._non_persistent_buffers_set:
                    sd[pfx + name] = take(t)
            for cname, child in r.layer.named_children():
                if cname in subs:
                    continue
                for n, t in child.state_dict(keep_vars=True).items():
                    sd[f"{pfx}{cname}.{n}"] = take(t)
            for sub, norm_name, dropped, mod in (
                ("attn", a.attn_norm, lc.attn_dropped, r.attn),
                ("mlp", a.mlp_norm, lc.mlp_dropped, r.mlp),
            ):
                rank = (lc.block_linear or lc.attn_linear) if sub == "attn" else lc.mlp_linear
                if rank:  # the kept input norm and the fitted map
                    norm = r.attn_norm if sub == "attn" else r.mlp_norm
                    for n, t in norm.state_dict(keep_vars=True).items():
                        sd[f"{pfx}{norm_name}.{n}"] = take(t)
                    part = "block" if sub == "attn" and lc.block_linear else sub
                    for n, t in self.linear_module(i, part, rank).state_dict().items():
                        sd[f"{pfx}{a.attn if sub == 'attn' else a.mlp}.{n}"] = t.detach().clone().contiguous()
                    continue
                if dropped:
                    continue
                norm = r.attn_norm if sub == "attn" else r.mlp_norm
                for n, t in norm.state_dict(keep_vars=True).items():
                    sd[f"{pfx}{norm_name}.{n}"] = take(t)
                sub_name = a.attn if sub == "attn" else a.mlp
                linear_names = a.attn_linears if sub == "attn" else a.mlp_linears
                for n, t in mod.state_dict(keep_vars=True).items():
                    if n.split(".", 1)[0] in linear_names:
                        continue
                    sd[f"{pfx}{sub_name}.{n}"] = take(t)
                for name, (w, b) in linears[(i, sub)].items():
                    sd[f"{pfx}{sub_name}.{name}.weight"] = w
                    if b is not None:
                        sd[f"{pfx}{sub_name}.{name}.bias"] = b
        new = self._build(config, sd, candidate)
        return new

    def _build(self, config: Any, sd: dict[str, torch.Tensor], candidate: Candidate) -> nn.Module:
        dense = self.model
        cls = type(dense)
        if type(config) is not type(dense.config):  # an evoprune_<type> config: its registered class
            pruned = pruned_model_class(self.adapter.model_type)
            cls = pruned if issubclass(pruned, cls) else cls
        with per_layer_modules(), torch.device("meta"):
            new = cls(config)
        missing, unexpected = new.load_state_dict(sd, strict=False, assign=True)
        tied = _tied_pairs(new)
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise RuntimeError(
                f"materialize: state dict mismatch (missing={missing[:8]}, unexpected={unexpected[:8]}); "
                "the adapter does not describe this model's modules."
            )
        if tied and getattr(config, "tie_word_embeddings", False):
            new.tie_weights()
        kept = candidate.kept_layers
        prefix = self.adapter.layers + "."
        for name, buf in list(new.named_buffers()):
            if not buf.is_meta:
                continue
            src_name = name
            if name.startswith(prefix):
                j, _, rest = name[len(prefix):].partition(".")
                src_mod = self._refs[kept[int(j)]].layer
                src = src_mod.get_buffer(rest)
            else:
                src = dense.get_buffer(src_name)
            mod_name, _, bname = name.rpartition(".")
            new.get_submodule(mod_name)._buffers[bname] = src.detach().clone()
        for name, p in new.named_parameters():
            if p.is_meta:
                raise RuntimeError(f"materialize: parameter {name} was not filled.")
        if hasattr(dense, "generation_config") and dense.generation_config is not None:
            new.generation_config = copy.deepcopy(dense.generation_config)
        new.train(dense.training)
        device_map = getattr(dense, "hf_device_map", None)
        if isinstance(device_map, dict) and len(set(device_map.values())) > 1:
            _dispatch(new, device_map, kept, self.adapter.layers)
        return new

    def export(self, candidate: Candidate, path: str | os.PathLike[str], tokenizer: Any = None, *,
               format: str = "hf", dtype: str | None = None, **save_kwargs: Any) -> Path:
        """Write ``candidate`` as a standard HF checkpoint directory and return its path.

        ``format="gguf"`` also writes ``model-<dtype>.gguf`` (``dtype`` f32/f16/bf16) into the folder,
        for llama.cpp; ``format="nemotron-nas"`` writes a DeciLM ``block_configs`` folder for vLLM
        instead (see :mod:`._serve`). Both check first and write nothing when the candidate does not fit.

        Contents: ``model*.safetensors``, ``config.json`` (with ``per_layer_config`` for the
        per-layer differences and an ``evoprune`` section holding the candidate and the dense
        model's fingerprint), ``generation_config.json`` and, when given, the tokenizer files.
        No pickles. Load it with :func:`~evoprune.pruning.load_pruned`, or with plain
        ``AutoModelForCausalLM.from_pretrained`` in a process that imported evoprune.

        A probe-mode pruner writes the dense weights, the candidate and its settings instead (HF format
        only); :func:`~evoprune.pruning.load_pruned` gives back a model that prunes per batch.

        ``model_type`` is the dense one when stock transformers builds the export exactly (block
        drops, sparsity, 2:4, or one set of widths for every kept block that the dense config
        class accepts; the global ``num_attention_heads``/``num_key_value_heads``/
        ``intermediate_size`` are then those widths), so it loads anywhere. Otherwise (widths
        that differ per block, dropped attention/MLP sublayers) it is ``evoprune_<dense type>``:
        transformers without evoprune refuses it loudly instead of building dense-shaped blocks
        with random weights, and the globals keep the dense values
        (``allow_global_per_layer_attribute_access`` is set so transformers' config validation
        can read them). Each block's real sizes and ``skip`` list are in ``per_layer_config``
        (written explicitly for every block), and ``num_hidden_layers`` counts the kept blocks.
        """
        return self._strategy.export(self, candidate, path, tokenizer=tokenizer, format=format, dtype=dtype,
                                     **save_kwargs)


def _uniform_widths(candidate: Candidate) -> tuple[int, int, int] | None:
    """``(q heads, kv heads, mlp channels)`` shared by every kept block, or ``None`` when a block
    drops a sublayer or the widths differ (stock transformers builds every block alike)."""
    kept = [candidate.layers[i] for i in candidate.kept_layers]
    if any(lc.attn_dropped or lc.mlp_dropped for lc in kept):
        return None
    widths = {(lc.num_q_heads, lc.num_kv_heads, lc.mlp_channels) for lc in kept}
    return widths.pop() if len(widths) == 1 else None


def _stock_config(config_cls: type, d: dict[str, Any], widths: tuple[int, int, int] | None) -> Any:
    """The dense config class built with ``widths`` as its global values, or ``None`` when there is
    no such set of widths or the class rejects them (e.g. ``hidden_size % num_attention_heads``)."""
    if widths is None:
        return None
    stock = dict(d)
    stock["num_attention_heads"], stock["num_key_value_heads"], stock["intermediate_size"] = widths
    from huggingface_hub.errors import StrictDataclassError

    try:
        with quiet_heterogeneous_warnings():
            return config_cls.from_dict(stock)
    except (ValueError, TypeError, StrictDataclassError):
        return None


def _check_cache_layer_types(types: list[str], has_attn: list[bool]) -> None:
    """With compact attention indices, KV-cache layer ``a`` is built from ``layer_types[a]`` while the
    ``a``-th attention block has type ``layer_types[j]``; they must agree."""
    attn_blocks = [j for j, f in enumerate(has_attn) if f]
    for a_idx, j in enumerate(attn_blocks):
        if types[a_idx] != types[j]:
            raise NotImplementedError(
                "this candidate drops attention sublayers in a model that mixes attention layer types "
                f"({sorted(set(types))}); the KV cache would pair cache layer {a_idx} ({types[a_idx]}) with "
                f"block {j} ({types[j]}). Not supported yet."
            )


def _tied_pairs(model: nn.Module) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or {}
    if isinstance(keys, dict):
        return set(keys)
    return set(keys)


def _dispatch(model: nn.Module, device_map: dict[str, Any], kept: tuple[int, ...], layers_path: str) -> None:
    """Re-apply a multi-device ``hf_device_map`` (renumbered for removed blocks) with accelerate."""
    try:
        from accelerate import dispatch_model
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("materializing a model spread over several devices needs `accelerate`.") from exc
    new_index = {i: j for j, i in enumerate(kept)}
    prefix = layers_path + "."
    remapped: dict[str, Any] = {}
    for name, dev in device_map.items():
        if name.startswith(prefix):
            idx, _, rest = name[len(prefix):].partition(".")
            if int(idx) not in new_index:
                continue
            name = f"{prefix}{new_index[int(idx)]}" + (f".{rest}" if rest else "")
        remapped[name] = dev
    dispatch_model(model, device_map=remapped)
    model.hf_device_map = remapped
