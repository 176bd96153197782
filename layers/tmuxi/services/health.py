"""The system's health: PostgreSQL (critical), Redis (degraded when down), tmux hosts (down when none is live,
degraded while one has recently stopped heartbeating: it is dead, and its sessions are lost).

Cheap to ask repeatedly: the PostgreSQL query is made at most once per ``_DB_CHECK_TTL_S`` in a process (callers
meanwhile, concurrent ones included, share its answer); Redis is asked each time (a ping, or nothing while it is
known to be down), so its state shows at once."""
from __future__ import annotations

import threading
import time

from tmuxi import __version__, cache
from tmuxi.db import repo
from tmuxi.errors import AppError
from tmuxi.models import HealthResponse
from tmuxi.observability import POSTGRES_UP, REDIS_UP
from tmuxi.settings import get_settings

_DB_CHECK_TTL_S = 1.0
# A host that stopped heartbeating is reported dead (and the system degraded) for this long; then forgotten.
DEAD_HOSTS_SHOWN_S = 600.0
_db_lock = threading.Lock()
_db_checks: tuple[float, dict[str, str]] = (float("-inf"), {})  # (good until, monotonic; checks)


def _database_checks() -> dict[str, str]:
    global _db_checks
    if _db_checks[0] > time.monotonic():
        return _db_checks[1]
    with _db_lock:
        if _db_checks[0] > time.monotonic():  # another caller just asked
            return _db_checks[1]
        try:
            live, dead = repo.host_counts(get_settings().host_dead_after_s, DEAD_HOSTS_SHOWN_S)  # PostgreSQL too
            checks = {"postgres": "ok", "hosts": (f"{live} live" if live else "none live")
                      + (f", {dead} dead" if dead else "")}
        except AppError:
            checks = {"postgres": "down", "hosts": "unknown"}
        _db_checks = (time.monotonic() + _DB_CHECK_TTL_S, checks)
        return checks


def health(component: str = "api") -> HealthResponse:
    """``component``: who asks (the label of postgres_up / redis_up, which this sets: the Prometheus alert rules'
    DatabaseDown and RedisDown)."""
    checks = dict(_database_checks())
    checks["redis"] = "ok" if cache.available() else "down"
    POSTGRES_UP.labels(component=component).set(checks["postgres"] == "ok")
    REDIS_UP.labels(component=component).set(checks["redis"] == "ok")
    if checks["postgres"] == "down" or checks["hosts"].startswith("none live"):
        status = "down"
    elif checks["redis"] != "ok" or checks["hosts"].endswith(" dead"):
        status = "degraded"
    else:
        status = "ok"
    return HealthResponse(status=status, checks=checks, version=__version__)
