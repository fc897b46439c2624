"""Evaluators: score the candidate applied to a live model, in stages.

The pieces::

    from evoprune.evaluators import (EvalContext, KLToDense, Perplexity, FineTuned, LMEval,
                                     Latency, Cost, Stage, Pipeline, TopK, TopFraction)

    ctx = EvalContext(eval_ids=val_ids, train_ids=train_ids, pruner=pruner,
                      cost_model=cost_model, tokenizer=tokenizer, seed=0)
    pipe = Pipeline([
        Stage(name="s1", evaluators=[KLToDense()], eval_tokens=2048, seq_len=256, promote=TopK(4)),
        Stage(name="s2", evaluators=[KLToDense(top_k=256)], eval_tokens=16384, seq_len=256,
              finetune_tokens=20_000, finetune={"lr": 1e-5}, promote=TopK(1)),
        Stage(name="final", evaluators=[KLToDense(top_k=256), Latency()], eval_tokens=65536, seq_len=256),
    ])
    results = pipe.run_batch(candidates, model, ctx)     # model: dense when called

Every evaluator has ``name``, ``direction`` (``"minimize"``/``"maximize"``)
and ``evaluate(model, candidate, context) -> EvalResult`` (value, details,
tokens, seconds); evaluators with dense reference data also have
``prepare(model, context)``. Evaluation tokens are deterministic functions of
(data fingerprint, stage, seed): see :func:`make_token_set`.

``__all__`` lists what a user calls; the dense-reference cache (``dense_reference``,
``reference_nbytes``), fine-tune internals and the fingerprints (``model_fingerprint``,
``ids_fingerprint``, ``default_cache_dir``: re-exported from their one home,
``evoprune._fingerprint`` / ``evoprune._paths``) stay importable for advanced use. Other rooms
also use :func:`sequence_nll` (the one next-token NLL rule), :func:`normalize_windows` and
:func:`check_window_offsets` (window choices, checked when a study config is read); :func:`evoprune.plan` uses
the KL evaluator's memory rules and kernels (``resolve_top_k``, ``kl_cache_bytes_limit``,
``KL_LOGITS_BYTES_PER_FORWARD``, ``forward_logits``, ``kl_kernel``); the search's close calls use the
racing stages' paired statistics (``paired_gap``, ``t_critical``).

Names load on first use (PEP 562), so ``import evoprune.evaluators`` -- and reading a study config,
which checks window choices -- does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "ids_fingerprint": ".._fingerprint",
    "model_fingerprint": ".._fingerprint",
    "default_cache_dir": ".._paths:cache_root",
    "EvalContext": "._base",
    "EvalResult": "._base",
    "Evaluator": "._base",
    "Cost": "._cost",
    "check_distill": "._distill",
    "teacher_nbytes": "._distill",
    "FineTuned": "._finetune",
    "FineTuneReport": "._finetune",
    "finetune": "._finetune",
    "healed": "._finetune",
    "select_trainable": "._finetune",
    "DenseReference": "._kl",
    "KLToDense": "._kl",
    "Perplexity": "._kl",
    "dense_reference": "._kl",
    "perplexity": "._kl",
    "reference_nbytes": "._kl",
    "forward_logits": "._kl:_forward_logits",
    "kl_kernel": "._kl",
    "resolve_top_k": "._kl",
    "kl_cache_bytes_limit": "._kl:cache_bytes_limit",
    "KL_LOGITS_BYTES_PER_FORWARD": "._kl:LOGITS_BYTES_PER_FORWARD",
    "sequence_nll": "._kl",
    "Latency": "._latency",
    "measure_latency": "._latency",
    "LMEval": "._lmeval",
    "CandidateResult": "._pipeline",
    "EvalRecord": "._pipeline",
    "Pipeline": "._pipeline",
    "paired_gap": "._pipeline",
    "t_critical": "._pipeline",
    "PromotionRule": "._pipeline",
    "Race": "._pipeline",
    "Stage": "._pipeline",
    "StageResult": "._pipeline",
    "TopFraction": "._pipeline",
    "TopK": "._pipeline",
    "TokenSet": "._tokens",
    "make_token_set": "._tokens",
    "check_window_offsets": "._offsets",
    "normalize_windows": "._offsets",
}

__all__ = [
    "CandidateResult",
    "Cost",
    "EvalContext",
    "EvalResult",
    "Evaluator",
    "FineTuned",
    "KLToDense",
    "LMEval",
    "Latency",
    "Perplexity",
    "Pipeline",
    "Race",
    "Stage",
    "StageResult",
    "TokenSet",
    "TopFraction",
    "TopK",
    "check_window_offsets",
    "finetune",
    "make_token_set",
    "measure_latency",
    "normalize_windows",
    "perplexity",
    "sequence_nll",
]


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module, __name__), attr or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
