"""A clean stop on SIGTERM/SIGINT: the signal asks, the search driver stops at its next safe point.

Raising from a signal handler can land anywhere -- inside a database transaction, a connection
pool's lock, a logging handler -- and leave the process stuck in its own cleanup. So while a
search runs (:func:`cooperative`), the first signal only records the request and the driver calls
:func:`check` between trials, stages and generations, where stopping is safe: it raises
:class:`Stopped` (a ``KeyboardInterrupt``), which fails the running trials, releases the claims and
marks the worker stopped. Outside a search the handler raises at once. A second signal exits
immediately (``128 + signum``), without cleanup.

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
import signal
import threading
from collections.abc import Iterator

__all__ = ["Stopped", "check", "cooperative", "request", "reset"]


class Stopped(KeyboardInterrupt):
    """The process was asked to stop by signal ``signum`` (unwinds like Ctrl-C)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


_state = threading.local()
_requested: list[int] = []


def _depth() -> int:
    return getattr(_state, "depth", 0)


@contextlib.contextmanager
def cooperative() -> Iterator[None]:
    """Within this block (in the main thread) a stop request waits for :func:`check`."""
    _state.depth = _depth() + 1
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


def check() -> None:
    """Raise :class:`Stopped` if a stop was requested (call it where stopping is safe)."""
    if _requested:
        raise Stopped(_requested[0])
