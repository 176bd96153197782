"""Redis: the session cache, users' token state, the token revocation list and per-user rate limits.

Redis is not on the critical path. Every call goes through ``_gate``: when Redis fails in any way -- it cannot
be reached, it times out, it answers with an error (READONLY from a replica during a failover, OOM, BUSY,
NOSCRIPT, WRONGTYPE) or with something that does not parse -- the call returns ``DOWN``, and so does every call
for ``redis_retry_after_s``; callers fall back to PostgreSQL or to an in-process answer: slower, never wrong.
No connection that saw a failure is used again, so no reply left unread on it can ever be taken for another
request's. Cache entries carry a generation number; a process that saw Redis down bumps the generation when
Redis returns, which invalidates every entry that a missed invalidation could have left stale.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final, TypeVar

from tmuxi.observability import ERRORS, logger
from tmuxi.settings import get_settings
from tmuxi.snapstart import deferred_import

if TYPE_CHECKING:
    import redis
else:
    # ~100 ms at import (redis-py imports its asyncio client too): paid by the first request that reaches Redis,
    # not by a cold start that never does (an authorizer refusing a token); before a SnapStart snapshot, ahead
    redis = deferred_import("redis")


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

    def client(self) -> redis.Redis | None:
        if self._client is None:
            s = get_settings()
            if s.redis_url is None:
                return None
            with self._lock:
                if self._client is None:
                    from redis.backoff import NoBackoff
                    from redis.retry import Retry

                    self._client = redis.Redis.from_url(
                        s.redis_url,
                        socket_timeout=s.redis_timeout_s,
                        socket_connect_timeout=s.redis_timeout_s,
                        retry=Retry(NoBackoff(), 0),
                        decode_responses=True,
                        max_connections=64,
                        # with redis_secret_id, every new connection authenticates with the token as Secrets
                        # Manager has it (cached for secrets_max_age_s; fetched anew after a refusal: _failed)
                        credential_provider=_SecretToken() if s.redis_secret_id else None,
                    )
        return self._client

    def call(self, fn: Callable[[redis.Redis], T]) -> T | _Down:
        client = self.client()
        if client is None or time.monotonic() < self._down_until:
            return DOWN
        try:
            if self._was_down:
                # First contact after an outage or a failed write: invalidate every session entry a missed
                # delete may have left, and make revocation checks ask PostgreSQL (a revocation may be
                # missing here) until the list is re-warmed from it. Requests admitted here meanwhile are
                # added to the rate windows before anything else counts (Tracker.write_back).
                client.incr(_GEN)
                client.delete(_REVOCATIONS_LOADED)
                _tracker.write_back(client)
                client.ping()  # see _flushed
                self._was_down = False
                logger.info("redis reachable again; cache generation bumped, revocation list to re-warm")
            result = fn(client)
        except (redis.RedisError, OSError) as exc:
            # Any failure is Redis being down, an error reply included: a replica answering READONLY during a
            # failover or a full Redis answering OOM did not take the write, so what it would have invalidated
            # may be stale here exactly as after an outage.
            self._failed(client, exc)
            return DOWN
        return result

    def _failed(self, client: redis.Redis, exc: Exception) -> None:
        _tracker.drop()  # whatever it holds may have missed an invalidation; its connections are closed
        # and so is every idle pooled connection: none that saw the failure (or holds a reply nobody read) is
        # used again. redis-py reads a pipeline's replies to the end before raising the first error, and the
        # connections in use by other threads are checked for unread data when they are next taken.
        client.connection_pool.disconnect(inuse_connections=False)
        self._down_until = time.monotonic() + get_settings().redis_retry_after_s
        reply = isinstance(exc, redis.ResponseError)
        if isinstance(exc, redis.AuthenticationError) and get_settings().redis_secret_id:
            _SecretToken.refresh = True  # the token was rotated: the next connection asks Secrets Manager
        if not self._was_down:
            logger.warning("redis unavailable; serving from PostgreSQL", extra={
                "error": type(exc).__name__, "reply": str(exc)[:100] if reply else None})
        self._was_down = True
        ERRORS.labels(component="cache", kind="redis_error_reply" if reply else "redis_unavailable").inc()

    def mark_missed_write(self) -> None:
        """A write (invalidation) could not reach Redis: bump the generation on the next contact."""
        self._was_down = True

    def reset(self) -> None:
        """Forget the client (tests and settings changes)."""
        with self._lock:
            if self._client is not None:
                self._client.close()
            _tracker.drop(counts=True)
            _mac_key.cache_clear()
            _user_entries.clear()  # verified with that key
            _session_entries.clear()
            self._client = None
            self._down_until = 0.0
            self._was_down = False


class _SecretToken:
    """redis-py's credential provider protocol (``get_credentials``, asked by each new connection): the AUTH
    token of the secret ``redis_secret_id`` ({"auth_token": ...})."""

    refresh = False  # set after Redis refused the token: fetch it anew once

    def get_credentials(self) -> tuple[str]:
        from tmuxi import secrets

        refresh, _SecretToken.refresh = _SecretToken.refresh, False
        return (secrets.redis_auth_token(refresh=refresh),)


_gate = _Gate()
reset = _gate.reset


def available() -> bool:
    return _gate.call(lambda r: r.ping()) is True


# --- session cache ---------------------------------------------------------------------------------
# An entry is "<hex HMAC-SHA256>.<json>", keyed by a key derived from the JWT secret: whoever can write Redis but
# does not hold the secret cannot make an entry that grants anything (a forged or altered one is a cache miss).
_MAC_HEX = 64


@lru_cache(maxsize=1)
def _mac_key() -> bytes:
    secret = get_settings().require_jwt_secret().encode()
    return hmac.new(secret, b"tmuxi session cache v1", hashlib.sha256).digest()


def _sign(key: str, payload: str) -> str:
    mac = hmac.new(_mac_key(), f"{key}\n{payload}".encode(), hashlib.sha256).hexdigest()
    return f"{mac}.{payload}"


def _verified(key: str, raw: str) -> str | None:
    mac, _, payload = raw.partition(".")
    good = hmac.new(_mac_key(), f"{key}\n{payload}".encode(), hashlib.sha256).hexdigest()
    if len(mac) != _MAC_HEX or not hmac.compare_digest(mac, good):
        ERRORS.labels(component="cache", kind="bad_entry_mac").inc()
        return None
    return payload


def put_session(session_id: str, data: dict[str, Any], gen: int) -> None:
    key = f"session:{session_id}"
    payload = _sign(key, json.dumps({**data, "_g": gen}, default=str))
    _gate.call(lambda r: r.set(key, payload, ex=get_settings().cache_ttl_s))


def _flushed(r: redis.Redis, result: T) -> T:
    """Follow a write of a key that trackers may hold with a round trip: when its answer arrives, Redis has
    finished the event-loop pass that sent the invalidations for the write (it writes to clients in one pass,
    and may be pre-empted half-way through it), so a request that follows this one -- in any process -- finds
    the invalidation already delivered. Costs one round trip on deletes and revocations only."""
    r.ping()
    return result


def invalidate_session(session_id: str) -> None:
    if isinstance(_gate.call(lambda r: _flushed(r, r.delete(f"session:{session_id}"))), _Down):
        _gate.mark_missed_write()


# verified session entries, by value: each distinct entry is verified and parsed once. Besides the work, this keeps
# a lookup of another user's (cached) session as cheap as one of an id with no entry (services/sessions.py _load).
_session_entries: dict[tuple[str, str], tuple[dict[str, Any], Any] | None] = {}


def _memo_verified(memo: dict[tuple[str, str], Any], key: str, raw: str,
                   parse: Callable[[dict[str, Any]], T]) -> T | None:
    """A signed entry verified and parsed once per distinct value (None: forged, altered or malformed); the
    same value then serves every request until it changes."""
    k = (key, raw)
    if k in memo:
        hit: T | None = memo[k]
        return hit
    hit = None
    payload = _verified(key, raw)
    if payload is not None:
        try:
            hit = parse(json.loads(payload))
        except (ValueError, KeyError, TypeError):
            hit = None
    if len(memo) >= _MAX_TRACKED_KEYS:
        memo.clear()
    memo[k] = hit
    return hit


def _read_session(key: str, raw: str, gen: int) -> dict[str, Any] | None:
    hit = _memo_verified(_session_entries, key, raw, lambda e: (e, e.pop("_g", None)))
    if hit is None or hit[1] != gen:
        return None
    return dict(hit[0])


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
    """Record a revocation (PostgreSQL already has it). If Redis cannot take it, revocation checks go to
    PostgreSQL from the next contact until the list is re-warmed (see _Gate.call)."""
    if isinstance(_gate.call(lambda r: _flushed(r, r.set(f"revoked:{jti}", "1", ex=max(1, ttl_s)))), _Down):
        _gate.mark_missed_write()


def load_revocations(entries: list[tuple[str, int]]) -> None:
    """Re-warm the revocation list from PostgreSQL after Redis lost it (restart, flush)."""

    def _load(r: redis.Redis) -> None:
        pipe = r.pipeline(transaction=False)
        for jti, ttl in entries:
            pipe.set(f"revoked:{jti}", "1", ex=max(1, ttl))
        pipe.set(_REVOCATIONS_LOADED, "1")
        pipe.execute()
        r.ping()  # see _flushed

    _gate.call(_load)


# --- users' token state ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class UserState:
    """What a user's tokens depend on (PostgreSQL ``users``): a token is good while the user is enabled and has
    the epoch and role the token was issued with."""

    epoch: int
    role: str
    disabled: bool


UNKNOWN_USER: Final = UserState(-1, "user", True)  # no such user: no token of it is good

# An entry "user:<id>" is signed like a session entry and carries the cache generation and an expiry time (so it
# lasts user_state_ttl_s however late Redis expires it). Entries are only ever replaced by ones with an epoch at
# least as high: a request that read PostgreSQL just before a change cannot put the old state back after the
# writer put the new one. Unless it is the very entry the reader found unusable (stale generation, bad MAC):
# it read PostgreSQL after that entry was written, so its state is at least as new.
_PUT_USER = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[4] then
  local ok, e = pcall(cjson.decode, string.sub(cur, 66))
  if ok and type(e) == 'table' and type(e['epoch']) == 'number' and e['epoch'] > tonumber(ARGV[3]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""
_user_entries: dict[tuple[str, str], tuple[UserState, int, float] | None] = {}  # verified entries, by value


def _user_key(user_id: str) -> str:
    return f"user:{user_id}"


# An entry is fresh for user_state_ttl_s (``exp``), and kept in Redis this long: past its freshness it is what the
# caller's state was when PostgreSQL last said, good enough while PostgreSQL cannot be asked (no change to a user
# can commit then: every change is written to PostgreSQL first).
USER_STATE_KEEP_S = 3600


def _put_user(r: redis.Redis, user_id: str, state: UserState, gen: int, replacing: str | None) -> Any:
    ttl = get_settings().user_state_ttl_s
    key = _user_key(user_id)
    entry = {"epoch": state.epoch, "role": state.role, "disabled": state.disabled, "_g": gen,
             "exp": round(time.time() + ttl, 3)}
    return r.eval(_PUT_USER, 1, key, _sign(key, json.dumps(entry)), max(int(ttl) + 1, USER_STATE_KEEP_S),
                  state.epoch, replacing or "")


def _read_user(key: str, raw: str | None, gen: int) -> tuple[UserState | None, UserState | None]:
    """(the user's state if its entry is genuine, of this generation and fresh; the same state if it is all that
    but past its freshness -- for while PostgreSQL cannot be asked). Each distinct entry is verified once (the
    same one serves every request of the user until it changes)."""
    if raw is None:
        return None, None
    hit = _memo_verified(_user_entries, key, raw, lambda e: (
        UserState(int(e["epoch"]), str(e["role"]), bool(e["disabled"])), int(e["_g"]), float(e["exp"])))
    if hit is None or hit[1] != gen:
        return None, None
    return (hit[0], None) if hit[2] > time.time() else (None, hit[0])


def put_user(user_id: str, state: UserState, gen: int, replacing: str | None = None) -> None:
    """Cache a user's state read from PostgreSQL after a miss (never over a newer one, see _PUT_USER).
    ``replacing``: the unusable entry the request found, if any."""
    _gate.call(lambda r: _put_user(r, user_id, state, gen, replacing))


def user_changed(user_id: str, state: UserState) -> bool:
    """Put a user's new state, just committed in PostgreSQL, and flush (see _flushed): from the next request
    on, every process refuses the tokens the change ended. False when Redis could not take it: then the
    generation is bumped on this process's next contact, and every process has dropped the old state within
    ``user_state_ttl_s`` anyway (entries expire)."""

    def _write(r: redis.Redis) -> bool:
        gen = int(str(r.get(_GEN) or 0))
        _put_user(r, user_id, state, gen, None)
        return _flushed(r, True)

    if isinstance(_gate.call(_write), _Down):
        _gate.mark_missed_write()
        return False
    return True


# --- what every API request reads, answered from memory that Redis keeps exact --------------------
@dataclass
class Admission:
    """What one authenticated request needs from Redis."""

    count: int  # requests by this caller in the current rate-limit window (an estimate, see Tracker)
    revoked: bool | None  # None: Redis cannot say (restarted and not re-warmed)
    session: dict[str, Any] | None  # the cached session row, when a session was named and cached
    gen: int  # the cache generation, for put_session / put_user
    user: UserState | None = None  # the caller's state, when asked for and cached
    user_entry: str | None = None  # the caller's entry as found (for put_user when it was unusable)
    user_stale: UserState | None = None  # a genuine entry past its freshness: used only if PostgreSQL is down


_INVALIDATE_CHANNEL = "__redis__:invalidate"
_MAX_TRACKED_KEYS = 10_000
_MAX_WINDOWS = 100_000
RATE_SYNC_S = 0.1  # below half its limit, a caller's count is written to Redis at least this often ...
RATE_SYNC_REQUESTS = 20  # ... and every this many requests; from half the limit on, on every request

# KEYS: a caller's rate window. ARGV: the requests counted here since the last sync; the count this process last
# had from Redis plus those (a floor: a window Redis holds less of was lost -- a restart, a failover to a replica
# that had not caught up -- and gets back what this process knew of it); the window's lifetime in seconds.
_RATE_SYNC = """
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
local floor = tonumber(ARGV[2])
if n < floor then
  n = floor
  redis.call('SET', KEYS[1], n, 'EX', ARGV[3])
