"""Login, token checks (signature, claims, revocation) and revocation."""
from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from tmuxi import auth, cache
from tmuxi.db import repo
from tmuxi.errors import RateLimited, Unauthorized
from tmuxi.models import Principal, TokenRequest, TokenResponse, ValidateResponse
from tmuxi.observability import AUTH_FAILURES
from tmuxi.settings import get_settings

_LEEWAY_S = 5


def login(body: TokenRequest) -> TokenResponse:
    user = repo.get_user_by_username(body.username)
    ok = auth.verify_password(body.password, user["password_hash"] if user else None)
    if user is None or not ok or user["disabled"]:
        AUTH_FAILURES.labels(reason="login").inc()
        repo.audit(user["id"] if user else None, "auth.token", None, "denied", {"username": body.username[:64]})
        raise Unauthorized("wrong username or password")
    token, ttl = auth.issue_token(user["id"], user["username"], user["role"])
    repo.audit(user["id"], "auth.token", None, "ok")
    return TokenResponse(access_token=token, expires_in=ttl)


def _revoked(jti: str, known: bool | None) -> bool:
    """Is the token revoked? ``known`` is Redis's answer (None: it cannot say); PostgreSQL, the record, answers
    otherwise."""
    if known is not None:
        return known
    revoked = repo.is_token_revoked(jti)
    if cache.available():  # Redis is up but lost its list (restart, flush): re-warm it from PostgreSQL
        now = time.time()
        cache.load_revocations(
            [(r["jti"], int(r["expires_at"].timestamp() - now)) for r in repo.unexpired_revocations()]
        )
    return revoked


def authorize(token: str) -> Principal:
    try:
        claims = auth.decode_token(token)
    except Unauthorized as exc:
        AUTH_FAILURES.labels(reason=str(exc.details.get("reason", "invalid"))).inc()
        raise
    if _revoked(claims["jti"], cache.is_revoked(claims["jti"])):
        AUTH_FAILURES.labels(reason="revoked").inc()
        raise Unauthorized("token revoked", reason="revoked")
    return Principal(user_id=UUID(claims["sub"]), username=claims["name"], role=claims["role"],
                     jti=claims["jti"], exp=int(claims["exp"]))


def admit(p: Principal, session_id: UUID | None = None) -> cache.Admission | None:
    """The checks every authenticated request passes, whether or not the gateway cached the authorizer's
    answer: token not expired, not revoked, caller under the rate limit; the same call brings the named
    session's cache entry (``cache.admit``: usually from memory kept exact by Redis, no round trip). Returns
    None when Redis is down (then PostgreSQL answers)."""
    if p.exp < time.time() - _LEEWAY_S:
        AUTH_FAILURES.labels(reason="expired").inc()
        raise Unauthorized("token expired", reason="expired")
    key = f"user:{p.user_id}"
    limit = get_settings().rate_limit_per_minute
    res = cache.admit(key, p.jti, str(session_id) if session_id else None, limit)
    adm = res if isinstance(res, cache.Admission) else None
    if adm is not None:
        count, known = adm.count, adm.revoked
    else:
        count, known = cache.local_rate_count(key), None
    if count > limit:
        raise RateLimited(f"more than {limit} requests in a minute; slow down", limit_per_minute=limit,
                          retry_after_s=round(60 - time.time() % 60, 1))
    if _revoked(p.jti, known):
        AUTH_FAILURES.labels(reason="revoked").inc()
        raise Unauthorized("token revoked", reason="revoked")
    return adm


def revoke(principal: Principal) -> None:
    admit(principal)
    repo.revoke_token(principal.jti, principal.user_id, datetime.fromtimestamp(principal.exp, UTC))
    cache.mark_revoked(principal.jti, principal.exp - int(time.time()) + 5)


def validate(principal: Principal) -> ValidateResponse:
    admit(principal)
    return ValidateResponse(user_id=principal.user_id, username=principal.username, role=principal.role,
                            expires_at=datetime.fromtimestamp(principal.exp, UTC))


def principal_to_context(p: Principal) -> dict[str, str]:
    return {"user_id": str(p.user_id), "username": p.username, "role": p.role, "jti": p.jti, "exp": str(p.exp)}


def principal_from_context(ctx: dict[str, Any] | None) -> Principal:
    if not ctx or "user_id" not in ctx:
        raise Unauthorized("no authorizer context: the request did not pass the authorizer")
    try:
        return Principal(user_id=UUID(str(ctx["user_id"])), username=str(ctx["username"]), role=ctx["role"],
                         jti=str(ctx["jti"]), exp=int(ctx["exp"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise Unauthorized("malformed authorizer context") from exc
