"""The REST API: a thin FastAPI app. Each route parses its input, calls ONE service function and shapes the
response. Errors become JSON in one place (the handlers at the bottom + ``_EdgeMiddleware``).

The caller's identity is never computed here: API Gateway's Lambda authorizer already verified the token and
put the principal into ``requestContext.authorizer`` of the proxy event, which Mangum exposes as
``request.scope["aws.event"]``.

Routes are ``async def`` yet call the synchronous services directly: behind Mangum each invocation owns its
event loop (one request per Lambda environment, one per gateway worker thread locally), so blocking it costs
nothing and saves a thread hop per request. Do not serve this app with a plain ASGI server under concurrency.
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import Body, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

import tmuxi
from tmuxi.errors import AppError, Unauthorized
from tmuxi.models import (
    ErrorResponse,
    ExecInput,
    ExecList,
    ExecRequest,
    ExecResult,
    ExecSignal,
    FileContent,
    FileList,
    FileWrite,
    FileWritten,
    HealthResponse,
    InputRequest,
    InputWaitResult,
    Principal,
    RecordingList,
    ResizeRequest,
    ScreenResponse,
    Session,
    SessionCreate,
    SessionFilter,
    SessionList,
    ShareCreate,
    ShareCreated,
    ShareList,
    ShareTicket,
    ShareTicketRequest,
    TokenRequest,
    TokenResponse,
    User,
    UserUpdate,
    ValidateResponse,
    WsTicket,
)
from tmuxi.observability import ERRORS, REQUEST_DURATION, REQUESTS, emit_request_metrics, logger, request_context
from tmuxi.pagination import MAX_PAGE, decode_cursor
from tmuxi.routes import ROUTES
from tmuxi.services import auth as auth_service
from tmuxi.services import execs as execs_service
from tmuxi.services import files as files_service
from tmuxi.services import health as health_service
from tmuxi.services import live as live_service
from tmuxi.services import sessions as sessions_service
from tmuxi.services import throttle
from tmuxi.services import users as users_service
from tmuxi.settings import get_settings

COMPONENT = "api"


# --- OpenAPI models for the error shapes ------------------------------------------------------------------
class FieldError(BaseModel):
    field: str
    message: str


class ValidationErrorBody(BaseModel):
    code: str = "validation_error"
    message: str
    fields: list[FieldError]


class ValidationErrorResponse(BaseModel):
    error: ValidationErrorBody


def _err(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


_COMMON: dict[int | str, dict[str, Any]] = {
    413: _err("Request body too large"),
    422: {"model": ValidationErrorResponse, "description": "Invalid request (names the offending fields)"},
    500: _err("Internal error (no details leaked)"),
    503: _err("A dependency is unavailable"),
}
_AUTHED: dict[int | str, dict[str, Any]] = {
    **_COMMON,
    401: _err("Missing, malformed, expired, revoked or wrongly signed token"),
    429: _err("Rate limit or session quota exceeded"),
}
_SESSION: dict[int | str, dict[str, Any]] = {
    **_AUTHED,
    404: _err("No such session (or it belongs to someone else)"),
    409: _err("Session busy or not active"),
}

app = FastAPI(
    title="tmuxi",
    version=tmuxi.__version__,
    description="Persistent tmux terminal sessions over REST: create, send input, read the screen, exec.",
    openapi_url="/openapi.json",
    redoc_url=None,
    swagger_ui_oauth2_redirect_url=None,
)


class _ResourceRoute(APIRoute):
    """Serves exactly the resource API Gateway matched (the event's ``resource``), else "no such route" (404).
    API Gateway matches the raw path, Mangum hands FastAPI the DECODED one: ``/sessions/<id>%2Fscreen`` is
    ``/sessions/{id}`` (id ``<id>/screen``) at the edge but would reach the screen route here. One comparison,
    on the matched route only; without an API Gateway event (the app called directly) there is nothing to
    compare."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        event = scope.get("aws.event")
        if event is not None and event.get("resource") != self.path_format:
            scope.pop("route", None)  # logged and counted under the resource API Gateway matched
            raise StarletteHTTPException(404)
        await super().handle(scope, receive, send)


app.router.route_class = _ResourceRoute  # before any route is declared


# --- identity ---------------------------------------------------------------------------------------------
def _authorizer_context(request: Request) -> dict[str, Any] | None:
    event = request.scope.get("aws.event")
    if not isinstance(event, dict):
        return None
    ctx = (event.get("requestContext") or {}).get("authorizer")
    return ctx if isinstance(ctx, dict) and ctx else None


def principal(request: Request) -> Principal:
    """The caller, from the authorizer context (no context -> 401). Expiry, revocation and the rate limit are
    checked by the services on every request (the gateway may cache the authorizer's answer).

    Routes call this themselves rather than declaring ``Depends(principal)``: a dependency costs FastAPI a
    second dependency-resolution pass per request (~15 us of ~400, bench/profile_api.py)."""
    ctx = _authorizer_context(request)
    if ctx is None:
        raise Unauthorized("no authorizer context: the request did not pass the authorizer")
    return auth_service.principal_from_context(ctx)


def _json(model: BaseModel, status: int = 200) -> Response:
    """A model the services built (typed, validated) as JSON, serialised once by pydantic. The route's
    ``response_model`` still documents the shape; returning a Response skips FastAPI's second validation and
    serialisation of it (a tenth of the route's own cost, bench/profile_api.py)."""
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")


# --- sessions ---------------------------------------------------------------------------------------------
# (registered first: the router tries routes in order, and these carry nearly all the traffic)


@app.post("/sessions", status_code=201, response_model=Session, tags=["sessions"], responses=_AUTHED)
async def create_session(request: Request, body: Annotated[SessionCreate | None, Body()] = None) -> Response:
    p = principal(request)
    # an empty body means all defaults (`curl -X POST /sessions`)
    return _json(sessions_service.create_session(p, body or SessionCreate()), 201)


@app.get("/sessions", response_model=SessionList, tags=["sessions"], responses=_AUTHED)
async def list_sessions(
    request: Request,
    state: Annotated[SessionFilter | None, Query(
        description="live (creating or active; the default), all, or one state")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="sessions per page")] = 100,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    include_ended: Annotated[bool, Query(deprecated=True, description="same as state=all")] = False,
) -> Response:
    try:
        after = decode_cursor(cursor) if cursor is not None else None
    except ValueError:
        raise RequestValidationError([{"type": "value_error", "loc": ("query", "cursor"), "msg": "invalid cursor",
                                       "input": cursor}]) from None
    p = principal(request)
    return _json(sessions_service.list_sessions(p, state or ("all" if include_ended else "live"), limit, after))


