"""Depth pruning optimum: does the evolutionary sampler find the best 3-of-8 block drop cheaply?

The small reference model (8 blocks) loses exactly 3 blocks (a params budget band
that only 3-block drops meet). All C(8,3) = 56 configurations are scored on one
fixed token set ("final" stage): that is the optimum. Then, per seed:

* evolutionary (EvoPress depth schedule, scaled down): ``--offspring`` offspring
  per generation screened on ``--screen-tokens`` tokens, the best 1 promoted to
  the final token set; a "full evaluation" is one final-stage evaluation (the
  initial parent counts);
* Optuna TPE (budget as constraints) and random search (repair), single stage:
  every evaluated trial is a full evaluation;
* one-shot ShortGPT (block influence) and SLEB (greedy calibration loss).

Final-stage values are a deterministic function of (model, token set,
candidate), so they are memoized across methods (each method is still charged
one full evaluation per final-stage request); screening evaluations are real.

Targets: median over seeds of the full evaluations the evolutionary sampler
needs to first evaluate the optimum, <= 14 (a quarter of 56); median gap to the
optimum after 14 full evaluations, <= 0.

    python bench/depth_optimum.py                    # ~5-10 min on 2 CPU cores
    python bench/depth_optimum.py --seeds 3 --final-tokens 4096
    python bench/depth_optimum.py --smoke            # seconds: tiny reference model, drop 1 of 4 blocks
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import statistics
import sys
import time

import optuna
from _common import add_common_args, parse_args, start

from evoprune.evaluators import KLToDense, Pipeline, Stage, TopK
from evoprune.baselines import shortgpt, sleb
from evoprune.search import EvolutionarySampler, Searcher, StudyConfig, build_runtime
from evoprune.storage.internal import ATTR_PREFIX
from evoprune.space import Budget


class MemoKL:
    """KLToDense whose values are memoized by candidate key (counts every request)."""

    direction = "minimize"

    def __init__(self, inner: KLToDense) -> None:
        self.inner = inner
        self.name = inner.name
        self.cache: dict[str, object] = {}
        self.requests = 0
        self.computed = 0

    def prepare(self, model, context):
        self.inner.prepare(model, context)

    def evaluate(self, model, candidate, context):
        self.requests += 1
        key = candidate.key
        if key not in self.cache:
            self.computed += 1
            self.cache[key] = self.inner.evaluate(model, candidate, context)
        return dataclasses.replace(self.cache[key])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drop", type=int, default=3, help="blocks to drop")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--offspring", type=int, default=16)
    ap.add_argument("--screen-tokens", type=int, default=1024)
    ap.add_argument("--final-tokens", type=int, default=8192)
    ap.add_argument("--max-full-evals", type=int, default=30, help="cap per method and seed")
    add_common_args(ap)
    args = parse_args(ap, argv, smoke=dict(model="reference:tiny", drop=1, seeds=1, offspring=2, screen_tokens=128,
                                           final_tokens=256, max_full_evals=4, seq_len=64))
    t_start = start(args)

    cfg = StudyConfig.from_dict({
        "model": args.model,
        "calibration": {"num_sequences": 16, "seq_len": args.seq_len},
        "space": {"attention": None, "mlp": False, "drop_blocks": True},
        "stages": [{"name": "final", "evaluators": ["kl"], "eval_tokens": args.final_tokens, "seq_len": args.seq_len}],
        "seed": args.seed,
    })
    rt = build_runtime(cfg)
    space0 = rt.space
    n = space0.spec.num_layers
    dense = space0.dense_cost("params")
    k = args.drop
    drop3 = space0.cost(space0.candidate_from_levels({f"L{i}.block": 1 for i in range(k)}), "params")
    space = dataclasses.replace(space0, budget=(Budget(metric="params", min_value=drop3, max_value=drop3),))
    rt.space = space
    final_kl = MemoKL(KLToDense(name="kl"))
    final = Stage(name="final", evaluators=[final_kl], eval_tokens=args.final_tokens, seq_len=args.seq_len)
    screen = Stage(name="screen", evaluators=[KLToDense(name="kl")], eval_tokens=args.screen_tokens,
                   seq_len=args.seq_len, promote=TopK(1))
    staged = Pipeline([screen, final])
    single = Pipeline([final])
    print(f"model {rt.model_path}: {n} blocks, drop {k} -> params {drop3 / dense:.3f} of dense; "
          f"final token set {args.final_tokens} tokens (seq_len {args.seq_len}), screening {args.screen_tokens}")

    # --- exhaustive ---------------------------------------------------------------------------
    t0 = time.time()
    single.prepare(rt.model, rt.context)
    table = {}
    for combo in itertools.combinations(range(n), k):
        cand = space.candidate_from_levels({f"L{i}.block": 1 for i in combo})
        table[cand.key] = (combo, single.run_stage(final, rt.model, cand, rt.context).objective)
    limit = len(table) // 4  # a quarter of the exhaustive evaluations (14 of 56)
    ranked = sorted(table.values(), key=lambda cv: cv[1])
    opt_combo, opt = ranked[0]
    opt_key = next(k for k, v in table.items() if v[0] == opt_combo)
    print(f"\nexhaustive: {len(table)} configurations in {time.time() - t0:.0f}s; optimum drops {opt_combo} "
          f"KL {opt:.5f}; runner-up {ranked[1][0]} {ranked[1][1]:.5f}; worst {ranked[-1][1]:.5f}")

    def final_keys(study):
        out = []
        for t in study.get_trials(deepcopy=False):
            if t.user_attrs.get(ATTR_PREFIX + "stage_reached") == "final":
                out.append((t.user_attrs[ATTR_PREFIX + "candidate_key"], t.values[0] if t.values else math.nan))
        return out

    def summarize(evals: list[tuple[str, float]]) -> tuple[float, float]:
        """(full evaluations until the optimum was first evaluated, gap after ``limit`` full evaluations)."""
        needed = next((i + 1 for i, (k, _) in enumerate(evals) if k == opt_key), math.inf)
        first = [v for _, v in evals[:limit]]
        gap = (min(first) - opt) if first else math.inf
        return needed, max(gap, 0.0)

    rows = []
    results: dict[str, list[tuple[float, float, float]]] = {"evolutionary": [], "tpe": [], "random": []}
    for seed in range(args.seeds):
        # evolutionary
        rt.pipeline = staged
        study = optuna.create_study(directions=rt.directions)
        searcher = Searcher(rt, study, EvolutionarySampler(offspring=args.offspring, seed=seed, patience=None),
                            progress=False)
        tokens = 0
        t0 = time.time()
        while True:
            st = searcher.run(n_generations=1)
            tokens += st.tokens
            evals = final_keys(study)
            if st.stopped_by == "exhausted" or any(k == opt_key for k, _ in evals) or len(evals) >= args.max_full_evals:
                break
        needed, gap = summarize(evals)
        results["evolutionary"].append((needed, gap, tokens))
        rows.append(("evolutionary", seed, needed, gap, len(evals), len(study.trials), tokens, time.time() - t0))
        # Optuna TPE (constraints) and random (repair), single stage
        rt.pipeline = single
        for name in ("tpe", "random"):
            sampler = (optuna.samplers.TPESampler(seed=seed, n_startup_trials=10) if name == "tpe"
                       else optuna.samplers.RandomSampler(seed=seed))
            study = optuna.create_study(directions=rt.directions, sampler=sampler)
            searcher = Searcher(rt, study, progress=False)
            t0 = time.time()
            tokens = 0
            for _ in range(2000):
                st = searcher.run(n_trials=1)
                tokens += st.tokens
                evals = final_keys(study)
                if any(k == opt_key for k, _ in evals) or len(evals) >= args.max_full_evals:
                    break
            needed, gap = summarize(evals)
            results[name].append((needed, gap, tokens))
            rows.append((name, seed, needed, gap, len(evals), len(study.trials), tokens, time.time() - t0))

    # --- one-shot baselines -----------------------------------------------------------------------
    one_shot = []
    for name, make in (("shortgpt", lambda: shortgpt(space, rt.pruner)),
                       ("sleb", lambda: sleb(space, rt.pruner, rt.calib_ids))):
        t0 = time.time()
        cand = make()
        combo, value = table[cand.key]
        one_shot.append((name, combo, value, value - opt, time.time() - t0))

    print("\nper run (full evals = final-stage evaluations, inf = optimum not found within the cap):")
    print(f"{'method':14s} {'seed':>4s} {'evals to opt':>12s} {'gap@' + str(limit):>9s} {'full evals':>10s} {'trials':>7s} "
          f"{'tokens':>10s} {'sec':>6s}")
    for m, seed, needed, gap, nfull, ntr, tok, sec in rows:
        print(f"{m:14s} {seed:4d} {needed:12} {gap:9.5f} {nfull:10d} {ntr:7d} {tok:10d} {sec:6.0f}")
    print("\nsummary (median over seeds):")
    print(f"{'method':14s} {'evals to opt':>12s} {'gap@' + str(limit):>9s} {'tokens':>10s}")
    med = {}
    for m, vals in results.items():
        med[m] = (statistics.median(v[0] for v in vals), statistics.median(v[1] for v in vals),
                  statistics.median(v[2] for v in vals))
        print(f"{m:14s} {med[m][0]:12} {med[m][1]:9.5f} {med[m][2]:10.0f}")
    for name, combo, value, gap, sec in one_shot:
        print(f"{name:14s} {'1 (one-shot)':>12s} {gap:9.5f}   drops {combo} KL {value:.5f} ({sec:.0f}s)")
    print(f"\nfinal-stage KL computed for {final_kl.computed} distinct candidates, requested {final_kl.requests} "
          f"times; total {time.time() - t_start:.0f}s")
    ev, gap = med["evolutionary"][0], med["evolutionary"][1]
    print(f"TARGET evo_median_full_evals {ev:g} <= {limit} {'PASS' if ev <= limit else 'FAIL'}")
    print(f"TARGET evo_median_gap {gap:.6g} <= 0 {'PASS' if gap <= 0 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
