"""Run an evoprune study from a YAML config, compare with one-shot baselines, export the best model.

    python studies/reference_small.py                                   # studies/reference_small.yaml
    python studies/reference_small.py --config studies/pareto_small.yaml --generations 12
    python studies/reference_small.py --generations 5 --export out/small-60

Copy this file as a starting point; it only uses the public API of
``evoprune.search`` (StudyConfig, build_runtime, Searcher, baselines).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import optuna

from evoprune._logging import configure_logging
from evoprune.search import (
    ATTR_PREFIX,
    BudgetSweep,
    Searcher,
    StudyConfig,
    build_runtime,
    hypervolume,
    shortgpt,
    sleb,
    uniform,
)


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(here / "reference_small.yaml"))
    ap.add_argument("--generations", type=int, default=None, help="override stop.n_generations")
    ap.add_argument("--storage", default=None, help="Optuna storage URL (default: in memory)")
    ap.add_argument("--export", default=None, help="folder to export the best candidate to")
    args = ap.parse_args(argv)
    configure_logging("INFO")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    config = StudyConfig.from_yaml(args.config)
    if args.generations is not None:
        config = config.replace(stop={**config.stop.to_dict(), "n_generations": args.generations})
    runtime = build_runtime(config)
    space = runtime.space
    print(f"model {runtime.model_path}\nfingerprints {runtime.fingerprints}")
    print(f"space: {len(space.genes)} genes, budget {[b.to_dict() for b in space.budget]}")

    study = runtime.create_study(storage=args.storage)
    sampler, budget_mode = runtime.make_sampler()
    searcher = Searcher(runtime, study, sampler, budget_mode=budget_mode)
    stats = searcher.run(**config.stop.kwargs())
    print(f"search: {stats.trials} trials, {stats.generations} generations, {stats.tokens} forward tokens, "
          f"{stats.seconds:.0f}s, stopped by {stats.stopped_by}")

    if len(runtime.objectives) > 1:
        front = sorted(study.best_trials, key=lambda t: t.values[1])
        print(f"Pareto front ({len(front)} points): {runtime.objectives}")
        for t in front:
            print(f"  trial {t.number:4d}  " + "  ".join(f"{v:.4f}" for v in t.values)
                  + f"  {t.user_attrs.get(ATTR_PREFIX + 'group', '')}")
        ref = [max(t.values[0] for t in front) * 1.1, 1.0]
        print(f"hypervolume (reference {ref}): {hypervolume([t.values for t in front], ref):.4f}")
        return 0

    best = space.candidate_from_params(study.best_trial.params)
    final = runtime.pipeline.stages[-1]
    print(f"best {runtime.objectives[0]} {study.best_value:.5f} at {space.ratio(best, 'params'):.3f} of dense params")

    # one-shot baselines, scored on the same last-stage token set
    baselines = {"uniform": lambda: uniform(space)}
    if space.genes_of_kind("block"):
        baselines["shortgpt"] = lambda: shortgpt(space, runtime.pruner)
        baselines["sleb"] = lambda: sleb(space, runtime.pruner, runtime.calib_ids)
    for name, make in baselines.items():
        try:
            cand = make()
        except ValueError as exc:
            print(f"  {name}: n/a ({exc})")
            continue
        res = runtime.pipeline.run_stage(final, runtime.model, cand, runtime.context)
        print(f"  {name:9s} {res.objective:.5f} at {space.ratio(cand, 'params'):.3f} of dense params")

    if args.export:
        path = runtime.pruner.export(best, args.export, tokenizer=runtime.tokenizer)
        print(f"exported to {path} (load with evoprune.pruning.load_pruned)")
    if isinstance(sampler, BudgetSweep):
        print(sampler.best)
    return 0


if __name__ == "__main__":
    sys.exit(main())
