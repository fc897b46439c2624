"""Bench: several `evoprune worker` processes on one PostgreSQL study.

Phases (each on its own study in a fresh PostgreSQL database, dropped at the end):

1. ``one``: a single worker runs ``--n-trials T``;
2. ``many``: W workers (default 3) start together on one study, ``--n-trials T`` each;
3. ``kill``: W workers again, and one of them is killed with SIGKILL once it has finished a
   trial; the others' heartbeat threads find it dead, fail its RUNNING trials and release its
   claims, and the candidates are evaluated again by the survivors (retried, not lost).

For every phase: candidates duplicated (finished in more than one trial), candidates lost
(a trial was started for them but none finished, retries included), reservations released
without a trial (a worker died between claiming and starting it: never evaluated, so
nothing is lost), failed trials, and
throughput = finished trials per second of evaluation (first trial start to last trial end,
from the database, so process start-up is not counted), and the same while every worker was
evaluating ("all-busy" window). Each process uses one torch thread.

Usage: ``python bench/workers.py [--server postgresql://postgres@127.0.0.1:5432/test]
[--workers 3] [--trials 16]``; ``--smoke``: 2 workers x 2 trials on small token sets (the process
start-ups dominate).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _common import parse_args

CONFIG = """\
model: reference:tiny
calibration: {num_sequences: 8, seq_len: 64}
space: {attention: null, mlp_step: 16}
budget: {metric: params, max_ratio: 0.8}
stages:
  - {name: s1, evaluators: [kl], eval_tokens: %(s1_tokens)d, seq_len: 128, promote: {top_k: 2}}
  - {name: final, evaluators: [kl], eval_tokens: %(final_tokens)d, seq_len: 128}
