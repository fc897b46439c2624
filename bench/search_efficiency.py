"""Search efficiency: forward tokens until the exhaustive optimum is held, and the self-chosen stop.

Problems with a known optimum (``bench/data/optima_<problem>.json``, made once by
``bench/optima.py`` on the small reference model's *test* split, every configuration enumerated):
``depth_3of8``, ``sublayers_2a2m``, ``sublayers_any4of16`` and ``width_mlp3`` (see that script).
The searches score on the validation split (their own stage windows), so the optimum they are
judged against is one they never saw.

Per problem, over ``--seeds`` seeds (the study seed: sampler and stage windows), two schedules, both
with every stage's tokens scaled by ``--token-scale`` (default 0.5: the first stage keeps 4 windows
of 256 tokens, enough for the racing test):

- ``default``: evoprune's default preset (surrogate-ranked offspring, a racing first stage, a
  final stage extending the first one's windows, the convergence stop). It runs until it stops by
  itself (``--max-generations`` caps it).
- ``evopress``: the ``evopress-depth`` preset (EvoPress's published depth schedule: 32 offspring,
  top 2 @ 2,048 tokens -> 1 @ 32,768) for ``k(n-k)/1.5`` generations (``k`` of ``n`` genes
  changed), as EvoPress runs it.

Measured per run: forward tokens (every stage's evaluation tokens, the incumbent's reference
scoring included) until the incumbent is first the optimum; tokens at the stop; the final
incumbent's rank among all configurations (1 = the optimum; ranks from the JSON).
Reported per problem: medians over seeds.

TARGETs per problem: ``tokens_to_optimum_over_evopress_preset <= 0.5`` (median default /
median evopress), ``final_rank_median <= 1`` (default), ``stop_tokens_over_tokens_to_optimum <=
2.0`` (default, median of the per-seed ratios); and for TPE on ``depth_3of8``
``wasted_trial_share <= 0.05`` (proposals over budget or already seen, of all proposals).

    python bench/search_efficiency.py                         # all problems, 3 seeds, ~15 min on 2 cores
    python bench/search_efficiency.py --seeds 5               # the full run (26 min on 2 shared cores)
    python bench/search_efficiency.py --problem depth_3of8 --seeds 1
    python bench/search_efficiency.py --smoke      # seconds: tiny reference model, its depth optimum made first
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
import math
import statistics
import sys
import time
from pathlib import Path

import optuna
import torch
from _common import add_common_args, parse_args, print_targets, start
from optima import PROBLEMS

from evoprune.search import Searcher, StudyConfig, build_runtime, evopress_depth_generations, make_sampler
from evoprune.storage.internal import ATTR_PREFIX
from evoprune.search._stages import build_pipeline
from evoprune.storage._values import RESAMPLED_ATTR

DATA = Path(__file__).resolve().parent / "data"

#: per problem: the budgets that make the space exactly the enumerated configurations, how many genes
#: a configuration changes (k) of how many (n), and sampler options both schedules need
SETUP = {
    "depth_3of8": dict(budget=[{"metric": "dropped_blocks", "exactly": 3}], k=3, n=8, options={}),
    "sublayers_2a2m": dict(budget=[{"metric": "dropped_attn", "exactly": 2}, {"metric": "dropped_mlp", "exactly": 2}],
                           k=4, n=16, options={}),
    "sublayers_any4of16": dict(budget=[{"metric": "dropped_sublayers", "exactly": 4}], k=4, n=16,
                               options={"same_kind": False}),
    "width_mlp3": dict(budget=None, k=4, n=8, options={}),
}


def _config(args, problem: str, preset: str, seed: int) -> StudyConfig:
    p = PROBLEMS[problem]
    setup = SETUP[problem]
    budget = setup["budget"]
    if budget is None:  # width: an exact params value (every level step removes the same params)
        budget = [{"metric": "params", "min_value": _WIDTH_COST[0], "max_value": _WIDTH_COST[0]}]
    cfg = StudyConfig.from_dict({
        "preset": preset,
        "model": args.model,
        "calibration": {"num_sequences": 32, "seq_len": args.seq_len},
        "space": p.space,
        "budget": budget,
        "sampler": {"name": "evolutionary", "options": {"seed": seed, **setup["options"],
                                                        **(args.default_options if preset == "default" else {})}},
        "seed": seed,
        "threads": 1,
        "eval_batch_size": args.batch_size,
    })
    if args.token_scale != 1:  # both schedules alike: every stage's tokens scaled, whole windows
        stages = [dataclasses.replace(st, eval_tokens=max(st.seq_len, int(round(st.eval_tokens * args.token_scale
                                                                               / st.seq_len)) * st.seq_len))
                  for st in cfg.stages]
        cfg = cfg.replace(stages=stages)
    return cfg


_WIDTH_COST: list[float] = []
_RUNTIMES: dict[str, object] = {}


def _runtime(args, problem: str):
    """One runtime per problem and process (model, data, importance); runs swap pipeline, seed, sampler."""
    if problem not in _RUNTIMES:
        torch.set_num_threads(1)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if problem == "width_mlp3" and not _WIDTH_COST:
            rt = build_runtime(StudyConfig.from_dict({"model": args.model, "space": PROBLEMS[problem].space,
                                                      "calibration": {"num_sequences": 32, "seq_len": args.seq_len},
                                                      "threads": 1}))
            _WIDTH_COST.append(rt.space.cost(rt.space.candidate_from_levels({f"L{i}.mlp": 1 for i in range(4)}),
                                             "params"))
        _RUNTIMES[problem] = build_runtime(_config(args, problem, "default", 0))
    return _RUNTIMES[problem]


def run_one(args, problem: str, schedule: str, seed: int, optimum: set[str], ranks: dict[str, int]) -> dict:
    setup = SETUP[problem]
    rt = _runtime(args, problem)
    cfg = _config(args, problem, "default" if schedule == "default" else "evopress-depth", seed)
    # this run's stage schedule and seed; fresh per-run caches (token sets, per-window KL), the
    # dense references (keyed by their token set) and the model fingerprint stay
    shared = {k: v for k, v in rt.context.shared.items() if k in ("dense_reference", "model_fingerprint")}
    rt.pipeline = build_pipeline(cfg.stages)
    rt.context = dataclasses.replace(rt.context, seed=seed, shared=shared)
    rt.pipeline.prepare(rt.model, rt.context)  # dense references: not search tokens
    sampler, _mode = make_sampler("evolutionary", cfg.sampler.options, seed=seed, space=rt.space)
    study = optuna.create_study(directions=rt.directions)
    searcher = Searcher(rt, study, sampler, progress=False)
    cap = args.max_generations if schedule == "default" else \
        evopress_depth_generations(num_blocks=setup["n"], drop=setup["k"])
    tokens, first, stopped, gens, t0 = 0, None, "n_generations", 0, time.time()
    while gens < cap:
        st = searcher.run(n_generations=1)
        tokens += st.tokens
        gens += st.generations
        inc = sampler.incumbent
        if first is None and inc is not None and inc.key in optimum:
            first = tokens
            if schedule == "evopress":  # what is measured of it: the tokens until it first holds the optimum
                stopped = "optimum held"
                break
        if st.generations == 0:
            stopped = st.stopped_by
            break
    inc = sampler.incumbent
    rank = 1 if inc is not None and inc.key in optimum else (ranks.get(inc.key) if inc is not None else None)
    return dict(problem=problem, schedule=schedule, seed=seed, first=first, stop=tokens, rank=rank, stopped=stopped,
                generations=gens, seconds=time.time() - t0)


def _run_task(task):
    args, problem, schedule, seed, optimum, ranks, fingerprint = task
    rt = _runtime(args, problem)
    if rt.fingerprints["model"] != fingerprint:
        raise SystemExit(
            f"{args.model} here has fingerprint {rt.fingerprints['model']}, but bench/data/optima_{problem}.json was "
            f"made on {fingerprint}: the optima do not apply. Rebuild the reference model with one training thread "
            "(evoprune reference-model --size small --threads 1) or run bench/optima.py on this one.")
    return run_one(args, problem, schedule, seed, optimum, ranks)


def tpe_waste(args, problem: str) -> tuple[float, dict]:
    """TPE on ``problem`` for ``--tpe-trials`` trials: the share of its trials that were not an
    evaluation of a new in-budget candidate (over-budget placeholders, repeats)."""
    rt = _runtime(args, problem)
    cfg = _config(args, problem, "default", 0)
    rt.pipeline = build_pipeline(cfg.stages)
    shared = {k: v for k, v in rt.context.shared.items() if k in ("dense_reference", "model_fingerprint")}
    rt.context = dataclasses.replace(rt.context, seed=0, shared=shared)
    sampler, mode = make_sampler("tpe", {"seed": 0}, seed=0, space=rt.space)
    study = optuna.create_study(directions=rt.directions, sampler=sampler)
    st = Searcher(rt, study, sampler, budget_mode=mode, progress=False).run(n_trials=args.tpe_trials)
    trials = [t for t in study.get_trials(deepcopy=False) if RESAMPLED_ATTR not in t.system_attrs]
    evaluated = {tuple(sorted(t.params.items())) for t in trials}
    wasted = sum(1 for t in trials if ATTR_PREFIX + "stage_reached" not in t.user_attrs)
    out = dict(trials=len(trials), wasted=wasted, distinct=len(evaluated), proposals=st.proposals,
               resampled=st.resampled, stopped_by=st.stopped_by)
    return (wasted / len(trials) if trials else 0.0), out


def _median(xs):
    """Median with ``None`` (never reached) as infinity."""
    return statistics.median([math.inf if x is None else x for x in xs]) if xs else math.inf


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problem", action="append", choices=sorted(SETUP), help="default: all")
    ap.add_argument("--seeds", type=int, default=3, help="study seeds per schedule (the issue's full run: 5)")
    ap.add_argument("--max-generations", type=int, default=40, help="cap of the default schedule")
    ap.add_argument("--token-scale", type=float, default=0.5,
                    help="every stage's tokens x this, in both schedules (1: the presets as published)")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (one torch thread each)")
    ap.add_argument("--tpe-trials", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    add_common_args(ap, model="reference:small", seq_len=256, threads=1)
    ap.add_argument("--default-options", type=json.loads, default={},
                    help='JSON sampler options for the default schedule, e.g. \'{"patience": 3}\'')
    ap.add_argument("--data", default=str(DATA), help="folder of the optima_<problem>.json files (bench/optima.py)")
    args = parse_args(ap, argv, smoke=dict(model="reference:tiny", problem=["depth_3of8"], seeds=1, max_generations=2,
                                           jobs=1, tpe_trials=4, token_scale=0.125, seq_len=64, batch_size=4,
                                           data=""))
    t_start = start(args)
    problems = args.problem or list(SETUP)
    if not args.data:  # --smoke: the optimum of this (tiny) model first, by bench/optima.py --smoke
        import tempfile

        import optima as optima_bench

        args.data = tempfile.mkdtemp(prefix="evoprune-optima-smoke-")
        with contextlib.redirect_stdout(sys.stderr):  # its report (and TARGET lines) are not this bench's
            optima_bench.main(["--smoke", "--model", args.model, "--out", args.data,
                               *sum((["--problem", p] for p in problems), [])])
    tasks, optima = [], {}
    for problem in problems:
        data = json.loads((Path(args.data) / f"optima_{problem}.json").read_text())
        best = {data["optimum"]["key"]} | {t["key"] for t in (data.get("ties") or [])}
        optima[problem] = (best, data)
        for schedule in ("default", "evopress"):
            for seed in range(args.seeds):
                tasks.append((args, problem, schedule, seed, best, data["ranks"], data["model_fingerprint"]))
    print(f"{len(tasks)} runs, {args.jobs} at a time; stage tokens x {args.token_scale}")
    print(f"{'problem':<20} {'schedule':<9} {'seed':>4} {'tokens to optimum':>18} {'stop tokens':>12} "
          f"{'rank':>5} {'gens':>5} {'stopped by':<13} {'s':>6}")
    results = []
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        for r in pool.map(_run_task, tasks):
            results.append(r)
            print(f"{r['problem']:<20} {r['schedule']:<9} {r['seed']:>4} {str(r['first']):>18} {r['stop']:>12} "
                  f"{str(r['rank']):>5} {r['generations']:>5} {r['stopped']:<13} {r['seconds']:>6.0f}", flush=True)
    targets = []
    print()
    for problem in problems:
        best, data = optima[problem]
        d = [r for r in results if r["problem"] == problem and r["schedule"] == "default"]
        e = [r for r in results if r["problem"] == problem and r["schedule"] == "evopress"]
        med_d, med_e = _median([r["first"] for r in d]), _median([r["first"] for r in e])
        ratios = [r["stop"] / r["first"] if r["first"] else math.inf for r in d]
        rank_med = _median([r["rank"] if r["rank"] is not None else math.inf for r in d])
        sep = "separated" if data.get("separated") else f"not separated: {len(best)} tied configurations count as the optimum"
        print(f"{problem} ({data['num_configs']} configurations; optimum {data['gap_in_se']:.1f} SE ahead of the "
              f"runner-up, {sep}): median tokens to optimum default {med_d:,.0f} vs evopress {med_e:,.0f}; found by "
              f"default {sum(r['first'] is not None for r in d)}/{len(d)}, by evopress "
              f"{sum(r['first'] is not None for r in e)}/{len(e)}; default stops at a median {_median([r['stop'] for r in d]):,.0f} "
              f"tokens, final rank median {rank_med}")
        targets.append((f"{problem}.tokens_to_optimum_over_evopress_preset", med_d / med_e, "<=", 0.5))
        targets.append((f"{problem}.final_rank_median", rank_med, "<=", 1))
        targets.append((f"{problem}.stop_tokens_over_tokens_to_optimum", statistics.median(ratios), "<=", 2.0))
    if "depth_3of8" in problems and args.tpe_trials:
        share, d = tpe_waste(args, "depth_3of8")
        print(f"TPE on depth_3of8, {args.tpe_trials} trials asked: {d}")
        targets.append(("depth_3of8.wasted_trial_share", share, "<=", 0.05))
    print(f"\ntotal {time.time() - t_start:.0f}s")
    print_targets(targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
