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
from tmuxi.observability import logger

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
        logger.warning("heartbeat not recorded in PostgreSQL", extra={"host_id": info.host_id, "error": exc.message})


def sessions_exited(host_id: str, session_ids: set[UUID]) -> None:
    """Called by a host when sessions' shells exited (``exit`` typed, or a command ended the shell): they are
    over. Sessions already ended (deleted meanwhile) are left as they are."""
    for sid in session_ids:
        if repo.end_session(sid, None, "exited", f"its shell exited (host {host_id})") is not None:
            cache.invalidate_session(str(sid))


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
        repo.end_session(sid, None, "lost", "tmux session not found when the host started")
        cache.invalidate_session(str(sid))
    unknown = {sid for sid, _ in present} - set(adopt)
    if unknown:
        # a session being created right now is 'creating' and so live: never unknown here
        logger.info("tmux sessions not confirmed by the record", extra={"host_id": host_id, "count": len(unknown)})
    return adopt
