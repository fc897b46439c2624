"""A clean stop on SIGTERM/SIGINT: the signal asks, the search driver stops at its next safe point.

Raising from a signal handler can land anywhere -- inside a database transaction, a connection
pool's lock, a logging handler -- and leave the process stuck in its own cleanup. So while a
search runs (:func:`cooperative`), the first signal only records the request and the driver calls
:func:`check` between trials, stages and generations, where stopping is safe: it raises
:class:`Stopped` (a ``KeyboardInterrupt``), which fails the running trials, releases the claims and
marks the worker stopped. Outside a search the handler raises at once. A second signal exits
at once (``128 + signum``) after a short, bounded cleanup (:func:`on_abort`, at most a few
seconds): the search fails its running trials and releases its claims; whatever that cleanup
could not finish, the next process that opens the study recovers.

>>> import signal
>>> with cooperative():
...     request(signal.SIGTERM)
...     try:
...         check()
...     except Stopped as exc:
...         print(exc.signum == signal.SIGTERM, str(exc))
True SIGTERM
>>> reset()
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["Abandoned", "Stopped", "abandon", "abandoned", "abort_cleanup", "check", "clear_abandoned", "cooperative",
           "on_abort", "request", "reset", "searched", "signals_stop_cleanly"]


class Stopped(KeyboardInterrupt):
    """The process was asked to stop by signal ``signum`` (unwinds like Ctrl-C)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


class Abandoned(Stopped):
    """The study was deleted under this worker (``delete-study --force``): stop, saying so in one line."""

    def __init__(self, message: str) -> None:
        KeyboardInterrupt.__init__(self, message)
        self.signum = int(signal.SIGTERM)
        self.message = message


_state = threading.local()
_requested: list[int] = []
_abandoned: list[str] = []
_searched: list[bool] = []


_on_abort: list[Callable[[], Any]] = []


@contextlib.contextmanager
def on_abort(cleanup: Callable[[], Any]) -> Iterator[None]:
    """Within this block, a second signal runs ``cleanup`` (bounded by :func:`abort_cleanup`'s
    timeout) before the process exits: a search fails its running trials and releases its claims."""
    _on_abort.append(cleanup)
    try:
        yield
    finally:
        _on_abort.remove(cleanup)


def abort_cleanup(timeout: float) -> bool:
    """Run the :func:`on_abort` cleanups in a thread of their own (the main thread may hold a lock where
    the signal interrupted it) for at most ``timeout`` seconds; ``True`` if they all finished."""
    if not _on_abort:
        return True
    done: list[bool] = []

    def run() -> None:
        for cleanup in reversed(list(_on_abort)):
            cleanup()
        done.append(True)

    t = threading.Thread(target=run, name="evoprune-abort-cleanup", daemon=True)
    t.start()
    t.join(timeout)
    return bool(done)


def searched() -> bool:
    """Did a search loop (:func:`cooperative`) start since the last :func:`reset`?"""
    return bool(_searched)


def abandon(message: str) -> None:
    """Stop at the next :func:`check` with :class:`Abandoned` (any thread may call it: the heartbeat does)."""
    _abandoned.append(message)


def clear_abandoned() -> None:
    """Forget an :func:`abandon` request (a new search run starts)."""
    _abandoned.clear()


def abandoned() -> str | None:
    """The message of an :func:`abandon` request, if any."""
    return _abandoned[0] if _abandoned else None


def _depth() -> int:
    return getattr(_state, "depth", 0)


@contextlib.contextmanager
def cooperative() -> Iterator[None]:
    """Within this block (in the main thread) a stop request waits for :func:`check`."""
    _state.depth = _depth() + 1
    _searched.append(True)
    try:
        yield
    finally:
        _state.depth -= 1


def request(signum: int) -> None:
    """Ask for a stop: raise :class:`Stopped` now outside :func:`cooperative`, else at the next :func:`check`."""
    _requested.append(int(signum))
    if _depth() == 0:
        raise Stopped(signum)


def reset() -> None:
    """Forget stop requests (the CLI does when a command ends)."""
    _requested.clear()
    _abandoned.clear()
    _searched.clear()


def check() -> None:
    """Raise :class:`Stopped` if a stop was requested (call it where stopping is safe)."""
    if _abandoned:
        raise Abandoned(_abandoned[0])
    if _requested:
        raise Stopped(_requested[0])


#: seconds a second SIGTERM/SIGINT waits for the search's cleanup (:func:`on_abort`) before the process exits
ABORT_CLEANUP_S = 5.0


@contextlib.contextmanager
def signals_stop_cleanly(say: Callable[[str], Any]) -> Iterator[None]:
    """SIGTERM and SIGINT stop the command cleanly once (:func:`request`); a second signal exits
    (``128 + signum``) after a cleanup of at most :data:`ABORT_CLEANUP_S` seconds, telling ``say``
    one line. Previous handlers come back afterwards (the CLI wraps every command in this)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = []

    def handler(signum: int, frame: Any) -> None:
        if stopping:  # the second signal: a bounded cleanup, one line, exit now
            clean = abort_cleanup(ABORT_CLEANUP_S)
            say(f"stopped by a second {signal.Signals(signum).name}; " + (
                "running trials were failed and their claims released" if clean else
                f"cleanup did not finish in {ABORT_CLEANUP_S:g} s; the next `evoprune resume` or worker on the "
                "study recovers its running trials and claims") + ".")
            sys.stderr.flush()
            os._exit(128 + signum)
        stopping.append(signum)
        request(signum)  # raises now, or at the search driver's next safe point

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
        reset()
