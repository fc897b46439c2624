"""Search quality at equal forward-token budgets: width + sparsity at 50 % of the nonzero parameters.

On the small reference model the space searches, per block, the KV groups kept,
the MLP width and the unstructured sparsity of the block's linears, under
``nonzero_params <= 0.5 x dense``. Every search method gets the same budget of
forward tokens (evaluation tokens of every stage; ``--tokens``):

* evolutionary: ``--offspring`` offspring per generation, screened on
  ``--screen-tokens``, 4 survivors on ``--mid-tokens``, 1 finalist on
  ``--search-tokens`` (the EvoPress/DarwinLM staged selection), from the
  uniform candidate;
* Optuna TPE and NSGA-II (budget as constraints) and random search (repair),
  one stage of ``--search-tokens`` tokens per trial;
* one-shot uniform and FLAP (standardized fluctuation scores) candidates.

Each method's best candidate is then scored on a held-out, larger token set
(``--report-tokens``; scale it down on slow machines, the value used is
printed). Targets: the evolutionary candidate has the lowest report KL of all
methods, and at most half the uniform candidate's.

    python bench/search_quality.py                        # ~10-15 min on 2 CPU cores
    python bench/search_quality.py --tokens 300000 --report-tokens 65536
    python bench/search_quality.py --smoke                # seconds: tiny reference model, 4k tokens per method
"""

from __future__ import annotations

import argparse
import sys
import time

import optuna
from _common import add_common_args, parse_args, start

from evoprune.evaluators import KLToDense, Pipeline, Stage, TopK
from evoprune.baselines import flap, flap_scores, uniform
from evoprune.search import EvolutionarySampler, Searcher, StudyConfig, build_runtime, trial_candidate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.5, help="nonzero-params budget ratio")
    ap.add_argument("--tokens", type=int, default=160_000, help="forward-token budget per search method")
    ap.add_argument("--offspring", type=int, default=12)
    ap.add_argument("--screen-tokens", type=int, default=256)
    ap.add_argument("--mid-tokens", type=int, default=1024)
    ap.add_argument("--search-tokens", type=int, default=2048)
    ap.add_argument("--report-tokens", type=int, default=32768)
    ap.add_argument("--mlp-step", type=int, default=64)
    add_common_args(ap)
    args = parse_args(ap, argv, smoke=dict(model="reference:tiny", tokens=1536, offspring=3, screen_tokens=128,
                                           mid_tokens=256, search_tokens=256, report_tokens=512, mlp_step=16,
                                           seq_len=64))
    t_start = start(args)

    cfg = StudyConfig.from_dict({
        "model": args.model,
        "calibration": {"num_sequences": 32, "seq_len": args.seq_len},
        "space": {"attention": "kv_groups", "mlp_step": args.mlp_step, "sparsity_levels": [0.0, 0.25, 0.5, 0.75],
                  "sparsity_method": None},  # Wanda masks per candidate: the samplers are compared, not the levels
        "budget": [{"metric": "nonzero_params", "max_ratio": args.ratio}],
        "stages": [{"name": "search", "evaluators": ["kl"], "eval_tokens": args.search_tokens,
                    "seq_len": args.seq_len}],
        "seed": args.seed,
    })
    rt = build_runtime(cfg)
    space = rt.space
    kl = KLToDense(name="kl")
    screen = Stage(name="screen", evaluators=[kl], eval_tokens=args.screen_tokens, seq_len=args.seq_len,
                   promote=TopK(4))
    mid = Stage(name="mid", evaluators=[kl], eval_tokens=args.mid_tokens, seq_len=args.seq_len, promote=TopK(1))
    search = Stage(name="search", evaluators=[kl], eval_tokens=args.search_tokens, seq_len=args.seq_len)
    report = Stage(name="report", evaluators=[kl], eval_tokens=args.report_tokens, seq_len=args.seq_len)
    staged, single, reporting = Pipeline([screen, mid, search]), Pipeline([search]), Pipeline([report])
    print(f"model {rt.model_path}; {len(space.genes)} genes ({space.num_configurations:.3g} level assignments); "
          f"budget nonzero_params <= {args.ratio}; forward-token budget {args.tokens} per method; "
          f"report token set {args.report_tokens} tokens (seq_len {args.seq_len})")

    results = []

    def score(name, cand, tokens, seconds, evaluated):
        res = reporting.run_stage(report, rt.model, cand, rt.context)
        results.append((name, res.objective, space.ratio(cand, "nonzero_params"), space.ratio(cand, "params"),
                        tokens, evaluated, seconds))

    reporting.prepare(rt.model, rt.context)
    # one-shot baselines
    t0 = time.time()
    uni = uniform(space)
    score("uniform", uni, 0, time.time() - t0, 1)
    t0 = time.time()
    scores = flap_scores(rt.pruner, rt.calib_ids)
    score("flap", flap(space, rt.pruner, scores=scores), scores["tokens"], time.time() - t0, 1)

    # evolutionary
    rt.pipeline = staged
    study = optuna.create_study(directions=rt.directions)
    # the space mixes widths and sparsity: switch levels across gene kinds so the search can trade one for
    # the other (same-kind switches would keep uniform's split between width and sparsity compression)
    # equal budgets: the search spends its tokens (no convergence stop)
    evo = EvolutionarySampler(offspring=args.offspring, init=uni, seed=args.seed, same_kind=False, patience=None)
    t0 = time.time()
    st = Searcher(rt, study, evo, progress=False).run(max_tokens=args.tokens)
    score("evolutionary", evo.best[0], st.tokens, time.time() - t0, st.evaluated)
    print(f"evolutionary: {st.generations} generations, {st.trials} trials, stage evaluations {st.stage_evaluations}")

    # Optuna samplers, one stage per trial
    rt.pipeline = single
    for name, sampler in (
        ("tpe", optuna.samplers.TPESampler(seed=args.seed, n_startup_trials=20)),
        ("nsgaii", optuna.samplers.NSGAIISampler(seed=args.seed, population_size=20)),
        ("random", optuna.samplers.RandomSampler(seed=args.seed)),
    ):
        study = optuna.create_study(directions=rt.directions, sampler=sampler)
        t0 = time.time()
        st = Searcher(rt, study, progress=False).run(max_tokens=args.tokens)
        best = trial_candidate(study.best_trial, space)
        score(name, best, st.tokens, time.time() - t0, st.evaluated)
        print(f"{name}: {st.trials} trials ({st.evaluated} evaluated, {st.infeasible} infeasible, "
              f"{st.duplicates} duplicates)")

    print(f"\n{'method':14s} {'report KL':>10s} {'nnz ratio':>9s} {'params':>7s} {'tokens':>9s} {'evals':>6s} "
          f"{'sec':>6s}")
    for name, value, nnz, params, tokens, evaluated, sec in sorted(results, key=lambda r: r[1]):
        print(f"{name:14s} {value:10.5f} {nnz:9.3f} {params:7.3f} {tokens:9d} {evaluated:6d} {sec:6.0f}")
    by = {r[0]: r[1] for r in results}
    evo_kl = by["evolutionary"]
    rank = 1 + sum(v < evo_kl for k, v in by.items() if k != "evolutionary")
    ratio = evo_kl / by["uniform"]
    print(f"\ntotal {time.time() - t_start:.0f}s")
    print(f"TARGET evo_rank {rank} <= 1 {'PASS' if rank <= 1 else 'FAIL'}")
    print(f"TARGET evo_over_uniform_kl {ratio:.4f} <= 0.5 {'PASS' if ratio <= 0.5 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
