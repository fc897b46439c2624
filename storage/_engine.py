"""Storage URLs, engines and Optuna's RDB storage on them.

One SQLAlchemy engine serves both Optuna's tables and evoprune's: it is the
engine of the :class:`optuna.storages.RDBStorage`, so a study database is an
ordinary Optuna database (``optuna.load_study`` and ``optuna-dashboard`` open
it as is). :func:`run_transaction` is the one place that runs a unit of work in a
transaction and retries it after a transient lock conflict.

SQLite files are switched to WAL mode, get a busy timeout and start every
transaction with ``BEGIN IMMEDIATE`` (a deferred transaction that later wants
to write fails at once with "database is locked" instead of waiting; an
immediate one waits for the lock). That makes a handful of processes on one
machine safe; for many workers use PostgreSQL or MySQL.

>>> normalize_url("studies/run.db").startswith("sqlite:///")
True
>>> normalize_url("postgresql://u@db:5432/evo")
'postgresql+psycopg://u@db:5432/evo'
"""

from __future__ import annotations

import importlib.util
import re
import os
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc

from .._logging import get_logger

_log = get_logger("storage.engine")

__all__ = [
    "DEFAULT_GRACE_PERIOD",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "SQLITE_BUSY_TIMEOUT_S",
    "StorageError",
    "StorageNotFoundError",
    "check_storage",
    "default_storage_url",
    "normalize_url",
    "open_rdb_storage",
    "redact_url",
    "run_transaction",
]

T = TypeVar("T")

#: Seconds between heartbeats of a running trial.
DEFAULT_HEARTBEAT_INTERVAL = 10
#: A running trial whose heartbeat is older than this many seconds is considered dead.
DEFAULT_GRACE_PERIOD = 60
#: How long a SQLite connection waits for a lock before giving up.
SQLITE_BUSY_TIMEOUT_S = 60.0

_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb")


def normalize_url(url: str | os.PathLike[str]) -> str:
    """A SQLAlchemy URL for ``url``: a URL is completed with an installed driver
    (``postgresql://`` -> ``postgresql+psycopg://`` when psycopg2 is absent,
    ``mysql://`` -> ``mysql+pymysql://`` when mysqlclient is absent); a plain file path
    becomes an absolute ``sqlite:///`` URL."""
    text = os.fspath(url)
    if not text:
        raise ValueError("storage URL is empty; pass e.g. sqlite:///study.db or postgresql://user@host/db.")
    if "://" not in text:
        return "sqlite:///" + str(Path(text).expanduser().resolve())
    scheme, rest = text.split("://", 1)
    base = scheme.split("+", 1)[0]
    if base not in _SCHEMES:
        raise ValueError(
            f"unsupported storage URL scheme {scheme!r}; use sqlite:///FILE, postgresql://... or mysql://..."
        )
    if "+" not in scheme:
        if base in ("postgresql", "postgres"):
            if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is not None:
                scheme = "postgresql+psycopg"
            else:
                scheme = "postgresql"
        elif base in ("mysql", "mariadb"):
            if importlib.util.find_spec("MySQLdb") is None and importlib.util.find_spec("pymysql") is not None:
                scheme = f"{base}+pymysql"
    return f"{scheme}://{rest}"


_URL_PASSWORD = re.compile(r"(://[^/\s:@]*:)[^@\s/]+@")


def redact_url(text: str, url: str | None = None) -> str:
    """``text`` with every password hidden as ``***`` -- the one rule for logs, errors and tracebacks.

    ``text`` is a storage URL or any message that may hold URLs; with ``url``, the bare password of
    ``url`` is hidden too wherever it appears (driver messages echo it).

    >>> redact_url("postgresql://me:secret@db/evo")
    'postgresql://me:***@db/evo'
    >>> redact_url("cannot reach mysql://root:pw@h/x (pw rejected)", "mysql://root:pw@h/x")
    'cannot reach mysql://root:***@h/x (*** rejected)'
    """
    if "://" in text and not any(c.isspace() for c in text):
        try:
            text = sa.engine.make_url(text).render_as_string(hide_password=True)
        except Exception:  # pragma: no cover - unparsable: show only the scheme
            return text.split("://", 1)[0] + "://..."
    text = _URL_PASSWORD.sub(r"\1***@", text)
    if url is not None:
        try:
            password = sa.engine.make_url(url).password
        except Exception:  # pragma: no cover - unparsable URL
            password = None
        if password:
            text = text.replace(str(password), "***")
    return text


