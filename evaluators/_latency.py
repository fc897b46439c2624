"""Measured latency of the materialized candidate, relative to the dense model."""

from __future__ import annotations

import gc
import hashlib
import statistics
import time
from typing import Any, Literal

import torch

from .._logging import get_logger
from ._base import EvalContext, EvalResult

__all__ = ["Latency", "measure_latency"]

_log = get_logger("evaluators.latency")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(vocab: int, batch_size: int, seq_len: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(hashlib.sha256(b"evoprune-latency").hexdigest()[:8], 16))
    return torch.randint(0, max(1, vocab), (batch_size, seq_len), generator=gen).to(device)


def measure_latency(
    model: torch.nn.Module,
    *,
    batch_size: int = 1,
    seq_len: int = 128,
    warmup: int = 2,
    repeats: int = 5,
    mode: Literal["prefill", "decode"] = "prefill",
    new_tokens: int = 16,
    device: torch.device | str | None = None,
) -> list[float]:
    """Wall times (seconds) of ``repeats`` timed runs after ``warmup`` untimed ones.

    ``"prefill"``: one forward pass over ``[batch_size, seq_len]`` tokens (no KV cache).
    ``"decode"``: after a ``seq_len`` prompt, ``new_tokens`` single-token steps
    with the KV cache (only the steps are timed). On CUDA every run is
    bracketed by ``torch.cuda.synchronize``.
    """
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 1000)
    ids = _inputs(vocab, batch_size, seq_len, device)
    step_ids = ids[:, -1:]
    was_training = model.training
    model.eval()
    times: list[float] = []
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                if mode == "prefill":
                    _sync(device)
                    t0 = time.perf_counter()
                    model(input_ids=ids, use_cache=False)
                    _sync(device)
                    elapsed = time.perf_counter() - t0
                elif mode == "decode":
                    out = model(input_ids=ids, use_cache=True)
                    past = out.past_key_values
                    _sync(device)
                    t0 = time.perf_counter()
                    for _ in range(new_tokens):
                        out = model(input_ids=step_ids, past_key_values=past, use_cache=True)
                        past = out.past_key_values
                    _sync(device)
                    elapsed = time.perf_counter() - t0
                    del past, out
                else:
                    raise ValueError(f"mode must be 'prefill' or 'decode', got {mode!r}.")
                if i >= warmup:
                    times.append(elapsed)
    finally:
        model.train(was_training)
    return times


class Latency:
    """Median forward latency of the materialized candidate / that of the dense model (minimize).

    :meth:`prepare` times the dense model (call it while the model is dense;
    the pipeline does) and caches the result in the context, so every
    candidate of the run is compared with a dense time measured in the same
    process on the same device. :meth:`evaluate` materializes the candidate
    with ``context.pruner.materialize(candidate)`` (a real, smaller module:
    sliced weights, dropped blocks gone) and times it the same way; without a
    pruner, or with a pruner in the probe mode (it prunes per batch, there is no
    fixed smaller model), ``model`` itself is timed (it is taken to be the candidate).

    Args:
        batch_size, seq_len: input shape.
        warmup, repeats: untimed and timed runs; the median of the timed runs counts.
        mode: ``"prefill"`` (one forward pass) or ``"decode"`` (``new_tokens``
            cached single-token steps).

    Details hold ``candidate_s``, ``dense_s`` (medians) and all timed runs.

    Example::

        lat = Latency(seq_len=256, repeats=10)
        lat.prepare(model, ctx)                         # dense timing
        lat.evaluate(model, candidate, ctx).value       # e.g. 0.52 for a 50 % depth cut
    """

    direction = "minimize"

    def __init__(
        self,
        *,
        batch_size: int = 1,
        seq_len: int = 128,
        warmup: int = 2,
        repeats: int = 5,
        mode: Literal["prefill", "decode"] = "prefill",
        new_tokens: int = 16,
        name: str = "latency",
    ) -> None:
        if mode not in ("prefill", "decode"):
            raise ValueError(f"Latency: mode must be 'prefill' or 'decode', got {mode!r}.")
        if repeats < 1 or warmup < 0 or batch_size < 1 or seq_len < 1:
            raise ValueError("Latency: repeats, batch_size, seq_len must be >= 1 and warmup >= 0.")
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.warmup = warmup
        self.repeats = repeats
        self.mode = mode
        self.new_tokens = new_tokens
        self.name = name

    def __repr__(self) -> str:
        return f"Latency(mode={self.mode!r}, batch_size={self.batch_size}, seq_len={self.seq_len})"

    def _key(self, device: torch.device) -> tuple:
        return (self.mode, self.batch_size, self.seq_len, self.new_tokens, str(device))

    def _measure(self, model: torch.nn.Module, device: torch.device) -> list[float]:
        return measure_latency(
            model,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            warmup=self.warmup,
            repeats=self.repeats,
            mode=self.mode,
            new_tokens=self.new_tokens,
            device=device,
        )

    def prepare(self, model: torch.nn.Module, context: EvalContext) -> None:
        """Time the dense ``model`` once per context (shared across stages)."""
        device = context.device_for(model)
        cache = context.shared.setdefault("dense_latency", {})
        key = self._key(device)
        if key not in cache:
            times = self._measure(model, device)
            cache[key] = times
            _log.info("dense %s latency %.4f s (median of %d)", self.mode, statistics.median(times), len(times))

    def evaluate(self, model: torch.nn.Module, candidate: Any, context: EvalContext) -> EvalResult:
        start = time.perf_counter()
        device = context.device_for(model)
        dense_times = context.shared.get("dense_latency", {}).get(self._key(device))
        if dense_times is None:
            raise RuntimeError(
                f"{self.name}: no dense timing in this context; call prepare(model, context) while the "
                "model is dense (Pipeline.run_batch does this)."
            )
        pruner = context.pruner
        # a probe-mode pruner (Probe Pruning) has no fixed smaller model: the applied model is timed,
        # probe, scoring and per-batch weight gathers included
        if pruner is not None and hasattr(pruner, "materialize") and getattr(pruner, "mode", "static") == "static":
            small = pruner.materialize(candidate)
            if next(small.parameters()).device != device:
                small = small.to(device)
            try:
                times = self._measure(small, device)
            finally:
                del small
                if device.type == "cuda":
                    gc.collect()
                    torch.cuda.empty_cache()
        else:
            times = self._measure(model, device)
        cand = statistics.median(times)
        dense = statistics.median(dense_times)
        return EvalResult(
            value=cand / dense,
            details={
                "candidate_s": cand,
                "dense_s": dense,
                "candidate_runs": times,
                "dense_runs": list(dense_times),
                "mode": self.mode,
                "batch_size": self.batch_size,
                "seq_len": self.seq_len,
                "device": str(device),
            },
            tokens=None,
            seconds=time.perf_counter() - start,
        )