elseif n == tonumber(ARGV[1]) then  -- a new window
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
return n
"""


def _int_reply(reply: Any) -> int:
    if not isinstance(reply, int) or isinstance(reply, bool):
        raise redis.InvalidResponse(f"expected an integer reply, got {type(reply).__name__}")
    return reply


@dataclass
class _Window:
    window_s: int
    known: int = 0  # the caller's count in Redis at the last sync (every process's requests)
    pending: int = 0  # requests counted here since: not in Redis yet
    synced_at: float = float("-inf")

    def current(self, rate_key: str) -> bool:
        return rate_key.rsplit(":", 1)[1] == str(int(time.time()) // self.window_s)


class Tracker:
    """The reads every authenticated request makes -- the token's revocation, the revocation-list marker, the
    cache generation, the session's entry, the caller's token state -- answered from this process's memory,
    which Redis keeps exact.

    The data connection runs with ``CLIENT TRACKING`` (redirect mode): Redis remembers the keys it read and,
    as soon as one changes, expires or is evicted, publishes its name on ``__redis__:invalidate`` to this
    tracker's second connection. Before answering, pending invalidations are drained without blocking.
    Writers of such keys (a delete, a revoke) follow the write with a round trip (``_flushed``), after which
    Redis has sent the invalidations, so a request that follows a change -- through any process -- finds it
    already delivered. Any error on either connection -- an error reply included -- closes both and clears
    the memory: nothing is ever answered that Redis could not have invalidated, and no reply left unread on a
    connection is ever read as another request's. (A round trip on every request was ~30% of a whole
    request's CPU on the 2-core machines, mostly the wake-ups of two processes: bench/bench_gateway.py; redis-py's
    own client-side caching refuses Redis before 7.4 and Unix sockets, and its cache hit costs ~5x this one.)

    Rate limiting is counted here. Below half its limit a caller's count is written to Redis (``_RATE_SYNC``)
    at least every ``RATE_SYNC_S`` seconds and every ``RATE_SYNC_REQUESTS`` requests; from half the limit on,
    on every request. So the limit holds exactly while fewer than limit / (2 x RATE_SYNC_REQUESTS) processes
    serve one caller at once (30 at the default 1,200 a minute). A process that is frozen or killed loses at
    most one unsynced batch of counts. While Redis is down the requests a process admits are counted here
    (``count_here``) and written to Redis when it returns (``write_back``), before anything else is counted.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: redis.Connection | None = None
        self._sub: redis.Connection | None = None
        self._values: dict[str, str | None] = {}
        self._windows: dict[str, _Window] = {}

    def drop(self, counts: bool = False) -> None:
        """Forget the connections and everything read through them (``counts``: the rate counts too)."""
        with self._lock:
            self._close()
            if counts:
                self._windows.clear()

    def _close(self) -> None:
        for conn in (self._data, self._sub):
            if conn is not None:
                conn.disconnect()  # type: ignore[no-untyped-call]
        self._data = self._sub = None
        self._values.clear()

    def _current(self, client: redis.Redis) -> redis.Connection:
        """The data connection, with every invalidation Redis has sent applied. When either connection was
        closed (Redis restarted, a client timeout, CLIENT KILL), Redis stopped tracking for us: start over with
        new connections and an empty memory."""
        if self._data is not None and self._sub is not None:
            try:
                if self._data.can_read(0):  # nothing ever arrives on it unasked: only a close or an error
                    raise redis.ConnectionError("tracking connection closed by the server")
                self._drain(self._sub)
                return self._data
            except redis.ConnectionError:
                self._close()
        return self._connect(client)

    def _connect(self, client: redis.Redis) -> redis.Connection:
        pool = client.connection_pool
        # RESP2: in redirect mode invalidations then arrive as ordinary pub/sub replies on our own connection
        # (under RESP3 they are push messages, which the client library consumes itself)
        kwargs = {**pool.connection_kwargs, "protocol": 2}
        sub: redis.Connection = pool.connection_class(**kwargs)
        data: redis.Connection = pool.connection_class(**kwargs)
        try:
            sub.send_command("CLIENT", "ID")  # type: ignore[no-untyped-call]
            sub_id = sub.read_response()
            sub.send_command("SUBSCRIBE", _INVALIDATE_CHANNEL)  # type: ignore[no-untyped-call]
            sub.read_response()
            data.send_command("CLIENT", "TRACKING", "ON", "REDIRECT", sub_id)  # type: ignore[no-untyped-call]
            data.read_response()
        except BaseException:
            sub.disconnect()  # type: ignore[no-untyped-call]
            data.disconnect()  # type: ignore[no-untyped-call]
            raise
        self._values.clear()
        self._sub, self._data = sub, data
        return data

    def _drain(self, sub: redis.Connection) -> None:
        while sub.can_read(0):
            msg = sub.read_response()
            if isinstance(msg, list) and len(msg) == 3 and msg[0] == "message":
                if msg[2] is None:  # FLUSHDB / FLUSHALL
                    self._values.clear()
                else:
                    for key in msg[2]:
                        self._values.pop(key, None)

    def _window(self, rate_key: str, window_s: int) -> _Window:
        w = self._windows.get(rate_key)
        if w is None:  # a new window: the previous ones are over
            window = rate_key.rsplit(":", 1)[1]
            for k in [k for k in self._windows if not k.endswith(":" + window)]:
                del self._windows[k]
            if len(self._windows) >= _MAX_WINDOWS:  # only what Redis already has can be forgotten
                for k in [k for k, v in self._windows.items() if not v.pending]:
                    del self._windows[k]
            w = self._windows[rate_key] = _Window(window_s)
        return w

    def admit(self, client: redis.Redis, rate_key: str, window_s: int, limit: int,
              keys: list[str]) -> tuple[int, list[str | None]]:
        """(the caller's request count in this window, the values of ``keys``). Raises whatever Redis did; then
        the request is not counted here (the caller's fallback counts it: ``count_here``)."""
        with self._lock:
            w = self._window(rate_key, window_s)
            w.pending += 1
            counted = False
            try:
                data = self._current(client)
                now = time.monotonic()
                sync = (w.pending >= RATE_SYNC_REQUESTS or now - w.synced_at >= RATE_SYNC_S
                        or 2 * (w.known + w.pending) > limit)
                missing = [k for k in keys if k not in self._values]
                commands: list[tuple[Any, ...]] = []
                sent = w.pending
                if sync:
                    commands.append(("EVAL", _RATE_SYNC, 1, rate_key, sent, w.known + sent, window_s + 1))
                if missing:
                    commands.append(("MGET", *missing))
                if commands:  # one round trip for all of it; every reply is read, or the connection closed
                    data.send_packed_command(data.pack_commands(commands))  # type: ignore[no-untyped-call]
                    if sync:
                        w.known, w.pending, w.synced_at = _int_reply(data.read_response()), w.pending - sent, now
                        counted = True
                    if missing:
                        values = data.read_response()
                        if not isinstance(values, list) or len(values) != len(missing):
                            raise redis.InvalidResponse("MGET answered with something else")
                        if len(self._values) + len(missing) > _MAX_TRACKED_KEYS:
                            self._values.clear()
                        self._values.update(zip(missing, values, strict=True))
                return w.known + w.pending, [self._values.get(k) for k in keys]
            except BaseException:
                if not counted:
                    w.pending -= 1
                self._close()  # an error reply or a failure half-way: what is left unread is never read
                raise

    def count(self, client: redis.Redis, rate_key: str, window_s: int) -> int:
        """Count one request under ``rate_key`` in Redis now (the edge limits: every request goes to Redis);
        returns every process's count in the window. Raises whatever Redis did; then the request is not
        counted here."""
        with self._lock:
            w = self._window(rate_key, window_s)
            sent, w.pending = w.pending + 1, 0
            floor = w.known + sent
        try:
            n = _int_reply(client.eval(_RATE_SYNC, 1, rate_key, sent, floor, window_s + 1))
        except BaseException:
            with self._lock:
                w.pending += sent - 1
            raise
        with self._lock:
            w.known, w.synced_at = max(w.known, n), time.monotonic()
        return n

    def count_here(self, rate_key: str, window_s: int) -> tuple[int, int]:
        """While Redis is down: count one request under ``rate_key`` in this process. Returns (the count Redis
        last gave this process for the window, this process's requests since)."""
        with self._lock:
            w = self._window(rate_key, window_s)
            w.pending += 1
            return w.known, w.pending

    def write_back(self, client: redis.Redis) -> None:
        """When Redis is back: put the requests counted here meanwhile into their windows (and, in a window
        Redis lost, what this process knew of it), all in one round trip."""
        with self._lock:
            due = [(k, w, w.pending) for k, w in self._windows.items() if w.pending and w.current(k)]
            if not due:
                return
            pipe = client.pipeline(transaction=False)
            for k, w, sent in due:
                pipe.eval(_RATE_SYNC, 1, k, sent, w.known + sent, w.window_s + 1)
            replies = pipe.execute()
            now = time.monotonic()
            for (_, w, sent), n in zip(due, replies, strict=True):
                w.known, w.pending, w.synced_at = _int_reply(n), w.pending - sent, now


