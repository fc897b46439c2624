"""Quickstart: an evoprune search from a Python script, ending with the HTML report.

    python studies/quickstart.py                     # a few minutes on 2 CPU cores
    python studies/quickstart.py --generations 30    # a longer search (it resumes where it stopped)

It searches the offline tiny reference model (a 4-block GQA Llama trained on Shakespeare and
Milton, built into the cache on first use, about half a minute) for a Pareto front of KL to the
dense model against parameters: one evolutionary run per budget level (85 %, 75 % and 65 % of the
parameters), each candidate scored on 1,024 tokens first and the best three of each generation on
8,192. The study lives in ``out/quickstart.db``; while it runs, look at it from another shell::

    evoprune status --storage sqlite:///out/quickstart.db --study quickstart --watch
    evoprune dashboard --storage sqlite:///out/quickstart.db

Copy this file as a starting point: it only uses the public API.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import optuna

import evoprune
from evoprune._logging import configure_logging

CONFIG = {
    "model": "reference:tiny",          # or a checkpoint folder / hub id
    "device": "cpu",
    "data": {"source": "reference"},    # or {"source": "text", "train": ["docs/train/"], "validation": ["docs/valid/**/*.txt"]}
    "calibration": {"num_sequences": 16, "seq_len": 128},
    "space": {"attention": "kv_groups", "mlp_step": 16, "drop_blocks": True, "frozen_layers": [0]},
    "stages": [
        {"name": "s1", "evaluators": ["kl"], "eval_tokens": 1024, "seq_len": 128, "promote": {"top_k": 3}},
        {"name": "final", "evaluators": ["kl"], "eval_tokens": 8192, "seq_len": 128},
    ],
    "sampler": {"name": "evolutionary", "options": {"offspring": 8, "budget_sweep": [0.85, 0.75, 0.65]}},
    "objectives": ["kl", "params"],
    "seed": 0,
    "stop": {"n_generations": 15},      # 5 generations per budget level
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generations", type=int, default=None, help="stop after N generations (default: the config's 15)")
    ap.add_argument("--out", default="out", help="folder for the study database and the report (default out/)")
    args = ap.parse_args(argv)
    configure_logging("WARNING")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    study = evoprune.create_study(CONFIG, storage=f"sqlite:///{(out / 'quickstart.db').resolve()}",
                                  study_name="quickstart")
    print(f"study {study.name!r} in {study.url}")
    stops = {"n_generations": args.generations} if args.generations is not None else {}
    stats = study.run(**stops, progress=sys.stderr.isatty())
    print(f"search: {stats.trials} trials in {stats.generations} generations, {stats.tokens:,} forward tokens, "
          f"{time.monotonic() - start:.0f} s, stopped by {stats.stopped_by}")

    print("\n".join(study.status().lines()))
    print("Pareto front (kl, params ratio):")
    for p in sorted(study.pareto_front(), key=lambda p: p.values[1]):
        print(f"  trial {p.number:4d}  kl {p.values[0]:.4f}  params {p.values[1]:.3f}")
    path = study.report(out / "quickstart-report.html")
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
