"""Bench: the HTML report of a 10,000-trial study builds in < 20 s and weighs < 25 MB.

The study is synthetic but shaped like a real one (and as large as the report ever has to draw): a
16-layer Llama-like model (its ``config.json`` in a temporary folder, so the report rebuilds the search
space and computes every cost ratio as for a real model), two objectives (KL, params ratio), two
stages, a candidate row and stage records/outcomes per trial. By default every trial reaches the final
stage and is COMPLETE (10,000 points on the Pareto plot and in the history: the worst case; a real
staged study completes a fraction of them); ``--final-every 4`` completes a quarter, as
``bench/study_scale.py`` does. A few dozen trials are baselines (source ``"seed"``). Rows are
bulk-inserted, then timed:

* ``report_seconds``: ``evoprune report --storage URL --study scale --out FILE`` as a user runs it, in a
  fresh process (interpreter start and imports included), median of ``--repeats`` runs;
* for information: the in-process time of ``write_report`` (``load_snapshot`` + figures + HTML) and
  of the snapshot alone, the HTML size and how many points each figure carries.

Usage: ``python bench/report_scale.py [--trials 10000] [--final-every 1] [--storage URL] [--repeats 3]``
(default storage: a temporary SQLite file); ``--smoke``: 100 trials, one timed run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import parse_args
from study_scale import MODEL, populate, scale_config

def time_cli(url: str, out: Path) -> float:
    """Wall time of ``evoprune report`` in a fresh process."""
    env = dict(os.environ, EVOPRUNE_LOG_LEVEL="WARNING", OMP_NUM_THREADS="1")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "evoprune", "report", "--storage", url, "--study", "scale", "--out",
                    str(out)], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10_000)
    ap.add_argument("--final-every", type=int, default=1, help="every Nth trial reaches the final stage (COMPLETE)")
    ap.add_argument("--storage", default=None, help="database URL (default: a temporary SQLite file)")
    ap.add_argument("--repeats", type=int, default=3)
    args = parse_args(ap, argv, smoke=dict(trials=100, repeats=1))
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tmp = tempfile.TemporaryDirectory()
    model_dir = Path(tmp.name) / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(MODEL))
    url = args.storage or f"sqlite:///{Path(tmp.name) / 'scale.db'}"
    print(f"populating {args.trials} trials in {url.split('://')[0]} ...", flush=True)
    t = time.perf_counter()
    made = populate(url, args.trials, model=str(model_dir), final_every=args.final_every, n_seeds=32)
    populate_s = time.perf_counter() - t
    from evoprune.report._snapshot import study_space

    space, note = study_space(scale_config(str(model_dir)), {"space": made["space"].key})
    assert space is not None and not note, note  # the report rebuilds the stored space from config.json
    out = Path(tmp.name) / "report.html"
    cli = [time_cli(url, out) for _ in range(args.repeats)]

    from evoprune.report import load_snapshot, write_report
    from evoprune.report._history import history_data
    from evoprune.report._pareto import pareto_plot_data

    t = time.perf_counter()
    snap = load_snapshot((url, "scale"))
    snap_s = time.perf_counter() - t
    t = time.perf_counter()
    write_report(snap, out)
    figures_s = time.perf_counter() - t
    text = out.read_text(encoding="utf-8")
    megabytes = len(text.encode()) / 1e6
    pareto, history = pareto_plot_data(snap), history_data(snap)
    report_s = statistics.median(cli)
    rows = [
        ("trials (complete)", f"{args.trials} ({made['complete']})"),
        ("populate (s)", f"{populate_s:.1f}"),
        ("evoprune report, fresh process (s), median", f"{report_s:.2f}  (runs: {', '.join(f'{x:.2f}' for x in cli)})"),
        ("  in process: load_snapshot (s)", f"{snap_s:.2f}"),
        ("  in process: figures + HTML from the snapshot (s)", f"{figures_s:.2f}"),
        ("HTML size (MB)", f"{megabytes:.2f}"),
        ("  figures", str(text.count('<div class="figure">'))),
        ("  Pareto points / front / drawn dominated (cap)", f"{len(pareto.numbers)} / {len(pareto.front)} / "
                                                           f"{min(len(pareto.numbers) - len(pareto.front), 2000)}"),
        ("  history points / hypervolume points", f"{len(history.numbers)} / {len(history.hv_numbers)}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':<{width}}  value")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    ok_s, ok_mb = report_s < 20.0, megabytes < 25.0
    print(f"TARGET report_seconds_10k {report_s:.2f} < 20 {'PASS' if ok_s else 'FAIL'}")
    print(f"TARGET report_megabytes_10k {megabytes:.2f} < 25 {'PASS' if ok_mb else 'FAIL'}")
    tmp.cleanup()
    return 0 if args.smoke or (ok_s and ok_mb) else 1  # --smoke checks the bench runs, not its targets


if __name__ == "__main__":
    sys.exit(main())
