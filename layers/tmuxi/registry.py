"""The host registry: tmux hosts heartbeat here with their free capacity; the API resolves a session's host
from it. PostgreSQL is the record. Host addresses come from it alone (cached in-process for a few seconds), never
from Redis, which a compromised client could write."""
from __future__ import annotations

import time
from datetime import UTC, datetime
from uuid import UUID

from tmuxi import cache
from tmuxi.db import repo
from tmuxi.errors import AppError, HostUnavailable
from tmuxi.host_client import HostInfo
from tmuxi.observability import POSTGRES_UP, logger
from tmuxi.settings import get_settings

_url_cache: dict[str, tuple[str, float]] = {}
_URL_TTL_S = 5.0
_reported_extra: dict[str, dict[int, int]] = {}


def heartbeat(info: HostInfo) -> None:
    """Record a host as alive, with the sessions its users made from a shell (they count against the quota).
    Never raises: a heartbeat that fails is logged and retried next interval."""
    try:
        repo.upsert_host(info.host_id, info.url, info.capacity, info.active_sessions,
                         datetime.fromtimestamp(info.started_at, UTC))
        if _reported_extra.get(info.host_id) != info.extra_sessions:
            repo.set_extra_sessions(info.host_id, info.extra_sessions)
            _reported_extra[info.host_id] = dict(info.extra_sessions)
    except AppError as exc:
        POSTGRES_UP.labels(component="host").set(0)  # the host's view of its dependency (DatabaseDown)
        logger.warning("heartbeat not recorded in PostgreSQL", extra={"host_id": info.host_id, "error": exc.message})
    else:
        POSTGRES_UP.labels(component="host").set(1)


def sessions_ended(host_id: str, ended: dict[UUID, tuple[str, str]]) -> None:
    """Called by a host with sessions that ended there on their own: ``{session id: (state, reason)}``, state
    ``exited`` (its shell exited) or ``lost`` (its tmux server died). Only sessions placed on that host are
    changed; sessions already ended (deleted meanwhile) are left as they are. Raises if the record cannot be
    written (the host keeps the report and sends it again)."""
    for sid, (state, reason) in ended.items():
        if state not in ("exited", "lost"):
            continue
        if repo.end_session(sid, None, state, reason[:200], host_id=host_id) is not None:
            cache.invalidate_session(str(sid))


def host_stopped(host_id: str) -> None:
    """Called by a host stopping on purpose (SIGTERM). Never raises."""
    try:
        repo.mark_host_stopped(host_id)
    except AppError as exc:
        logger.warning("host stop not recorded", extra={"host_id": host_id, "error": exc.message})


def host_draining(host_id: str) -> None:
    """Called by a host told to go (SIGTERM on ECS) before it drains: new sessions are placed elsewhere. Raises if
    the record cannot be written (the host retries while it drains)."""
    repo.mark_host_draining(host_id)


def host_alive(host_id: str) -> bool:
    """The host heartbeated within the dead-after window (read from PostgreSQL; True if it cannot be read: only
    a known-dead host's sessions are declared lost)."""
    try:
        row = repo.get_host(host_id)
    except AppError:
        return True
    if row is None:
        return False
    age: float = (datetime.now(UTC) - row["last_heartbeat"]).total_seconds()
    return age < get_settings().host_dead_after_s


def confirm_sessions(host_id: str, present: set[tuple[UUID, int]]) -> set[UUID]:
    """Called by a host from time to time with the ``(session id, account)`` pairs it holds: those the record
    has holding a tmux session on this host for that account. The host kills the rest (a create rolled back or
    moved to another host, a delete whose kill did not reach it)."""
    return repo.confirmed_on_host(host_id, present)


def host_url(host_id: str) -> str:
    """The URL of a host, from PostgreSQL (cached in this process for a few seconds)."""
    hit = _url_cache.get(host_id)
    now = time.monotonic()
    if hit is not None and hit[1] > now:
        return hit[0]
    row = repo.get_host(host_id)
    if row is None:
        raise HostUnavailable("the session's tmux host is not registered")
    url = str(row["url"])
    _url_cache[host_id] = (url, now + _URL_TTL_S)
    return url


def reconcile_host(host_id: str, present: set[tuple[UUID, int]]) -> dict[UUID, int]:
    """Called by a host on start with the ``(session id, account)`` pairs it found in tmux. Returns the sessions
    to adopt, each with the account whose server must hold it: live in the record, placed on this host, and found
    on its owner's server (a session of that name on any other account's server is a forgery). Sessions the record
    has live on this host that are not found so are marked lost."""
    live = repo.live_sessions_for_host(host_id)
    adopt = {sid: acct for sid, acct in present if live.get(sid) == acct}
    for sid in set(live) - set(adopt):
        repo.end_session(sid, None, "lost", "its tmux session was not found when its host started", host_id=host_id)
        cache.invalidate_session(str(sid))
    unknown = {sid for sid, _ in present} - set(adopt)
    if unknown:
        # a session being created right now is 'creating' and so live: never unknown here
        logger.info("tmux sessions not confirmed by the record", extra={"host_id": host_id, "count": len(unknown)})
    return adopt


def connection_target(connection_id: str) -> tuple[str, str] | None:
    """(host id, host URL) of the host holding a WebSocket connection's viewer -- where the tmux hosts forward the
    connection's `$default` messages (input, resize) -- from PostgreSQL. None: the connection is unknown or not
    attached. Not cached: an attach may move a connection to another host at any moment."""
    row = repo.ws_connection_target(connection_id)
    return (str(row["host_id"]), str(row["url"])) if row is not None else None


def sessions_active(host_id: str, session_ids: set[UUID]) -> None:
    """Called by a host with its sessions that had input or viewers since its last heartbeat (activity over
    WebSocket the API does not see): their last_active_at is bumped, so idle cleanup leaves them. Raises if the
    record cannot be written (the host sends them again)."""
    repo.touch_sessions(host_id, sorted(session_ids))
