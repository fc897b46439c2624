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
``evoprune._fingerprint`` / ``evoprune._paths``) stay importable for advanced use.
"""

from .._fingerprint import ids_fingerprint, model_fingerprint
from .._paths import cache_root as default_cache_dir
from ._base import EvalContext, EvalResult, Evaluator
from ._cost import Cost
from ._finetune import FineTuned, FineTuneReport, finetune, healed, select_trainable
from ._kl import DenseReference, KLToDense, Perplexity, dense_reference, perplexity, reference_nbytes
from ._latency import Latency, measure_latency
from ._lmeval import LMEval
from ._pipeline import (
    CandidateResult,
    EvalRecord,
    Pipeline,
    PromotionRule,
    Race,
    Stage,
    StageResult,
    TopFraction,
    TopK,
)
from ._tokens import TokenSet, make_token_set

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
    "finetune",
    "make_token_set",
    "measure_latency",
    "perplexity",
]
