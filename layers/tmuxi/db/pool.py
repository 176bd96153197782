"""The PostgreSQL connection pool: created lazily, once per process (a Lambda execution environment, a gateway
worker, a tmux host), and what keeps a database outage from holding requests (README "The database: migrations
and outages").

It never migrates: migrations are a step of their own (``python -m tmuxi.db.migrate``, ``make migrate``). The
first use of a connection in a process checks that the schema is not behind the code, and refuses (SchemaBehind:
503, and a log line naming the fix) until it is not.

Sizing (settings ``db_pool_min`` 0, ``db_pool_max`` 2): a Lambda execution environment serves one request at a
time, so it opens one connection, on its first request (none at a cold start or in a SnapStart snapshot), and
reuses it.

Failing fast. Once a process has found PostgreSQL unreachable, a request that needs it is answered 503
(DependencyUnavailable, ``retry_after_s`` -> Retry-After) in microseconds (4 us measured):
- A circuit breaker (``breaker.py``). A connection that cannot be had within ``db_timeout_s``, one that stops
  answering, or one that breaks opens it; then every request is refused without touching the pool, and one
  request per ``db_retry_s`` probes: it waits at most ``db_probe_timeout_s`` for a connection, checks it, and
  closes the breaker when the server answers. A connection that broke (a backend or server killed: the socket is
  reset, which takes no time to learn) lets the next request probe at once.
- ``statement_timeout`` (``db_statement_timeout_s``, in the connection's startup options: no extra round trip)
  cancels a slow statement on the server, and every use of a connection is bounded on the client 0.5 s past it.
  The client bound is needed because a server that does not run cancels nothing: a TCP or Unix-socket connect to
  a SIGSTOPped server still succeeds (the kernel queues it) and the kernel acknowledges what is sent, so neither
  TCP keepalives nor ``tcp_user_timeout`` (set anyway, for hosts that vanish) ever fire, and psycopg would wait on
  the socket for good. ``_Watchdog`` shuts the socket down from its own thread when the bound passes; the waiting
  call fails at once (OperationalError) and the connection is discarded. psycopg's connect timeout has a floor
  of 2 s (libpq's rule), so nothing waits on a connect directly: the pool connects in its worker threads and a
  request waits for it at most ``db_timeout_s`` (a probe ``db_probe_timeout_s``), in slices, so that a connect
  the pool gave up on (refused, and refused again ``db_probe_timeout_s`` later) ends the wait at once.
- Check before use: a connection idle longer than ``db_check_idle_s`` (1 s) is checked with an empty query,
  bounded by ``db_probe_timeout_s``, before a request gets it; if it is dead, every idle connection goes (they are
  as old) and the request gets a new one. A busy process's connections are never idle that long, so there the
  check costs nothing; a Lambda environment thawed after minutes, or a process whose server restarted while it was
  idle, pays one round trip instead of a 503. Checking every use measured +30 to +70 us median per use of a
  connection (one more round trip: 79-142 us against 48-74 us for a pooled ``SELECT 1`` on this machine's Unix
  socket, more across a network; an API request makes one to three uses) and buys nothing the idle rule does not:
  a connection that died within a second of its last use belonged to a server that died under load, which the
  requests in flight find anyway. psycopg_pool's own ``check=`` is not used: after a failed check it sleeps with
  exponential backoff (1 s, 2 s, ...) before trying the next connection (psycopg_pool 3.2.1, ticket #709), so a
  pool of stale connections after a restart would cost a request seconds.

What the first request to meet an outage costs (measured; then the breaker is open): a server paused while this
request's connection was in use or used within ``db_check_idle_s``: the client bound, ``db_statement_timeout_s``
+ 0.5 s (2.5 s); paused while the connection sat idle longer: the check's 0.1 s, then ``db_timeout_s`` (1 s)
waiting for a new connection (1.1 s); paused with no pooled connection: 1 s. A killed server: a connection in use
is reset (503 in a millisecond, and the next request probes); one idle longer, or none pooled: ~0.1 s (the pool's
connect is refused, retried once 0.1 s later, given up). Each probe while it lasts: at most 0.1 s."""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from tmuxi.db.breaker import BreakerOpen, CircuitBreaker, Ticket
from tmuxi.errors import DependencyUnavailable
from tmuxi.observability import logger
from tmuxi.settings import Settings, env_name, get_settings
from tmuxi.snapstart import deferred_import

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool
    from psycopg_pool import ConnectionPool

    Conn = psycopg.Connection[dict[str, Any]]
