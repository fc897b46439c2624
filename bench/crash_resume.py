"""Bench: a search on the tiny reference model, killed with SIGKILL at 10 random moments and resumed
each time, against an uninterrupted run with the same seed.

1. Reference: ``evoprune search CONFIG --generations G`` runs to the end, uninterrupted.
2. Crash run: ``evoprune search`` (then ``evoprune resume`` after every kill) on a second database;
   10 random moments are drawn uniformly over the reference run's evaluation time (process
   start-up excluded) and the crash run is killed with SIGKILL whenever its own accumulated
   evaluation time passes the next one. After the 10th kill a last ``resume`` runs to generation G.
3. Checks, on the crash database:
   * trials lost: a trial finished (COMPLETE/PRUNED) in any snapshot taken right after a kill that
     is no longer finished with the same values at the end (target 0);
   * trials duplicated: candidates finished in more than one trial (target 0);
   * the Pareto front (candidate keys and objective values) equals the reference run's
     (a budget sweep over three levels, so the front has a point per level);
   * ``evoprune check`` (integrity of every row) passes, no trial is left RUNNING.

Usage: ``python bench/crash_resume.py [--kills 10] [--generations 12] [--seed 0] [--storage-dir DIR]``;
``--smoke``: 1 kill, 2 generations of 3 offspring on small token sets (seconds of search; the process
start-ups dominate).
Each process uses one torch thread so that evaluation is bit-reproducible across runs.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import parse_args

CONFIG = """\
model: reference:tiny
calibration: {{num_sequences: 8, seq_len: 64}}
space: {{attention: null, mlp_step: 8}}
budget: {{metric: params, max_ratio: 0.9}}
stages:
  - {{name: s1, evaluators: [kl], eval_tokens: {s1_tokens}, seq_len: 128, promote: {{top_k: 2}}}}
  - {{name: final, evaluators: [kl], eval_tokens: {final_tokens}, seq_len: 128}}
