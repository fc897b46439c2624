"""Bench: a soak of several workers on one study, with workers killed and restarted all along.

W workers (default 3) run ``evoprune worker`` on one study on PostgreSQL (then a shorter run on
MariaDB) until the study holds ``--trials`` trials (default 2,000) on the tiny reference model.
Worker 0 lives through the whole run (its RSS is sampled); every ``--kill-every`` seconds one of
the others is stopped -- alternately SIGKILL (no cleanup at all) and SIGTERM (clean stop) -- and
started again at once. At the end every worker gets SIGTERM, one last ``evoprune resume`` runs the
retry pass, and the study is audited:

* ``lost``: candidates that got a trial but never finished in any trial;
* ``duplicated``: candidates evaluated to the end (COMPLETE/PRUNED) in more than one trial;
* ``stranded_claims``: claims still held with no trial, or by a failed trial, once nobody runs;
* ``unexpected_worker_exits``: exits other than 0, 143 after our SIGTERM, -9 after our SIGKILL;
* ``worker_rss_growth``: RSS of worker 0, mean of the last tenth of samples over the first tenth
  (samples start once it finished its first trial, i.e. after the model is loaded);
* ``integrity``: ``evoprune check``.

Usage: ``python bench/soak.py [--trials 2000] [--workers 3] [--kill-every 10]
[--server postgresql://postgres@127.0.0.1:5432/test] [--mariadb mysql://root@127.0.0.1:3306/test]
[--mariadb-trials 300]``. Each process uses one torch thread. ``--smoke``: 2 workers until 6 trials on
PostgreSQL only, a kill every 4 s (the process start-ups dominate).
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_args  # noqa: E402
from workers import ENV  # noqa: E402  (one environment for worker processes)

# An Optuna sampler (random, a different seed in each process) rather than the evolutionary one:
# on the 4-block tiny model the evolutionary sampler exhausts the neighbourhood of its parents after
# about 150-190 trials (it stops with "exhausted"), and a soak needs thousands of trials. Repeats
# across workers still happen (and exercise the duplicate handling).
CONFIG = """\
model: reference:tiny
calibration: {num_sequences: 4, seq_len: 32}
space: {mlp_step: 8, sparsity_levels: [0.0, 0.25, 0.5], drop_attention: true, drop_mlp: true}
budget: {metric: params, max_ratio: 0.8}
stages:
  - {name: s1, evaluators: [kl], eval_tokens: 64, seq_len: 32, promote: {top_k: 4}}
  - {name: final, evaluators: [kl], eval_tokens: 128, seq_len: 32}
sampler: {name: random, options: {seed: null, budget_mode: repair}}
objectives: [kl, params]
seed: 0
"""


def _start_worker(url: str, study: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "evoprune", "worker", "--storage", url, "--study", study, "--n-trials", "1000000",
         "--heartbeat", "1", "--grace", "5"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class _Counter:
    """Trials of study ``name``, read straight from Optuna's tables (cheap, no study object)."""

    def __init__(self, url: str, name: str) -> None:
        import sqlalchemy as sa

        from evoprune.storage import normalize_url

        self.sa = sa
        self.name = name
        self.engine = sa.create_engine(normalize_url(url))

    def counts(self) -> dict[str, int]:
        try:
            with self.engine.connect() as c:
                rows = c.execute(self.sa.text(
                    "SELECT t.state, COUNT(*) FROM trials t JOIN studies s ON s.study_id = t.study_id "
                    "WHERE s.study_name = :name GROUP BY t.state"), {"name": self.name}).all()
        except self.sa.exc.DBAPIError:
            return {}
        return {str(s).rsplit(".", 1)[-1]: int(n) for s, n in rows}

    def close(self) -> None:
        self.engine.dispose()