_tracker = Tracker()


def admit(caller_key: str, jti: str, session_id: str | None, limit: int | None = None,
          window_s: int = 60, user_id: str | None = None) -> Admission | _Down:
    """Count the request for rate limiting (against ``limit``, default the setting), look up the token's
    revocation, the session's cache entry and (``user_id``) the user's token state. DOWN: Redis failed; the
    request is not counted (``rate_count_while_down`` does that)."""
    rate_key = f"rl:{caller_key}:{int(time.time()) // window_s}"
    keys = [f"revoked:{jti}", _REVOCATIONS_LOADED, _GEN]
    if session_id:
        keys.append(f"session:{session_id}")
    if user_id:
        keys.append(_user_key(user_id))
    lim = get_settings().rate_limit_per_minute if limit is None else limit
    res = _gate.call(lambda r: _tracker.admit(r, rate_key, window_s, lim, keys))
    if isinstance(res, _Down):
        return DOWN
    count, (revoked_hit, loaded, gen_raw, *rest) = res
    gen = int(gen_raw or 0)
    revoked = True if revoked_hit is not None else (False if loaded is not None else None)
    session_raw = rest.pop(0) if session_id else None
    session = _read_session(f"session:{session_id}", session_raw, gen) if session_raw is not None else None
    if not user_id:
        return Admission(count, revoked, session, gen)
    user_raw = rest[0]
    fresh, stale = _read_user(_user_key(user_id), user_raw, gen)
    return Admission(count, revoked, session, gen, fresh, user_raw, stale)


