"""Modules standing in for dropped sublayers, and the scoped decoder-layer patch that
builds non-uniform models from transformers' ``per_layer_config``."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ._adapters import ArchAdapter, registered_adapters

__all__ = ["DroppedAttention", "DroppedMLP", "LinearReplacement", "per_layer_modules", "SKIP_VALUES"]

SKIP_VALUES: tuple[str, ...] = ("attention", "mlp")
"""Entries of ``per_layer_config[i]["skip"]`` this backend understands."""


class DroppedAttention(nn.Module):
    """A removed attention sublayer: contributes exactly zero to the residual stream.

    Returns ``(0-dim zero, None)`` like an attention module's ``(output, weights)``, so
    ``residual + output`` is ``residual`` itself. Holds no parameters and no KV cache.
    """

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return hidden_states.new_zeros(()), None


class DroppedMLP(nn.Module):
    """A removed MLP sublayer: returns a 0-dim zero (``residual + 0``)."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states.new_zeros(())


class LinearReplacement(nn.Module):
    """A sublayer (or a whole block, in the attention slot) replaced by a fitted linear map of its
    normed input: ``x @ A`` (``A.weight`` is ``A`` transposed, ``hidden x hidden``) or, below full rank,
    ``x @ U @ V`` (``U.weight`` ``[rank, hidden]``, ``V.weight`` ``[hidden, rank]``). In the attention slot
    it returns ``(output, None)`` like an attention module and holds no KV cache.

    Built empty (``rank``, ``hidden``) or from fitted weights with :meth:`from_weights`.
    """

    def __init__(self, hidden: int, rank: int, *, attention: bool, dtype: Any = None, device: Any = None) -> None:
        super().__init__()
        if not 1 <= rank <= hidden:
            raise ValueError(f"LinearReplacement: rank must be in 1..{hidden} (the hidden size), got {rank}.")
        self.hidden, self.rank, self.attention = int(hidden), int(rank), bool(attention)
        kw = {"bias": False, "dtype": dtype, "device": device}
        if rank >= hidden:
            self.A = nn.Linear(hidden, hidden, **kw)
        else:
            self.U = nn.Linear(hidden, rank, **kw)
            self.V = nn.Linear(rank, hidden, **kw)

    @classmethod
    def from_weights(cls, weights: dict[str, torch.Tensor], *, attention: bool) -> "LinearReplacement":
        """From ``{"A.weight"}`` or ``{"U.weight", "V.weight"}`` (the module's own state-dict names)."""
        if "A.weight" in weights:
            w = weights["A.weight"]
            mod = cls(w.shape[1], w.shape[1], attention=attention, dtype=w.dtype, device=w.device)
        else:
            u = weights["U.weight"]
            mod = cls(u.shape[1], u.shape[0], attention=attention, dtype=u.dtype, device=u.device)
        with torch.no_grad():
            for name, p in mod.named_parameters():
                p.copy_(weights[name])
        return mod

    def matrix(self) -> torch.Tensor:
        """The full ``[hidden, hidden]`` map ``M`` with ``output = x @ M.T`` (an ``nn.Linear`` weight)."""
        if self.rank >= self.hidden:
            return self.A.weight.detach()
        return (self.V.weight @ self.U.weight).detach()

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        y = self.A(hidden_states) if self.rank >= self.hidden else self.V(self.U(hidden_states))
        return (y, None) if self.attention else y

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, rank={self.rank}, attention={self.attention}"


def _layer_linear(config: Any, layer_idx: int) -> dict[str, int]:
    """``per_layer_config[i]["linear"]``: ``{"attention" | "mlp": rank}`` of the fitted linear maps."""
    linear = dict(getattr(config.per_layer_config[layer_idx], "linear", None) or {})
    unknown = set(linear) - set(SKIP_VALUES)
    if unknown:
        raise ValueError(f"per_layer_config[{layer_idx}].linear has {sorted(unknown)}; evoprune understands "
                         f"{list(SKIP_VALUES)}.")
    return {k: int(v) for k, v in linear.items()}


def _layer_skips(config: Any, layer_idx: int) -> set[str]:
    skip = set(getattr(config.per_layer_config[layer_idx], "skip", None) or ())
    unknown = skip - set(SKIP_VALUES)
    if unknown:
        raise ValueError(
            f"per_layer_config[{layer_idx}].skip has {sorted(unknown)}; evoprune understands {list(SKIP_VALUES)}."
        )
    return skip