def soak(url: str, *, trials: int, workers: int, kill_every: float, cfg: Path, seed: int, label: str,
         time_limit: float) -> dict:
    from evoprune import create_study

    name = "soak"
    s = create_study(cfg, storage=url, study_name=name)
    s.close()
    rng = random.Random(seed)
    procs = [_start_worker(url, name) for _ in range(workers)]
    expected: dict[int, set[int]] = {}  # pid -> exit codes we caused
    exits: list[tuple[int, int, str]] = []
    counter = _Counter(url, name)
    rss: list[float] = []
    kills = {"SIGKILL": 0, "SIGTERM": 0}
    t0 = time.monotonic()
    next_kill = t0 + kill_every
    turn = 0
    try:
        while True:
            c = counter.counts()
            done = c.get("COMPLETE", 0) + c.get("PRUNED", 0)
            total = sum(c.values())
            if total >= trials or time.monotonic() - t0 > time_limit:
                break
            if done > 0:
                r = _rss_mb(procs[0].pid)
                if r is not None and procs[0].poll() is None:
                    rss.append(r)
            for i, p in enumerate(procs):  # a worker that ended by itself is a finding; start another
                if p.poll() is not None:
                    _, err = p.communicate()
                    exits.append((p.pid, p.returncode, err.decode()[-2000:]))
                    procs[i] = _start_worker(url, name)
            if workers > 1 and time.monotonic() >= next_kill:
                slot = 1 + turn % (workers - 1)
                sig = signal.SIGKILL if turn % 2 == 0 else signal.SIGTERM
                time.sleep(rng.uniform(0, 2))  # a random moment (evaluating, committing, loading ...)
                victim = procs[slot]
                if victim.poll() is None:
                    victim.send_signal(sig)
                    expected[victim.pid] = {-signal.SIGKILL} if sig == signal.SIGKILL else {128 + signal.SIGTERM, -signal.SIGTERM, 0}
                    kills[sig.name] += 1
                    _, err = victim.communicate()
                    exits.append((victim.pid, victim.returncode, err.decode()[-2000:]))
                procs[slot] = _start_worker(url, name)
                turn += 1
                next_kill = time.monotonic() + kill_every
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                expected[p.pid] = {128 + signal.SIGTERM, -signal.SIGTERM, 0}
        for p in procs:
            try:
                _, err = p.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
            exits.append((p.pid, p.returncode, err.decode()[-2000:]))
        counter.close()
    seconds = time.monotonic() - t0
    # one last start: reaps, then evaluates every released candidate again (the retry pass)
    final = subprocess.run([sys.executable, "-m", "evoprune", "resume", "--storage", url, "--study", name,
                            "--n-trials", "1"], env=ENV, capture_output=True, text=True)
    unexpected = [(pid, code, err) for pid, code, err in exits if code not in expected.get(pid, {0})]
    if final.returncode != 0:
        unexpected.append((-1, final.returncode, final.stderr[-2000:]))
    out = audit(url, name)
    tenth = max(1, len(rss) // 10)
    growth = (sum(rss[-tenth:]) / tenth) / (sum(rss[:tenth]) / tenth) if rss else float("nan")
    out.update(label=label, seconds=seconds, kills=kills, unexpected=unexpected, rss_first=rss[:tenth],
               rss_last=rss[-tenth:], rss_growth=growth, rss_samples=len(rss))
    return out


def audit(url: str, name: str) -> dict:
    from evoprune import load_study

    s = load_study(storage=url, study_name=name)
    rows = s.db.trial_candidates()
    finished: dict[str, int] = {}
    for r in rows:
        if r["state"] in ("COMPLETE", "PRUNED") and r["source"] != "duplicate":
            finished[r["candidate_key"]] = finished.get(r["candidate_key"], 0) + 1
    tried = {r["candidate_key"] for r in rows}
    states = {r["trial_id"]: r["state"] for r in rows}
    claims = s.db.claims()
    stranded = [k for k, c in claims.items() if c["status"] == "claimed"
                and (c["trial_id"] is None or states.get(c["trial_id"]) == "FAIL")]
    trials = s.trials()
    out = dict(
        trials=len(trials), finished=sum(1 for t in trials if t.state.name in ("COMPLETE", "PRUNED")),
        failed=sum(1 for t in trials if t.state.name == "FAIL"),
        running=sum(1 for t in trials if t.state.name == "RUNNING"),
        lost=len([k for k in tried if k not in finished]), duplicated=sum(n - 1 for n in finished.values() if n > 1),
        stranded=len(stranded), problems=s.check(),
    )
    s.close()
    return out


def _database(server: str, kind: str):
    """A fresh database on ``server`` (dropped by the returned function)."""
    import sqlalchemy as sa

    from evoprune.storage import normalize_url

    base = sa.engine.make_url(normalize_url(server))
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    name = f"evoprune_soak_{uuid.uuid4().hex[:8]}"
    with admin.connect() as c:
        c.execute(sa.text(f"CREATE DATABASE {name}"))
    url = base.set(database=name).render_as_string(hide_password=False)

    def drop() -> None:
        with admin.connect() as c:
            c.execute(sa.text(f"DROP DATABASE IF EXISTS {name}" + (" WITH (FORCE)" if kind == "postgresql" else "")))
        admin.dispose()

    return url, drop


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--mariadb", default="mysql://root@127.0.0.1:3306/test", help="'' skips the MariaDB run")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--mariadb-trials", type=int, default=300)
    ap.add_argument("--kill-every", type=float, default=10.0, help="seconds between kills")
    ap.add_argument("--time-limit", type=float, default=720.0, help="seconds per run at most")
    ap.add_argument("--seed", type=int, default=0)
    args = parse_args(ap, argv, smoke=dict(workers=2, trials=6, mariadb="", kill_every=4.0, time_limit=180.0))
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tmp = tempfile.TemporaryDirectory()
    cfg = Path(tmp.name) / "soak.yaml"
    cfg.write_text(CONFIG)
    runs = [("postgresql", args.server, args.trials)]
    if args.mariadb:
        runs.append(("mariadb", args.mariadb, args.mariadb_trials))
    results = []
    for kind, server, n in runs:
        url, drop = _database(server, "postgresql" if kind == "postgresql" else "mysql")
        try:
            print(f"{kind}: {args.workers} workers until {n} trials, a kill every {args.kill_every:g} s", flush=True)
            results.append(soak(url, trials=n, workers=args.workers, kill_every=args.kill_every, cfg=cfg,
                                seed=args.seed, label=kind, time_limit=args.time_limit))
        finally:
            drop()
    tmp.cleanup()
    cols = ["backend", "trials", "finished", "failed", "running", "SIGKILL", "SIGTERM", "lost", "duplicated",
            "stranded", "bad exits", "rss MB", "rss growth", "minutes", "integrity"]
    print("  ".join(f"{c:>10}" for c in cols))
    for r in results:
        print("  ".join(f"{v:>10}" for v in [
            r["label"], r["trials"], r["finished"], r["failed"], r["running"], r["kills"]["SIGKILL"],
            r["kills"]["SIGTERM"], r["lost"], r["duplicated"], r["stranded"], len(r["unexpected"]),
            f"{r['rss_last'][-1]:.0f}" if r["rss_last"] else "-", f"{r['rss_growth']:.3f}",
            f"{r['seconds'] / 60:.1f}", "ok" if not r["problems"] else len(r["problems"])]))
    for r in results:
        for pid, code, err in r["unexpected"]:
            print(f"unexpected exit ({r['label']}) pid {pid} code {code}:\n{err}")
        for p in r["problems"][:20]:
            print(f"integrity problem ({r['label']}): {p}")
    lost = sum(r["lost"] for r in results)
    dup = sum(r["duplicated"] for r in results)
    stranded = sum(r["stranded"] for r in results)
    bad = sum(len(r["unexpected"]) for r in results)
    growth = results[0]["rss_growth"]
    enough = results[0]["trials"] >= args.trials
    integrity = all(not r["problems"] for r in results)
    print(f"TARGET trials_reached {results[0]['trials']} >= {args.trials} {'PASS' if enough else 'FAIL'}")
    print(f"TARGET lost {lost} == 0 {'PASS' if lost == 0 else 'FAIL'}")
    print(f"TARGET duplicated {dup} == 0 {'PASS' if dup == 0 else 'FAIL'}")
    print(f"TARGET stranded_claims {stranded} == 0 {'PASS' if stranded == 0 else 'FAIL'}")
    print(f"TARGET unexpected_worker_exits {bad} == 0 {'PASS' if bad == 0 else 'FAIL'}")
    print(f"TARGET worker_rss_growth {growth:.3f} <= 1.10 {'PASS' if growth <= 1.10 else 'FAIL'}")
    print(f"TARGET integrity {'ok' if integrity else 'problems'} == ok {'PASS' if integrity else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
