"""lm-evaluation-harness tasks on the live (candidate-applied) model, offline-safe."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .._logging import get_logger
from ._base import EvalContext, EvalResult

__all__ = ["LMEval"]

_log = get_logger("evaluators.lmeval")

_MINIMIZE_METRICS = ("perplexity", "bits_per_byte", "loss")


def _hflm_class():
    from lm_eval.models.huggingface import HFLM

    class _InMemoryHFLM(HFLM):
        """HFLM on an in-memory model that never asks the Hub for a model sha."""

        def get_model_info(self) -> dict:
            model = self._model
            return {
                "model_num_parameters": sum(p.numel() for p in model.parameters()),
                "model_dtype": getattr(model, "dtype", ""),
                "model_revision": "in-memory",
                "model_sha": "",
            }

        def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                        labels: torch.Tensor | None = None) -> torch.Tensor:
            # lm-eval right-pads loglikelihood batches and calls the model without a mask; pass the
            # real lengths (recorded by _padding_lengths) as an attention mask so a per-batch mode
            # (probe) leaves the padding out of its ranking and history.
            lengths, _PADDING.lengths = _PADDING.lengths, None
            if (attn_mask is None and labels is None and lengths is not None and len(lengths) == inps.shape[0]
                    and max(lengths) <= inps.shape[1] and min(lengths) < inps.shape[1]):
                mask = (torch.arange(inps.shape[1]) < torch.tensor(lengths).unsqueeze(1)).to(inps.device, torch.long)
                with torch.no_grad():
                    return self.model(inps, attention_mask=mask).logits
            return super()._model_call(inps, attn_mask, labels)

    return _InMemoryHFLM


class _Padding(threading.local):
    lengths: list[int] | None = None


_PADDING = _Padding()


@contextlib.contextmanager
def _padding_lengths() -> Iterator[None]:
    """Record the unpadded lengths of every batch lm-eval right-pads (``pad_and_concat``)."""
    import lm_eval.models.huggingface as hf

    orig = hf.pad_and_concat

    def wrapped(max_length: int, tensors: list, padding_side: str = "right"):
        _PADDING.lengths = [int(t.shape[0]) for t in tensors] if padding_side == "right" else None
        return orig(max_length, tensors, padding_side=padding_side)

    hf.pad_and_concat = wrapped
    try:
        yield
    finally:
        hf.pad_and_concat = orig
        _PADDING.lengths = None


@contextlib.contextmanager
def _no_git_probe() -> Iterator[None]:
    """``simple_evaluate`` shells out to ``git describe`` per call; skip that (scoped, restored)."""
    import lm_eval.evaluator as ev

    original = getattr(ev, "get_git_commit_hash", None)
    if original is None:
        yield
        return
    ev.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        ev.get_git_commit_hash = original


def _task_manager(context: EvalContext, include_path: Sequence[str], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    cache = context.shared.setdefault("lm_eval_task_managers", {})
    key = (tuple(include_path), include_defaults)
    if key not in cache:
        cache[key] = TaskManager(include_path=list(include_path) or None, include_defaults=include_defaults)
    return cache[key]


class LMEval:
    """Run lm-eval tasks on the in-memory candidate and return one metric.

    The live model (with the candidate applied in place) is wrapped in
    ``lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=context.tokenizer)``
    and scored with ``lm_eval.simple_evaluate``. Tasks are names lm-eval knows
    or names defined by YAML files under ``include_path``. Nothing here needs
    the network: with ``HF_HUB_OFFLINE=1``/``HF_DATASETS_OFFLINE=1`` local tasks
    (e.g. ``dataset_path: json`` with absolute ``data_files``) and tasks whose
    datasets are already in the HF cache run offline.

    Args:
        tasks: task (or group) names.
        metric: metric name (``"acc"``, ``"acc_norm"``, ``"word_perplexity"``, ...)
            or a full lm-eval key such as ``"acc,none"``.
        task: the task whose metric is the value (default: the first task).
        include_path: directories with task YAMLs.
        include_defaults: also index lm-eval's built-in tasks (slower to build;
            set ``False`` when all tasks are local and self-contained).
        batch_size, limit, num_fewshot: passed to lm-eval.
        direction: default ``"minimize"`` for perplexity/bits-per-byte metrics,
            else ``"maximize"``.

    Details hold every numeric metric of every task (``{task: {key: value}}``).

    Example::

        ev = LMEval(["evoprune_ref_cloze"], metric="acc", include_path=[ckpt / "lm_eval_tasks"])
        ctx = EvalContext(tokenizer=tokenizer)
        with pruner.applied(candidate):
            ev.evaluate(model, candidate, ctx).value
    """

    def __init__(
        self,
        tasks: Sequence[str] | str,
        *,
        metric: str = "acc",
        task: str | None = None,
        include_path: Sequence[str | Path] | str | Path | None = None,
        include_defaults: bool = True,
        batch_size: int = 8,
        limit: int | float | None = None,
        num_fewshot: int | None = None,
        max_length: int | None = None,
        direction: str | None = None,
        name: str | None = None,
    ) -> None:
        self.tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        if not self.tasks:
            raise ValueError("LMEval needs at least one task name.")
        if include_path is None:
            paths: list[str] = []
        elif isinstance(include_path, (str, Path)):
            paths = [str(include_path)]
        else:
            paths = [str(p) for p in include_path]
        for p in paths:
            if not Path(p).exists():
                raise ValueError(f"LMEval: include_path {p!r} does not exist.")
        self.include_path = paths
        self.include_defaults = include_defaults
        self.metric = metric
        self.task = task or self.tasks[0]
        self.batch_size = batch_size
        self.limit = limit
        self.num_fewshot = num_fewshot
        self.max_length = max_length
        base = metric.split(",")[0]
        if direction is None:
            direction = "minimize" if any(base.endswith(m) for m in _MINIMIZE_METRICS) else "maximize"
        if direction not in ("minimize", "maximize"):
            raise ValueError(f"direction must be 'minimize' or 'maximize', got {direction!r}.")
        self.direction = direction
        self.name = name or f"lm_eval:{self.task}:{base}"

    def __repr__(self) -> str:
        return f"LMEval({self.tasks}, metric={self.metric!r}, task={self.task!r})"

    def evaluate(self, model: torch.nn.Module, candidate: Any, context: EvalContext) -> EvalResult:
        import lm_eval

        if context.tokenizer is None:
            raise ValueError("LMEval needs context.tokenizer (the dense model's tokenizer).")
        start = time.perf_counter()
        tm = _task_manager(context, self.include_path, self.include_defaults)
        hflm_kwargs: dict[str, Any] = {"batch_size": self.batch_size}
        if self.max_length is not None:
            hflm_kwargs["max_length"] = self.max_length
        was_training = model.training
        lm = _hflm_class()(pretrained=model, tokenizer=context.tokenizer, **hflm_kwargs)
        try:
            with torch.inference_mode(), _no_git_probe(), _padding_lengths():
                out = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=self.tasks,
                    task_manager=tm,
                    num_fewshot=self.num_fewshot,
                    limit=self.limit,
                    bootstrap_iters=0,
                    log_samples=False,
                    random_seed=context.seed,
                    numpy_random_seed=context.seed,
                    torch_random_seed=context.seed,
                    fewshot_random_seed=context.seed,
                )
        finally:
            model.train(was_training)
        if out is None:  # non-zero rank in a distributed run
            raise RuntimeError("lm_eval.simple_evaluate returned no results.")
        details: dict[str, Any] = {}
        for task_name, metrics in out.get("results", {}).items():
            details[task_name] = {
                k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        if "n-samples" in out:
            details["n_samples"] = {t: dict(v) for t, v in out["n-samples"].items()}
        value = self._pick(details)
        return EvalResult(value=value, details=details, tokens=None, seconds=time.perf_counter() - start)

    def _pick(self, details: dict[str, Any]) -> float:
        if self.task not in details:
            raise KeyError(f"LMEval: task {self.task!r} not in results (have {sorted(details)}).")
        metrics = details[self.task]
        key = self.metric if "," in self.metric else None
        if key is None:
            for k in (f"{self.metric},none", self.metric):
                if k in metrics:
                    key = k
                    break
            else:
                matches = [k for k in metrics if k.split(",")[0] == self.metric]
                key = matches[0] if matches else None
        if key is None or key not in metrics:
            raise KeyError(f"LMEval: metric {self.metric!r} not in {self.task!r} results (have {sorted(metrics)}).")
        value = metrics[key]
        return float(value) if not math.isnan(value) else math.nan
