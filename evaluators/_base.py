"""The evaluator protocol, its result type and the shared evaluation context."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from .._fingerprint import ids_fingerprint, model_fingerprint
from .._logging import get_logger
from .._paths import cache_folder
from ._tokens import TokenSet, make_token_set, normalize_windows

__all__ = [
    "EvalContext",
    "EvalResult",
    "Evaluator",
]

_log = get_logger("evaluators")

Direction = Literal["minimize", "maximize"]


@dataclasses.dataclass
class EvalResult:
    """One evaluator's score of one candidate.

    Args:
        value: the score (``float(result)`` gives it too).
        details: JSON-able extras (e.g. every lm-eval metric, timings).
        tokens: tokens the evaluator processed (``None`` where it does not apply,
            e.g. a cost count).
        seconds: wall time of the evaluation.
    """

    value: float
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    tokens: int | None = None
    seconds: float = 0.0

    def __float__(self) -> float:
        return float(self.value)


@runtime_checkable
class Evaluator(Protocol):
    """Scores the candidate currently applied to ``model``.

    ``evaluate`` may return a plain ``float`` or an :class:`EvalResult`.
    An evaluator may also define ``prepare(model, context)``, called once per
    stage while ``model`` is still dense (the stage pipeline does this), to
    cache reference data such as the dense logits or the dense latency.

    Example (a custom evaluator)::

        class NegParams:
            name = "neg_params"
            direction = "maximize"

            def evaluate(self, model, candidate, context):
                return -float(sum(p.numel() for p in model.parameters()))
    """

    name: str
    direction: Direction

    def evaluate(self, model: torch.nn.Module, candidate: Any, context: "EvalContext") -> float | EvalResult: ...


def as_result(value: float | EvalResult, *, seconds: float = 0.0) -> EvalResult:
    """Wrap a plain float returned by an evaluator."""
    if isinstance(value, EvalResult):
        return value
    return EvalResult(value=float(value), seconds=seconds)


@dataclasses.dataclass
class EvalContext:
    """What evaluators share: data, the pruner, the cost model and caches.

    Build one per study/worker and pass it to every evaluation; stage
    contexts made by :meth:`for_stage` share its caches (dense reference
    logits, dense latency, lm-eval task managers).

    Args:
        eval_ids: 1-D LongTensor of evaluation token ids (KL, perplexity).
        train_ids: 1-D LongTensor of fine-tuning token ids (defaults to ``eval_ids``
            only if ``allow_train_on_eval=True``).
        data_fingerprint: identifies ``eval_ids``/``train_ids``; computed if omitted.
        seed: study seed; token sets depend on it.
        device: where forward passes run (default: the model's device).
        pruner: an ``evoprune.pruning.Pruner`` (``apply``/``revert``/``applied``/
            ``materialize``/``trainable_parameters``/``masks``) or ``None``.
        cost_model: an ``evoprune.space`` cost model or ``None``.
        tokenizer: needed by :class:`LMEval`.
        batch_size: default forward batch size (sequences) for KL and perplexity.
        cache_dir: where dense reference logits are cached on disk; ``None``
            means ``<cache root>/dense_reference`` (:func:`evoprune._paths.cache_root`), ``False`` disables the disk cache.
        model_fingerprint: identifies the dense model; computed on first use
            (on the dense model, in ``prepare``) if omitted.
        stage: name of the current stage (set by :meth:`for_stage`).
        tokens: the current stage's evaluation :class:`TokenSet`.
        progress: show tqdm bars for long loops.
        allow_train_on_eval: let fine-tuning draw from ``eval_ids`` when no
            ``train_ids`` are given (off by default: it leaks evaluation text).
        eval_windows: how evaluation (``split="eval"``) windows are chosen: ``"random"`` (default,
            per stage and seed), ``"first"`` (the first tokens of ``eval_ids``) or a list of window
            start offsets (see :func:`evoprune.evaluators.make_token_set`). Fine-tuning windows stay random.
        draw: ``None`` (default): every stage keeps its one token set for the whole run. An int:
            evaluation windows drawn afresh for this draw (a deterministic function of data, stage,
            seed and the draw), as EvoPress draws new calibration windows for every selection step;
            the search driver sets it to the generation (``fresh_windows``). Dense references of
            drawn sets stay in memory only (:meth:`forget_draws` drops those of other draws).

    Example::

        >>> import torch
        >>> ctx = EvalContext(eval_ids=torch.arange(5000) % 97, seed=1)
        >>> s1 = ctx.for_stage("stage1", eval_tokens=512, seq_len=64)
        >>> s1.tokens.ids.shape
        torch.Size([8, 64])
    """

    eval_ids: torch.Tensor | None = None
    train_ids: torch.Tensor | None = None
    data_fingerprint: str | None = None
    seed: int = 0
    device: torch.device | str | None = None
    pruner: Any = None
    cost_model: Any = None
    tokenizer: Any = None
    batch_size: int = 8
    cache_dir: str | Path | bool | None = None
    model_fingerprint: str | None = None
    stage: str = "default"
    tokens: TokenSet | None = None
    progress: bool = False
    allow_train_on_eval: bool = False
    shared: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    eval_windows: Any = "random"
    draw: int | None = None

    def __post_init__(self) -> None:
        for name in ("eval_ids", "train_ids"):
            ids = getattr(self, name)
            if ids is not None and (not isinstance(ids, torch.Tensor) or ids.dim() != 1):
                raise ValueError(f"EvalContext.{name} must be a 1-D LongTensor of token ids.")
        if self.batch_size < 1:
            raise ValueError(f"EvalContext.batch_size must be >= 1, got {self.batch_size}.")
        self.eval_windows = normalize_windows(self.eval_windows, what="EvalContext.eval_windows")
        if self.data_fingerprint is None and (self.eval_ids is not None or self.train_ids is not None):
            parts = [ids_fingerprint(i) if i is not None else "-" for i in (self.eval_ids, self.train_ids)]
            self.data_fingerprint = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    # -- token sets -------------------------------------------------------------------------
    def token_set(
        self, num_tokens: int, seq_len: int, *, split: Literal["eval", "train"] = "eval", stage: str | None = None
    ) -> TokenSet:
        """The deterministic token set of ``stage`` (default: this context's stage), cached; evaluation
        windows follow :attr:`eval_windows`."""
        stage = self.stage if stage is None else str(stage)
        if split == "eval":
            ids = self.eval_ids
        elif split == "train":
            ids = self.train_ids
            if ids is None and self.allow_train_on_eval:
                ids = self.eval_ids
        else:
            raise ValueError(f"split must be 'eval' or 'train', got {split!r}.")
        if ids is None:
            raise ValueError(
                f"EvalContext has no {split}_ids; pass {split}_ids=<1-D LongTensor> "
                "(e.g. from evoprune.data.tokenized_split)."
            )
        windows = self.eval_windows if split == "eval" else "random"
        draw = self.draw if split == "eval" and windows == "random" else None
        cache = self.shared.setdefault("token_sets", {})
        key = (split, stage, int(num_tokens), int(seq_len), windows, draw)
        if key not in cache:
            cache[key] = make_token_set(
                ids,
                num_tokens=num_tokens,
                seq_len=seq_len,
                stage=f"{split}:{stage}" if draw is None else f"{split}:{stage}#draw{int(draw)}",
                seed=self.seed,
                data_fingerprint=self.data_fingerprint,
                windows=windows,
            )
        return cache[key]

    def forget_draws(self, keep: int | None = None) -> None:
        """Drop what the shared caches hold for token sets of draws other than ``keep`` (token sets,
        dense references, window digests, per-window KL): a run with fresh windows per generation
        keeps only the current generation's."""
        sets = self.shared.get("token_sets", {})
        old = {k: ts for k, ts in sets.items() if k[-1] is not None and k[-1] != keep}
        if not old:
            return
        keys = {ts.key for ts in old.values()}
        stages = {ts.stage for ts in old.values()}
        for k in old:
            sets.pop(k, None)
        refs = self.shared.get("dense_reference", {})
        for k in [k for k in refs if k[0] in keys]:
            refs.pop(k, None)
        memo = self.shared.get("window_hashes", {})
        for k in keys:
            memo.pop(k, None)
        windows = self.shared.get("kl_windows", {})
        for k in [k for k in windows if len(k) > 2 and k[2] in stages]:
            windows.pop(k, None)
        done = self.shared.get("prepared", set())
        for k in [k for k in done if k[-1] is not None and k[-1] != keep]:
            done.discard(k)

    def for_stage(self, stage: str, *, eval_tokens: int | None = None, seq_len: int | None = None) -> "EvalContext":
        """A copy for ``stage`` (sharing caches) whose ``tokens`` is the stage's token set."""
        tokens = None
        if eval_tokens:
            if seq_len is None:
                raise ValueError("for_stage: give seq_len together with eval_tokens.")
            tokens = self.token_set(eval_tokens, seq_len, stage=stage)
        return dataclasses.replace(self, stage=str(stage), tokens=tokens)

    def require_tokens(self, evaluator: str) -> TokenSet:
        if self.tokens is None:
            raise ValueError(
                f"{evaluator} needs evaluation tokens: use context.for_stage(name, eval_tokens=..., seq_len=...) "
                "or give the evaluator num_tokens= and seq_len=."
            )
        return self.tokens

    # -- models -----------------------------------------------------------------------------
    def device_for(self, model: torch.nn.Module) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        for p in model.parameters():
            return p.device
        return torch.device("cpu")

    def fingerprint_of(self, model: torch.nn.Module) -> str:
        """The dense model's fingerprint (computed once, on first call, from ``model``)."""
        if self.model_fingerprint is None:
            fp = self.shared.get("model_fingerprint")
            if fp is None:
                fp = model_fingerprint(model)
                self.shared["model_fingerprint"] = fp
                _log.info("dense model fingerprint %s", fp)
            self.model_fingerprint = fp
        return self.model_fingerprint

    def resolved_cache_dir(self) -> Path | None:
        if self.cache_dir is False:
            return None
        if self.cache_dir is None or self.cache_dir is True:
            return cache_folder("dense_reference")
        return Path(self.cache_dir)