@app.get("/sessions/{id}", response_model=Session, tags=["sessions"], responses=_SESSION)
async def get_session(id: UUID, request: Request) -> Response:  # noqa: A002 - the API's name
    return _json(sessions_service.get_session(principal(request), id))


@app.delete("/sessions/{id}", status_code=204, response_class=Response, tags=["sessions"],
            responses=_SESSION)
async def delete_session(id: UUID, request: Request) -> Response:  # noqa: A002
    p = principal(request)
    sessions_service.delete_session(p, id)
    return Response(status_code=204)


@app.post("/sessions/{id}/input", status_code=204, response_class=Response, tags=["sessions"],
          responses={**_SESSION, 200: {"model": InputWaitResult, "description": "with `wait`: the screen then"}})
async def send_input(id: UUID, body: InputRequest, request: Request) -> Response:  # noqa: A002
    p = principal(request)
    waited = sessions_service.send_input(p, id, body)
    return Response(status_code=204) if waited is None else _json(waited)


@app.get("/sessions/{id}/screen", response_model=ScreenResponse, tags=["sessions"], responses=_SESSION)
async def read_screen(
    request: Request,
    id: UUID,  # noqa: A002
    escapes: bool = False,
    history: int = Query(0, ge=0, le=10000, description="scrollback lines to include above the screen"),
) -> Response:
    p = principal(request)
    return _json(sessions_service.read_screen(p, id, escapes, history))


