"""Brief fine-tuning of the applied candidate, undone bit for bit afterwards.

While a candidate is applied, its kept weights are prefix-slice views of the
dense weights, so training them writes into the dense model. :func:`finetune`
therefore backs up exactly the data of the parameters it trains, trains with
AdamW (fp32 master copies for half-precision weights), re-applies the pruner's
sparsity masks after every step (zeros stay zero, masked gradients are
zeroed), and on exit copies the backup back and checks (by checksum or
exactly) that every weight storage of the model is what it was before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch

from .._logging import get_logger
from ._base import EvalContext, EvalResult, as_result
from ._distill import check_distill, distill_loss, teacher_reference

__all__ = ["FineTuneReport", "FineTuned", "finetune", "healed", "select_trainable"]

_log = get_logger("evaluators.finetune")

TrainSpec = Literal["all", "norms+lm_head"] | Callable[[str], bool]
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclasses.dataclass
class FineTuneReport:
    """What a fine-tune did: steps, tokens, per-step training losses, time."""

    steps: int
    tokens: int
    losses: list[float]
    seconds: float
    trained_numel: int
    lr: float
    token_set: str
    loss: str = "ce"
    teacher_bytes: int = 0

    @property
    def first_loss(self) -> float:
        return self.losses[0] if self.losses else math.nan

    @property
    def last_loss(self) -> float:
        return self.losses[-1] if self.losses else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            "seconds": self.seconds,
            "trained_numel": self.trained_numel,
            "lr": self.lr,
            "token_set": self.token_set,
            "loss": self.loss,
            "teacher_bytes": self.teacher_bytes,
        }


def _names_by_id(model: torch.nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _kept_parameters(model: torch.nn.Module, pruner: Any) -> list[torch.nn.Parameter]:
    source = None
    if pruner is not None and hasattr(pruner, "trainable_parameters"):
        source = pruner.trainable_parameters()
    if source is None:
        source = model.parameters()
    if isinstance(source, Mapping):
        source = source.values()
    params: list[torch.nn.Parameter] = []
    seen: set[int] = set()
    for item in source:
        p = item[1] if isinstance(item, tuple) else item
        if id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def select_trainable(
    model: torch.nn.Module,
    *,
    pruner: Any = None,
    train: TrainSpec = "all",
    layers: Iterable[int] = (),
) -> list[tuple[str, torch.nn.Parameter]]:
    """The kept parameters a fine-tune trains, as ``(name, parameter)`` pairs.

    Kept parameters are ``pruner.trainable_parameters()`` (the live views of a
    applied candidate) or, without a pruner, ``model.parameters()``. Then:

    - ``train="all"``: all of them;
    - ``train="norms+lm_head"``: normalization weights and the output head,
      plus every parameter of the decoder blocks in ``layers``;
    - ``train=callable``: those whose name the callable accepts (plus ``layers``).

    ``layers`` are the block indices as they appear in parameter names
    (``...layers.<i>....``).
    """
    if not (train in ("all", "norms+lm_head") or callable(train)):
        raise ValueError(f"train must be 'all', 'norms+lm_head' or a callable(name) -> bool, got {train!r}.")
    layer_set = {int(i) for i in layers}
    names = _names_by_id(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    out: list[tuple[str, torch.nn.Parameter]] = []
    for p in _kept_parameters(model, pruner):
        pnames = names.get(id(p), [f"<unnamed {tuple(p.shape)}>"])
        in_layers = any((m := _LAYER_RE.search(n)) and int(m.group(1)) in layer_set for n in pnames)
        if train == "all":
            keep = True
        elif train == "norms+lm_head":
            keep = in_layers or id(p) in head_ids or any("norm" in n.rsplit(".", 2)[-2] for n in pnames if "." in n)
        else:
            keep = in_layers or any(train(n) for n in pnames)
        if keep and p.is_floating_point():
            out.append((pnames[0], p))
    return out


# -- storage checks ---------------------------------------------------------------------------------------
def _storages(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """One uint8 tensor over each distinct storage backing ``tensors``."""
    seen: set[tuple[str, int]] = set()
    out = []
    for t in tensors:
        st = t.untyped_storage()
        key = (str(t.device), st.data_ptr())
        if key in seen or st.nbytes() == 0:
            continue
        seen.add(key)
        out.append(torch.empty(0, dtype=torch.uint8, device=t.device).set_(st))
    return out


def _checksum(raw: torch.Tensor) -> tuple[int, int]:
    x = raw.view(torch.int32) if raw.numel() % 4 == 0 else raw
    return int(x.sum(dtype=torch.int64)), int(x[::7].sum(dtype=torch.int64))


class _StorageGuard:
    def __init__(self, tensors: Iterable[torch.Tensor], mode: str) -> None:
        self.mode = mode
        self.raw = _storages(tensors) if mode != "off" else []
        if mode == "checksum":
            self.before = [_checksum(r) for r in self.raw]
        elif mode == "exact":
            self.before = [r.clone() for r in self.raw]
        elif mode != "off":
            raise ValueError(f"verify must be 'checksum', 'exact' or 'off', got {mode!r}.")

    def check(self) -> None:
        for i, raw in enumerate(self.raw):
            same = _checksum(raw) == self.before[i] if self.mode == "checksum" else torch.equal(raw, self.before[i])
            if not same:
                raise RuntimeError(
                    "fine-tune restore check failed: a weight storage of the model differs from before the "
                    "fine-tune (something wrote outside the trained parameters). The dense model is no longer "
                    "intact; reload it."
                )


@contextlib.contextmanager
def finetune(
    model: torch.nn.Module,
    context: EvalContext,
    *,
    tokens: int,
    lr: float = 1e-5,
    train: TrainSpec = "all",
    layers: Iterable[int] = (),
    batch_size: int = 4,
    seq_len: int | None = None,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    max_grad_norm: float | None = 1.0,
    verify: Literal["checksum", "exact", "off"] = "checksum",
    loss: Literal["ce", "kl", "kl+ce"] = "ce",
    temperature: float = 1.0,
    top_k: int | str = "auto",
) -> Iterator[FineTuneReport]:
    """Fine-tune the applied candidate for ``tokens`` training tokens; undo it on exit.

    Training data: the deterministic token set of ``context.train_ids`` for
    stage ``"<context.stage>"`` (every candidate of a stage sees the same
    sequences in the same order). Pruned structure stays pruned: only the
    kept views train, sparsity masks (``context.pruner.masks``) zero masked
    gradients before and masked weights after every step. On exit the trained
    parameters get their exact previous bytes back and ``verify`` checks that
    every weight storage of ``model`` is unchanged.

    ``loss``: ``"ce"`` (next-token cross-entropy), ``"kl"`` (distillation:
    ``T**2 * KL(dense_T || candidate_T)`` per token at ``temperature`` T, the
    dense teacher computed once by reverting the candidate, see
    :mod:`evoprune.evaluators._distill`; ``top_k`` bounds its memory) or
    ``"kl+ce"`` (their sum).

    Example::

        with pruner.applied(candidate), finetune(model, ctx, tokens=50_000, lr=1e-5) as report:
            kl = KLToDense().evaluate(model, candidate, ctx)
        report.first_loss, report.last_loss    # the dense weights are intact again here
    """
    if tokens < 1:
        raise ValueError(f"finetune: tokens must be >= 1, got {tokens}.")
    if lr <= 0:
        raise ValueError(f"finetune: lr must be > 0, got {lr}.")
    check_distill(loss, temperature, top_k)
    if seq_len is None:
        if context.tokens is None:
            raise ValueError("finetune: give seq_len= (or use a stage context whose tokens define it).")
        seq_len = context.tokens.seq_len
    data = context.token_set(tokens, seq_len, split="train")
    pruner = context.pruner
    # the teacher first: computing it reverts and re-applies the candidate (new live views)
    teacher = (teacher_reference(model, context, data, temperature=temperature, top_k=top_k, batch_size=batch_size)
               if loss != "ce" else None)
    named = select_trainable(model, pruner=pruner, train=train, layers=layers)
    if not named:
        raise ValueError(f"finetune: no parameters selected for train={train!r}, layers={list(layers)}.")
    params = [p for _, p in named]
    mask_src = getattr(pruner, "masks", None) or {}
    masks_by_id = {id(k): v for k, v in (mask_src.items() if isinstance(mask_src, Mapping) else mask_src)}
    masks: list[torch.Tensor | None] = []
    for name, p in named:
        m = masks_by_id.get(id(p))
        if m is not None and m.shape != p.shape:
            raise ValueError(f"finetune: sparsity mask of {name} has shape {tuple(m.shape)}, weight {tuple(p.shape)}.")
        masks.append(m.to(p.device) if m is not None else None)

    guard = _StorageGuard(list(model.parameters()) + params, verify)
    backup = [p.detach().clone() for p in params]
    all_params = list(model.parameters())
    flags = [q.requires_grad for q in all_params]
    was_training = model.training
    device = context.device_for(model)
    masters = [p.detach().float().clone() if p.dtype != torch.float32 else p for p in params]
    report = FineTuneReport(
        steps=0,
        tokens=0,
        losses=[],
        seconds=0.0,
        trained_numel=sum(p.numel() for p in params),
        lr=lr,
        token_set=data.key,
        loss=loss,
        teacher_bytes=teacher.nbytes if teacher is not None else 0,
    )
    start = time.perf_counter()
    try:
        for q in all_params:
            q.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        opt = torch.optim.AdamW(masters, lr=lr, betas=betas, weight_decay=weight_decay)
        model.train()
        batches = data.batches(batch_size)
        if context.progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=math.ceil(data.num_sequences / batch_size), desc="finetune", leave=False)
        row = 0
        for batch in batches:
            batch = batch.to(device)
            out = model(input_ids=batch, labels=batch if loss != "kl" else None, use_cache=False)
            if teacher is None:
                step_loss = out.loss
            else:
                kd = distill_loss(out.logits, teacher.rows(row, row + batch.shape[0], device))
                step_loss = kd if loss == "kl" else kd + out.loss
            row += batch.shape[0]
            if not torch.isfinite(step_loss):
                _log.warning("fine-tune loss is %s at step %d; stopping early", float(step_loss.detach()), report.steps)
                report.losses.append(float(step_loss.detach()))
                break
            step_loss.backward()
            with torch.no_grad():
                for p, master, m in zip(params, masters, masks):
                    if p.grad is None:
                        continue
                    if master is not p:
                        master.grad = p.grad.float()
                        p.grad = None
                    if m is not None:
                        master.grad.mul_(m)
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_([m for m in masters if m.grad is not None], max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                for p, master, m in zip(params, masters, masks):
                    if m is not None:
                        master.mul_(m)
                    if master is not p:
                        p.copy_(master)
                    p.grad = None
            report.steps += 1
            report.tokens += batch.numel()
            report.losses.append(float(step_loss.detach()))
        del opt
        model.train(was_training)
        report.seconds = time.perf_counter() - start
        _log.debug(
            "fine-tuned %d params for %d tokens: loss %.4f -> %.4f",
            report.trained_numel,
            report.tokens,
            report.first_loss,
            report.last_loss,
        )
        # the model is no longer "dense + candidate": evaluators must not reuse cached per-window scores
        context.shared["model_modified"] = context.shared.get("model_modified", 0) + 1
        try:
            yield report
        finally:
            context.shared["model_modified"] -= 1
    finally:
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.grad = None
                p.copy_(b)
        for q, f in zip(all_params, flags):
            q.requires_grad_(f)
        model.train(was_training)
        del backup, masters
        guard.check()


class FineTuned:
    """Evaluator wrapper: fine-tune the applied candidate, score it with ``inner``, undo.

    ``evaluate`` returns the first inner evaluator's result (its details hold
    the fine-tune report and every inner result); :meth:`evaluate_all` returns
    one result per inner evaluator plus the fine-tune itself (name
    ``"finetune"``, value = last training loss). Fine-tuning options are those
    of :func:`finetune`.

    Example::

        stage_eval = FineTuned([KLToDense()], tokens=50_000, lr=1e-5, train="all")
        stage_eval.prepare(model, ctx)             # dense model: caches the KL reference
        with pruner.applied(candidate):
            result = stage_eval.evaluate(model, candidate, ctx)
    """

    def __init__(
        self,
        inner: Sequence[Any] | Any,
        *,
        tokens: int,
        name: str | None = None,
        **options: Any,
    ) -> None:
        self.inner = list(inner) if isinstance(inner, (list, tuple)) else [inner]
        if not self.inner:
            raise ValueError("FineTuned needs at least one inner evaluator.")
        if tokens < 1:
            raise ValueError(f"FineTuned: tokens must be >= 1, got {tokens}.")
        self.tokens = int(tokens)
        self.options = options
        self.name = name or f"finetuned_{self.inner[0].name}"
        self.direction = self.inner[0].direction

    def __repr__(self) -> str:
        return f"FineTuned({self.inner!r}, tokens={self.tokens}, {self.options})"

    def prepare(self, model: torch.nn.Module, context: EvalContext) -> None:
        for ev in self.inner:
            if hasattr(ev, "prepare"):
                ev.prepare(model, context)

    def evaluate_all(
        self, model: torch.nn.Module, candidate: Any, context: EvalContext
    ) -> list[tuple[str, EvalResult]]:
        """``[("finetune", result), (inner.name, result), ...]``."""
        out: list[tuple[str, EvalResult]] = []
        with finetune(model, context, tokens=self.tokens, **self.options) as report:
            out.append(
                (
                    "finetune",
                    EvalResult(
                        value=report.last_loss, details=report.to_dict(), tokens=report.tokens, seconds=report.seconds
                    ),
                )
            )
            for ev in self.inner:
                t0 = time.perf_counter()
                res = as_result(ev.evaluate(model, candidate, context))
                if not res.seconds:
                    res.seconds = time.perf_counter() - t0
                res.details = {**res.details, "finetune_tokens": report.tokens}
                out.append((ev.name, res))
        return out

    def evaluate(self, model: torch.nn.Module, candidate: Any, context: EvalContext) -> EvalResult:
        t0 = time.perf_counter()
        results = self.evaluate_all(model, candidate, context)
        first = results[1][1]
        details = {
            "finetune": results[0][1].details,
            "results": {name: {"value": r.value, "tokens": r.tokens, "details": r.details} for name, r in results[1:]},
        }
        return EvalResult(value=first.value, details=details, tokens=first.tokens, seconds=time.perf_counter() - t0)


@contextlib.contextmanager
def healed(
    model: torch.nn.Module,
    context: EvalContext,
    *,
    tokens: int,
    eval_tokens: int,
    seq_len: int,
    lr: float = 1e-4,
    batch_size: int = 4,
    **options: Any,
) -> Iterator[dict[str, Any]]:
    """Heal the applied candidate for export: perplexity before, :func:`finetune`, perplexity after.

    Perplexity (:func:`evoprune.evaluators.perplexity`, the one rule) is measured on the
    deterministic evaluation token set ``(eval_tokens, seq_len)`` of stage ``context.stage``;
    the fine-tune trains on ``context.train_ids`` with the structure-preserving
    :func:`finetune` (pruned structure and sparsity zeros stay pruned). Inside the block
    the model holds the healed weights (materialize or export it there); on exit the dense
    weights are restored bit for bit. Yields ``{"ppl_before", "ppl_after", "finetune",
    "eval_tokens", "seq_len"}``; ``finetune`` is the :class:`FineTuneReport` as a dict.

    Example::

        with pruner.applied(candidate), healed(model, ctx, tokens=20_000, eval_tokens=4096, seq_len=128) as h:
            pruner.export(candidate, "out/")          # the healed weights
        h["ppl_before"], h["ppl_after"]
    """
    from ._kl import perplexity

    windows = context.token_set(eval_tokens, seq_len, split="eval").ids
    bs = context.batch_size
    device = context.device_for(model)
    record: dict[str, Any] = {"ppl_before": perplexity(model, windows, batch_size=bs, device=device)}
    with finetune(model, context, tokens=tokens, lr=lr, seq_len=seq_len, batch_size=batch_size, **options) as report:
        record["ppl_after"] = perplexity(model, windows, batch_size=bs, device=device)
        record.update(finetune=report.to_dict(), eval_tokens=int(windows.numel()), seq_len=int(seq_len))
        _log.info("healed", extra={"fields": {"ppl_before": round(record["ppl_before"], 3),
                                             "ppl_after": round(record["ppl_after"], 3), "tokens": report.tokens}})
        yield record