sampler: {name: evolutionary, options: {offspring: 4}}
objectives: [kl, params]
seed: 0
"""

ENV = dict(os.environ, EVOPRUNE_LOG_LEVEL="WARNING", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _worker(url: str, study: str, trials: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "evoprune", "worker", "--storage", url, "--study", study, "--n-trials", str(trials),
         "--heartbeat", "1", "--grace", "5"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def _finished_count(url: str, study: str) -> int:
    from evoprune import load_study

    s = load_study(storage=url, study_name=study)
    n = sum(1 for t in s.trials() if t.state.name in ("COMPLETE", "PRUNED"))
    s.storage.engine.dispose()
    return n


def _analyse(url: str, study: str) -> dict:
    from evoprune import load_study

    s = load_study(storage=url, study_name=study)
    trials = s.trials()
    rows = s.db.trial_candidates()
    finished_keys: dict[str, int] = {}
    for r in rows:
        if r["state"] in ("COMPLETE", "PRUNED"):
            finished_keys[r["candidate_key"]] = finished_keys.get(r["candidate_key"], 0) + 1
    duplicated = sum(n - 1 for n in finished_keys.values() if n > 1)
    claims = s.db.claims()
    tried = {r["candidate_key"] for r in rows}  # candidates that got a trial
    # lost: a candidate whose trial started but which never finished in any trial; a reservation whose
    # worker died before creating its trial was never evaluated -- it is released, not lost
    lost = sorted(k for k in tried if k not in finished_keys)
    reservations = sorted(k for k, c in claims.items() if k not in tried)
    done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in trials)).total_seconds()
    owners = {r["owner"] for r in rows}
    # steady state: the window in which every worker was evaluating (first start of the last worker to
    # begin .. last end of the first worker to stop), trials finished inside it per second
    by_owner: dict[str, list] = {}
    number_owner = {r["trial_number"]: r["owner"] for r in rows}
    for t in done:
        by_owner.setdefault(number_owner.get(t.number, "?"), []).append(t)
    starts = [min(x.datetime_start for x in ts) for ts in by_owner.values()]
    ends = [max(x.datetime_complete for x in ts) for ts in by_owner.values()]
    w0, w1 = max(starts), min(ends)
    window = (w1 - w0).total_seconds()
    inside = sum(1 for t in done if w0 <= t.datetime_complete <= w1)
    out = dict(
        trials=len(trials), finished=len(done), failed=sum(1 for t in trials if t.state.name == "FAIL"),
        running=sum(1 for t in trials if t.state.name == "RUNNING"), duplicated=duplicated, lost=len(lost),
        claims=len(claims), reservations=len(reservations), span=span, throughput=len(done) / span if span > 0 else float("nan"),
        workers=len(owners), problems=s.check(),
        steady=inside / window if window > 0 else float("nan"), window=window,
    )
    s.storage.engine.dispose()
    return out


def _run_phase(url: str, name: str, n_workers: int, trials: int, cfg: Path, *, kill_one: bool) -> dict:
    from evoprune import create_study

    s = create_study(cfg, storage=url, study_name=name)
    s.storage.engine.dispose()
    procs = [_worker(url, name, trials) for _ in range(n_workers)]
    killed = None
    if kill_one:
        victim = procs[-1]
        from evoprune import load_study

        st = load_study(storage=url, study_name=name)
        deadline = time.monotonic() + 600
        while victim.poll() is None and time.monotonic() < deadline:
            mine = [r for r in st.db.trial_candidates() if f":{victim.pid}:" in r["owner"]]
            if any(r["state"] in ("COMPLETE", "PRUNED") for r in mine) and any(r["state"] == "RUNNING" for r in mine):
                os.kill(victim.pid, signal.SIGKILL)
                killed = victim.pid
                break
            time.sleep(0.05)
        st.storage.engine.dispose()
    codes = []
    for p in procs:
        _, err = p.communicate()
        codes.append(p.returncode)
        if p.returncode not in (0, -signal.SIGKILL):
            print(f"worker {p.pid} failed (exit {p.returncode}):\n{err.decode()[-2500:]}")
    result = _analyse(url, name)
    result.update(exit_codes=codes, killed=killed)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432/test",
                    help="PostgreSQL URL with rights to CREATE DATABASE (a fresh database is made and dropped)")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--trials", type=int, default=16, help="trials per worker")
    ap.add_argument("--keep", action="store_true", help="keep the bench database")
    ap.add_argument("--s1-tokens", type=int, default=2048, help="stage-1 evaluation tokens")
    ap.add_argument("--final-tokens", type=int, default=4096, help="final-stage evaluation tokens")
    args = parse_args(ap, argv, smoke=dict(workers=2, trials=2, s1_tokens=256, final_tokens=512))
    import optuna
    import sqlalchemy as sa

    from evoprune.storage import normalize_url

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    server = sa.engine.make_url(normalize_url(args.server))
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    dbname = f"evoprune_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as c:
        c.execute(sa.text(f"CREATE DATABASE {dbname}"))
    url = server.set(database=dbname).render_as_string(hide_password=False)
    tmp = tempfile.TemporaryDirectory()
    cfg = Path(tmp.name) / "workers.yaml"
    cfg.write_text(CONFIG % {"s1_tokens": args.s1_tokens, "final_tokens": args.final_tokens})
    results = {}
    try:
        print(f"database {dbname}; {args.workers} workers x {args.trials} trials", flush=True)
        results["one"] = _run_phase(url, "one", 1, args.trials, cfg, kill_one=False)
        results["many"] = _run_phase(url, "many", args.workers, args.trials, cfg, kill_one=False)
        results["kill"] = _run_phase(url, "kill", args.workers, args.trials, cfg, kill_one=True)
    finally:
        if not args.keep:
            with admin.connect() as c:
                c.execute(sa.text(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)"))
        admin.dispose()
        tmp.cleanup()
    base = results["one"]["throughput"]
    base_steady = results["one"]["steady"]
    cols = ["phase", "workers", "trials", "finished", "failed", "running", "claims", "no trial", "duplicated", "lost",
            "span_s", "trials/s", "vs one", "all-busy_s", "busy tr/s", "busy vs 1", "exit codes", "integrity"]
    print("  ".join(f"{c:>10}" for c in cols))
    for name, r in results.items():
        n = 1 if name == "one" else args.workers
        print("  ".join(f"{v:>10}" for v in [
            name, n, r["trials"], r["finished"], r["failed"], r["running"], r["claims"], r["reservations"],
            r["duplicated"],
            r["lost"], f"{r['span']:.1f}", f"{r['throughput']:.2f}", f"{r['throughput'] / base:.2f}x",
            *((f"{r['window']:.1f}", f"{r['steady']:.2f}", f"{r['steady'] / base_steady:.2f}x") if name != "kill"
              else ("-", "-", "-")),
            ",".join(map(str, r["exit_codes"])), "ok" if not r["problems"] else len(r["problems"])]))
    for name, r in results.items():
        for p in r["problems"]:
            print(f"integrity problem ({name}): {p}")
    dup = sum(r["duplicated"] for r in results.values())
    lost = sum(r["lost"] for r in results.values())
    left = sum(r["running"] for r in results.values())
    print(f"throughput with {args.workers} workers relative to one: {results['many']['throughput'] / base:.2f}x "
          f"overall, {results['many']['steady'] / base_steady:.2f}x while all were evaluating "
          f"({os.cpu_count()} CPU cores, shared; one torch thread per worker)")
    print(f"TARGET duplicated_candidates {dup} == 0 {'PASS' if dup == 0 else 'FAIL'}")
    print(f"TARGET lost_candidates {lost + left} == 0 {'PASS' if lost + left == 0 else 'FAIL'}")
    return 0 if args.smoke or (dup == 0 and lost + left == 0) else 1  # --smoke checks the bench runs, not its targets


if __name__ == "__main__":
    sys.exit(main())
