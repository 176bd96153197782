"""Redis: the session cache, the token revocation list, per-user rate limits and the host registry.

Redis is not on the critical path. Every call goes through ``_gate``: when Redis cannot be reached the call
returns ``DOWN`` at once (for ``redis_retry_after_s``) and callers fall back to PostgreSQL or to an in-process
answer: slower, never wrong. Cache entries carry a generation number; a process that saw Redis down bumps the
generation when Redis returns, which invalidates every entry that a missed invalidation could have left stale.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tmuxi.observability import ERRORS, logger
from tmuxi.settings import get_settings


class _Down:
    def __repr__(self) -> str:
        return "DOWN"


DOWN: Final = _Down()
T = TypeVar("T")

_GEN = "cache:gen"
_REVOCATIONS_LOADED = "revocations:loaded"


class _Gate:
    def __init__(self) -> None:
        self._client: redis.Redis | None = None
        self._down_until = 0.0
        self._was_down = False
        self._lock = threading.Lock()
        self._local = threading.local()
        self._conns: list[redis.Connection] = []

    def connection(self) -> redis.Connection:
        """This thread's own connection, for the per-request command (``admit``): one command on one
        connection costs about half the CPU of a call through the client (no pool checkout, no retry
        wrapper, no response callbacks). Only valid inside ``call``; on any error it is dropped."""
        conn: redis.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            client = self.client()
            assert client is not None
            pool = client.connection_pool
            conn = pool.connection_class(**pool.connection_kwargs)
            with self._lock:
                self._conns.append(conn)
            self._local.conn = conn
        return conn

    def client(self) -> redis.Redis | None:
        if self._client is None:
            s = get_settings()
            if s.redis_url is None:
                return None
            with self._lock:
                if self._client is None:
                    self._client = redis.Redis.from_url(
                        s.redis_url,
                        socket_timeout=s.redis_timeout_s,
                        socket_connect_timeout=s.redis_timeout_s,
                        retry=Retry(NoBackoff(), 0),
                        decode_responses=True,
                        max_connections=64,
                    )
        return self._client

    def call(self, fn: Callable[[redis.Redis], T]) -> T | _Down:
        client = self.client()
        if client is None or time.monotonic() < self._down_until:
            return DOWN
        try:
            if self._was_down:  # first contact after an outage: invalidate what a missed delete may have left
                client.incr(_GEN)
                self._was_down = False
                logger.info("redis reachable again; cache generation bumped")
            result = fn(client)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            conn = getattr(self._local, "conn", None)
            if conn is not None:  # a half-read reply must not be read by the next command
                conn.disconnect()
            self._down_until = time.monotonic() + get_settings().redis_retry_after_s
            if not self._was_down:
                logger.warning("redis unavailable; serving from PostgreSQL", extra={"error": type(exc).__name__})
            self._was_down = True
            ERRORS.labels(component="cache", kind="redis_unavailable").inc()
            return DOWN
        return result

    def mark_missed_write(self) -> None:
        """A write (invalidation) could not reach Redis: bump the generation on the next contact."""
        self._was_down = True

    def reset(self) -> None:
        """Forget the client (tests and settings changes)."""
        with self._lock:
            if self._client is not None:
                self._client.close()
            for conn in self._conns:
                conn.disconnect()  # type: ignore[no-untyped-call]
            self._conns.clear()
            self._local = threading.local()
            self._client = None
            self._down_until = 0.0
            self._was_down = False


_gate = _Gate()
reset = _gate.reset


def available() -> bool:
    return _gate.call(lambda r: r.ping()) is True


# --- session cache ---------------------------------------------------------------------------------
def put_session(session_id: str, data: dict[str, Any], gen: int) -> None:
    payload = json.dumps({**data, "_g": gen}, default=str)
    _gate.call(lambda r: r.set(f"session:{session_id}", payload, ex=get_settings().cache_ttl_s))


def invalidate_session(session_id: str) -> None:
    if isinstance(_gate.call(lambda r: r.delete(f"session:{session_id}")), _Down):
        _gate.mark_missed_write()


# --- token revocations -----------------------------------------------------------------------------
def is_revoked(jti: str) -> bool | None:
    """True/False when Redis knows, None when it cannot say (down, or restarted and not yet re-warmed)."""
    res = _gate.call(lambda r: r.mget(f"revoked:{jti}", _REVOCATIONS_LOADED))
    if isinstance(res, _Down):
        return None
    hit, loaded = res
    if hit is not None:
        return True
    return False if loaded is not None else None


def mark_revoked(jti: str, ttl_s: int) -> None:
    _gate.call(lambda r: r.set(f"revoked:{jti}", "1", ex=max(1, ttl_s)))


def load_revocations(entries: list[tuple[str, int]]) -> None:
    """Re-warm the revocation list from PostgreSQL after Redis lost it (restart, flush)."""

    def _load(r: redis.Redis) -> None:
        pipe = r.pipeline(transaction=False)
        for jti, ttl in entries:
            pipe.set(f"revoked:{jti}", "1", ex=max(1, ttl))
        pipe.set(_REVOCATIONS_LOADED, "1")
        pipe.execute()

    _gate.call(_load)


# --- one round trip per API request ---------------------------------------------------------------
@dataclass
class Admission:
    """What one authenticated request needs from Redis, fetched in one round trip."""

    count: int  # requests by this caller in the current rate-limit window
    revoked: bool | None  # None: Redis cannot say (restarted and not re-warmed)
    session: dict[str, Any] | None  # the cached session row, when a session was named and cached
    gen: int  # the cache generation, for put_session


# Rate-limit count and the reads an authenticated request needs, as ONE Redis command (one round trip, one
# reply to parse). KEYS[1] is the rate-limit window key, KEYS[2..] are read; ARGV[1] is the window's TTL.
_ADMIT_LUA = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
local out = {n}
for i = 2, #KEYS do out[i] = redis.call('GET', KEYS[i]) end
return out
"""
_ADMIT_SHA = hashlib.sha1(_ADMIT_LUA.encode(), usedforsecurity=False).hexdigest()  # Redis names scripts so


