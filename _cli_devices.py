"""The command line's device pieces: ``evoprune plan``, ``--device`` / ``--dtype`` and ``worker --devices``.

``evoprune worker --devices 0,1,2,3 --storage postgresql://... --study NAME`` starts one
``evoprune worker --device cuda:N`` process per device on the same study database -- Optuna's
multi-worker mode on one PostgreSQL (or MySQL) database, nothing more: the workers share the
study through its rows (claims, heartbeats, sampler state), and this parent only starts them,
forwards Ctrl-C / SIGTERM and waits. Its exit code is the first non-zero one of its workers.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from typing import Any

__all__ = ["add_device_arg", "apply_device", "register_plan_command", "run_device_workers"]

_DTYPES = ("float32", "bfloat16", "float16", "auto")


def add_device_arg(p: argparse.ArgumentParser, *, dtype: bool = False) -> None:
    """``--device`` (and with ``dtype``, ``--dtype``) on a command that runs a search."""
    p.add_argument("--device", default=None, metavar="DEV",
                   help="cpu, cuda, cuda:N, mps or auto: where this process loads the model (default: the config's)")
    if dtype:
        p.add_argument("--dtype", default=None, choices=_DTYPES,
                       help="the study dtype (default: the config's; calibration statistics, KL and optimizer state "
                            "stay float32)")


def apply_device(args: argparse.Namespace, target: Any) -> Any:
    """``target`` (a :class:`~evoprune.search.StudyConfig` or a loaded study) with ``--device`` /
    ``--dtype`` applied; the device is checked first (one line if this machine has no such device).

    For a loaded study (``resume``, ``worker``) the device is a machine setting of this process: the
    stored config keeps its own, and the model and data fingerprints must still match."""
    device, dtype = getattr(args, "device", None), getattr(args, "dtype", None)
    if device is None and dtype is None:
        return target
    if device is not None:
        from ._device import check_device

        check_device(device)
    changes = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    if hasattr(target, "replace"):
        return target.replace(**changes)
    target.config = target.config.replace(**changes)
    return target


# --------------------------------------------------------------------------- worker --devices


def _worker_argv(args: argparse.Namespace, device: str) -> list[str]:
    argv = [sys.executable, "-m", "evoprune", "worker", "--storage", args.storage, "--study", args.study,
            "--device", device, "--heartbeat", repr(args.heartbeat), "--grace", repr(args.grace)]
    for flag, value in (("--n-trials", args.n_trials), ("--generations", args.generations),
                        ("--timeout", args.timeout), ("--max-tokens", args.max_tokens), ("--threads", args.threads)):
        if value is not None:
            argv += [flag, str(value)]
    if getattr(args, "debug", False):
        argv.append("--debug")
    return argv


def run_device_workers(args: argparse.Namespace) -> int:
    """Start one worker process per device of ``--devices`` on the study and wait for them all."""
    from ._device import check_device, parse_devices

    if args.device is not None:
        raise ValueError("give either --device (this process) or --devices (one process per device), not both.")
    devices = parse_devices(args.devices)
    for d in devices:
        check_device(d)
    procs = [subprocess.Popen(_worker_argv(args, d), env=dict(os.environ)) for d in devices]
    print(f"started {len(procs)} workers on study {args.study!r}: "
          + ", ".join(f"{d} (pid {p.pid})" for d, p in zip(devices, procs)), flush=True)

    def forward(signum: int, frame: Any) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [p.wait() for p in procs]
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    for d, c in zip(devices, codes):
        print(f"worker on {d}: exit {c}")
    return next((c for c in codes if c), 0)


# --------------------------------------------------------------------------- plan


def _cmd_plan(args: argparse.Namespace) -> int:
    import json

    from .study import plan

    p = plan(args.config, device=args.device, dtype=args.dtype, gpu_memory=args.gpu_memory,
             gpu_tflops=args.gpu_tflops, gpu_bandwidth=args.gpu_bandwidth,
             measure=False if args.no_measure else None)
    print(json.dumps(p.to_dict(), indent=1, default=str) if args.json else "\n".join(p.lines()))
    return 0 if p.fits is not False else 1


def register_plan_command(subparsers: Any, guarded: Any) -> None:
    """Add ``plan`` (``guarded(fn)`` maps errors to one line and an exit code)."""
    p = subparsers.add_parser("plan", help="memory, FLOPs and time of a study before it starts (reads config.json, "
                                           "no weights needed)")
    p.add_argument("config", metavar="CONFIG", help="study config (YAML or JSON)")
    p.add_argument("--device", default=None, metavar="DEV", help="plan for cpu, cuda, cuda:N (default: the config's)")
    p.add_argument("--dtype", default=None, choices=_DTYPES, help="plan for this dtype (default: the config's)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GiB",
                   help="the GPU's memory: say whether one worker fits (exit 1 if not)")
    p.add_argument("--gpu-tflops", type=float, default=None, metavar="X",
                   help="peak dense TFLOPS of the device in the study dtype (with --gpu-bandwidth: times from "
                        "these figures instead of a calibration run here)")
    p.add_argument("--gpu-bandwidth", type=float, default=None, metavar="GB/s", help="memory bandwidth in GB/s")
    p.add_argument("--no-measure", action="store_true", help="no calibration run: memory only (and times from "
                                                             "device figures if given)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=lambda args: guarded(lambda: _cmd_plan(args)))
