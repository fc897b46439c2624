"""Who is working on a study: a process identity that other processes can check for liveness.

An :class:`Owner` is ``host:pid:token``. A process on the same host can tell at once
whether the owner is still alive (its pid exists, is not a zombie and started at the
same moment, so a reused pid does not count); on another host only the owner's
heartbeat in the database can tell.

>>> me = Owner.current()
>>> me.is_local() and me.is_alive()
True
>>> Owner.parse(me.name) == me
True
"""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid

__all__ = ["Owner"]


def _proc_stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    # "pid (comm) state ppid ..."; comm may contain spaces and parentheses.
    return raw[raw.rfind(")") + 2 :].split()


def _proc_start(pid: int) -> str:
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else ""  # field 22 of stat: start time in ticks


@dataclasses.dataclass(frozen=True)
class Owner:
    """A process identity (``host``, ``pid``, the process' start time and a random token)."""

    host: str
    pid: int
    proc_start: str
    token: str

    @classmethod
    def current(cls) -> Owner:
        """A fresh identity for this process (a new token per call)."""
        pid = os.getpid()
        return cls(host=socket.gethostname(), pid=pid, proc_start=_proc_start(pid), token=uuid.uuid4().hex[:12])

    @property
    def name(self) -> str:
        return f"{self.host}:{self.pid}:{self.proc_start or '-'}:{self.token}"

    @classmethod
    def parse(cls, name: str) -> Owner:
        host, pid, start, token = name.rsplit(":", 3)
        return cls(host=host, pid=int(pid), proc_start="" if start == "-" else start, token=token)

    def is_local(self) -> bool:
        return self.host == socket.gethostname()

    def is_alive(self) -> bool | None:
        """``True``/``False`` for a process on this host, ``None`` (unknown) for another host."""
        if not self.is_local():
            return None
        if self.pid == os.getpid():
            return self.proc_start == _proc_start(self.pid)
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        fields = _proc_stat(self.pid)
        if fields is None:  # no /proc (not Linux): the pid exists, assume it is ours
            return True
        if fields[0] in ("Z", "X"):  # zombie or dead: killed, not yet reaped
            return False
        return not self.proc_start or (len(fields) > 19 and fields[19] == self.proc_start)
