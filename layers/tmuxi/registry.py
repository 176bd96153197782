"""The host registry: tmux hosts heartbeat here with their free capacity; the API resolves a session's host
from it. PostgreSQL holds the record (``hosts``), Redis a hot copy with a TTL."""
from __future__ import annotations

import time
from datetime import UTC, datetime
from uuid import UUID

from tmuxi import cache
from tmuxi.db import repo
from tmuxi.errors import AppError, HostUnavailable
from tmuxi.host_client import HostInfo
from tmuxi.observability import logger
from tmuxi.settings import get_settings

_url_cache: dict[str, tuple[str, float]] = {}
_URL_TTL_S = 5.0


def heartbeat(info: HostInfo) -> None:
    """Record a host as alive. Never raises: a heartbeat that fails is logged and retried next interval."""
    s = get_settings()
    try:
        repo.upsert_host(info.host_id, info.url, info.capacity, info.active_sessions,
                         datetime.fromtimestamp(info.started_at, UTC))
    except AppError as exc:
        logger.warning("heartbeat not recorded in PostgreSQL", extra={"host_id": info.host_id, "error": exc.message})
    cache.put_host(info.host_id, {"url": info.url, "capacity": info.capacity, "active": info.active_sessions,
                                  "ts": time.time()}, ttl_s=int(s.host_dead_after_s))


def sessions_exited(host_id: str, session_ids: set[UUID]) -> None:
    """Called by a host when sessions' shells exited (``exit`` typed, or a command ended the shell): they are
    over. Sessions already ended (deleted meanwhile) are left as they are."""
    for sid in session_ids:
        if repo.end_session(sid, None, "exited", f"its shell exited (host {host_id})") is not None:
            cache.invalidate_session(str(sid))


def host_url(host_id: str) -> str:
    """The URL of a host (in-process cache, then Redis, then PostgreSQL)."""
    hit = _url_cache.get(host_id)
    now = time.monotonic()
    if hit is not None and hit[1] > now:
        return hit[0]
    data = cache.get_host(host_id)
    url: str | None = data["url"] if isinstance(data, dict) else None
    if url is None:
        row = repo.get_host(host_id)
        if row is None:
            raise HostUnavailable(f"tmux host {host_id!r} is not registered")
        url = str(row["url"])
    _url_cache[host_id] = (url, now + _URL_TTL_S)
    return url


def reconcile_host(host_id: str, present: set[UUID]) -> set[UUID]:
    """Called by a host on start with the sessions it found in tmux. Sessions the database thinks are live on
    this host but that tmux no longer has are marked lost; returns tmux sessions the database does not know as
    live (orphans) for the host to kill."""
    live = repo.live_session_ids_for_host(host_id)
    for sid in live - present:
        repo.end_session(sid, None, "lost", "tmux session not found when the host started")
        cache.invalidate_session(str(sid))
    orphans = present - live
    if orphans:
        # a session being created right now is 'creating' and so live: never an orphan here
        logger.info("orphan tmux sessions found", extra={"host_id": host_id, "count": len(orphans)})
    return orphans
