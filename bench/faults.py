"""Bench: faults at random moments -- kills, signals, a database restart -- and what they cost.

For each fault, ``--runs`` times (default 3), a search on the tiny reference model is hit at a
random moment and then continued with ``evoprune resume``; the study is audited afterwards:

* ``sigkill-startup``: SIGKILL while the model loads and importance is scored (0-3 s after start);
* ``sigkill-search``: SIGKILL at a random moment of the search (evaluating, committing, saving state);
* ``sigkill-finetune``: SIGKILL while a stage fine-tunes (a config whose final stage fine-tunes);
* ``sigterm-search``: SIGTERM at a random moment: exit 143 (or -15 while Python starts), and at
  once -- before any grace period -- no RUNNING trial and no claim held by the stopped process;
* ``sigkill-export``: SIGKILL of ``evoprune export`` at a random moment, then the export again
  into a new folder: it must succeed and reload;
* ``diskfull-export``: ``evoprune export`` on a "full disk" (a 64 KB file-size limit, EFBIG):
  one line that says what to do, no half-written folder, and the export into the same folder
  then succeeds;
* ``postgres-restart``: PostgreSQL restarted (``pg_ctlcluster``) under 2 running workers, which
  must ride through it (skipped where the cluster cannot be restarted);
* ``stall``: a search and a worker share a study (``--heartbeat 0.2 --grace 1``); the search is
  frozen with SIGSTOP three times for 3.5 s (longer than the grace period) while one of its trials
  runs, then SIGCONT: the trials failed as silent meanwhile are discarded by their owner (one
  warning), and both processes must finish with exit 0 (issue 23);
* ``first-start``: 4 processes open one new, empty database at the same moment and create a study
  each (a fleet started by a scheduler), ``--first-start-rounds`` rounds (default 10) on SQLite,
  PostgreSQL and MariaDB; a process that fails counts as a worker crash, a missing study as an
  integrity problem (issue 23).

Columns: fault, runs, trials lost (a candidate with a trial that never finished), candidates
duplicated (finished in two trials), claims stranded (held with no trial or a failed one once
nobody runs), worker crashes (exits we did not cause), integrity (``evoprune check``).
Covered by tests instead of here: a candidate that runs out of memory (it fails, the search goes
on: tests/storage/test_liveness_races.py), a NaN/inf fine-tune loss (stops, weights restored:
tests/evaluators/test_finetune.py) and a full disk while caching importance scores or dense logits
(skipped with a warning, scores unchanged: tests/pruning/test_full_disk.py).

Usage: ``python bench/faults.py [--runs 3] [--seed 0] [--server postgresql://postgres@127.0.0.1:5432/test]``;
``--smoke``: one run of ``sigkill-search`` (never the PostgreSQL restart).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import _Counter, _database, audit  # noqa: E402
from _common import parse_args  # noqa: E402
from workers import ENV  # noqa: E402

CONFIG = """\
model: reference:tiny
calibration: {num_sequences: 4, seq_len: 32}
space: {mlp_step: 16}
budget: {metric: params, max_ratio: 0.8}
stages:
  - {name: s1, evaluators: [kl], eval_tokens: 128, seq_len: 32, promote: {top_k: 2}}
  - {name: final, evaluators: [kl], eval_tokens: 256, seq_len: 32%s}