@app.post("/sessions/{id}/resize", status_code=204, response_class=Response, tags=["sessions"],
          responses=_SESSION)
async def resize(id: UUID, body: ResizeRequest, request: Request) -> Response:  # noqa: A002
    p = principal(request)
    sessions_service.resize(p, id, body)
    return Response(status_code=204)


@app.post("/sessions/{id}/exec", response_model=ExecResult, tags=["sessions"], responses=_SESSION)
async def exec_command(id: UUID, body: ExecRequest, request: Request) -> Response:  # noqa: A002
    p = principal(request)
    return _json(sessions_service.exec_command(p, id, body))


_EXEC_ID = Path(pattern=r"^[0-9a-f]{16}\z", description="from an exec answer")


@app.get("/sessions/{id}/execs", response_model=ExecList, tags=["execs"], responses=_SESSION)
async def list_execs(id: UUID, request: Request) -> Response:  # noqa: A002
    return _json(execs_service.list_execs(principal(request), id))


@app.get("/sessions/{id}/execs/{exec_id}", response_model=ExecResult, tags=["execs"], responses=_SESSION)
async def poll_exec(
    request: Request,
    id: UUID,  # noqa: A002
    exec_id: str = _EXEC_ID,
    cursor: str = Query("", max_length=40, description="from the last answer: only what came after it"),
    wait_s: float = Query(0.0, ge=0, description="wait this long for more output (or the end) if none is there"),
) -> Response:
    return _json(execs_service.poll(principal(request), id, exec_id, cursor, wait_s))


@app.post("/sessions/{id}/execs/{exec_id}/input", status_code=204, response_class=Response, tags=["execs"],
          responses=_SESSION)
async def exec_input(id: UUID, body: ExecInput, request: Request, exec_id: str = _EXEC_ID) -> Response:  # noqa: A002
    execs_service.send_input(principal(request), id, exec_id, body)
    return Response(status_code=204)


@app.post("/sessions/{id}/execs/{exec_id}/signal", status_code=204, response_class=Response, tags=["execs"],
          responses=_SESSION)
async def signal_exec(id: UUID, body: ExecSignal, request: Request, exec_id: str = _EXEC_ID) -> Response:  # noqa: A002
    execs_service.signal(principal(request), id, exec_id, body.signal)
    return Response(status_code=204)


@app.delete("/sessions/{id}/execs/{exec_id}", response_model=ExecResult, tags=["execs"], responses=_SESSION)
async def stop_exec(
    request: Request,
    id: UUID,  # noqa: A002
    exec_id: str = _EXEC_ID,
    grace_s: float = Query(2.0, ge=0, le=20, description="SIGTERM, then SIGKILL after this long"),
) -> Response:
    return _json(execs_service.stop(principal(request), id, exec_id, grace_s))


# --- files in the session's home -------------------------------------------------------------------------------
_FILES: dict[int | str, dict[str, Any]] = {
    **_SESSION,
    400: _err("A path outside the home directory, empty, with a NUL or too long; a directory where a file is "
              "expected, or the reverse"),
    403: _err("The user's OS account may not read or write it (permission_denied)"),
    404: _err("No such session of yours (not_found), or no such file (file_not_found)"),
    410: _err("The session has ended"),
    413: _err("The file is larger than TMUXI_MAX_FILE_BYTES (4 MiB): the message names both sizes"),
    507: _err("No space left in the home to write the file"),
}
_FILE_PATH = Query(description="relative to the home directory, or absolute inside it")


