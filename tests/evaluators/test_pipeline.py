"""The stage pipeline: promotion, records, fine-tune stages, determinism across workers."""

from __future__ import annotations

import math

import pytest
import torch

from evoprune.evaluators import (
    Cost,
    EvalContext,
    KLToDense,
    Perplexity,
    Pipeline,
    Stage,
    TopFraction,
    TopK,
)
from evoprune.pruning import Pruner
from evoprune.space import CostModel
from helpers import bits, calib, candidate

pytestmark = pytest.mark.usefixtures("one_thread")  # the shared 2 cores: one intra-op thread


class _Params:
    """A user evaluator returning a plain float."""

    name = "live_params"
    direction = "minimize"

    def evaluate(self, model, candidate, context):
        return float(sum(p.numel() for p in model.parameters()))


def _stages():
    return [
        Stage(name="s1", evaluators=[KLToDense(), Cost(metric="params"), _Params()], eval_tokens=1024, seq_len=128,
              promote=TopK(3)),
        Stage(name="s2", evaluators=[KLToDense(top_k=64), Perplexity()], eval_tokens=2048, seq_len=128,
              finetune_tokens=1024, finetune={"lr": 1e-3, "batch_size": 4}, promote=TopFraction(0.5)),
        Stage(name="final", evaluators=[Perplexity(), KLToDense()], objective="kl", eval_tokens=4096,
              seq_len=128),
    ]


def _setup(ref_data):
    model = ref_data.model()
    pruner = Pruner(model, calib(ref_data.eval_ids))
    spec = pruner.spec
    ctx = EvalContext(
        eval_ids=ref_data.eval_ids, train_ids=ref_data.train_ids, data_fingerprint=ref_data.fingerprint,
        pruner=pruner, cost_model=CostModel(spec), cache_dir=False, seed=0,
    )
    i = spec.intermediate_size
    cands = [
        candidate(spec, mlp=i // 4, drop=(1,)),
        candidate(spec, mlp=3 * i // 4),
        candidate(spec, drop=(1, 2)),
        candidate(spec, mlp=i // 2),
        candidate(spec, kv=1, mlp=i // 2),
    ]
    return model, pruner, ctx, cands


def test_pipeline_promotes_records_and_restores(ref_data):
    model, pruner, ctx, cands = _setup(ref_data)
    dense = {n: bits(p) for n, p in model.state_dict().items()}
    pipe = Pipeline(_stages())
    results = pipe.run_batch(cands, model, ctx)
    assert len(results) == len(cands)
    s1 = [r.stage("s1").objective for r in results]
    # stage 1: the 3 lowest KLs go on
    best3 = sorted(range(len(cands)), key=lambda i: s1[i])[:3]
    assert [r.stage("s1").promoted for r in results] == [i in best3 for i in range(len(cands))]
    reached_s2 = [i for i, r in enumerate(results) if r.stage("s2") is not None]
    assert reached_s2 == sorted(best3)
    # stage 2: ceil(0.5 * 3) = 2 go on to the final stage, which promotes nobody
    reached_final = [i for i, r in enumerate(results) if r.stage("final") is not None]
    assert len(reached_final) == 2 and set(reached_final) <= set(reached_s2)
    s2 = {i: results[i].stage("s2").objective for i in reached_s2}
    assert set(reached_final) == set(sorted(s2, key=s2.get)[:2])
    assert all(results[i].stage("final").promoted is None for i in reached_final)
    assert results[reached_final[0]].last_stage == "final"
    # records: (stage, evaluator, tokens, value, seconds)
    rec = results[best3[0]].stage("s1").records
    assert [r.evaluator for r in rec] == ["kl", "params_ratio", "live_params"]
    assert rec[0].tokens == 1024 and rec[0].seconds > 0 and rec[0].direction == "minimize"
    assert rec[1].tokens is None and 0 < rec[1].value < 1
    # the user evaluator saw the applied (smaller) model
    assert rec[2].value == ctx.cost_model.params(cands[best3[0]])
    s2rec = results[reached_s2[0]].stage("s2").records
    assert [r.evaluator for r in s2rec] == ["finetune", "kl", "ppl"]
    assert s2rec[0].tokens == 1024 and s2rec[1].tokens == 2048
    assert s2rec[1].details["finetune_tokens"] == 1024
    fin = results[reached_final[0]].stage("final")
    assert fin.objective == fin.value("kl") and fin.direction == "minimize"
    assert all(math.isfinite(r.value) for r in results[reached_final[0]].records)
    # everything is JSON-able for the study database
    import json

    assert json.loads(json.dumps(results[reached_final[0]].to_dict()))["stages"][0]["stage"] == "s1"
    # the model is dense again, bit for bit
    assert pruner.candidate is None
    assert all(torch.equal(bits(p), dense[n]) for n, p in model.state_dict().items())

    # a second worker with the same data and seed scores identically (no fine-tune involved at s1)
    model2, pruner2, ctx2, _ = _setup(ref_data)
    pipe2 = Pipeline(_stages())
    pipe2.prepare(model2, ctx2)
    again = pipe2.run_stage("s1", model2, cands[0], ctx2)
    assert again.objective == results[0].stage("s1").objective


def test_pipeline_history_promotion_and_run_stage(ref_data):
    model, pruner, ctx, cands = _setup(ref_data)
    stages = [
        Stage(name="s1", evaluators=[KLToDense()], eval_tokens=512, seq_len=128, promote=TopFraction(0.25)),
        Stage(name="s2", evaluators=[KLToDense()], eval_tokens=1024, seq_len=128),
    ]
    pipe = Pipeline(stages)
    # history from earlier workers: everything before was excellent, so nobody of this batch is promoted
    res = pipe.run_batch(cands[:2], model, ctx, history={"s1": [0.0] * 20})
    assert [r.last_stage for r in res] == ["s1", "s1"]
    assert [r.stage("s1").promoted for r in res] == [False, False]
    # an asynchronous worker: score one candidate at one stage, decide from the shared history
    one = pipe.run_stage("s1", model, cands[1], ctx)
    assert one.objective == res[1].stage("s1").objective and one.promoted is None
    assert TopFraction(0.25).promotes(one.objective, [one.objective * 2] * 3)
    assert pipe.stage(1).name == "s2" and pipe.stage("s2") is stages[1]


def test_stage_and_pipeline_validation():
    kl = KLToDense()
    with pytest.raises(ValueError, match="distinct"):
        Stage(name="s", evaluators=[kl, KLToDense()], eval_tokens=10)
    with pytest.raises(ValueError, match="objective"):
        Stage(name="s", evaluators=[kl], objective="nope")
    with pytest.raises(ValueError, match="finetune options"):
        Stage(name="s", evaluators=[kl], finetune={"learning_rate": 1})
    with pytest.raises(TypeError, match="promote"):
        Stage(name="s", evaluators=[kl], promote=3)
    with pytest.raises(ValueError, match="distinct"):
        Pipeline([Stage(name="s", evaluators=[kl]), Stage(name="s", evaluators=[kl])])
    with pytest.raises(ValueError, match="at least one"):
        Pipeline([])
    st = Stage(name="s", evaluators=[kl, Cost()], objective="params_ratio")
    assert st.objective_evaluator.name == "params_ratio" and st.direction == "minimize"
