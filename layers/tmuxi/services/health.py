"""The system's health: PostgreSQL (critical), Redis (degraded when down), tmux hosts."""
from __future__ import annotations

from tmuxi import __version__, cache
from tmuxi.db import repo
from tmuxi.errors import AppError
from tmuxi.models import HealthResponse
from tmuxi.settings import get_settings


def health() -> HealthResponse:
    checks: dict[str, str] = {}
    try:
        hosts = repo.live_hosts(get_settings().host_dead_after_s)  # answers for PostgreSQL too
        checks["postgres"] = "ok"
        checks["hosts"] = f"{len(hosts)} live" if hosts else "none live"
    except AppError:
        checks["postgres"] = "down"
        checks["hosts"] = "unknown"
    checks["redis"] = "ok" if cache.available() else "down"
    if checks["postgres"] == "down" or checks["hosts"] == "none live":
        status = "down"
    elif checks["redis"] != "ok":
        status = "degraded"
    else:
        status = "ok"
    return HealthResponse(status=status, checks=checks, version=__version__)