else:
    # ~110 ms at import (psycopg's libpq lookup imports ctypes.util): paid by the first request that reaches
    # PostgreSQL, not by a cold start that never does; before a SnapStart snapshot, ahead (tmuxi/snapstart.py)
    psycopg = deferred_import("psycopg")
    psycopg_pool = deferred_import("psycopg_pool")

CLIENT_MARGIN_S = 0.5  # the client gives up on a use of a connection this long after statement_timeout
_UNAVAILABLE = "database unavailable; retry shortly"

_pool: ConnectionPool[Conn] | None = None
_lock = threading.Lock()
_breaker: CircuitBreaker | None = None
_schema_ok = False  # the schema was found current (checked until it is, then never again in this process)
_last_answer = 0.0  # monotonic time a connection last came back from a use that the server answered
_gave_up = 0.0  # monotonic time the pool last gave up connecting
_SLICE_S = 0.02  # a request waiting for a new connection looks every this often whether the pool gave up
# when each pooled connection was made or last came back (psycopg_pool does not keep it)
_idle_since: weakref.WeakKeyDictionary[Conn, float] = weakref.WeakKeyDictionary()


def database_url(refresh: bool = False) -> str:
    """The database to use: ``database_url``, with the credentials (and host, port, dbname, as far as it has
    them) of the secret ``database_secret_id`` when that is set, fetched on first use and cached for
    ``secrets_max_age_s`` (``refresh``: fetched anew, after a password was refused)."""
    s = get_settings()
    if s.database_secret_id:
        from tmuxi import secrets

        return secrets.database_url(s.database_url.get_secret_value() if s.database_url else "", refresh=refresh)
    if s.database_url is None:
        raise RuntimeError(
            f"{env_name('database_url')} is not set: run the local stack (`make run`) which starts an embedded "
            f"PostgreSQL, or point it at a server (or {env_name('database_secret_id')} at its secret)"
        )
    return s.database_url.get_secret_value()


def _conninfo(s: Settings, refresh: bool = False) -> str:
    """The URL with the pool's connection parameters; what the URL sets itself wins (its options come after)."""
    url = database_url(refresh)
    given = psycopg.conninfo.conninfo_to_dict(url)
    bound_ms = int((s.db_statement_timeout_s + CLIENT_MARGIN_S) * 1000)
    params: dict[str, Any] = {
        "connect_timeout": max(2, math.ceil(s.db_timeout_s)),  # psycopg's floor is 2 s; the pool's workers wait it
        # TCP only (libpq ignores them on a Unix socket): a host that vanishes without a reset is noticed
        "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
        "tcp_user_timeout": bound_ms,
    }
    params = {k: v for k, v in params.items() if k not in given}
    options = f"-c statement_timeout={int(s.db_statement_timeout_s * 1000)}"
    params["options"] = f"{options} {given['options']}" if given.get("options") else options
    return psycopg.conninfo.make_conninfo(url, **params)


def breaker() -> CircuitBreaker:
    global _breaker
    if _breaker is None:
        with _lock:
            if _breaker is None:
                s = get_settings()
                # a probe holds the way for at most two waits for a connection, a check and one use
                _breaker = CircuitBreaker(s.db_retry_s, probe_lease_s=s.db_probe_timeout_s * 3
                                          + s.db_statement_timeout_s + CLIENT_MARGIN_S)
    return _breaker


def get_pool() -> ConnectionPool[Conn]:
    """The process's pool (no I/O: it connects on first use). It does not migrate."""
    global _pool
    if _pool is not None:
        return _pool
    with _lock:
        if _pool is None:
            s = get_settings()
            _pool = psycopg_pool.ConnectionPool(
                # asked for each new connection: a rotated database secret reaches new connections once the
                # cached one is older than secrets_max_age_s, or at once after a refusal (_connection_class)
                lambda: _conninfo(get_settings()),
                connection_class=_connection_class(),
                min_size=s.db_pool_min,
                max_size=s.db_pool_max,
                timeout=s.db_timeout_s,
                # a connect that failed is retried once, then given up on (and a waiting request told, through
                # _gave_up): its place is free for the next request, never held by a backoff of minutes; the
                # breaker decides when to try again
                reconnect_timeout=s.db_probe_timeout_s,
                reconnect_failed=_gave_up_connecting,
                kwargs={"autocommit": True, "row_factory": psycopg.rows.dict_row},
                configure=_made,
                open=True,
                name="tmuxi",
            )
    return _pool