sampler: {{name: evolutionary, options: {{offspring: {offspring}, budget_sweep: [0.9, 0.8, 0.7]}}}}
objectives: [kl, params]
seed: {seed}
"""

ENV = dict(os.environ, EVOPRUNE_LOG_LEVEL="WARNING", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "evoprune", *args]


def _generation(url: str, study: str) -> int:
    import optuna

    from evoprune import load_study
    from evoprune.storage import StorageNotFoundError

    try:
        s = load_study(storage=url, study_name=study)
    except (LookupError, KeyError, optuna.exceptions.StorageInternalError, StorageNotFoundError):
        return 0  # no database / no study yet
    saved = s.db.load_sampler_state()
    s.storage.engine.dispose()
    return saved[0] if saved else 0


def _trial_count(url: str) -> int:
    import sqlalchemy as sa

    from evoprune.storage._engine import normalize_url

    eng = sa.create_engine(normalize_url(url))
    try:
        with eng.connect() as c:
            return int(c.execute(sa.text("SELECT COUNT(*) FROM trials")).scalar())
    except sa.exc.DBAPIError:
        return 0
    finally:
        eng.dispose()


def _search_span(url: str, study: str) -> float:
    from evoprune import load_study

    s = load_study(storage=url, study_name=study)
    trials = s.trials()
    span = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
    s.storage.engine.dispose()
    return span


def _finished(url: str, study: str) -> dict[int, tuple]:
    from optuna.trial import TrialState

    from evoprune import load_study

    s = load_study(storage=url, study_name=study)
    out = {}
    for t in s.trials():
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            out[t.number] = (t.state.name, tuple(t.values) if t.values else None,
                             t.user_attrs.get("evoprune:candidate_key"))
    s.storage.engine.dispose()
    return out


def _front(url: str, study: str) -> set[tuple]:
    from evoprune import load_study

    s = load_study(storage=url, study_name=study)
    front = {(p.candidate_key, tuple(round(v, 12) for v in p.values)) for p in s.pareto_front()}
    s.storage.engine.dispose()
    return front


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--generations", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0, help="study seed and kill-time seed")
    ap.add_argument("--storage-dir", default=None, help="folder for the two SQLite databases (default: temporary)")
    ap.add_argument("--offspring", type=int, default=6)
    ap.add_argument("--s1-tokens", type=int, default=2048, help="stage-1 evaluation tokens")
    ap.add_argument("--final-tokens", type=int, default=8192, help="final-stage evaluation tokens")
    args = parse_args(ap, argv, smoke=dict(kills=1, generations=2, offspring=3, s1_tokens=256, final_tokens=512))
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tmp = tempfile.TemporaryDirectory()
    root = Path(args.storage_dir or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "crash.yaml"
    cfg.write_text(CONFIG.format(seed=args.seed, offspring=args.offspring, s1_tokens=args.s1_tokens,
                                 final_tokens=args.final_tokens))
    ref_url, crash_url = f"sqlite:///{root / 'reference.db'}", f"sqlite:///{root / 'crash.db'}"
    for p in root.glob("*.db*"):
        p.unlink()
    G = args.generations

    # Warm the caches first (importance scores, dense reference logits): a dense reference computed
    # in-process and one loaded from the cache differ in the last bits, so both runs must load it.
    # (One trial: a search needs at least one generation or trial to stop after.)
    subprocess.run(_cli("search", str(cfg), "--storage", f"sqlite:///{root / 'warmup.db'}", "--study", "s",
                        "--n-trials", "1"), env=ENV, check=True, stdout=subprocess.DEVNULL)
    print(f"reference run: {G} generations, uninterrupted ...", flush=True)
    t = time.monotonic()
    subprocess.run(_cli("search", str(cfg), "--storage", ref_url, "--study", "s", "--generations", str(G)),
                   env=ENV, check=True, stdout=subprocess.DEVNULL)
    ref_seconds = time.monotonic() - t
    ref_trials = _trial_count(ref_url)
    G = _generation(ref_url, "s")  # the reference may stop early if a level's neighbourhood is exhausted
    search_seconds = _search_span(ref_url, "s")  # evaluation time, without process start-up

    # 10 random moments of evaluation time (the search part of the reference run, start-up excluded);
    # the crash run is killed whenever its own accumulated evaluation time passes the next one.
    rng = random.Random(args.seed)
    moments = sorted(rng.uniform(0.02, 0.95) * search_seconds for _ in range(args.kills))
    clock = 0.0
    kills, log, snapshots = 0, [], {}
    while True:
        gen = _generation(crash_url, "s")
        remaining = G - gen
        if remaining <= 0:
            break
        first = _trial_count(crash_url) == 0 and gen == 0
        name = "search" if first else "resume"
        cmd = (_cli("search", str(cfg), "--storage", crash_url, "--study", "s") if first
               else _cli("resume", "--storage", crash_url, "--study", "s"))
        cmd += ["--generations", str(remaining), "--heartbeat", "2"]
        n0 = _trial_count(crash_url)
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while proc.poll() is None and _trial_count(crash_url) <= n0:  # start-up: not evaluating yet
            time.sleep(0.02)
        t_eval = time.monotonic()
        target = moments[kills] if kills < len(moments) else None
        while proc.poll() is None and (target is None or clock + time.monotonic() - t_eval < target):
            time.sleep(0.02)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            clock += time.monotonic() - t_eval
            kills += 1
            snap = _finished(crash_url, "s")
            snapshots.update(snap)
            log.append((len(log) + 1, name, gen, "SIGKILL", time.monotonic() - t0,
                        f"at evaluation time {clock:.2f} s (moment {target:.2f}); {len(snap)} finished trials"))
        else:
            clock += time.monotonic() - t_eval
            err = proc.stderr.read().decode()
            if proc.returncode != 0:
                print(err[-3000:])
                raise SystemExit(f"{name} failed with exit code {proc.returncode}")
            log.append((len(log) + 1, name, gen, "finished", time.monotonic() - t0, f"evaluation time {clock:.2f} s"))
            if _generation(crash_url, "s") < G:
                print(f"the search stopped by itself at generation {_generation(crash_url, 's')} of {G}")
                break

    from evoprune import load_study

    final = _finished(crash_url, "s")
    lost = sorted(n for n, v in snapshots.items() if final.get(n) != v)
    keys = [v[2] for v in final.values()]
    duplicated = len(keys) - len(set(keys))
    crash_study = load_study(storage=crash_url, study_name="s")
    problems = crash_study.check()
    states: dict[str, int] = {}
    for tr in crash_study.trials():
        states[tr.state.name] = states.get(tr.state.name, 0) + 1
    crash_study.storage.engine.dispose()
    ref_front, crash_front = _front(ref_url, "s"), _front(crash_url, "s")
    ref_final = _finished(ref_url, "s")
    same_front = ref_front == crash_front
    ref_results = {(v[2], v[1]) for v in ref_final.values()}
    crash_results = {(v[2], v[1]) for v in final.values()}

    print(f"\n{'#':>3}  {'command':<7} {'from gen':>8}  {'outcome':<9} {'seconds':>8}  note")
    for row in log:
        print(f"{row[0]:>3}  {row[1]:<7} {row[2]:>8}  {row[3]:<9} {row[4]:>8.1f}  {row[5]}")
    print()
    table = [
        ("generations", G),
        ("kills (SIGKILL)", kills),
        ("reference run: trials / seconds (search part)", f"{ref_trials} / {ref_seconds:.1f} ({search_seconds:.1f})"),
        ("reference run: finished trials", len(ref_final)),
        ("crash run: trials by state", ", ".join(f"{k.lower()} {v}" for k, v in sorted(states.items()))),
        ("crash run: finished trials", len(final)),
        ("finished trials seen in kill snapshots", len(snapshots)),
        ("trials lost", len(lost)),
        ("candidates duplicated", duplicated),
        ("reference Pareto front", sorted(ref_front)),
        ("crash-run Pareto front", sorted(crash_front)),
        ("Pareto fronts equal", same_front),
        ("finished (candidate, values): only reference / only crash run",
         f"{len(ref_results - crash_results)} / {len(crash_results - ref_results)}"),
        ("integrity problems", problems or "none"),
    ]
    for k, v in table:
        print(f"{k:<62} {v}")
    if kills < args.kills:
        print(f"note: only {kills} of {args.kills} kills landed before the search ended")
    running_left = states.get("RUNNING", 0)
    print(f"TARGET trials_lost {len(lost)} == 0 {'PASS' if not lost else 'FAIL'}")
    print(f"TARGET trials_duplicated {duplicated} == 0 {'PASS' if duplicated == 0 else 'FAIL'}")
    print(f"TARGET pareto_front_equal {int(same_front)} == 1 {'PASS' if same_front else 'FAIL'}")
    ok_integrity = not problems and running_left == 0
    print(f"TARGET integrity_problems {len(problems) + running_left} == 0 {'PASS' if ok_integrity else 'FAIL'}")
    tmp.cleanup()
    return 0 if args.smoke or (not lost and duplicated == 0 and same_front and ok_integrity) else 1  # --smoke checks the bench runs, not its targets


if __name__ == "__main__":
    sys.exit(main())