@app.put("/sessions/{id}/files", response_model=FileWritten, tags=["files"], responses=_FILES)
async def write_file(id: UUID, body: FileWrite, request: Request) -> Response:  # noqa: A002
    p = principal(request)
    return _json(files_service.write_file(p, id, body))


@app.get("/sessions/{id}/files", response_model=FileContent, tags=["files"], responses=_FILES)
async def read_file(
    request: Request,
    id: UUID,  # noqa: A002
    path: Annotated[str, _FILE_PATH],
    encoding: Annotated[Literal["utf-8", "base64"] | None, Query(
        description="base64: always base64; by default UTF-8 text when the file is UTF-8")] = None,
) -> Response:
    p = principal(request)
    return _json(files_service.read_file(p, id, path, encoding))


@app.get("/sessions/{id}/files/list", response_model=FileList, tags=["files"], responses=_FILES)
async def list_files(request: Request, id: UUID, path: Annotated[str, _FILE_PATH] = ".") -> Response:  # noqa: A002
    p = principal(request)
    return _json(files_service.list_files(p, id, path))


# --- live terminals (docs/websocket.md): connect tickets, read-only shares, recordings -----------------------


@app.post("/ws/tickets", status_code=201, response_model=WsTicket, tags=["live"], responses=_AUTHED)
async def mint_ws_ticket(request: Request) -> Response:
    return _json(live_service.mint_ticket(principal(request)), 201)


@app.post("/ws/share-tickets", status_code=201, response_model=ShareTicket, tags=["live"],
          responses={**_COMMON, 404: _err("Unknown, expired or revoked share token, or its session has ended"),
                     429: _err("Too many requests from the address; Retry-After says when to try again")})
async def redeem_share(body: ShareTicketRequest, request: Request) -> Response:
    return _json(live_service.redeem_share(body.share_token, throttle.source_ip(request.scope.get("aws.event"))), 201)


_SHARES: dict[int | str, dict[str, Any]] = {**_SESSION, 404: _err("No such session of yours, or no such share")}


@app.post("/sessions/{id}/shares", status_code=201, response_model=ShareCreated, tags=["live"],
          responses={**_SESSION, 410: _err("The session has ended")})
async def create_share(id: UUID, request: Request,  # noqa: A002
                       body: Annotated[ShareCreate | None, Body()] = None) -> Response:
    p = principal(request)
    # an empty body means all defaults (an hour)
    return _json(live_service.create_share(p, id, body or ShareCreate()), 201)


@app.get("/sessions/{id}/shares", response_model=ShareList, tags=["live"], responses=_SHARES)
async def list_shares(id: UUID, request: Request) -> Response:  # noqa: A002
    return _json(live_service.list_shares(principal(request), id))


@app.delete("/sessions/{id}/shares/{share_id}", status_code=204, response_class=Response, tags=["live"],
            responses=_SHARES)
async def revoke_share(id: UUID, share_id: UUID, request: Request) -> Response:  # noqa: A002
    p = principal(request)
    live_service.revoke_share(p, id, share_id)
    return Response(status_code=204)


@app.get("/sessions/{id}/recordings", response_model=RecordingList, tags=["live"], responses=_SESSION)
async def list_recordings(id: UUID, request: Request) -> Response:  # noqa: A002
    return _json(live_service.list_recordings(principal(request), id))


@app.get("/sessions/{id}/recordings/{name}", response_class=Response, tags=["live"],
         responses={**_SESSION, 400: _err("Not a recording's name"), 404: _err("No such session or recording"),
                    413: _err("The recording is larger than the API returns (5 MB)"),
                    200: {"content": {"application/x-asciicast": {}}, "description": "asciicast v2"}})
async def get_recording(id: UUID, name: str, request: Request) -> Response:  # noqa: A002
    p = principal(request)
    return Response(live_service.get_recording(p, id, name), media_type="application/x-asciicast")


# --- auth -------------------------------------------------------------------------------------------------


