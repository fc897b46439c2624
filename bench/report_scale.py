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
(default storage: a temporary SQLite file).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from study_scale import scale_config

MODEL = dict(model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=16, hidden_size=512,
             num_attention_heads=8, num_key_value_heads=4, intermediate_size=1408, vocab_size=4096,
             tie_word_embeddings=False, max_position_embeddings=2048)


def populate(url: str, n_trials: int, model_dir: str, *, final_every: int = 1, seed: int = 0) -> dict:
    """Create the study and bulk-insert ``n_trials`` finished trials with their report rows."""
    import sqlalchemy as sa
    from optuna.trial import TrialState

    from evoprune import create_study
    from evoprune._optuna_private import rdb_models
    from evoprune.report import study_space
    from evoprune.storage._tables import StageResultRow, StageRow, TrialRow

    om = rdb_models()
    config = scale_config(model_dir)
    study = create_study(config, storage=url, study_name="scale")
    space, note = study_space(config)
    assert space is not None and not note, note
    rng = np.random.default_rng(seed)
    cands, keys = [], set()
    while len(cands) < n_trials:
        c = space.random(rng)
        if c.key not in keys:
            keys.add(c.key)
            cands.append(c)
    sid, esid = study.db.optuna_study_id, study.db.study_id
    t0 = dt.datetime(2026, 1, 1)
    trials, values, erows, stages, results = [], [], [], [], []
    with study.storage.engine.connect() as conn:
        first_id = 1 + (conn.execute(sa.select(sa.func.max(om.TrialModel.trial_id))).scalar() or 0)
    for i, c in enumerate(cands):
        tid = first_id + i
        s1 = float(rng.gamma(2.0, 0.05))
        final = i % final_every == 0
        kl = s1 * float(rng.uniform(0.8, 1.0))
        source = "seed" if i < 32 else "evolution"
        start = t0 + dt.timedelta(seconds=2 * i)
        trials.append(dict(trial_id=tid, number=i, study_id=sid, state=TrialState.COMPLETE if final else
                           TrialState.PRUNED, datetime_start=start, datetime_complete=start + dt.timedelta(seconds=1)))
        if final:
            for obj, v in enumerate((kl, space.ratio(c, "params"))):
                values.append(dict(trial_id=tid, objective=obj, value=v,
                                   value_type=om.TrialValueModel.TrialValueType.FINITE))
        erows.append(dict(study_id=esid, trial_id=tid, trial_number=i, candidate_key=c.key,
                          candidate_json=c.to_json(), source=source, owner="bench", created_at=start))
        for si, (st, v) in enumerate((("s1", s1), ("final", kl))[: 2 if final else 1]):
            stages.append(dict(study_id=esid, trial_id=tid, stage=st, stage_index=si, objective=v,
                               direction="minimize", promoted=None if st == "final" else final, seconds=0.5,
                               created_at=start))
            results.append(dict(study_id=esid, trial_id=tid, stage=st, evaluator="kl",
                                tokens=2048 if st == "s1" else 16384, value=v, seconds=0.5, direction="minimize",
                                details_json="{}", created_at=start))
    with study.storage.engine.begin() as conn:
        for table, rows in ((om.TrialModel.__table__, trials), (om.TrialValueModel.__table__, values),
                            (TrialRow.__table__, erows), (StageRow.__table__, stages),
                            (StageResultRow.__table__, results)):
            for k in range(0, len(rows), 5000):
                conn.execute(sa.insert(table), rows[k:k + 5000])
        if conn.dialect.name == "postgresql":  # explicit trial ids: move the id sequence past them
            conn.execute(sa.text("SELECT setval(pg_get_serial_sequence('trials', 'trial_id'), "
                                 "(SELECT MAX(trial_id) FROM trials))"))
    study.db.record_fingerprints({"model": "m" * 16, "data": "d" * 16, "space": space.key})
    study.close()
    return {"complete": len(values) // 2}


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
    args = ap.parse_args(argv)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tmp = tempfile.TemporaryDirectory()
    model_dir = Path(tmp.name) / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(MODEL))
    url = args.storage or f"sqlite:///{Path(tmp.name) / 'scale.db'}"
    print(f"populating {args.trials} trials in {url.split('://')[0]} ...", flush=True)
    t = time.perf_counter()
    made = populate(url, args.trials, str(model_dir), final_every=args.final_every)
    populate_s = time.perf_counter() - t
    out = Path(tmp.name) / "report.html"
    cli = [time_cli(url, out) for _ in range(args.repeats)]

    from evoprune.report import history_data, load_snapshot, pareto_plot_data, write_report

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
    return 0 if ok_s and ok_mb else 1


if __name__ == "__main__":
    sys.exit(main())
