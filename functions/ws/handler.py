"""Lambda entry point of the WebSocket API's control routes (docs/websocket.md, "Where each message goes"):
``$connect``, ``$disconnect``, ``attach`` and ``detach``. Everything else a client sends (``$default``: input,
resize, ping) goes to the tmux hosts, never here.

Thin: parse the API Gateway WebSocket event, call one function of ``tmuxi.services.live``, shape the answer.

* ``$connect`` answers with the handshake's status: 200 admits it, 401 refuses a missing, unknown, used or expired
  ticket, 403 a disabled user's (or an ended share's), 429 a source address over the limit of unauthenticated
  requests. The connection does not exist until this returns, so nothing is ever posted to it from here.
* ``attach`` and ``detach`` are two-way routes: the body returned is sent to the client. Success returns none
  (the session's host sends ``attached`` / ``detached`` itself); a refusal returns an ``error`` frame.
* ``$disconnect`` always answers 200 (API Gateway ignores it; the connection is already gone).

Powertools' parser models for these events are not used: its connect model drops the query string (the ticket)
and requires fields the handler has no use for. API Gateway's requestId is bound for the invocation, as in the
REST API: every line logged meanwhile carries it (``correlation_id``), and the host client sends it on. The
ticket is never logged. No FastAPI here: a cold start imports only the services."""
from __future__ import annotations

import base64
import binascii
import json
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tmuxi import snapstart
from tmuxi.errors import AppError, BadRequest
from tmuxi.observability import ERRORS, REQUEST_DURATION, REQUESTS, emit_request_metrics, logger, request_context
from tmuxi.services import live, throttle

snapstart.install()  # SnapStart: libraries imported before the snapshot, state re-made after restore

COMPONENT = "ws"


def _server_error_codes(cls: type[AppError] = AppError) -> frozenset[str]:
    """The codes of 5xx errors: a refused message's outcome is its error's code; these count as tmux_errors."""
    codes = {cls.code} if cls.status >= 500 else set()
    for sub in cls.__subclasses__():
        codes |= _server_error_codes(sub)
    return frozenset(codes)


_SERVER_ERRORS = _server_error_codes() | {"error"}  # "error": an unhandled exception

Response = dict[str, Any]


# --- the parts of an API Gateway WebSocket event the routes read --------------------------------------------
class _Identity(BaseModel):
    source_ip: str | None = Field(default=None, alias="sourceIp")
    user_agent: str | None = Field(default=None, alias="userAgent")


class _RequestContext(BaseModel):
    route_key: str = Field(alias="routeKey")
    connection_id: str = Field(alias="connectionId")
    request_id: str | None = Field(default=None, alias="requestId")
    identity: _Identity = Field(default_factory=_Identity)