@app.post("/auth/token", response_model=TokenResponse, tags=["auth"],
          responses={**_COMMON, 401: _err("Wrong username or password"),
                     429: _err("Locked out after failed logins (username or address), or too many requests from "
                               "the address; Retry-After says when to try again")})
async def login(body: TokenRequest, request: Request) -> TokenResponse:
    return auth_service.login(body, throttle.source_ip(request.scope.get("aws.event")))


@app.post("/auth/revoke", status_code=204, response_class=Response, tags=["auth"], responses=_AUTHED)
async def revoke(request: Request) -> Response:
    p = principal(request)
    auth_service.revoke(p)
    return Response(status_code=204)


@app.get("/auth/health", response_model=HealthResponse, tags=["auth"], responses=_COMMON)
async def auth_health() -> HealthResponse:
    return health_service.health()


@app.get("/validate", response_model=ValidateResponse, tags=["auth"], responses=_AUTHED)
async def validate(request: Request) -> ValidateResponse:
    p = principal(request)
    return auth_service.validate(p)


# --- users (admins only) ---------------------------------------------------------------------------------
# A change ends the user's tokens (except enable): every process refuses them from its next request, within
# TMUXI_USER_STATE_TTL_S at worst (services/users.py).
_ADMIN: dict[int | str, dict[str, Any]] = {
    **_AUTHED,
    403: _err("The caller is not an admin"),
    404: _err("No such user"),
    409: _err("Admins cannot disable, demote or delete themselves"),
}


@app.post("/users/{username}/disable", response_model=User, tags=["users"], responses=_ADMIN)
async def disable_user(username: str, request: Request) -> Response:
    return _json(users_service.disable_user(principal(request), username))


@app.post("/users/{username}/enable", response_model=User, tags=["users"], responses=_ADMIN)
async def enable_user(username: str, request: Request) -> Response:
    return _json(users_service.enable_user(principal(request), username))


@app.post("/users/{username}/revoke-tokens", response_model=User, tags=["users"], responses=_ADMIN)
async def revoke_user_tokens(username: str, request: Request) -> Response:
    return _json(users_service.revoke_user_tokens(principal(request), username))


@app.patch("/users/{username}", response_model=User, tags=["users"], responses=_ADMIN)
async def update_user(username: str, body: UserUpdate, request: Request) -> Response:
    return _json(users_service.update_user(principal(request), username, body))


@app.delete("/users/{username}", status_code=204, response_class=Response, tags=["users"], responses=_ADMIN)
async def delete_user(username: str, request: Request) -> Response:
    users_service.delete_user(principal(request), username)
    return Response(status_code=204)


# --- operations -------------------------------------------------------------------------------------------


@app.get("/health", response_model=HealthResponse, tags=["operations"], responses=_COMMON)
async def health() -> HealthResponse:
    return health_service.health()


# --- errors: the one place they become JSON ---------------------------------------------------------------


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _request_id(scope: Mapping[str, Any]) -> str | None:
    """API Gateway's requestId (Powertools' correlation_paths.API_GATEWAY_REST) of the request."""
    event = scope.get("aws.event")
    rid = (event.get("requestContext") or {}).get("requestId") if isinstance(event, dict) else None
    return rid if isinstance(rid, str) else None


def _request_ids(scope: Mapping[str, Any]) -> dict[str, Any]:
    """The ids a log line is found by: API Gateway's requestId and the Lambda invocation's aws_request_id."""
    return {"request_id": _request_id(scope),
            "lambda_request_id": getattr(scope.get("aws.context"), "aws_request_id", None)}


