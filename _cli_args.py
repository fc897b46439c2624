"""Checks of the command line's flag values, made before anything is opened or written.

A bad flag value is a usage error: one line, exit code 2 (like argparse's own), whatever the
command. :func:`check_args` runs on every command right after parsing; :func:`stops` and
:func:`apply_threads_arg` turn the checked flags into what the search takes.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["MAX_STUDY_NAME", "UsageError", "apply_threads_arg", "check_args", "check_log_level", "check_out", "stops"]

#: Optuna's limit for a study name (its indexed string columns)
MAX_STUDY_NAME = 512
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class UsageError(ValueError):
    """A bad flag value (exit code 2)."""


def _seconds(flag: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{flag} must be a positive, finite number of seconds, got {value:g}.")


def check_log_level(level: str | None) -> str | None:
    """``--log-level`` (or ``$EVOPRUNE_LOG_LEVEL``) in upper case; :class:`UsageError` if unknown."""
    level = level or os.environ.get("EVOPRUNE_LOG_LEVEL") or None
    if level is None:
        return None
    if level.upper() not in _LEVELS:
        raise UsageError(f"--log-level (or $EVOPRUNE_LOG_LEVEL) must be one of {', '.join(_LEVELS)}, got {level!r}.")
    return level.upper()


def _in_memory(url: str) -> bool:
    url = str(url).strip()
    return url.split("?")[0].rstrip("/") in ("sqlite:", "sqlite:/", "sqlite:///:memory:") or "mode=memory" in url


def check_args(args: argparse.Namespace) -> None:
    """Every flag value of the parsed command that can be checked without opening anything."""
    get = vars(args).get
    storage = get("storage")
    if storage is not None and _in_memory(storage):
        raise UsageError(f"--storage {storage} is an in-memory database that is gone when the command ends; "
                         "give a file (sqlite:///path/study.db) or a server URL.")
    study = get("study")
    if study is not None and (not study.strip() or len(study) > MAX_STUDY_NAME):
        raise UsageError(f"--study must be a name of 1 to {MAX_STUDY_NAME} characters, got "
                         + (f"{len(study)} characters." if study.strip() else f"{study!r}."))
    for flag in ("heartbeat", "grace", "window"):
        if get(flag) is not None:
            _seconds(f"--{flag}", get(flag))
    if get("heartbeat") is not None and get("grace") is not None and not args.grace > args.heartbeat:
        raise UsageError(f"--grace ({args.grace:g} s) must be longer than --heartbeat ({args.heartbeat:g} s), or a "
                         "live worker is presumed dead between two of its own heartbeats; about 3x or more is safe.")
    if get("timeout") is not None:
        _seconds("--timeout", args.timeout)
    threads = get("threads")
    cpus = os.cpu_count() or 1
    if threads is not None and not 1 <= threads <= cpus:
        raise UsageError(f"--threads must be 1..{cpus} (the CPUs of this machine), got {threads}; leave it out "
                         "for automatic.")
    if get("finetune_lr") is not None:
        lr = args.finetune_lr
        if not (math.isfinite(lr) and lr > 0):
            raise UsageError(f"--finetune-lr must be a positive, finite number, got {lr:g}.")
        if not get("finetune_tokens"):
            raise UsageError("--finetune-lr is only used with --finetune-tokens N (healing); add it or leave "
                             "--finetune-lr out.")
    if get("finetune_loss") is not None and not get("finetune_tokens"):
        raise UsageError("--finetune-loss is only used with --finetune-tokens N (healing); add it or leave "
                         "--finetune-loss out.")
    if get("finetune_temperature") is not None:
        t = args.finetune_temperature
        if not (math.isfinite(t) and t > 0):
            raise UsageError(f"--finetune-temperature must be a positive, finite number, got {t:g}.")
        if get("finetune_loss") not in ("kl", "kl+ce"):
            raise UsageError("--finetune-temperature is only used with --finetune-loss kl or kl+ce; add one or "
                             "leave --finetune-temperature out.")
    if get("finetune_tokens") is not None and args.finetune_tokens < 0:
        raise UsageError(f"--finetune-tokens must be >= 0, got {args.finetune_tokens}.")
    if get("tolerance") is not None and not (math.isfinite(args.tolerance) and args.tolerance > 0):
        raise UsageError(f"--tolerance must be a positive, finite number, got {args.tolerance:g}.")
    if get("tokens") is not None and args.tokens < 1:
        raise UsageError(f"--tokens must be >= 1, got {args.tokens}.")
    if get("limit") is not None and args.limit < 0:
        raise UsageError(f"--limit must be >= 0, got {args.limit}.")


def check_out(out: str) -> None:
    """``--out`` of ``export``/``report``: its folder must exist and be writable (checked once the study
    is found, before anything is written)."""
    parent = Path(out).expanduser().absolute().parent
    if not parent.is_dir():
        raise UsageError(f"--out {out}: its folder {parent} does not exist; create it first or pick another.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: its folder {parent} is not writable; pick another.")


def apply_threads_arg(args: argparse.Namespace) -> None:
    """``--threads N`` (checked by :func:`check_args`) -> ``$EVOPRUNE_THREADS``, which the runtime applies
    (:mod:`evoprune._threads`)."""
    from ._threads import ENV_VAR

    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}; leave it out for automatic.")
        os.environ[ENV_VAR] = str(args.threads)


def stops(args: argparse.Namespace) -> dict[str, Any]:
    """The stop flags given (``--n-trials``, ``--generations``, ``--timeout``, ``--max-tokens``)."""
    flags = {"n_trials": "--n-trials", "n_generations": "--generations", "max_tokens": "--max-tokens"}
    given = {k: v for k, v in dict(n_trials=args.n_trials, n_generations=args.generations, timeout=args.timeout,
                                   max_tokens=args.max_tokens).items() if v is not None}
    for key, value in given.items():
        if key in flags and value < 1:
            raise UsageError(f"{flags[key]} must be >= 1, got {value}; leave it out to use the config's `stop`.")
        if key == "timeout":
            _seconds("--timeout", value)
    for flag, value in (("--heartbeat", args.heartbeat), ("--grace", args.grace)):
        _seconds(flag, value)
    return given


