"""Abuse limits, checked before any expensive work.

* Failed logins, per username and per source address: the first ``login_free_failures`` (per address
  ``login_source_free_failures``) within ``login_failure_window_s`` are free; each further failure locks that
  username (address) out for ``login_lockout_base_s``, doubling with every failure up to ``login_lockout_max_s``.
  While locked out every login of it is refused with 429 and ``Retry-After`` -- the right password too, before
  the user is looked up or any password is hashed. A successful login clears its username's count (never the
  address's: one account of one's own must not reset an address that guesses others').
* Unauthenticated routes (``/health``, ``/auth/health``, ``/openapi.json``, ``/docs``, ``POST /auth/token``):
  ``public_rate_limit_per_minute`` requests per source address per minute.

The source address is API Gateway's ``requestContext.identity.sourceIp``. Counters are in Redis (atomic,
expiring); while Redis is down, in this process (``cache.py``).
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any

from tmuxi import cache
from tmuxi.errors import RateLimited
from tmuxi.observability import AUTH_FAILURES, logger
from tmuxi.settings import get_settings

_WINDOW_S = 60
_MAX_OVER = 10_000
_over: dict[str, int] = {}  # source address -> the window this process knows it is over the limit in


def source_ip(event: Any) -> str | None:
    """The caller's address as API Gateway saw it (``requestContext.identity.sourceIp``), if the event has it."""
    if not isinstance(event, dict):
        return None
    identity = (event.get("requestContext") or {}).get("identity")
    ip = identity.get("sourceIp") if isinstance(identity, dict) else None
    return ip if isinstance(ip, str) and ip else None


# --- unauthenticated routes ----------------------------------------------------------------------------------
def public_request(source: str | None) -> RateLimited | None:
    """Count a request to an unauthenticated route; returns the error to answer with when its source address is
    over the limit. Once over, this process answers the rest of the minute without asking Redis."""
    if not source:
        return None
    limit = get_settings().public_rate_limit_per_minute
    now = time.time()
    window = int(now) // _WINDOW_S
    if _over.get(source) != window:
        if cache.count_request(f"src:{source}", _WINDOW_S) <= limit:
            return None
        if len(_over) >= _MAX_OVER:
            _over.clear()
        _over[source] = window
    return RateLimited(
        f"more than {limit} requests a minute from this address to routes without a token; retry after the "
        "time given in Retry-After", limit_per_minute=limit,
        retry_after_s=max(1, math.ceil(_WINDOW_S - now % _WINDOW_S)),
    )


# --- logins --------------------------------------------------------------------------------------------------
def _user_key(username: str) -> str:
    return "login:u:" + hashlib.sha256(username.encode()).hexdigest()[:32]


def _source_key(source: str) -> str:
    return "login:s:" + source


def _keys(username: str, source: str | None) -> list[str]:
    return [_user_key(username)] + ([_source_key(source)] if source else [])


def check_login(username: str, source: str | None) -> None:
    """Raise RateLimited (429, Retry-After) while the username or the source address is locked out."""
    wait = cache.lockout_remaining(_keys(username, source))
    if wait > 0:
        AUTH_FAILURES.labels(reason="login_locked_out").inc()
        raise RateLimited("too many failed logins for this username or from this address; retry after the time "
                          "given in Retry-After", retry_after_s=max(1, math.ceil(wait)))


@dataclass(frozen=True, slots=True)
class LoginFailure:
    failures: int  # the username's failures in its window, this one included
    source_failures: int  # the address's (0: no address known)
    locked_for_s: float  # the lockout this failure started, of the username or the address (0: none)

    @property
    def audited(self) -> bool:
        """Failed logins are audited at thresholds only, each row carrying the counts so far: a username's first
        failure in its window, and each failure that starts a lockout. A guessing run thus writes one row, then
        one per lockout -- ever longer apart -- however fast it guesses."""
        return self.failures == 1 or self.locked_for_s > 0

    def audit_detail(self, username: str, source: str | None) -> dict[str, Any]:
        return {"username": username[:64], "source_ip": source, "failures": self.failures,
                "source_failures": self.source_failures, "locked_for_s": self.locked_for_s}


def login_failed(username: str, source: str | None) -> LoginFailure:
    s = get_settings()
    frees = [s.login_free_failures, s.login_source_free_failures]
    counts = cache.record_failures(list(zip(_keys(username, source), frees, strict=False)),
                                   s.login_lockout_base_s, s.login_lockout_max_s, s.login_failure_window_s)
    (failures, user_lock), (source_failures, source_lock) = counts[0], (counts[1] if source else (0, 0.0))
    out = LoginFailure(failures, source_failures, max(user_lock, source_lock))
    if out.locked_for_s:
        logger.warning("logins locked out after failures", extra={
            "source_ip": source, "failures": failures, "source_failures": source_failures,
            "locked_for_s": out.locked_for_s, "by": "username" if user_lock >= source_lock else "source"})
    return out


def login_succeeded(username: str) -> None:
    cache.clear_failures(_user_key(username))