class WsEvent(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    request_context: _RequestContext = Field(alias="requestContext")
    query: dict[str, str] | None = Field(default=None, alias="queryStringParameters")
    body: str | None = None
    is_base64_encoded: bool = Field(default=False, alias="isBase64Encoded")

    def text(self) -> str | None:
        """The message's body as text (API Gateway base64-encodes binary frames)."""
        if self.body is None or not self.is_base64_encoded:
            return self.body
        try:
            return base64.b64decode(self.body, validate=True).decode()
        except (binascii.Error, ValueError):
            raise BadRequest("the message is not UTF-8 text") from None


# --- routes -----------------------------------------------------------------------------------------------------
def _status(code: int, exc: AppError | None = None) -> Response:
    if exc is None:
        return {"statusCode": code}
    return {"statusCode": code, "headers": {"Content-Type": "application/json"}, "body": json.dumps(exc.to_body())}


def _frame(exc: AppError) -> Response:
    """A refused message: an `error` frame back to the client (the connection stays open)."""
    code, message = live.ws_error(exc)
    return {"statusCode": 200, "body": json.dumps({"type": "error", "code": code, "message": message})}


def _connect(ev: WsEvent) -> tuple[Response, str]:
    ctx = ev.request_context
    # unauthenticated, like the REST API's public routes: limited per source address (services/throttle.py)
    limited = throttle.public_request(ctx.identity.source_ip)
    if limited is not None:
        return _status(429, limited), limited.code
    try:
        live.connect((ev.query or {}).get("ticket"), ctx.connection_id, ctx.identity.source_ip,
                     ctx.identity.user_agent)
    except AppError as exc:
        _log_failure("$connect", exc)
        return _status(exc.status, exc), exc.code
    return _status(200), "ok"


def _disconnect(ev: WsEvent) -> tuple[Response, str]:
    live.disconnect(ev.request_context.connection_id)  # never raises
    return _status(200), "ok"


def _attach(ev: WsEvent) -> tuple[Response, str]:
    try:
        live.attach(ev.request_context.connection_id, ev.text())
    except AppError as exc:
        _log_failure("attach", exc)
        return _frame(exc), exc.code
    return _status(200), "ok"


def _detach(ev: WsEvent) -> tuple[Response, str]:
    try:
        told = live.detach(ev.request_context.connection_id, ev.text())
    except AppError as exc:
        _log_failure("detach", exc)
        return _frame(exc), exc.code
    if told is not None:  # the host that held the viewer is dead: the `detached` comes from here
        return {"statusCode": 200, "body": json.dumps(told)}, "ok"
    return _status(200), "ok"


_ROUTES = {"$connect": _connect, "$disconnect": _disconnect, "attach": _attach, "detach": _detach}


def _log_failure(route: str, exc: AppError) -> None:
    """A 5xx, or a refusal with detail for the log only: what the client is not told is logged."""
    if exc.status >= 500 or exc.internal:
        cause = exc.__cause__
        ERRORS.labels(component=COMPONENT, kind=exc.code).inc()
        (logger.warning if exc.status >= 500 else logger.info)("websocket request failed", extra={
            "route": route, "status": exc.status, "code": exc.code, "error": exc.message, "internal": exc.internal,
            "cause": f"{type(cause).__name__}: {cause}"[:500] if cause is not None else None})


# --- entry point ------------------------------------------------------------------------------------------------
def _request_id(event: Any) -> str | None:
    """API Gateway's requestId of the invocation (the path of Powertools' correlation_paths.API_GATEWAY_REST)."""
    rc = event.get("requestContext") if isinstance(event, dict) else None
    rid = rc.get("requestId") if isinstance(rc, dict) else None
    return rid if isinstance(rid, str) else None


def handler(event: dict[str, Any], context: Any) -> Response:
    # Bound per thread (not Logger.set_correlation_id, which is process-wide): the local gateway runs several
    # invocations at once in the threads of one process.
    rid = _request_id(event)
    with request_context(rid):
        return _serve(event, context, rid)


def _serve(event: dict[str, Any], context: Any, rid: str | None) -> Response:
    start = time.perf_counter()
    route, outcome, connection_id = "unparsed", "error", None
    try:
        try:
            ev = WsEvent.model_validate(event)
        except ValidationError as exc:
            logger.warning("not an API Gateway WebSocket event", extra={"error": str(exc)[:300]})
            outcome = "bad_event"
            return _status(400)
        connection_id = ev.request_context.connection_id
        serve = _ROUTES.get(ev.request_context.route_key)
        if serve is None:  # only the routes above are integrated with this function (tmuxi.routes.WS_ROUTES)
            route, outcome = "unknown", "unknown_action"
            return {"statusCode": 200, "body": json.dumps({
                "type": "error", "code": "unknown_action",
                "message": f"unknown action {ev.request_context.route_key[:64]!r}"})}
        route = ev.request_context.route_key
        response, outcome = serve(ev)
        return response
    except Exception:
        ERRORS.labels(component=COMPONENT, kind="unhandled").inc()
        logger.exception("unhandled error", extra={"route": route})
        if route in ("attach", "detach"):
            return {"statusCode": 200, "body": json.dumps(
                {"type": "error", "code": "internal_error", "message": "internal error"})}
        return _status(500)
    finally:
        elapsed = time.perf_counter() - start
        REQUESTS.labels(component=COMPONENT, route=route, status=outcome).inc()
        REQUEST_DURATION.labels(component=COMPONENT, route=route, status=outcome).observe(elapsed)
        logger.info("websocket request", extra={
            "route": route, "status": outcome, "connection_id": connection_id,
            "duration": round(elapsed * 1000, 3), "request_id": rid,
            "lambda_request_id": getattr(context, "aws_request_id", None)})
        emit_request_metrics(COMPONENT, route=route, status=outcome, duration_s=elapsed,
                             error=outcome in _SERVER_ERRORS, auth_failure=outcome == "unauthorized", request_id=rid)