class StorageError(RuntimeError):
    """The storage URL cannot be used: no server answers, the database or file does not exist,
    the file is not a SQLite database, ... The message is one line and never shows a password."""


class StorageNotFoundError(StorageError):
    """There is no study database at the URL (no SQLite file, or a database without Optuna's tables)."""


def describe_db_error(url: str, exc: BaseException) -> str:
    """One line for a driver error on ``url``: what failed and what to check (no password)."""
    orig = getattr(exc, "orig", None) or exc
    lines = [ln.strip() for ln in str(orig).splitlines() if ln.strip()]
    reason = lines[0] if lines else type(orig).__name__
    if len(reason) > 300:
        reason = reason[:300] + "..."
    lower = str(orig).lower()
    if "role" in lower and "does not exist" in lower:
        hint = "no such user on the server: create it (CREATE ROLE name LOGIN) or fix the user name in --storage"
    elif "does not exist" in lower or "unknown database" in lower:
        hint = "create the database first (CREATE DATABASE ...) or fix its name in --storage"
    elif "resolve" in lower or "name or service not known" in lower or "nodename" in lower:
        hint = "the host name does not resolve; fix the host in --storage"
    elif "refused" in lower or "can't connect" in lower or "timeout" in lower or "timed out" in lower:
        hint = "is the database server running and listening on that host and port?"
    elif "password" in lower or "access denied" in lower or "authentication" in lower:
        hint = "check the user name and password"
    else:
        hint = "check --storage"
    return redact_url(f"cannot open the study database {redact_url(url)}: {reason} ({hint}).", url)


_SQLITE_MAGIC = b"SQLite format 3\x00"


def sqlite_readonly_uri(path: str | os.PathLike[str]) -> str:
    """A ``file:`` URI that opens the SQLite file ``path`` read-only (never creates it).

    >>> sqlite_readonly_uri("/tmp/a b?.db")
    'file:/tmp/a%20b%3F.db?mode=ro'
    """
    from urllib.parse import quote

    return f"file:{quote(os.fspath(path))}?mode=ro"


def check_storage(url: str | os.PathLike[str], *, existing: bool) -> str:
    """Check ``url`` without writing anything and return it normalized (:func:`normalize_url`).

    A SQLite path must not be a folder, and a file there must be a SQLite database; other
    databases must answer. With ``existing`` the study database must already be there: the
    SQLite file exists and the database holds Optuna's tables (read-only commands never create a
    file, a folder or a table).

    Raises:
        StorageError: with a one-line message that says what to fix.
    """
    import sqlite3

    url = normalize_url(url)
    hint = "`evoprune search CONFIG --storage URL` creates one"
    if _is_sqlite(url):
        path = _sqlite_file(url)
        if path is None:
            if existing:
                raise StorageError("an in-memory SQLite database holds no study; give a file: sqlite:///FILE.db.")
            return url
        p = Path(path)
        if p.is_dir():
            raise StorageError(f"storage {p} is a folder, not a database file; give a file such as "
                               f"sqlite:///{p / 'study.db'}.")
        if p.exists():
            with open(p, "rb") as fh:
                head = fh.read(len(_SQLITE_MAGIC))
            if head and head != _SQLITE_MAGIC:
                raise StorageError(f"{p} is not a SQLite database (a config file?); --storage takes a database "
                                   "URL such as sqlite:///study.db or postgresql://USER@HOST/DB.")
        elif existing:
            raise StorageNotFoundError(f"no study database at {p}; check --storage ({hint}).")
        if not existing:
            return url
        try:
            raw = sqlite3.connect(sqlite_readonly_uri(p), uri=True, timeout=SQLITE_BUSY_TIMEOUT_S)
            try:
                found = raw.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'studies'"
                                    ).fetchone() is not None
            finally:
                raw.close()
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"cannot read {p} as a SQLite database ({exc}); check --storage.") from None
        if not found:
            raise StorageNotFoundError(f"{p} is not a study database (no Optuna tables); check --storage ({hint}).")
        return url
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            found = sa.inspect(conn).has_table("studies")
    except sa_exc.DBAPIError as exc:
        raise StorageError(describe_db_error(url, exc)) from None
    except ImportError as exc:
        raise StorageError(f"no database driver for {redact_url(url)}: {exc}; pip install 'evoprune[postgres]' "
                           "or 'evoprune[mysql]'.") from None
    finally:
        engine.dispose()
    if existing and not found:
        raise StorageNotFoundError(f"{redact_url(url)} holds no study database (no Optuna tables); check --storage "
                                   f"({hint}).")
    return url


