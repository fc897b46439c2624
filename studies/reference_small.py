"""Run an evoprune study from a YAML config, compare with one-shot baselines, export the best model.

    python studies/reference_small.py                                   # studies/reference_small.yaml
    python studies/reference_small.py --config studies/pareto_small.yaml --generations 12
    python studies/reference_small.py --generations 5 --export out/small-60

Copy this file as a starting point; it only uses the public API (``evoprune.create_study``, the
study object, ``evoprune.baselines`` and ``evoprune.study`` helpers), the same path as ``evoprune search``:
the study lives in a SQL database (``--storage``, default ``out/<config stem>.db``) and can be
resumed with ``evoprune resume``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import optuna

import evoprune
from evoprune._logging import configure_logging
from evoprune.baselines import shortgpt, sleb, uniform
from evoprune.study import hypervolume


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(here / "reference_small.yaml"))
    ap.add_argument("--generations", type=int, default=None, help="stop after N generations (default: the config's stop)")
    ap.add_argument("--storage", default=None, help="study database URL (default: sqlite:///out/<config stem>.db)")
    ap.add_argument("--export", default=None, help="folder to export the best candidate to")
    args = ap.parse_args(argv)
    configure_logging("INFO")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    name = Path(args.config).stem
    storage = args.storage or f"sqlite:///{Path('out').resolve() / (name + '.db')}"
    Path("out").mkdir(exist_ok=True)
    study = evoprune.create_study(args.config, storage=storage, study_name=name)
    runtime = study.build_runtime()
    space = runtime.space
    print(f"study {study.name!r} in {study.url}\nmodel {runtime.model_path}\nfingerprints {runtime.fingerprints}")
    print(f"space: {len(space.genes)} genes, budget {[b.to_dict() for b in space.budget]}")

    stops = {"n_generations": args.generations} if args.generations is not None else {}
    stats = study.run(**stops, runtime=runtime)
    print(f"search: {stats.trials} trials, {stats.generations} generations, {stats.tokens} forward tokens, "
          f"{stats.seconds:.0f}s, stopped by {stats.stopped_by}")

    front = study.pareto_front()
    objectives = list(study.config.objectives)
    if len(objectives) > 1:
        front = sorted(front, key=lambda p: p.values[1])
        print(f"Pareto front ({len(front)} points): {objectives}")
        for p in front:
            print(f"  trial {p.number:4d}  " + "  ".join(f"{v:.4f}" for v in p.values))
        ref = [max(p.values[0] for p in front) * 1.1, 1.0]
        print(f"hypervolume (reference {ref}): {hypervolume([p.values for p in front], ref):.4f}")
        return 0

    best_point = front[0]
    best = study.candidate(best_point.number)
    final = runtime.pipeline.stages[-1]
    print(f"best {objectives[0]} {best_point.values[0]:.5f} at {space.ratio(best, 'params'):.3f} of dense params")

    # one-shot baselines, scored on the same last-stage token set
    baselines = {"uniform": lambda: uniform(space)}
    if space.genes_of_kind("block"):
        baselines["shortgpt"] = lambda: shortgpt(space, runtime.pruner)
        baselines["sleb"] = lambda: sleb(space, runtime.pruner, runtime.calib_ids)
    for bname, make in baselines.items():
        try:
            cand = make()
        except ValueError as exc:
            print(f"  {bname}: n/a ({exc})")
            continue
        res = runtime.pipeline.run_stage(final, runtime.model, cand, runtime.context)
        print(f"  {bname:9s} {res.objective:.5f} at {space.ratio(cand, 'params'):.3f} of dense params")

    if args.export:
        art = study.export(best_point.number, args.export, runtime=runtime)
        print(f"exported to {art.path} (load with evoprune.load_pruned)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