def token_state(jti: str, user_id: str) -> Admission | _Down:
    """What the authorizer checks, in one round trip: the token's revocation and its user's state (``count``
    is 0: the authorizer does not count requests)."""
    key = _user_key(user_id)
    res = _gate.call(lambda r: r.mget(f"revoked:{jti}", _REVOCATIONS_LOADED, _GEN, key))
    if isinstance(res, _Down):
        return DOWN
    revoked_hit, loaded, gen_raw, user_raw = (None if v is None else str(v) for v in res)
    gen = int(gen_raw or 0)
    revoked = True if revoked_hit is not None else (False if loaded is not None else None)
    fresh, stale = _read_user(key, user_raw, gen)
    return Admission(0, revoked, None, gen, fresh, user_raw, stale)


# --- rate limits while Redis is down ---------------------------------------------------------------
# Each process counts the requests it admits and, from the count Redis last gave it for the window, estimates
# every process's: that count plus N x its own requests since, N being ``rate_limit_processes`` (the processes
# expected to serve one caller at once). So while Redis is down the processes together admit at most what was
# left of the limit (a process that had not served the caller yet: at most limit / N). When Redis is back each
# process adds its requests to the window -- and, where Redis lost the window (a restart), restores what it
# knew of it -- before anything else is counted. Across an outage a caller thus gets at most twice its limit in
# a window (its limit before the outage, and at most its limit during and after it), while no more than N
# processes serve it; with Redis's data kept (a pause, error replies) about its limit.
def _rate_key(key: str, window_s: int) -> str:
    return f"rl:{key}:{int(time.time()) // window_s}"