def default_storage_url(config_path: str | os.PathLike[str] | None) -> str:
    """The default study database: ``<config stem>.db`` next to the config file,
    or ``./evoprune.db`` for a config that has no file."""
    if config_path is None:
        return normalize_url("evoprune.db")
    path = Path(config_path).expanduser().resolve()
    return normalize_url(path.with_suffix(".db"))


def _is_sqlite(url: str) -> bool:
    return url.split("://", 1)[0].split("+", 1)[0] == "sqlite"


def _sqlite_file(url: str) -> str | None:
    db = sa.engine.make_url(url).database
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return db


def _on_sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" hook below issue BEGIN itself.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
    finally:
        cur.close()


def _on_sqlite_begin(conn: sa.Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def configure_sqlite_engine(engine: sa.Engine) -> None:
    """WAL, busy timeout and ``BEGIN IMMEDIATE`` on every (new) connection of a SQLite engine."""
    if engine.dialect.name != "sqlite" or getattr(engine, "_evoprune_sqlite", False):
        return
    event.listen(engine, "connect", _on_sqlite_connect)
    event.listen(engine, "begin", _on_sqlite_begin)
    engine._evoprune_sqlite = True  # type: ignore[attr-defined]
    engine.dispose()  # connections opened before the listeners existed are dropped


def open_rdb_storage(
    url: str,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = DEFAULT_GRACE_PERIOD,
    engine_kwargs: dict[str, Any] | None = None,
) -> Any:
    """An :class:`optuna.storages.RDBStorage` on ``url``.

    For SQLite files, WAL mode is switched on before Optuna touches the file and the
    engine is configured with :func:`configure_sqlite_engine`. Optuna's own heartbeat
    (``heartbeat_interval``) is off by default: it only runs inside ``Study.optimize`` and
    warns on every ``ask``; evoprune's :class:`~evoprune.storage.Heartbeat` thread writes the
    same ``trial_heartbeats`` rows instead.
    """
    import optuna

    url = normalize_url(url)
    kwargs = dict(engine_kwargs or {})
    if _is_sqlite(url):
        check_storage(url, existing=False)  # a folder or a non-SQLite file: one clear error
        path = _sqlite_file(url)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            import sqlite3

            with sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S) as raw:  # WAL persists in the file
                raw.execute("PRAGMA journal_mode = WAL")
            raw.close()
        connect_args = dict(kwargs.get("connect_args", {}))
        connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_S)
        kwargs["connect_args"] = connect_args
    else:
        kwargs.setdefault("pool_pre_ping", True)
    from ._firststart import first_start_lock

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            with first_start_lock(url, _sqlite_file(url) if _is_sqlite(url) else None, kwargs):
                storage = _reconnecting_storage_class()(
                    url,
                    engine_kwargs=kwargs,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                )
        except sa_exc.DBAPIError as exc:
            raise StorageError(describe_db_error(url, exc)) from None
    configure_sqlite_engine(storage.engine)
    return storage


# --------------------------------------------------------------------------- transactions

#: Driver messages of lock conflicts that succeed when the transaction is simply run again.
_TRANSIENT = ("database is locked", "deadlock", "lock wait timeout", "could not serialize", "busy")

#: Driver messages of a connection that was lost or refused while the server restarts.
_CONNECTION_LOST = (
    "terminating connection", "server closed the connection", "connection refused", "shutting down",
    "starting up", "could not connect", "connection failed", "lost connection", "gone away", "can't connect",
    "connection reset", "connection is closed", "consuming input failed", "connection not open",
    "in recovery mode",
)

#: How long a database call keeps trying while the server is unreachable (a restart, a failover)
#: before the error reaches the caller.
RECONNECT_SECONDS = 90.0


