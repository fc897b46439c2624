"""Wanda-sp and FLAP with bias compensation: the structured one-shot baselines as published.

Both score the input channels of ``o_proj`` and ``down_proj`` on calibration tokens, keep the best
attention heads and MLP channels, and run the smaller model with no fine-tuning:

* **Wanda-sp** (the structured Wanda of An et al. 2024, FLAP's baseline, and of Probe Pruning's
  tables): ``score_j = ||X_j||_2 * sum_i |W_ij|`` per input channel ``j``; a head scores the sum
  over its ``head_dim`` channels; one ratio for every block (:func:`~evoprune.baselines.uniform`).
* **FLAP** (An et al., AAAI 2024; code CASIA-IVA-Lab/FLAP, metric ``WIFV``, structure ``AL-AM``):
  the fluctuation ``var(X_j) * ||W_:,j||_2^2`` (squared again for attention), standardized per
  layer, one global threshold over all layers and both modules (the widths of
  :func:`~evoprune.baselines.flap`), and the **bias compensation**: for every removed input
  channel ``j`` of ``o_proj`` / ``down_proj``, ``W[:, j] * mean(X_j)`` is added to that
  projection's bias, so the layer's mean output is kept.

Which units are kept: :func:`structured_pruner` builds a :class:`~evoprune.pruning.Pruner` whose
importance *is* the baseline's score (so a candidate's kept prefix is exactly the baseline's best
units). Under GQA both keep the structure every static candidate has (KV groups scored by the sum
of their query heads, the best query heads inside each kept group). The biases need a model with
``o_proj`` / ``down_proj`` biases: :func:`with_zero_biases` rebuilds a Llama model with
transformers' ``attention_bias`` / ``mlp_bias`` (zero biases where FLAP adds none), so exports are
standard checkpoints that load as usual. :func:`compensated` sets the biases of one candidate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .._logging import get_logger
from ..space import Candidate

__all__ = ["STRUCTURED_METRICS", "compensated", "input_means", "structured_importance", "structured_pruner",
           "with_zero_biases"]

_log = get_logger("baselines")
STRUCTURED_METRICS = ("wanda_sp", "flap")


def with_zero_biases(model: Any) -> Any:
    """A copy of a Llama-family ``model`` whose config has ``attention_bias`` and ``mlp_bias`` set: the
    same weights, every q/k/v/o and gate/up/down bias zero (the function is unchanged). FLAP's
    compensation writes into the ``o_proj`` / ``down_proj`` ones."""
    import copy

    import torch
    import transformers

    cfg = model.config
    if getattr(cfg, "model_type", None) != "llama":
        raise ValueError(f"FLAP bias compensation needs a Llama model (transformers' attention_bias / mlp_bias); "
                         f"got model_type {getattr(cfg, 'model_type', None)!r}: use flap() widths without compensation.")
    new_cfg = copy.deepcopy(cfg)
    new_cfg.attention_bias = True
    new_cfg.mlp_bias = True
    dtype = next(model.parameters()).dtype
    out = transformers.AutoModelForCausalLM.from_config(new_cfg, dtype=dtype)
    missing, unexpected = out.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.endswith(".bias") for k in missing):
        raise RuntimeError(f"with_zero_biases: unexpected state dict mismatch (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}).")
    with torch.no_grad():
        for k in missing:
            out.get_parameter(k).zero_()
    if getattr(cfg, "tie_word_embeddings", False):
        out.tie_weights()
    return out.to(next(model.parameters()).device).eval()


def _column_stats(model: Any, calib_ids: Any, batch_size: int) -> dict[tuple[int, str], list]:
    import torch

    from ..pruning import calibration_pass, get_adapter

    adapter = get_adapter(model)
    layers = model.get_submodule(adapter.layers)
    stats: dict[tuple[int, str], list] = {}

    def hook(key: tuple[int, str]):
        def fn(x):
            x = x.detach().double().reshape(-1, x.shape[-1])
            s = stats.setdefault(key, [torch.zeros(x.shape[-1], dtype=torch.float64),
                                       torch.zeros(x.shape[-1], dtype=torch.float64), 0])
            s[0] += x.sum(0).cpu()
            s[1] += x.pow(2).sum(0).cpu()
            s[2] += x.shape[0]

        return fn

    inputs = []
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, adapter.attn), getattr(layer, adapter.mlp)
        inputs += [(getattr(attn, adapter.o), hook((i, "o"))), (getattr(mlp, adapter.down), hook((i, "down")))]
    calibration_pass(model, calib_ids, inputs, batch_size=batch_size)
    return stats


def structured_importance(model: Any, calib_ids: Any, metric: str, *, batch_size: int = 8) -> Any:
    """An :class:`~evoprune.pruning.Importance` of the dense, unpermuted ``model`` whose head, KV-group
    and channel scores are ``metric``'s (``"wanda_sp"`` or ``"flap"``, see the module docstring);
    block influences are zero (these baselines drop no blocks)."""
    import torch

    from ..pruning import Importance, get_adapter
    from ..space import ModelSpec

    if metric not in STRUCTURED_METRICS:
        raise ValueError(f"structured baseline metric must be one of {STRUCTURED_METRICS}, got {metric!r}.")
    if calib_ids is None:
        raise ValueError(f"{metric}: pass calib_ids (calibration token sequences [n, seq_len]).")
    adapter, spec = get_adapter(model), ModelSpec.from_config(model.config)
    stats = _column_stats(model, calib_ids, batch_size)
    layers = model.get_submodule(adapter.layers)
    G, Q, hd, L = spec.num_kv_heads, spec.q_per_kv, spec.head_dim, spec.num_layers
    heads, chans, norms = [], [], {"o_in": [], "down_in": []}
    with torch.no_grad():
        for i, layer in enumerate(layers):
            for key, mod, out in (("o", getattr(getattr(layer, adapter.attn), adapter.o), heads),
                                  ("down", getattr(getattr(layer, adapter.mlp), adapter.down), chans)):
                s1, s2, n = stats[(i, key)]
                w = mod.weight.detach().double().cpu()
                if metric == "wanda_sp":
                    score = s2.sqrt() * w.abs().sum(0)
                else:
                    score = (s2 / n - (s1 / n) ** 2).clamp_min(0) * w.pow(2).sum(0)
                    if key == "o":
                        score = score ** 2  # FLAP squares the attention metric
                norms[f"{key}_in"].append(s2.sqrt())
                out.append(score.reshape(-1, hd).sum(-1) if key == "o" else score)
    q_head = torch.stack(heads).float().view(L, G, Q)
    zeros = torch.zeros(L)
    hidden = spec.hidden_size
    return Importance(method="activation", kv_group=q_head.sum(-1), q_head=q_head,
                      mlp_channel=torch.stack(chans).float(), block_influence=zeros, attn_influence=zeros.clone(),
                      mlp_influence=zeros.clone(),
                      input_norms={"attn_in": torch.ones(L, hidden), "o_in": torch.stack(norms["o_in"]).float(),
                                   "mlp_in": torch.ones(L, hidden), "down_in": torch.stack(norms["down_in"]).float()},
                      num_tokens=int(calib_ids.numel()))


def structured_pruner(model: Any, calib_ids: Any, metric: str, *, batch_size: int = 8) -> Any:
    """A static-mode :class:`~evoprune.pruning.Pruner` over ``model`` (permuted in place) whose kept
    prefix is ``metric``'s best units; widths come from a candidate (``uniform`` for Wanda-sp,
    ``flap`` for FLAP)."""
    from ..pruning import Pruner

    importance = structured_importance(model, calib_ids, metric, batch_size=batch_size)
    return Pruner(model, calib_ids, importance=importance, calib_batch_size=batch_size)


def input_means(pruner: Any, calib_ids: Any, *, batch_size: int = 8) -> dict[int, dict[str, Any]]:
    """Mean ``o_proj`` / ``down_proj`` input per column of the pruner's dense (permuted) model:
    FLAP's baseline values for the bias compensation."""
    pruner.revert()
    stats = _column_stats(pruner.model, calib_ids, batch_size)
    return {i: {k: stats[(i, k)][0] / stats[(i, k)][2] for k in ("o", "down")} for i in range(pruner.spec.num_layers)}


