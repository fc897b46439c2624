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
  final stage extending the first one's windows, close calls settled on up to 4 x the final
  stage's tokens, the convergence stop with its unseen-candidate bound). It runs until it stops by
  itself (``--max-generations`` caps it).
- ``evopress``: EvoPress's own loop (``preset: evopress``: windows drawn afresh every generation,
  the parent scored again on the final stage's fresh windows every generation, the first parent
  the best of 64 random candidates on the first stage, repeats allowed; 32 offspring, top 2 @
  2,048 tokens -> 1 @ 32,768) on the drop problems, its level search (``preset: evopress-levels``:
  64 offspring, 8 @ 2,048 -> 2 @ 16,384 -> 1 @ 65,536, from the uniform candidate) on
  ``width_mlp3``; for ``int(k(n-k)/1.5)`` generations (``k`` of ``n`` genes changed: EvoPress's
  depth rule; its level search's published 400 generations are out of reach here, so the same
  rule caps it), stopped early once it holds the optimum (what is measured of it).

Measured per run: forward tokens (every stage's evaluation tokens, the incumbent's reference and
re-scoring, close calls) until the incumbent is first the optimum; tokens at the stop; the final
incumbent's rank among all configurations on the held-out split (1 = the optimum; ranks from
the JSON). Per problem and schedule: how many seeds found the optimum, the median tokens to
hold it over the seeds that did, and the median over all seeds with a seed that never held it
counted at the cap (the tokens of EvoPress's whole generation budget), and the final ranks.

TARGETs per problem: ``found_share_default >= 1.0`` (every default seed ends holding the optimum;
on the close problem either tied configuration counts), ``tokens_to_optimum_over_evopress <= 0.5``
(capped medians, default / EvoPress), ``stop_tokens_over_tokens_to_optimum <= 2.0`` (default,
median of the per-seed ratios); and for TPE on ``depth_3of8`` ``wasted_trial_share <= 0.05``
(proposals over budget or already seen, of all proposals).

    python bench/search_efficiency.py --seeds 5               # the full run
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
                           k=2, n=8, options={}),  # EvoPress: k attention and k MLP sublayers of n blocks
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
    return _scaled(args, cfg)


def _scaled(args, cfg: StudyConfig) -> StudyConfig:
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


def _preset(problem: str, schedule: str) -> str:
    if schedule == "default":
        return "default"
    return "evopress-levels" if SETUP[problem]["budget"] is None else "evopress"


def evopress_cap(args, problem: str) -> int:
    """Forward tokens of EvoPress's whole run on ``problem`` (its generation budget): the cap a seed that
    never holds the optimum counts at."""
    setup = SETUP[problem]
    cfg = _scaled(args, StudyConfig.from_dict({"preset": _preset(problem, "evopress"),
                                               "calibration": {"num_sequences": 32, "seq_len": args.seq_len}}))
    opts = cfg.sampler.options
    gens = evopress_depth_generations(num_blocks=setup["n"], drop=setup["k"])
    tokens = [st.eval_tokens for st in cfg.stages]
    survivors = [st.promote["top_k"] for st in cfg.stages[:-1]]
    per_gen = opts["offspring"] * tokens[0] + sum(k * t for k, t in zip(survivors, tokens[1:])) + tokens[-1]
    init = (opts.get("init_samples", 1) if opts.get("init") == "random" else 1) * tokens[0]  # first stage only
    return init + gens * per_gen


def run_one(args, problem: str, schedule: str, seed: int, optimum: set[str], ranks: dict[str, int]) -> dict:
    setup = SETUP[problem]
    rt = _runtime(args, problem)
    cfg = _config(args, problem, _preset(problem, schedule), seed)
    # this run's stage schedule and seed; fresh per-run caches (token sets, per-window KL), the
    # dense references (keyed by their token set) and the model fingerprint stay
    # (every token set depends on the seed: a run keeps no dense reference of another, so memory stays
    # bounded by one run's; the disk cache has them)
    shared = {k: v for k, v in rt.context.shared.items() if k == "model_fingerprint"}
    rt.pipeline = build_pipeline(cfg.stages)
    rt.context = dataclasses.replace(rt.context, seed=seed, shared=shared)
    rt.pipeline.prepare(rt.model, rt.context)  # dense references: not search tokens
    sampler, _mode = make_sampler("evolutionary", cfg.sampler.options, seed=seed, space=rt.space)
    study = optuna.create_study(directions=rt.directions)
    searcher = Searcher(rt, study, sampler, progress=False)
    cap = args.max_generations if schedule == "default" else \
        1 + evopress_depth_generations(num_blocks=setup["n"], drop=setup["k"])  # + its initial selection
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
    rt.context = dataclasses.replace(rt.context, shared={k: v for k, v in shared.items() if k == "model_fingerprint"})
    inc = sampler.incumbent
    rank = 1 if inc is not None and inc.key in optimum else (ranks.get(inc.key) if inc is not None else None)
    return dict(problem=problem, schedule=schedule, seed=seed, first=first, stop=tokens, rank=rank, stopped=stopped,
                generations=gens, seconds=time.time() - t0, found=inc is not None and inc.key in optimum)


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