def is_connection_lost(exc: BaseException) -> bool:
    """Did ``exc`` (or the driver error it wraps, e.g. in Optuna's ``StorageInternalError``) come
    from a lost or refused server connection?

    >>> is_connection_lost(sa_exc.OperationalError("SELECT 1", {}, Exception("server closed the connection")))
    True
    >>> is_connection_lost(sa_exc.OperationalError("SELECT 1", {}, Exception("no such table: trials")))
    False
    """
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, sa_exc.DBAPIError):
            if seen.connection_invalidated:
                return True
            text = str(getattr(seen, "orig", seen)).lower()
            return any(s in text for s in _CONNECTION_LOST)
        seen = seen.__cause__ or seen.__context__
    return False


def call_reconnecting(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, called again (with backoff, for up to :data:`RECONNECT_SECONDS`) while
    it fails because the database server cannot be reached; other errors pass through at once."""
    deadline = time.monotonic() + RECONNECT_SECONDS
    delay = 0.25
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not is_connection_lost(exc) or time.monotonic() + delay > deadline:
                raise
            _log.warning("database connection lost; retrying in %.2g s (%s)", delay,
                         str(getattr(exc, "orig", exc)).strip().splitlines()[0][:200] if str(exc).strip() else "")
            time.sleep(delay)
            delay = min(2.0, delay * 2)


_RECONNECTING: Any = None


def _reconnecting_storage_class() -> Any:
    """A subclass of Optuna's ``RDBStorage`` whose public methods ride through a server restart
    (:func:`call_reconnecting`): a worker keeps its trials when PostgreSQL or MySQL restarts under it."""
    global _RECONNECTING
    if _RECONNECTING is None:
        import functools

        import optuna

        base = optuna.storages.RDBStorage

        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(fn)
            def method(*args: Any, **kwargs: Any) -> Any:
                return call_reconnecting(fn, *args, **kwargs)

            return method

        methods = {name: wrap(fn) for name, fn in vars(base).items()
                   if not name.startswith("_") and callable(fn) and not isinstance(fn, (staticmethod, classmethod))}
        _RECONNECTING = type("ReconnectingRDBStorage", (base,), {**methods, "__module__": __name__})
    return _RECONNECTING


def is_transient(exc: BaseException, *, conflicts: bool = False) -> bool:
    """Would running the failed transaction again succeed? True for lock conflicts (SQLite "database
    is locked", MySQL deadlocks and lock wait timeouts, PostgreSQL serialization failures); with
    ``conflicts``, also for a unique-constraint conflict with a concurrent writer (the next run reads
    the row the other writer committed).

    >>> is_transient(sa_exc.OperationalError("BEGIN", {}, Exception("database is locked")))
    True
    >>> is_transient(sa_exc.IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed")))
    False
    """
    if isinstance(exc, sa_exc.IntegrityError):
        return conflicts
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    text = str(getattr(exc, "orig", exc)).lower()
    return any(s in text for s in _TRANSIENT)


def run_transaction(engine: sa.Engine, fn: Callable[[sa.Connection], T], *, attempts: int = 8,
                    retry_conflicts: bool = False) -> T:
    """Run ``fn(conn)`` in one transaction (all or nothing) and return its result; run it again, after
    a short random backoff, when it failed for a transient reason (see :func:`is_transient`).

    Args:
        engine: the study database's engine.
        fn: the unit of work; it may run more than once, so it must not have effects outside ``conn``.
        attempts: how often to run ``fn`` at most.
        retry_conflicts: also run it again after a unique-constraint conflict (for a "create it
            unless it exists" ``fn`` that races with another process doing the same).

    >>> engine = sa.create_engine("sqlite://")
    >>> run_transaction(engine, lambda conn: conn.execute(sa.text("SELECT 1 + 1")).scalar())
    2
    """
    def attempt_all() -> T:
        for attempt in range(1, attempts + 1):
            try:
                with engine.begin() as conn:
                    return fn(conn)
            except sa_exc.DBAPIError as exc:
                # a lost connection goes to call_reconnecting, which waits for the server
                if is_connection_lost(exc) or attempt >= attempts or not is_transient(exc, conflicts=retry_conflicts):
                    raise
                time.sleep(min(2.0, 0.05 * 2 ** (attempt - 1)) * (0.5 + random.random()))
        raise AssertionError("unreachable")  # pragma: no cover

    return call_reconnecting(attempt_all)
