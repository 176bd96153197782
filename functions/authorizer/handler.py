"""API Gateway (REST) Lambda REQUEST authorizer.

Reads ``Authorization: Bearer <jwt>``, verifies it with ``tmuxi.services.auth.authorize`` and answers with an
IAM policy allowing ``execute-api:Invoke`` on every method of the stage (so a cached policy is valid for all
routes) plus the principal as authorizer context. Any refusal raises ``Exception("Unauthorized")`` -- that
exact message is how API Gateway is told to answer 401. The token itself is never logged; every line it logs
carries the request's id (``correlation_id``).
"""
from __future__ import annotations

import time
from typing import Any

from tmuxi import snapstart
from tmuxi.errors import Unauthorized
from tmuxi.models import Principal
from tmuxi.observability import AUTH_FAILURES, emit_request_metrics, logger, request_context
from tmuxi.services import auth as auth_service

snapstart.install()  # SnapStart: libraries imported before the snapshot, state re-made after restore

COMPONENT = "authorizer"


class _Refused(Exception):
    def __init__(self, reason: str, counted: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.counted = counted  # authorize() already counted it in tmux_authentication_failures


def _header(event: dict[str, Any], name: str) -> str | None:
    """Case-insensitive header lookup over ``headers`` then ``multiValueHeaders``."""
    name = name.lower()
    for k, v in (event.get("headers") or {}).items():
        if k.lower() == name and v is not None:
            return str(v)
    for k, vs in (event.get("multiValueHeaders") or {}).items():
        if k.lower() == name and vs:
            return str(vs[-1])
    return None


def bearer_token(event: dict[str, Any]) -> str:
    value = _header(event, "authorization")
    if value is None or not value.strip():
        raise _Refused("missing")
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token or token.count(".") != 2:
        raise _Refused("malformed")
    return token


def stage_resource(method_arn: str) -> str:
    """``arn:aws:execute-api:region:acct:apiId/stage/VERB/path...`` -> ``arn:...:apiId/stage/*/*``."""
    arn_prefix, _, rest = method_arn.partition("/")
    stage = rest.split("/", 1)[0] if rest else "*"
    return f"{arn_prefix}/{stage or '*'}/*/*"


def allow_policy(principal: Principal, method_arn: str) -> dict[str, Any]:
    return {
        "principalId": str(principal.user_id),
        "policyDocument": {
            "Version": "2012-10-17",
            "Statement": [
                {"Action": "execute-api:Invoke", "Effect": "Allow", "Resource": stage_resource(method_arn)}
            ],
        },
        "context": auth_service.principal_to_context(principal),
    }


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    # API Gateway's requestId (Powertools' correlation_paths.API_GATEWAY_REST) on every line logged meanwhile.
    # Bound per thread (not Logger.set_correlation_id, which is process-wide): the local gateway runs several
    # invocations at once in the threads of one process.
    request_id = (event.get("requestContext") or {}).get("requestId")
    rid = request_id if isinstance(request_id, str) else None
    with request_context(rid):
        return _authorize(event, rid, time.perf_counter())


def _authorize(event: dict[str, Any], request_id: str | None, start: float) -> dict[str, Any]:
    # Each outcome ends with one line carrying the duration (as the API's "request" line does) and one EMF
    # document; an unexpected exception (a dependency down) is logged by Lambda and counted as an error.
    status, error = "error", True
    try:
        try:
            token = bearer_token(event)
            try:
                principal = auth_service.authorize(token)
            except Unauthorized as exc:
                raise _Refused(str((exc.details or {}).get("reason", "invalid")), counted=True) from None
        except _Refused as refused:
            status, error = "refused", False
            if not refused.counted:  # header problems never reach authorize(), so they are counted here
                AUTH_FAILURES.labels(reason=refused.reason).inc()
            logger.info("authorization refused", extra={"reason": refused.reason, "request_id": request_id,
                                                        "status": status, "duration": _ms_since(start)})
            raise Exception("Unauthorized") from None  # noqa: TRY002 - the exact contract with API Gateway
        policy = allow_policy(principal, str(event.get("methodArn", "")))
        status, error = "allowed", False
        logger.info("authorized", extra={"request_id": request_id, "status": status, "duration": _ms_since(start)})
        return policy
    finally:
        emit_request_metrics(COMPONENT, route="authorize", status=status, duration_s=time.perf_counter() - start,
                             error=error, auth_failure=status == "refused", request_id=request_id)


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)