def local_rate_count(key: str, window_s: int = 60) -> int:
    """While Redis is down: count one request of ``key`` in this process (Redis gets it when it returns);
    returns this process's requests of it that Redis has not seen."""
    return _tracker.count_here(_rate_key(key, window_s), window_s)[1]


def rate_count_while_down(key: str, window_s: int = 60) -> int:
    """While Redis is down: count one request of ``key`` in this process; returns the estimate of every
    process's count in the window that the limit is held to (see above)."""
    known, here = _tracker.count_here(_rate_key(key, window_s), window_s)
    return known + get_settings().resolved_rate_limit_processes * here


# --- edge counters: requests per source address, failures with growing lockouts (services/throttle.py) -----
def count_request(key: str, window_s: int = 60) -> int:
    """Count one request under ``key`` in the current fixed window of ``window_s`` seconds and return the count
    so far: every process's, from Redis (one round trip); while Redis is down, the estimate of
    ``rate_count_while_down``."""
    rkey = _rate_key(key, window_s)
    res = _gate.call(lambda r: _tracker.count(r, rkey, window_s))
    return rate_count_while_down(key, window_s) if isinstance(res, _Down) else res


# KEYS: the failure count, the lockout. ARGV: free failures, base and longest lockout (ms), window (ms). The count
# lives for the window after the last failure (plus the lockout it started); from the (free+1)th failure on each
# one locks the key out for base, 2 x base, 4 x base ... at most the longest.
_RECORD_FAILURE = """
local n = redis.call('INCR', KEYS[1])
local free, base, cap, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local lock = 0
if n > free then
  lock = math.max(1, math.floor(math.min(cap, base * 2 ^ math.min(n - free - 1, 62))))
  redis.call('SET', KEYS[2], n, 'PX', lock)
end
redis.call('PEXPIRE', KEYS[1], window + lock)
return {n, lock}
"""
_MAX_LOCAL_FAILURES = 100_000