def close_pool() -> None:
    """Close the pool and forget what this process learnt (the breaker, the schema check): the next use starts
    afresh, with the settings as they are then."""
    global _pool, _breaker, _schema_ok
    with _lock:
        if _pool is not None:
            _pool.close()
            _pool = None
        _breaker = None
        _schema_ok = False


@lru_cache(maxsize=1)
def _connection_class() -> type[Conn]:
    """The pool's connection class: with ``database_secret_id``, a connect whose password is refused fetches the
    secret anew (RDS rotated it) and tries once more before giving up. Made on first use, as psycopg is."""

    class Connection(psycopg.Connection[dict[str, Any]]):
        @classmethod
        def connect(cls, conninfo: str = "", **kwargs: Any) -> Connection:
            try:
                return super().connect(conninfo, **kwargs)
            except psycopg.OperationalError as exc:
                from tmuxi.db.migrate import password_refused

                if not password_refused(exc) or not get_settings().database_secret_id:
                    raise
                logger.info("PostgreSQL refused the database secret's password; fetching the secret anew",
                            extra={"status": "refused"})
            return super().connect(_conninfo(get_settings(), refresh=True), **kwargs)

    return Connection


def _made(conn: Conn) -> None:
    _idle_since[conn] = time.monotonic()


@contextmanager
def connection() -> Iterator[Conn]:
    """A pooled connection (autocommit; use ``conn.transaction()`` for multi-statement writes), for one bounded
    use. A database that cannot be reached becomes a clean 503 (DependencyUnavailable), never a hang."""
    try:
        ticket = breaker().admit()
    except BreakerOpen as exc:
        raise _unavailable(exc.retry_in_s) from None
    pool = get_pool()
    conn = _acquire(pool, ticket)
    s = get_settings()
    token = _watchdog.arm(conn, s.db_statement_timeout_s + CLIENT_MARGIN_S)
    settled = False
    try:
        if not _schema_ok:
            _require_schema(conn)
        yield conn
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        if isinstance(exc, psycopg.InterfaceError) and not conn.broken:
            raise  # a programming error, not the server
        settled = True
        _settle(pool, conn, token, ticket)
        raise _unavailable(breaker().retry_in_s()) from exc
    finally:
        if not settled:
            _settle(pool, conn, token, ticket)


def _acquire(pool: ConnectionPool[Conn], ticket: Ticket) -> Conn:
    s = get_settings()
    wait = s.db_probe_timeout_s if ticket.probe else s.db_timeout_s
    conn = _getconn(pool, ticket, wait)
    stale = ticket.probe or time.monotonic() - _idle_since.get(conn, 0.0) > s.db_check_idle_s
    if stale and not _check(conn, s.db_probe_timeout_s):
        pool.putconn(conn)  # closed: the pool drops it
        pool.drain()  # the other idle ones are as old: most likely dead too
        logger.info("dropped pooled PostgreSQL connections that failed their check; connecting anew")
        conn = _getconn(pool, ticket, wait)
    return conn


def _getconn(pool: ConnectionPool[Conn], ticket: Ticket, wait: float) -> Conn:
    """A connection within ``wait``. The pool connects in its worker threads and does not tell a waiting request
    that a connect failed, so the wait is taken in slices: a refusal the pool gave up on (``_gave_up``) ends it
    at once instead of at its end."""
    asked = time.monotonic()
    deadline = asked + wait
    while True:
        try:
            return pool.getconn(max(0.001, min(_SLICE_S, deadline - time.monotonic())))
        except psycopg_pool.PoolTimeout as exc:
            refused = _gave_up > asked
            if not refused and time.monotonic() < deadline:
                continue
            if not refused and not ticket.probe and _last_answer > asked:
                # others were answered meanwhile: every connection is busy, the server is up
                raise DependencyUnavailable("every database connection is busy; retry shortly",
                                            retry_after_s=1) from exc
            why = "connections refused" if refused else f"no connection within {wait:g} s"
            _failed(pool, ticket, timed_out=True, why=why)
            raise _unavailable(breaker().retry_in_s()) from exc


def _gave_up_connecting(pool: ConnectionPool[Conn]) -> None:
    """psycopg_pool's reconnect_failed: a connect failed, and so did its one retry ``db_probe_timeout_s`` later."""
    global _gave_up
    _gave_up = time.monotonic()