def _median(xs, cap=math.inf):
    """Median with ``None`` (never reached) counted at ``cap``."""
    return statistics.median([cap if x is None else x for x in xs]) if xs else math.inf


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:,.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problem", action="append", choices=sorted(SETUP), help="default: all")
    ap.add_argument("--seeds", type=int, default=5, help="study seeds per schedule")
    ap.add_argument("--max-generations", type=int, default=40, help="cap of the default schedule")
    ap.add_argument("--token-scale", type=float, default=0.5,
                    help="every stage's tokens x this, in both schedules (1: the presets as published)")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (one torch thread each)")
    ap.add_argument("--tpe-trials", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--schedule", action="append", choices=["default", "evopress"],
                    help="default: both (TARGETs need both)")
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
        for schedule in args.schedule or ("default", "evopress"):
            for seed in range(args.seeds):
                tasks.append((args, problem, schedule, seed, best, data["ranks"], data["model_fingerprint"]))
    print(f"{len(tasks)} runs, {args.jobs} at a time; stage tokens x {args.token_scale}")
    print(f"{'problem':<20} {'schedule':<9} {'seed':>4} {'tokens to optimum':>18} {'stop tokens':>12} "
          f"{'found':>5} {'rank':>5} {'gens':>5} {'stopped by':<13} {'s':>6}")
    results = []
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        for r in pool.map(_run_task, tasks):
            results.append(r)
            print(f"{r['problem']:<20} {r['schedule']:<9} {r['seed']:>4} {_fmt(r['first']):>18} {_fmt(r['stop']):>12} "
                  f"{'yes' if r['found'] else 'no':>5} {str(r['rank']):>5} {r['generations']:>5} {r['stopped']:<13} "
                  f"{r['seconds']:>6.0f}", flush=True)
    targets = summarize(args, problems, optima, results)
    if "depth_3of8" in problems and args.tpe_trials:
        share, d = tpe_waste(args, "depth_3of8")
        print(f"TPE on depth_3of8, {args.tpe_trials} trials asked: {d}")
        targets.append(("depth_3of8.wasted_trial_share", share, "<=", 0.05))
    print(f"\ntotal {time.time() - t_start:.0f}s")
    print_targets(targets)
    return 0


def summarize(args, problems: list[str], optima: dict, results: list[dict]) -> list[tuple]:
    """Print the per-problem table; the TARGETs (but TPE's)."""
    targets = []
    print()
    print(f"{'problem':<20} {'schedule':<9} {'found':>6} {'median to optimum (found)':>26} "
          f"{'median to optimum (capped)':>27} {'median stop':>12} {'final ranks':<20}")
    for problem in problems:
        best, data = optima[problem]
        cap = evopress_cap(args, problem)
        med = {}
        for schedule in args.schedule or ("default", "evopress"):
            rs = sorted((r for r in results if r["problem"] == problem and r["schedule"] == schedule),
                        key=lambda r: r["seed"])
            found = [r["first"] for r in rs if r["first"] is not None]
            med[schedule] = _median([r["first"] for r in rs], cap)
            share = sum(r["found"] for r in rs) / len(rs) if rs else 0.0
            if schedule == "default":
                targets.append((f"{problem}.found_share_default", share, ">=", 1.0))
                ratios = [r["stop"] / r["first"] if r["first"] else math.inf for r in rs]
                stop_ratio = statistics.median(ratios) if ratios else math.inf
            print(f"{problem:<20} {schedule:<9} {sum(r['found'] for r in rs):>2}/{len(rs):<3} "
                  f"{_fmt(_median(found) if found else None):>26} {_fmt(med[schedule]):>27} "
                  f"{_fmt(_median([r['stop'] for r in rs])):>12} {[r['rank'] for r in rs]}")
        sep = "separated" if data.get("separated") else f"not separated: {len(best)} tied configurations count as the optimum"
        print(f"  {problem}: {data['num_configs']} configurations; optimum {data['gap_in_se']:.1f} SE ahead of the "
              f"runner-up on the held-out split, {sep}; cap (EvoPress's whole run) {cap:,} tokens")
        if "default" in med and "evopress" in med:
            targets.append((f"{problem}.tokens_to_optimum_over_evopress", med["default"] / med["evopress"], "<=", 0.5))
        if "default" in med:
            targets.append((f"{problem}.stop_tokens_over_tokens_to_optimum", stop_ratio, "<=", 2.0))
    return targets


if __name__ == "__main__":
    sys.exit(main())