def _spin_until_readable(conn: redis.Connection) -> None:
    """Poll for the reply for up to ``redis_spin_us`` before the read blocks. A reply on loopback or within an
    availability zone takes tens of microseconds; a thread put to sleep on the socket and woken again costs
    more CPU than that (measured in-handler: ~105 us of CPU per blocking round trip against ~75 polling), and
    this wait happens on every request. A slow or absent reply falls through to the normal blocking read with
    its timeout."""
    budget = get_settings().redis_spin_us
    if budget <= 0:
        return
    deadline = time.perf_counter() + budget / 1e6
    while not conn.can_read(0) and time.perf_counter() < deadline:
        pass


def admit(caller_key: str, jti: str, session_id: str | None, window_s: int = 60) -> Admission | _Down:
    """Count the request for rate limiting, look up the token's revocation and the session's cache entry."""
    keys = [f"rl:{caller_key}:{int(time.time()) // window_s}", f"revoked:{jti}", _REVOCATIONS_LOADED, _GEN]
    if session_id:
        keys.append(f"session:{session_id}")

    def _run(_: redis.Redis) -> list[Any]:
        conn = _gate.connection()
        try:
            conn.send_command("EVALSHA", _ADMIT_SHA, len(keys), *keys, window_s + 1)  # type: ignore[no-untyped-call]
            _spin_until_readable(conn)
            return list(conn.read_response())
        except redis.exceptions.NoScriptError:  # a new or flushed Redis: load the script, then run it
            conn.send_command("EVAL", _ADMIT_LUA, len(keys), *keys, window_s + 1)  # type: ignore[no-untyped-call]
            return list(conn.read_response())

    res = _gate.call(_run)
    if isinstance(res, _Down):
        return DOWN
    count, revoked_hit, loaded, gen_raw = res[0], res[1], res[2], res[3]
    gen = int(gen_raw or 0)
    revoked = True if revoked_hit is not None else (False if loaded is not None else None)
    session = None
    if session_id and len(res) > 4 and res[4] is not None:
        entry = json.loads(res[4])
        if entry.pop("_g", None) == gen:
            session = entry
    return Admission(int(count), revoked, session, gen)


# --- rate limits -----------------------------------------------------------------------------------
_local_windows: dict[tuple[str, int], int] = {}
_local_lock = threading.Lock()


def local_rate_count(key: str, window_s: int = 60) -> int:
    """The per-process fallback counter used while Redis is down."""
    window = int(time.time()) // window_s
    with _local_lock:
        for k in [k for k in _local_windows if k[1] != window]:
            del _local_windows[k]
        count = _local_windows[(key, window)] = _local_windows.get((key, window), 0) + 1
    return count


# --- host registry ---------------------------------------------------------------------------------
def put_host(host_id: str, data: dict[str, Any], ttl_s: int) -> None:
    payload = json.dumps(data, default=str)
    _gate.call(lambda r: r.set(f"host:{host_id}", payload, ex=max(1, ttl_s)))


def get_host(host_id: str) -> dict[str, Any] | None | _Down:
    raw = _gate.call(lambda r: r.get(f"host:{host_id}"))
    if isinstance(raw, _Down) or raw is None:
        return raw
    data: dict[str, Any] = json.loads(raw)
    return data
