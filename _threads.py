"""How many torch threads an evoprune process should use: the one home of that rule.

The library never leaves torch's default (every core of the machine, even in a
container limited to two, or with three other workers on the same box): on
shared CPUs an OpenMP barrier then waits on descheduled threads and a forward
pass gets several times *slower*. The count is, in order:

1. ``$EVOPRUNE_THREADS`` (the CLI's ``--threads`` sets it for its process);
2. the study config's ``threads``;
3. :func:`available_cpus` -- the CPUs this process may actually run on
   (``os.sched_getaffinity``) capped by the cgroup CPU quota (v2 ``cpu.max``,
   v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``) -- divided evenly among the
   evoprune search processes alive on this machine (:func:`local_workers`).

::

    from evoprune._threads import apply_threads
    n = apply_threads(config_threads=None)   # sets torch.set_num_threads(n) and returns n
"""

from __future__ import annotations

import atexit
import math
import os
import socket
from pathlib import Path

from ._logging import get_logger

__all__ = ["ENV_VAR", "apply_threads", "available_cpus", "cgroup_cpu_limit", "local_workers", "resolve_threads"]

_log = get_logger("threads")

ENV_VAR = "EVOPRUNE_THREADS"


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return None


def _quota(quota: float, period: float) -> float | None:
    return quota / period if quota > 0 and period > 0 else None


def _cpu_max(text: str | None) -> float | None:
    """CPUs of a cgroup v2 ``cpu.max`` line (``"<quota> <period>"``; ``"max ..."``: unlimited)."""
    if not text or text.startswith("max"):
        return None
    q, _, p = text.partition(" ")
    try:
        return _quota(float(q), float(p or 100000))
    except ValueError:
        return None


def cgroup_cpu_limit(cgroup_root: str | os.PathLike[str] = "/sys/fs/cgroup",
                     proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup") -> float | None:
    """The CPU quota of this process' cgroup in CPUs (e.g. ``1.5``), or ``None`` when unlimited/unknown.

    cgroup v2: ``cpu.max`` (``"<quota> <period>"`` or ``"max <period>"``) of the
    process' cgroup and of every ancestor up to the root (the smallest wins).
    cgroup v1: ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota ``-1`` is
    unlimited) in the ``cpu`` controller's folder of the process, else its root.
    """
    root = Path(cgroup_root)
    lines = (_read(Path(proc_cgroup)) or "").splitlines()
    limits: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if controllers == "":  # v2 unified hierarchy
            here = root / rel if rel else root
            while True:
                lim = _cpu_max(_read(here / "cpu.max"))
                if lim:
                    limits.append(lim)
                if here == root or root not in here.parents:
                    break
                here = here.parent
        elif "cpu" in controllers.split(","):
            for base in (root / controllers, root / "cpu,cpuacct", root / "cpu"):
                for folder in ((base / rel) if rel else base, base):
                    q, p = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
                    if q is not None and p is not None:
                        try:
                            lim = _quota(float(q), float(p))
                        except ValueError:
                            lim = None
                        if lim:
                            limits.append(lim)
                        break
                else:
                    continue
                break
    if not lines:  # no /proc/self/cgroup: a bare v2 root
        lim = _cpu_max(_read(root / "cpu.max"))
        if lim:
            limits.append(lim)
    return min(limits) if limits else None


def available_cpus(*, affinity: set[int] | None = None, cgroup_root: str | os.PathLike[str] = "/sys/fs/cgroup",
                   proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup") -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup quota (rounded down, at least 1)."""
    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except (AttributeError, OSError):  # pragma: no cover - macOS / Windows
            affinity = set(range(os.cpu_count() or 1))
    n = max(1, len(affinity))
    quota = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    if quota is not None:
        n = min(n, max(1, math.floor(quota + 1e-9)))
    return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


_registered: set[Path] = set()


def local_workers(run_dir: str | os.PathLike[str] | None = None, *, register: bool = True) -> int:
    """How many evoprune search processes are alive on this machine, counting this one once registered.

    Each process leaves a file named by its pid in ``run_dir`` (default
    ``<cache>/run/<hostname>``), removed at exit; files of dead processes are
    cleaned up here. Workers that start later see the earlier ones; an earlier
    one keeps the count it saw (threads are set when a runtime is built).
    """
    if run_dir is None:
        from ._paths import cache_folder

        run_dir = cache_folder("run") / socket.gethostname()
    folder = Path(run_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if register:
            mine = folder / str(os.getpid())
            if mine not in _registered:
                mine.touch()
                _registered.add(mine)
                atexit.register(_unregister, mine)
        count = 0
        for f in folder.iterdir():
            if not f.name.isdigit():
                continue
            if _alive(int(f.name)):
                count += 1
            else:
                f.unlink(missing_ok=True)
    except OSError as exc:  # a read-only cache: behave as the only worker
        _log.debug("cannot count local workers (%s)", exc)
        return 1
    return max(1, count)


def _unregister(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # pragma: no cover
        pass
    _registered.discard(path)


def resolve_threads(config_threads: int | None = None, *, workers: int | None = None,
                    cpus: int | None = None) -> int:
    """The thread count: ``$EVOPRUNE_THREADS``, else ``config_threads``, else ``cpus // workers`` (>= 1)."""
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"${ENV_VAR} must be a positive integer, got {env!r}.") from None
        if n < 1:
            raise ValueError(f"${ENV_VAR} must be a positive integer, got {env!r}.")
        return n
    if config_threads is not None:
        if isinstance(config_threads, bool) or not isinstance(config_threads, int) or config_threads < 1:
            raise ValueError(f"threads must be a positive integer (or null for automatic), got {config_threads!r}.")
        return config_threads
    cpus = available_cpus() if cpus is None else cpus
    workers = local_workers() if workers is None else workers
    return max(1, cpus // max(1, workers))


def apply_threads(config_threads: int | None = None) -> int:
    """Set torch's intra-op thread count by :func:`resolve_threads`; returns it."""
    import torch

    n = resolve_threads(config_threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    _log.info("torch threads", extra={"fields": {"threads": n}})
    return n