def _check(conn: Conn, timeout_s: float) -> bool:
    """One empty query, bounded: does the connection still reach a server that answers?"""
    token = _watchdog.arm(conn, timeout_s)
    try:
        conn.execute("")
        ok = True
    except psycopg.Error:
        ok = False
    if _watchdog.disarm(token) or not ok:
        conn.close()
        return False
    return True


def _require_schema(conn: Conn) -> None:
    global _schema_ok
    from tmuxi.db.migrate import require_current

    require_current(conn)  # SchemaBehind names the fix
    _schema_ok = True


def _settle(pool: ConnectionPool[Conn], conn: Conn, token: int, ticket: Ticket) -> None:
    """After a use: give the connection back (closed if it broke) and tell the breaker what the use showed."""
    global _last_answer
    fired = _watchdog.disarm(token)
    broken = fired or conn.broken
    if broken:
        conn.close()
    else:
        _last_answer = _idle_since[conn] = time.monotonic()
    pool.putconn(conn)
    if broken:
        # a server that stopped answering: try again after db_retry_s; a connection reset (a server killed or
        # restarted, or this backend ended) is known at once, so the next request may probe at once
        _failed(pool, ticket, timed_out=fired, why="it stopped answering" if fired else "the connection broke")
    elif breaker().succeeded(ticket):
        logger.info("PostgreSQL reachable again: circuit closed")


def _failed(pool: ConnectionPool[Conn], ticket: Ticket, *, timed_out: bool, why: str) -> None:
    b = breaker()
    if b.failed(ticket, None if timed_out else 0.0):
        pool.drain()  # nothing pooled before the outage is trusted after it
        logger.warning("PostgreSQL unreachable: circuit open, requests refused until a probe gets an answer",
                       extra={"reason": why, "retry_s": b.retry_s if timed_out else 0.0})


def _unavailable(retry_in_s: float) -> DependencyUnavailable:
    return DependencyUnavailable(_UNAVAILABLE, retry_after_s=round(max(retry_in_s, 0.1), 2))


class _Watchdog:
    """Bounds a use of a connection from outside the thread that waits on it: when the deadline passes, the
    connection's socket is shut down (shutdown(2) on a duplicate of its descriptor, so a descriptor number the
    connection has meanwhile closed and the process reused is never touched), and the wait fails at once.

    One daemon thread per process, started on first use. It ticks every ``_TICK_S`` while something is armed or
    was within ``_LINGER_S``, and sleeps until woken otherwise; arming never wakes it while it ticks. So a bound
    fires up to ``_TICK_S`` late, and a request pays a dup(), a lock and a dict entry (~3 us)."""

    _TICK_S = 0.02
    _LINGER_S = 2.0

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._armed: dict[int, tuple[float, int]] = {}  # token -> (deadline, duplicated descriptor)
        self._fired: set[int] = set()
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None
        self._sleeping = False
        self._busy_at = 0.0

    def arm(self, conn: Conn, timeout_s: float) -> int:
        fd = os.dup(conn.fileno())
        with self._cond:
            token = next(self._tokens)
            self._armed[token] = (time.monotonic() + timeout_s, fd)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tmuxi-db-watchdog", daemon=True)
                self._thread.start()
            elif self._sleeping:
                self._cond.notify()
        return token

    def disarm(self, token: int) -> bool:
        """Done with that use; True if its bound had passed (its connection is cut)."""
        with self._cond:
            entry = self._armed.pop(token, None)
            if entry is None:
                self._fired.discard(token)
                return True
        os.close(entry[1])
        return False

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for token, (deadline, fd) in list(self._armed.items()):
                    if deadline <= now:
                        del self._armed[token]
                        self._fired.add(token)
                        _cut(fd)
                if self._armed:
                    self._busy_at = now
                self._sleeping = not self._armed and now - self._busy_at > self._LINGER_S
                self._cond.wait(None if self._sleeping else self._TICK_S)

    def _after_fork(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._armed.clear()
        self._fired.clear()
        self._thread = None
        self._sleeping = False


def _cut(fd: int) -> None:
    """Shut the socket down for reading and writing (every descriptor of it sees EOF), and close ``fd``."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        return
    with sock, contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


_watchdog = _Watchdog()
os.register_at_fork(after_in_child=_watchdog._after_fork)
