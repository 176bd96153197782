"""Login, token checks (signature, claims, revocation, the user's current state) and revocation."""
from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from tmuxi import auth, cache
from tmuxi.db import repo
from tmuxi.errors import DependencyUnavailable, RateLimited, Unauthorized
from tmuxi.models import Principal, TokenRequest, TokenResponse, ValidateResponse
from tmuxi.observability import AUTH_FAILURES
from tmuxi.services import throttle
from tmuxi.settings import get_settings

_LEEWAY_S = 5


def login(body: TokenRequest, source_ip: str | None = None) -> TokenResponse:
    """``source_ip``: the caller's address (API Gateway's sourceIp), for the failed-login limits."""
    # before the lookup and the password hash: a locked-out flood costs one Redis round trip per attempt
    throttle.check_login(body.username, source_ip)
    user = repo.get_user_by_username(body.username)
    ok = auth.verify_password(body.password, user["password_hash"] if user else None)
    if user is None or not ok or user["disabled"]:
        AUTH_FAILURES.labels(reason="login").inc()
        failure = throttle.login_failed(body.username, source_ip)
        if failure.audited:
            repo.audit(user["id"] if user else None, "auth.token", None,
                       "locked_out" if failure.locked_for_s else "denied",
                       failure.audit_detail(body.username, source_ip))
        raise Unauthorized("wrong username or password")
    throttle.login_succeeded(body.username)
    token, ttl = auth.issue_token(user["id"], user["username"], user["role"], epoch=user["token_epoch"])
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


# A user's state as read from PostgreSQL while Redis is down: user id -> (good until, monotonic; state)
_local_users: dict[UUID, tuple[float, cache.UserState]] = {}
_MAX_LOCAL_USERS = 10_000


def _user_state(user_id: UUID, adm: cache.Admission | None) -> cache.UserState:
    """The user's state: from the cache lookup the request already made (``adm``: None when Redis is down),
    else PostgreSQL, put back into Redis for every process -- or, while Redis is down, kept in this process for
    ``user_state_ttl_s``. Either way PostgreSQL is asked at most about once per user and interval."""
    if adm is not None and adm.user is not None:
        return adm.user
    now = time.monotonic()
    if adm is None:
        hit = _local_users.get(user_id)
        if hit is not None and hit[0] > now:
            return hit[1]
    try:
        row = repo.get_user_state(user_id)
    except DependencyUnavailable:
        if adm is not None and adm.user_stale is not None:
            return adm.user_stale  # PostgreSQL down: no change to the user can have committed since
        raise
    state = (cache.UserState(int(row["token_epoch"]), str(row["role"]), bool(row["disabled"]))
             if row is not None else cache.UNKNOWN_USER)
    if adm is not None:
        cache.put_user(str(user_id), state, adm.gen, replacing=adm.user_entry)
    else:
        if len(_local_users) >= _MAX_LOCAL_USERS:
            _local_users.clear()
        _local_users[user_id] = (now + get_settings().user_state_ttl_s, state)
    return state


def _check_user(p: Principal, state: cache.UserState) -> None:
    """Tokens follow their user: refused once the user is disabled or deleted, or its token epoch moved on (a
    new role or password, all tokens ended). The role is compared too, so no request ever acts on a role the
    user no longer has."""
    if state.disabled:
        reason = "user_disabled"
    elif state.epoch != p.epoch or state.role != p.role:
        reason = "user_changed"
    else:
        return
    AUTH_FAILURES.labels(reason=reason).inc()
    raise Unauthorized("token no longer valid; sign in again", reason=reason)


def user_changed(user_id: UUID, state: cache.UserState) -> bool:
    """After a change to a user committed in PostgreSQL: every process sees it on its next request (False:
    Redis could not take it; then within ``user_state_ttl_s``)."""
    _local_users.pop(user_id, None)
    return cache.user_changed(str(user_id), state)


def authorize(token: str) -> Principal:
    try:
        claims = auth.decode_token(token)
    except Unauthorized as exc:
        AUTH_FAILURES.labels(reason=str(exc.details.get("reason", "invalid"))).inc()
        raise
    p = Principal(user_id=UUID(claims["sub"]), username=claims["name"], role=claims["role"],
                  jti=claims["jti"], exp=int(claims["exp"]), epoch=claims["epoch"])
    res = cache.token_state(p.jti, str(p.user_id))
    found = res if isinstance(res, cache.Admission) else None
    if _revoked(p.jti, found.revoked if found is not None else None):
        AUTH_FAILURES.labels(reason="revoked").inc()
        raise Unauthorized("token revoked", reason="revoked")
    _check_user(p, _user_state(p.user_id, found))
    return p


def admit(p: Principal, session_id: UUID | None = None) -> cache.Admission | None:
    """The checks every authenticated request passes, whether or not the gateway cached the authorizer's
    answer: token not expired, not revoked, its user enabled and unchanged since it was issued (epoch, role),
    caller under the rate limit; the same call brings the named session's cache entry (``cache.admit``: usually
    from memory kept exact by Redis, no round trip). Returns None when Redis is down (then PostgreSQL
    answers)."""
    if p.exp < time.time() - _LEEWAY_S:
        AUTH_FAILURES.labels(reason="expired").inc()
        raise Unauthorized("token expired", reason="expired")
    key = f"user:{p.user_id}"
    limit = get_settings().rate_limit_per_minute
    res = cache.admit(key, p.jti, str(session_id) if session_id else None, limit, user_id=str(p.user_id))
    adm = res if isinstance(res, cache.Admission) else None
    if adm is not None:
        count, known = adm.count, adm.revoked
    else:
        count, known = cache.rate_count_while_down(key), None  # held to its share of the limit
    if count > limit:
        raise RateLimited(f"more than {limit} requests in a minute; slow down", limit_per_minute=limit,
                          retry_after_s=round(60 - time.time() % 60, 1))
    if _revoked(p.jti, known):
        AUTH_FAILURES.labels(reason="revoked").inc()
        raise Unauthorized("token revoked", reason="revoked")
    _check_user(p, _user_state(p.user_id, adm))
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
    return {"user_id": str(p.user_id), "username": p.username, "role": p.role, "jti": p.jti, "exp": str(p.exp),
            "epoch": str(p.epoch)}


def principal_from_context(ctx: dict[str, Any] | None) -> Principal:
    if not ctx or "user_id" not in ctx:
        raise Unauthorized("no authorizer context: the request did not pass the authorizer")
    try:
        return Principal(user_id=UUID(str(ctx["user_id"])), username=str(ctx["username"]), role=ctx["role"],
                         jti=str(ctx["jti"]), exp=int(ctx["exp"]), epoch=int(ctx.get("epoch", 0)))
    except (KeyError, ValueError, TypeError) as exc:
        raise Unauthorized("malformed authorizer context") from exc