sampler: {name: evolutionary, options: {offspring: 6}}
objectives: [kl, params]
seed: 0
"""
FINETUNE = ", finetune_tokens: 4096"


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "evoprune", *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _wait_for(counter: _Counter, proc: subprocess.Popen, pred, limit: float = 300.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        if pred(counter.counts()):
            return True
        time.sleep(0.02)
    return False


def _resume(url: str, study: str) -> int:
    return subprocess.run([sys.executable, "-m", "evoprune", "resume", "--storage", url, "--study", study,
                           "--generations", "1"], env=ENV, capture_output=True).returncode


def _wait_for_server(url: str, limit: float = 60.0) -> None:
    import sqlalchemy as sa

    from evoprune.storage import normalize_url

    engine = sa.create_engine(normalize_url(url))
    deadline = time.monotonic() + limit
    try:
        while True:
            try:
                with engine.connect() as c:
                    c.execute(sa.text("SELECT 1"))
                return
            except sa.exc.DBAPIError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        engine.dispose()


def run_fault(fault: str, url: str, workdir: Path, rng: random.Random, i: int) -> dict:
    cfg = workdir / f"{fault}.yaml"
    cfg.write_text(CONFIG % (FINETUNE if fault == "sigkill-finetune" else ""))
    study = f"{fault}-{i}"
    counter = _Counter(url, study)
    crashes = 0
    extra_ok = True
    search = ["search", str(cfg), "--storage", url, "--study", study, "--generations", "40", "--heartbeat", "1",
              "--grace", "3"]
    try:
        if fault == "sigkill-startup":
            p = _cli(*search)
            time.sleep(rng.uniform(0.0, 3.0))
            p.kill()
            p.communicate()
        elif fault in ("sigkill-search", "sigkill-finetune", "sigterm-search"):
            p = _cli(*search)
            _wait_for(counter, p, lambda c: c.get("COMPLETE", 0) + c.get("PRUNED", 0) >= 1)
            time.sleep(rng.uniform(0.0, 1.5))
            if p.poll() is None:
                p.send_signal(signal.SIGTERM if fault == "sigterm-search" else signal.SIGKILL)
            _, err = p.communicate()
            allowed = {-signal.SIGKILL, 0} if fault != "sigterm-search" else {128 + signal.SIGTERM, -signal.SIGTERM, 0}
            if p.returncode not in allowed:
                crashes += 1
                print(f"{fault}: exit {p.returncode}\n{err.decode()[-2000:]}")
            if fault == "sigterm-search":  # before any grace period: nothing RUNNING, no claim held
                extra_ok = counter.counts().get("RUNNING", 0) == 0 and audit(url, study)["stranded"] == 0
        elif fault == "sigkill-export":
            p = _cli(*search[:-6], "--generations", "2")
            _, err = p.communicate()
            crashes += p.returncode != 0
            out = workdir / f"export-{i}"
            e = _cli("export", "--storage", url, "--study", study, "--trial", "0", "--out", str(out))
            time.sleep(rng.uniform(1.0, 6.0))
            e.kill()
            e.communicate()
            again = subprocess.run([sys.executable, "-m", "evoprune", "export", "--storage", url, "--study", study,
                                    "--trial", "0", "--out", str(workdir / f"export-{i}-again")], env=ENV,
                                   capture_output=True, text=True)
            extra_ok = again.returncode == 0
            if not extra_ok:
                print(f"{fault}: export after a killed export failed: {again.stderr[-1500:]}")
        elif fault == "diskfull-export":
            import resource

            p = _cli(*search[:-6], "--generations", "2")
            _, err = p.communicate()
            crashes += p.returncode != 0
            out = workdir / f"full-{i}"

            def small_disk() -> None:  # writes past 64 KB fail with EFBIG, as on a full disk
                resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))

            full = subprocess.run([sys.executable, "-m", "evoprune", "export", "--storage", url, "--study", study,
                                   "--trial", "0", "--out", str(out)], env=ENV, capture_output=True, text=True,
                                  preexec_fn=small_disk)
            last = full.stderr.strip().splitlines()[-1] if full.stderr.strip() else ""
            again = subprocess.run([sys.executable, "-m", "evoprune", "export", "--storage", url, "--study", study,
                                    "--trial", "0", "--out", str(out)], env=ENV, capture_output=True, text=True)
            extra_ok = (full.returncode == 1 and "free disk space" in last and "Traceback" not in full.stderr
                        and again.returncode == 0 and (out / "config.json").is_file())
            if not extra_ok:
                print(f"{fault}: exit {full.returncode}: {last!r}; again: {again.returncode} {again.stderr[-500:]}")
        elif fault == "stall":
            from evoprune import create_study

            cfg.write_text(CONFIG.replace("offspring: 6}", "offspring: 6, patience: null}") % "")
            create_study(cfg, storage=url, study_name=study).close()
            fast = ["--generations", "200", "--timeout", "40", "--heartbeat", "0.2", "--grace", "1"]
            a = _cli("search", str(cfg), "--storage", url, "--study", study, *fast)
            b = _cli("worker", "--storage", url, "--study", study, *fast)
            for _ in range(3):
                if not _wait_for(counter, a, lambda c: c.get("RUNNING", 0) >= 1 and c.get("COMPLETE", 0) >= 1):
                    break
                time.sleep(rng.uniform(0.0, 0.5))
                a.send_signal(signal.SIGSTOP)
                time.sleep(3.5)
                a.send_signal(signal.SIGCONT)
                time.sleep(1.0)
            for w in (a, b):
                _, err = w.communicate()
                if w.returncode != 0:
                    crashes += 1
                    print(f"{fault}: exit {w.returncode}\n{err.decode()[-2000:]}")
        elif fault == "postgres-restart":
            from evoprune import create_study

            create_study(cfg, storage=url, study_name=study).close()
            ws = [_cli("worker", "--storage", url, "--study", study, "--generations", "6", "--heartbeat", "1",
                       "--grace", "5") for _ in range(2)]
            _wait_for(counter, ws[0], lambda c: c.get("COMPLETE", 0) + c.get("PRUNED", 0) >= 2)
            time.sleep(rng.uniform(0.0, 1.0))
            subprocess.run(["pg_ctlcluster", "15", "main", "restart"], check=True, capture_output=True)
            _wait_for_server(url)
            for w in ws:
                _, err = w.communicate()
                if w.returncode != 0:
                    crashes += 1
                    print(f"{fault}: worker exit {w.returncode}\n{err.decode()[-2000:]}")
        if fault == "sigkill-startup":  # killed before or after its first write: starting again must work
            again = subprocess.run([sys.executable, "-m", "evoprune", *search[:-6], "--generations", "1"], env=ENV,
                                   capture_output=True, text=True)
            if again.returncode != 0:
                crashes += 1
                print(f"{fault}: search after the kill failed: {again.stderr[-1500:]}")
        elif fault not in ("sigkill-export", "diskfull-export", "stall"):
            crashes += _resume(url, study) != 0
        result = audit(url, study)
    finally:
        counter.close()
    result.update(crashes=crashes, extra_ok=extra_ok)
    return result


_FIRST_START = """
import sys, time
from evoprune import create_study
url, name, at, config = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
time.sleep(max(0.0, at - time.time()))  # every process opens the database at the same moment
create_study(config, storage=url, study_name=name).close()
"""


def first_start(servers: dict[str, str], workdir: Path, rounds: int, processes: int = 4) -> dict:
    """``rounds`` x ``processes`` concurrent first starts per backend (see the module docs)."""
    from evoprune.storage import list_studies

    cfg = workdir / "first.yaml"
    cfg.write_text(CONFIG % "")
    crashes, missing, per_backend = 0, 0, {}
    for kind, server in servers.items():
        failed = 0
        for r in range(rounds):
            if kind == "sqlite":
                url, drop = f"sqlite:///{workdir / f'first-{r}.db'}", (lambda: None)
            else:
                url, drop = _database(server, kind)
            try:
                at = time.time() + 8.0  # after every interpreter has imported evoprune
                ps = [subprocess.Popen([sys.executable, "-c", _FIRST_START, url, f"first{i}", str(at), str(cfg)],
                                       env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                      for i in range(processes)]
                for p in ps:
                    _, err = p.communicate()
                    if p.returncode != 0:
                        failed += 1
                        print(f"first-start ({kind}, round {r}): exit {p.returncode}: "
                              f"{(err.decode().strip().splitlines() or [''])[-1][:300]}")
                missing += processes - len([s for s in list_studies(url) if s["name"].startswith("first")])
            finally:
                drop()
        per_backend[kind] = failed
        crashes += failed
        print(f"first-start {kind}: {rounds} rounds x {processes} processes, {failed} failed", flush=True)
    return dict(trials=0, lost=0, duplicated=0, stranded=0, running=0, crashes=crashes, problems=[],
                extra_ok=missing == 0, per_backend=per_backend)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mariadb", default="mysql://root@127.0.0.1:3306/test",
                    help="'' leaves MariaDB out of first-start")
    ap.add_argument("--first-start-rounds", type=int, default=10)
    ap.add_argument("--faults", default="sigkill-startup,sigkill-search,sigkill-finetune,sigterm-search,"
                                        "sigkill-export,diskfull-export,postgres-restart,stall,first-start")
    args = parse_args(ap, argv, smoke=dict(runs=1, faults="sigkill-search"))
    rng = random.Random(args.seed)
    faults = [f for f in args.faults.split(",") if f]
    can_restart = shutil.which("pg_ctlcluster") is not None and os.geteuid() == 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for fault in faults:
            if fault == "postgres-restart" and not can_restart:
                print("postgres-restart skipped: pg_ctlcluster is missing or this is not root")
                continue
            if fault == "first-start":
                servers = {"sqlite": "", "postgresql": args.server, **({"mysql": args.mariadb} if args.mariadb else {})}
                r = first_start(servers, workdir, args.first_start_rounds)
                rows.append((fault, args.first_start_rounds, {**{k: r[k] for k in ("lost", "duplicated", "stranded",
                                                                                   "crashes", "running", "trials")},
                                                              "integrity": r["extra_ok"]}))
                print(f"{fault}: done", flush=True)
                continue
            url, drop = _database(args.server, "postgresql")
            try:
                results = [run_fault(fault, url, workdir, rng, i) for i in range(args.runs)]
            finally:
                if fault == "postgres-restart":
                    time.sleep(2)
                drop()
            agg = {k: sum(r[k] for r in results) for k in ("lost", "duplicated", "stranded", "crashes", "running")}
            agg["integrity"] = all(not r["problems"] for r in results) and all(r["extra_ok"] for r in results)
            agg["trials"] = sum(r["trials"] for r in results)
            for r in results:
                for p in r["problems"][:5]:
                    print(f"integrity problem ({fault}): {p}")
            rows.append((fault, args.runs, agg))
            print(f"{fault}: done", flush=True)
    cols = ["fault", "runs", "trials", "lost", "duplicated", "stranded", "running", "crashes", "integrity"]
    print("  ".join(f"{c:>17}" for c in cols))
    for fault, runs, a in rows:
        print("  ".join(f"{v:>17}" for v in [fault, runs, a["trials"], a["lost"], a["duplicated"], a["stranded"],
                                             a["running"], a["crashes"], "ok" if a["integrity"] else "FAIL"]))
    for key, name in (("lost", "trials_lost"), ("duplicated", "candidates_duplicated"),
                      ("stranded", "claims_stranded"), ("crashes", "worker_crashes")):
        total = sum(a[key] for _, _, a in rows)
        print(f"TARGET {name} {total} == 0 {'PASS' if total == 0 else 'FAIL'}")
    ok = all(a["integrity"] for _, _, a in rows)
    print(f"TARGET integrity {'ok' if ok else 'problems'} == ok {'PASS' if ok else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