def lockout_s(failures: int, free: int, base_s: float, max_s: float) -> float:
    """The lockout the ``failures``-th failure starts (0: still free)."""
    return 0.0 if failures <= free else min(max_s, base_s * 2.0 ** min(failures - free - 1, 62))


def _failure_keys(key: str) -> tuple[str, str]:
    return f"lf:{{{key}}}", f"lf:{{{key}}}:lock"  # one hash slot for both


class _LocalFailures:
    """Failure counts and lockouts in this process while Redis is down: the rule of _RECORD_FAILURE."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, list[float]] = {}  # key -> [failures, forget at, locked until] (monotonic)

    def remaining(self, keys: list[str]) -> float:
        now = time.monotonic()
        with self._lock:
            return max([0.0, *(e[2] - now for k in keys if (e := self._entries.get(k)) is not None)])

    def record(self, key: str, free: int, base_s: float, max_s: float, window_s: float) -> tuple[int, float]:
        now = time.monotonic()
        with self._lock:
            e = self._entries.get(key)
            if e is None or e[1] <= now:
                if len(self._entries) >= _MAX_LOCAL_FAILURES:
                    for k in [k for k, v in self._entries.items() if v[1] <= now]:
                        del self._entries[k]
                    if len(self._entries) >= _MAX_LOCAL_FAILURES:
                        self._entries.clear()
                e = self._entries[key] = [0, 0.0, 0.0]
            e[0] += 1
            n = int(e[0])
            lock = lockout_s(n, free, base_s, max_s)
            if lock:
                e[2] = now + lock
            e[1] = now + window_s + lock
            return n, lock

    def clear(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)


_local_failures = _LocalFailures()


def lockout_remaining(keys: list[str]) -> float:
    """Seconds until none of ``keys`` is locked out any more (0: none is). One round trip."""

    def _pttls(r: redis.Redis) -> list[int]:
        pipe = r.pipeline(transaction=False)
        for k in keys:
            pipe.pttl(_failure_keys(k)[1])
        return [int(x) for x in pipe.execute()]

    res = _gate.call(_pttls)
    if isinstance(res, _Down):
        return _local_failures.remaining(keys)
    return max([0, *res]) / 1000  # -2: no lockout


def record_failures(keys: list[tuple[str, int]], base_s: float, max_s: float,
                    window_s: float) -> list[tuple[int, float]]:
    """Count a failure under each ``(key, free failures)`` (atomically, one round trip); per key, the failures
    in its window so far and the lockout in seconds this one started (0: none)."""

    def _record(r: redis.Redis) -> list[tuple[int, float]]:
        pipe = r.pipeline(transaction=False)
        for key, free in keys:
            pipe.eval(_RECORD_FAILURE, 2, *_failure_keys(key), free, int(base_s * 1000), int(max_s * 1000),
                      int(window_s * 1000))
        return [(int(n), int(lock) / 1000) for n, lock in pipe.execute()]

    res = _gate.call(_record)
    if isinstance(res, _Down):
        return [_local_failures.record(key, free, base_s, max_s, window_s) for key, free in keys]
    return res


def clear_failures(key: str) -> None:
    """Forget ``key``'s failures and lockout (a successful login clears its username's)."""
    _local_failures.clear(key)
    _gate.call(lambda r: r.delete(*_failure_keys(key)))


# --- scheduled maintenance (services/maintenance.py) ---------------------------------------------------------
def invalidate_sessions(session_ids: list[str]) -> None:
    """``invalidate_session`` for many sessions: one DEL and one flushing round trip for all of them (cleanup
    ends sessions by the thousand; one round trip pair each cost ~0.2 ms x 2 x 10,000)."""
    if not session_ids:
        return
    keys = [f"session:{sid}" for sid in session_ids]
    if isinstance(_gate.call(lambda r: _flushed(r, r.delete(*keys))), _Down):
        _gate.mark_missed_write()


def cached_session_ids() -> list[str] | None:
    """The ids of the sessions cached in Redis (SCAN, never KEYS: Redis keeps serving meanwhile); None when
    Redis is down."""
    res = _gate.call(lambda r: [k.decode() if isinstance(k, bytes) else str(k)
                                for k in r.scan_iter(match="session:*", count=1000)])
    return None if isinstance(res, _Down) else [k.split(":", 1)[1] for k in res]