@app.exception_handler(AppError)
async def _app_error(request: Request, exc: AppError) -> JSONResponse:
    if exc.status >= 500 or exc.internal:
        # what the body leaves out (host ids, addresses, capacities, tmux text, a dependency's words) is logged
        cause = exc.__cause__
        ERRORS.labels(component=COMPONENT, kind=exc.code).inc()
        (logger.warning if exc.status >= 500 else logger.info)("request failed", extra={
            "route": _route_template(request.scope), "status": exc.status, "code": exc.code,
            "error": exc.message, "internal": exc.internal,
            "cause": f"{type(cause).__name__}: {cause}"[:500] if cause is not None else None,
            **_request_ids(request.scope),
        })
    headers = None
    retry_after = exc.details.get("retry_after_s") if exc.details else None
    if exc.status == 503 and retry_after is None:
        retry_after = 1  # every 503 is "retry shortly": say when
    if exc.status in (429, 503) and isinstance(retry_after, int | float):
        headers = {"Retry-After": str(max(1, int(retry_after + 0.999)))}
    return JSONResponse(exc.to_body(), status_code=exc.status, headers=headers)


def _field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc) or "request"


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return JSONResponse(
            {"error": {"code": "validation_error", "message": "request body is not valid JSON",
                       "fields": [{"field": "body", "message": "not valid JSON"}]}},
            status_code=422,
        )
    fields = []
    for e in errors:
        msg = str(e.get("msg", "invalid"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        fields.append({"field": _field_path(e.get("loc", ())), "message": msg})
    message = "; ".join(f"{f['field']}: {f['message']}" for f in fields) or "invalid request"
    return JSONResponse(
        {"error": {"code": "validation_error", "message": message, "fields": fields}}, status_code=422
    )


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, "bad_request" if exc.status_code < 500 else "internal_error")
    message = "no such route" if exc.status_code == 404 else str(exc.detail)
    return _error(exc.status_code, code, message, headers=getattr(exc, "headers", None))


# --- edge middleware: body limit, unexpected errors, request log + metrics --------------------------------


class _BodyTooLarge(Exception):
    pass


_TOO_LARGE = b'{"error":{"code":"payload_too_large","message":"request body too large"}}'
_INTERNAL = b'{"error":{"code":"internal_error","message":"internal error"}}'
_JSON_HEADERS = [(b"content-type", b"application/json")]
_METRIC_CHILDREN: dict[tuple[str, int], tuple[Any, Any]] = {}


class _EdgeMiddleware:
    """Pure ASGI (no per-request task or stream objects): refuses oversized bodies before anything parses
    them, turns unexpected exceptions into a bare 500 (logged with the traceback, never sent), and writes one
    structured log line + metrics per request with the route template (never tokens or bodies).

    API Gateway's requestId is bound for the whole request: every line logged while serving it (here, in the
    services, in the host client) carries it as ``correlation_id``, and the host client sends it to the tmux
    host. Bound per thread / task (tmuxi.observability.request_context): the local gateway runs invocations in
    several threads of one process. API Gateway returns it to the client itself (``x-amzn-RequestId``)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with request_context(_request_id(scope)):
            await self._serve(scope, receive, send)

    async def _serve(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        start = time.perf_counter()
        limit = _body_limit(scope)
        state = {"status": 0}

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)

        try:
            if (scope.get("method"), _resource(scope)) in _PUBLIC_ROUTES:
                limited = throttle.public_request(_source_ip(scope))
                if limited is not None:
                    await self._send(send_wrapper, 429, json.dumps(limited.to_body()).encode(),
                                     [(b"retry-after", str(limited.details["retry_after_s"]).encode())])
                    return
            for name, value in scope["headers"]:
                if name == b"content-length":
                    if value.isdigit() and int(value) > limit:
                        raise _BodyTooLarge
                    break
            # Read the whole body first (Mangum hands it over in one message anyway), then replay it, so
            # nothing parses a body that is too large.
            chunks: list[bytes] = []
            size = 0
            more = True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    break
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise _BodyTooLarge
                chunks.append(chunk)
                more = message.get("more_body", False)
            replay: list[dict[str, Any]] = [
                {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            ]

            async def receive_replay() -> dict[str, Any]:
                return replay.pop() if replay else await receive()

            await self.app(scope, receive_replay, send_wrapper)
        except _BodyTooLarge:
            if not state["status"]:
                await self._send(send_wrapper, 413, _TOO_LARGE)
        except Exception:
            ERRORS.labels(component=COMPONENT, kind="unhandled").inc()
            logger.exception("unhandled error", extra={"route": _route_template(scope), **_request_ids(scope)})
            if not state["status"]:
                await self._send(send_wrapper, 500, _INTERNAL)
        finally:
            self._log(scope, state["status"] or 500, start)

    @staticmethod
    async def _send(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [*_JSON_HEADERS, (b"content-length", str(len(body)).encode()), *(headers or [])]})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _log(scope: dict[str, Any], status: int, start: float) -> None:
        elapsed = time.perf_counter() - start
        route = _route_template(scope)
        key = (route, status)
        children = _METRIC_CHILDREN.get(key)
        if children is None:  # labels() costs a few µs; the (route, status) set is small and bounded
            children = _METRIC_CHILDREN[key] = (
                REQUESTS.labels(component=COMPONENT, route=route, status=str(status)),
                REQUEST_DURATION.labels(component=COMPONENT, route=route, status=str(status)),
            )
        children[0].inc()
        children[1].observe(elapsed)
        ids = _request_ids(scope)
        user_id = _principal_id(scope)
        logger.info(
            "request",
            extra={
                "method": scope.get("method"),
                "route": route,
                "status": status,
                "duration": round(elapsed * 1000, 3),
                **ids,
                # who asked (the authorizer's principal: a user id, never a token): the operator's log analysis
                # counts top users by it (python -m ops logs analyze)
                **({"user_id": user_id} if user_id else {}),
            },
        )
        # the same request for CloudWatch (EMF; nothing scrapes a function's registry): 401 is an authentication
        # failure (a refused login or token), 5xx an error
        emit_request_metrics(COMPONENT, route=route, status=status, duration_s=elapsed, error=status >= 500,
                             auth_failure=status == 401, request_id=ids["request_id"])


def _body_limit(scope: dict[str, Any]) -> int:
    """The largest body a route reads: a file's write takes a file (in base64), an exec a command as large as a file
    may be; everything else max_body_bytes."""
    s = get_settings()
    if (scope.get("method"), _resource(scope)) in (("PUT", "/sessions/{id}/files"), ("POST", "/sessions/{id}/exec")):
        return max(s.max_body_bytes, s.max_file_body_bytes)
    return s.max_body_bytes


def _principal_id(scope: dict[str, Any]) -> str | None:
    """The authorizer's principalId of the request (API Gateway puts it in requestContext.authorizer)."""
    event = scope.get("aws.event")
    context = event.get("requestContext") if isinstance(event, dict) else None
    authorizer = context.get("authorizer") if isinstance(context, dict) else None
    principal = authorizer.get("principalId") if isinstance(authorizer, dict) else None
    return principal if isinstance(principal, str) and principal else None


# Routes without a token (per source address limit, services/throttle.py)
_PUBLIC_ROUTES = frozenset((r.method, r.resource) for r in ROUTES if not r.protected)


def _resource(scope: dict[str, Any]) -> str | None:
    """The API Gateway resource of the request (the path where there is no event)."""
    event = scope.get("aws.event")
    if isinstance(event, dict) and event.get("resource"):
        return str(event["resource"])
    return scope.get("path")


def _source_ip(scope: dict[str, Any]) -> str | None:
    client = scope.get("client")
    return throttle.source_ip(scope.get("aws.event")) or (str(client[0]) if client and client[0] else None)


def _route_template(scope: Mapping[str, Any]) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path:
        return str(path)
    event = scope.get("aws.event")
    if isinstance(event, dict) and event.get("resource"):
        return str(event["resource"])
    return "unmatched"


app.add_middleware(_EdgeMiddleware)
