"""One two-objective study (KL vs parameter ratio) gives a Pareto front across 20 %-60 % parameter cuts.

On the small reference model (depth + attention + MLP widths, first block
frozen) a :class:`~evoprune.search.BudgetSweep` runs one evolutionary search per
budget level (``--levels``; generations round-robin over the levels) in one
Optuna study with objectives ``["kl", "params"]``; the study's Pareto front
(``study.best_trials``) is the result. For comparison, Optuna's NSGA-II gets
the same forward-token budget in a second study.

Printed: both fronts (KL, params ratio, cut), their hypervolumes with the
reference point (1.1 x the worst front KL, 1.0 params), and the targets: the
sweep's front has >= 8 points, its smallest cut is <= 20 % and its largest
cut >= 60 % of the parameters.

    python bench/pareto.py                           # ~10 min on 2 CPU cores
    python bench/pareto.py --generations 40 --nsgaii 0
    python bench/pareto.py --smoke                   # seconds: tiny reference model, 2 generations
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import optuna
from _common import add_common_args, parse_args, start

from evoprune.evaluators import KLToDense, Pipeline, Stage, TopK
from evoprune.search import BudgetSweep, Searcher, StudyConfig, build_runtime
from evoprune.storage.internal import ATTR_PREFIX
from evoprune.study import hypervolume, study_front


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", type=float, nargs="+",
                    default=[round(float(x), 3) for x in np.linspace(0.82, 0.40, 10)])
    ap.add_argument("--generations", type=int, default=40, help="generations in all (round-robin over levels)")
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--screen-tokens", type=int, default=256)
    ap.add_argument("--final-tokens", type=int, default=2048)
    ap.add_argument("--mlp-step", type=int, default=64)
    ap.add_argument("--nsgaii", type=int, default=1, help="also run NSGA-II at the same token budget (1/0)")
    add_common_args(ap)
    args = parse_args(ap, argv, smoke=dict(model="reference:tiny", levels=[0.8, 0.6], generations=2, offspring=3,
                                           screen_tokens=128, final_tokens=256, mlp_step=16, seq_len=64))
    t_start = start(args)

    cfg = StudyConfig.from_dict({
        "model": args.model,
        "calibration": {"num_sequences": 32, "seq_len": args.seq_len},
        "space": {"attention": "kv_groups", "mlp_step": args.mlp_step, "drop_blocks": True, "frozen_layers": [0]},
        "stages": [{"name": "final", "evaluators": ["kl"], "eval_tokens": args.final_tokens, "seq_len": args.seq_len}],
        "objectives": ["kl", "params"],
        "seed": args.seed,
    })
    rt = build_runtime(cfg)
    kl = KLToDense(name="kl")
    screen = Stage(name="screen", evaluators=[kl], eval_tokens=args.screen_tokens, seq_len=args.seq_len,
                   promote=TopK(2))
    final = Stage(name="final", evaluators=[kl], eval_tokens=args.final_tokens, seq_len=args.seq_len)
    rt.pipeline = Pipeline([screen, final])
    print(f"model {rt.model_path}; {len(rt.space.genes)} genes; budget levels {args.levels}; "
          f"{args.generations} generations of {args.offspring} offspring; final token set {args.final_tokens}")

    study = optuna.create_study(directions=rt.directions)
    sweep = BudgetSweep(levels=args.levels, offspring=args.offspring, seed=args.seed, patience=None)  # fixed budget
    t0 = time.time()
    stats = Searcher(rt, study, sweep, progress=False).run(n_generations=args.generations)
    sweep_sec = time.time() - t0
    fronts = {"budget sweep": (study, stats, sweep_sec)}
    if args.nsgaii:
        rt.pipeline = Pipeline([final])
        study2 = optuna.create_study(directions=rt.directions,
                                     sampler=optuna.samplers.NSGAIISampler(seed=args.seed, population_size=16))
        t0 = time.time()
        st2 = Searcher(rt, study2, progress=False).run(max_tokens=stats.tokens)
        fronts["nsga-ii"] = (study2, st2, time.time() - t0)

    worst = max(t.values[0] for s, _, _ in fronts.values() for t in study_front(s))
    ref = (1.1 * worst, 1.0)
    summary = {}
    for name, (s, st, sec) in fronts.items():
        front = sorted(study_front(s), key=lambda t: t.values[1])
        pts = [t.values for t in front]
        hv = hypervolume(pts, ref)
        cuts = [1 - p[1] for p in pts]
        summary[name] = (len(front), min(cuts), max(cuts), hv)
        print(f"\n{name}: {st.trials} trials, {st.evaluated} evaluated, {st.tokens} forward tokens, {sec:.0f}s; "
              f"front of {len(front)} distinct points")
        print(f"  {'trial':>5s} {'KL':>9s} {'params':>7s} {'cut':>6s}  group")
        for t in front:
            print(f"  {t.number:5d} {t.values[0]:9.5f} {t.values[1]:7.3f} {1 - t.values[1]:6.3f}  "
                  f"{t.user_attrs.get(ATTR_PREFIX + 'group', '')}")
        print(f"  hypervolume {hv:.5f} (reference point KL {ref[0]:.4f}, params {ref[1]})")
    n, lo, hi, hv = summary["budget sweep"]
    print(f"\ntotal {time.time() - t_start:.0f}s")
    print(f"TARGET front_points {n} >= 8 {'PASS' if n >= 8 else 'FAIL'}")
    print(f"TARGET front_min_cut {lo:.4f} <= 0.2 {'PASS' if lo <= 0.2 else 'FAIL'}")
    print(f"TARGET front_max_cut {hi:.4f} >= 0.6 {'PASS' if hi >= 0.6 else 'FAIL'}")
    print(f"TARGET front_hypervolume {hv:.5f} > 0 {'PASS' if hv > 0 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
