"""The one calibration forward pass with hooks.

Several rules read what a model's modules see on calibration tokens (the probe mode's history,
FLAP's fluctuation, OWL's Wanda norms). They all collect it the same way, here: run the tokens
through the decoder backbone (no LM head: nothing reads the logits) in batches, without gradients
and without a KV cache, and call one function per hooked module with that module's input::

    seen = []   # down_proj's input on every batch
    calibration_pass(model, calib_ids, [(down_proj, lambda x: seen.append(x.pow(2).sum((0, 1))))])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["calibration_pass", "capture_layer_inputs", "run_layer"]


def calibration_pass(
    model: nn.Module,
    calib_ids: torch.Tensor,
    inputs: Iterable[tuple[nn.Module, Callable[[torch.Tensor], None]]],
    *,
    batch_size: int = 8,
) -> None:
    """Run ``calib_ids`` through ``model`` so that every ``(module, fn)`` of ``inputs`` sees it.

    ``fn(x)`` is called with the first positional input of ``module`` (a forward pre-hook) on every
    batch. ``model`` is a causal LM or its decoder backbone; a causal LM runs its backbone
    (``model.base_model``), so no logits are computed. Batches of ``batch_size`` sequences go to the
    device of the input embeddings, under ``torch.no_grad()`` and with ``use_cache=False``. The hooks
    are removed afterwards, also when a batch raises.

    Args:
        model: the (dense, live) model.
        calib_ids: calibration tokens, a ``LongTensor [n_sequences, seq_len]``.
        inputs: ``(module, fn)`` pairs; one module may appear several times.
        batch_size: sequences per forward.
    """
    if batch_size < 1:
        raise ValueError(f"calibration_pass: batch_size must be >= 1, got {batch_size}.")

    def pre_hook(fn: Callable[[torch.Tensor], None]):
        def hook(module: nn.Module, args: tuple) -> None:
            fn(args[0])

        return hook

    _run_hooked(model, calib_ids, batch_size, [(module, pre_hook(fn), False) for module, fn in inputs])


def _run_hooked(model: nn.Module, calib_ids: torch.Tensor, batch_size: int,
                hooks: list[tuple[nn.Module, Callable[..., None], bool]]) -> None:
    """The pass itself: ``calib_ids`` through the backbone in batches (no gradients, no KV cache) with the
    forward pre-hooks ``(module, hook, with_kwargs)`` registered, and removed afterwards whatever happens."""
    backbone = getattr(model, "base_model", model)
    device = model.get_input_embeddings().weight.device
    handles = []
    try:
        for module, hook, with_kwargs in hooks:
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs))
        with torch.no_grad():
            for start in range(0, calib_ids.shape[0], batch_size):
                backbone(input_ids=calib_ids[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()


def capture_layer_inputs(
    model: nn.Module, layers: list[nn.Module], calib_ids: torch.Tensor, *, batch_size: int = 8,
) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """``(hidden, kwargs)`` of one dense calibration pass: ``hidden[b]`` is the first decoder layer's
    input hidden states on batch ``b`` and ``kwargs[i][b]`` the keyword arguments layer ``i`` was
    called with (position embeddings, attention mask, ...), so each layer can then be run on its own
    with :func:`run_layer` on hidden states computed some other way (SparseGPT's sequential inputs)."""
    if batch_size < 1:
        raise ValueError(f"capture_layer_inputs: batch_size must be >= 1, got {batch_size}.")
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in layers]

    def hook(i: int):
        def fn(module: nn.Module, args: tuple, kw: dict) -> None:
            kw = dict(kw)
            h = args[0] if args else kw.pop("hidden_states")
            kwargs[i].append({**kw, **({"__args__": args[1:]} if len(args) > 1 else {})})
            if i == 0:
                hidden.append(h.detach())

        return fn

    _run_hooked(model, calib_ids, batch_size, [(layer, hook(i), True) for i, layer in enumerate(layers)])
    return hidden, kwargs


@torch.no_grad()
def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder layer on ``hidden`` with the keyword arguments :func:`capture_layer_inputs` recorded;
    its output hidden states (the first element when the layer returns a tuple)."""
    kw = dict(kwargs)
    out = layer(hidden, *kw.pop("__args__", ()), **kw)
    return out[0] if isinstance(out, (tuple, list)) else out