@contextlib.contextmanager
def compensated(pruner: Any, candidate: Candidate, means: dict[int, dict[str, Any]]) -> Iterator[Any]:
    """``with compensated(pruner, cand, means) as model:`` the candidate applied with FLAP's bias
    compensation: each kept ``o_proj`` / ``down_proj`` bias is ``sum over removed columns j of
    W[:, j] * mean(X_j)`` (the model must have those biases: :func:`with_zero_biases`). Exports
    made inside carry the biases; on exit the biases are zero again and the candidate reverted."""
    import torch

    from ..pruning import get_adapter

    adapter, spec = get_adapter(pruner.model), pruner.spec
    pruner.revert()
    layers = pruner.model.get_submodule(adapter.layers)
    G, Q, hd, I = spec.num_kv_heads, spec.q_per_kv, spec.head_dim, spec.intermediate_size
    touched = []
    with torch.no_grad():
        for i, (layer, lc) in enumerate(zip(layers, candidate.layers)):
            if lc.dropped:
                continue
            o = getattr(getattr(layer, adapter.attn), adapter.o)
            down = getattr(getattr(layer, adapter.mlp), adapter.down)
            if o.bias is None or down.bias is None:
                raise ValueError("compensated: the model has no o_proj / down_proj bias; build it with "
                                 "with_zero_biases(model) before the Pruner.")
            keep_o = torch.zeros(G, Q, hd, dtype=torch.bool)
            if not lc.attn_dropped:
                keep_o[: lc.num_kv_heads, : lc.q_per_kv] = True
            keep_d = torch.zeros(I, dtype=torch.bool)
            if not lc.mlp_dropped:
                keep_d[: lc.mlp_channels] = True
            for mod, keep, key in ((o, keep_o.reshape(-1), "o"), (down, keep_d, "down")):
                m = means[i][key].to(mod.weight.device, torch.float64) * (~keep).to(mod.weight.device)
                mod.bias.copy_((mod.weight.double() @ m).to(mod.bias.dtype))
                touched.append(mod.bias)
    try:
        pruner.apply(candidate)
        yield pruner.model
    finally:
        pruner.revert()
        with torch.no_grad():
            for b in touched:
                b.zero_()