def attention_cache_index(config: Any, layer_idx: int) -> int:
    """Compact KV-cache index of block ``layer_idx``: the number of earlier blocks that keep attention."""
    return sum(1 for i in range(layer_idx) if "attention" not in _layer_skips(config, i))


def _patched_init(orig_init, adapter: ArchAdapter):
    @functools.wraps(orig_init)
    def __init__(self, config, layer_idx, *args, **kwargs):
        if not getattr(config, "is_heterogeneous", False):
            return orig_init(self, config, layer_idx, *args, **kwargs)
        layer_config = config.per_layer_config[layer_idx]
        skip = _layer_skips(config, layer_idx)
        linear = _layer_linear(config, layer_idx)
        orig_init(self, layer_config, layer_idx, *args, **kwargs)
        hidden = int(config.hidden_size)
        if "attention" in linear:  # skipped attention replaced by a linear map of its normed input
            setattr(self, adapter.attn, LinearReplacement(hidden, linear["attention"], attention=True))
        elif "attention" in skip:
            setattr(self, adapter.attn, DroppedAttention())
            setattr(self, adapter.attn_norm, nn.Identity())
        else:
            getattr(self, adapter.attn).layer_idx = attention_cache_index(config, layer_idx)
        if "mlp" in linear:
            setattr(self, adapter.mlp, LinearReplacement(hidden, linear["mlp"], attention=False))
        elif "mlp" in skip:
            setattr(self, adapter.mlp, DroppedMLP())
            setattr(self, adapter.mlp_norm, nn.Identity())

    __init__._evoprune_patched = True  # type: ignore[attr-defined]
    return __init__


_lock = threading.RLock()
_depth = 0
_saved: list[tuple[type, Any]] = []


class _QuietHeterogeneousWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D401
        return "per-layer attribute" not in record.getMessage()


_HETERO_LOGGER = "transformers.integrations.heterogeneity.configuration_utils"


@contextlib.contextmanager
def quiet_heterogeneous_warnings() -> Iterator[None]:
    """Silence transformers' "reading global value of a per-layer attribute" warnings (evoprune's
    exported configs allow that global access on purpose: the global values are the dense ones)."""
    logger = logging.getLogger(_HETERO_LOGGER)
    flt = _QuietHeterogeneousWarnings()
    logger.addFilter(flt)
    try:
        yield
    finally:
        logger.removeFilter(flt)


@contextlib.contextmanager
def per_layer_modules() -> Iterator[None]:
    """Scoped patch so that transformers builds each decoder block from ``per_layer_config``.

    Inside the ``with`` block, the decoder-layer classes of every registered architecture
    build block ``i`` from ``config.per_layer_config[i]`` (its own ``num_attention_heads``,
    ``num_key_value_heads``, ``intermediate_size``), replace a skipped ``"attention"``
    sublayer (and its input norm) by :class:`DroppedAttention` / ``nn.Identity`` and a
    skipped ``"mlp"`` by :class:`DroppedMLP` / ``nn.Identity``, and renumber attention
    ``layer_idx`` compactly over the blocks that keep attention (so the KV cache's layer 0
    is always a real attention layer). Homogeneous configs build exactly as before.
    The original constructors are restored on exit, also on error; nesting is allowed.

    Example (the ``from_pretrained`` hook)::

        from transformers import AutoModelForCausalLM
        from evoprune.pruning import per_layer_modules

        with per_layer_modules():
            model = AutoModelForCausalLM.from_pretrained("exported-dir")

    The patch is process-wide while active (do not build unrelated models of the same
    architecture in other threads at the same time).
    """
    global _depth
    with _lock:
        if _depth == 0:
            for adapter in registered_adapters():
                try:
                    cls = adapter.decoder_layer_class()
                except (ImportError, AttributeError):
                    continue
                if getattr(cls.__init__, "_evoprune_patched", False):
                    continue
                _saved.append((cls, cls.__dict__.get("__init__")))
                cls.__init__ = _patched_init(cls.__init__, adapter)
        _depth += 1
    try:
        with quiet_heterogeneous_warnings():
            yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                while _saved:
                    cls, orig = _saved.pop()
                    if orig is None:
                        del cls.__init__
                    else:
                        cls.__init__ = orig
