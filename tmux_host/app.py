"""Internal HTTP API of the tmux host (Starlette). Every route except ``/health`` requires the header
``X-Tmuxi-Host-Secret``. Errors are ``{"error": {"code", "message", "request_id"}}`` built from
:mod:`tmuxi.errors`.

Each request is served under the id the API sends in ``X-Request-Id`` (API Gateway's requestId): every line the
host logs while serving it -- its request line, the engine's warnings, tasks it starts -- carries it as
``correlation_id``, and the response (errors included) carries it in ``X-Request-Id``. Bound per task
(tmuxi.observability.request_context): concurrent requests on the event loop never mix ids. An id that is
missing, longer than 128 characters or outside ``[A-Za-z0-9._:-]`` is replaced by one of the host's own
(``h-`` + 16 hex digits), and the one given is never logged."""
from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote
from uuid import UUID

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tmux_host import files
from tmux_host.engine import Engine, Registry
from tmux_host.protection import TaskProtection
from tmux_host.stream import FORWARDED_HEADER
from tmuxi import errors
from tmuxi.host_client import FILE_MODE_HEADER, FILE_PATH_HEADER, REQUEST_ID_HEADER, SECRET_HEADER, FileBadPath
from tmuxi.models import FILE_MODE, KEY_NAME, ExecRequest, ExecSignal, ResizeRequest, WaitSpec
from tmuxi.observability import ERRORS, REGISTRY, REQUEST_DURATION, REQUESTS, logger, request_context
from tmuxi.routes import (
    WS_CONNECTION_HEADER,
    WS_CONNECTION_ID,
    WS_HOST_MESSAGE_PATH,
    WS_MAX_MESSAGE_BYTES,
    WS_STREAM_ID,
)
from tmuxi.settings import Settings, get_settings

Handler = Callable[[Request], Awaitable[Response]]


# --- request bodies ---------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateSessionBody(_Body):
    session_id: UUID
    account: int = Field(ge=1, le=2**31 - 1)  # the owner's users.account_no: whose OS account and tmux server
    cols: int = Field(ge=10, le=1000)
    rows: int = Field(ge=5, le=500)


class AttachViewerBody(_Body):
    connection_id: str = Field(pattern=rf"^{WS_CONNECTION_ID}\z")
    read_only: bool = False
    stream: str | None = Field(default=None, pattern=rf"^{WS_STREAM_ID}\z")
    last_seq: int | None = Field(default=None, ge=0)
    share_id: UUID | None = None
    expires_at: float | None = None


class InputBody(_Body):
    data_b64: str | None = None
    keys: list[str] | None = Field(default=None, max_length=256)
    wait: WaitSpec | None = None


class ExecBody(ExecRequest):
    exec_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{16}\z")  # the API's; without it, the host's


class ExecInputBody(_Body):
    data_b64: str = ""
    eof: bool = False


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_CONNECTION_ID = re.compile(WS_CONNECTION_ID)


def request_id_of(given: str | None) -> tuple[str, bool]:
    """(the id to serve a request under, whether the one given was replaced). A given id is used only if it is
    short and of a safe charset (it goes into log lines and response headers); any other is replaced."""
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given, False
    return "h-" + os.urandom(8).hex(), given is not None


def _error(exc: errors.AppError, rid: str) -> JSONResponse:
    body: dict[str, Any] = {"error": {"code": exc.code, "message": exc.message, "request_id": rid}}
    if exc.details and exc.status < 500:  # e.g. how a session ended (410 session_gone)
        body["error"]["details"] = exc.details
    return JSONResponse(body, status_code=exc.status, headers={REQUEST_ID_HEADER: rid})


def _model(result: BaseModel) -> Response:
    """A result as JSON, serialized by pydantic itself (no dict and json.dumps in between)."""
    return Response(result.model_dump_json(), media_type="application/json")


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def read_json(request: Request, model: type[BaseModel], max_body: int | None = None) -> Any:
    max_body = max_body or _settings(request).max_body_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_body:
        raise errors.PayloadTooLarge(f"body is over {max_body} bytes")
    raw = await request.body()
    if len(raw) > max_body:
        raise errors.PayloadTooLarge(f"body is over {max_body} bytes")
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise errors.BadRequest(f"invalid body: {where} {first['msg']}".strip()) from None


def sid(request: Request) -> UUID:
    try:
        return UUID(request.path_params["sid"])
    except ValueError:
        raise errors.NotFound("unknown session") from None


# Not logged one line each: probes, and WebSocket messages (every keystroke; counted in the metrics, and logged
# when refused)
_UNLOGGED = frozenset({"/health", "/metrics", WS_HOST_MESSAGE_PATH})


def endpoint(template: str, handler: Handler, *, auth: bool = True) -> Handler:
    """Auth, error mapping, metrics (route template label, never an id) and one structured log line."""

    async def wrapped(request: Request) -> Response:
        started = time.perf_counter()
        rid, replaced = request_id_of(request.headers.get(REQUEST_ID_HEADER))
        with request_context(rid):
            try:
                if auth:
                    given = request.headers.get(SECRET_HEADER, "").encode()
                    if not hmac.compare_digest(given, request.app.state.secret):
                        raise errors.Unauthorized("missing or wrong host secret")
                response = await handler(request)
                response.headers[REQUEST_ID_HEADER] = rid
            except errors.AppError as exc:
                if exc.status >= 500:
                    ERRORS.labels(component="host", kind=exc.code).inc()
                response = _error(exc, rid)
            except Exception:
                logger.exception("unhandled error", extra={"route": template})
                ERRORS.labels(component="host", kind="internal_error").inc()
                response = _error(errors.AppError("internal error"), rid)
            elapsed = time.perf_counter() - started
            status = str(response.status_code)
            REQUEST_DURATION.labels(component="host", route=template, status=status).observe(elapsed)
            REQUESTS.labels(component="host", route=template, status=status).inc()
            if template not in _UNLOGGED or response.status_code >= 400:
                logger.info("request", extra={"method": request.method, "route": template,
                                              "status": response.status_code, "duration": round(elapsed * 1000, 3),
                                              "request_id_replaced": True if replaced else None})
        return response

    return wrapped


# --- handlers ------------------------------------------------------------------------------------------
async def create_session(request: Request) -> Response:
    body = await read_json(request, CreateSessionBody)
    out = await _engine(request).create_session(body.session_id, body.account, body.cols, body.rows)
    return JSONResponse(out, status_code=201)


async def list_sessions(request: Request) -> Response:
    return JSONResponse({"sessions": await _engine(request).list_sessions()})


async def kill_session(request: Request) -> Response:
    await _engine(request).kill_session(sid(request))
    return Response(status_code=204)


async def send_input(request: Request) -> Response:
    session_id = sid(request)
    limit = _settings(request).max_input_bytes
    body = await read_json(request, InputBody)
    if body.data_b64 is None and body.keys is None:
        raise errors.BadRequest("give data_b64 and/or keys")
    data: bytes | None = None
    if body.data_b64 is not None:
        if len(body.data_b64) > (limit * 4) // 3 + 8:
            raise errors.PayloadTooLarge(f"input is over {limit} bytes")
        try:
            data = base64.b64decode(body.data_b64, validate=True)
        except (binascii.Error, ValueError):
            raise errors.BadRequest("data_b64 is not valid base64") from None
        if len(data) > limit:
            raise errors.PayloadTooLarge(f"input is over {limit} bytes")
    if body.keys is not None:
        bad = [k for k in body.keys if not KEY_NAME.fullmatch(k)]
        if bad:
            raise errors.BadRequest(f"unknown key names: {bad[:5]}")
    if body.wait is not None:
        w = body.wait
        result = await _engine(request).send_and_wait(session_id, data, body.keys, until=w.until, timeout_s=w.timeout_s,
                                                     quiet_ms=w.quiet_ms, pattern=w.pattern)
        return _model(result)
    await _engine(request).send_input(session_id, data=data, keys=body.keys)
    return Response(status_code=204)


async def screen(request: Request) -> Response:
    session_id = sid(request)
    q = request.query_params
    escapes = q.get("escapes", "0") in ("1", "true", "yes")
    try:
        history = int(q.get("history", "0"))
    except ValueError:
        raise errors.BadRequest("history must be an integer") from None
    if history < 0:
        raise errors.BadRequest("history must be >= 0")
    result = await _engine(request).screen(session_id, escapes=escapes, history=history)
    return _model(result)


async def resize(request: Request) -> Response:
    session_id = sid(request)
    body = await read_json(request, ResizeRequest)
    await _engine(request).resize(session_id, body.cols, body.rows)
    return Response(status_code=204)


async def exec_(request: Request) -> Response:
    session_id = sid(request)
    s = _settings(request)
    body = await read_json(request, ExecBody, max(s.max_body_bytes, s.max_file_body_bytes))
    result = await _engine(request).exec(session_id, body.command, body.timeout_s, on_timeout=body.on_timeout,
                                         background=body.background, streams=body.streams, encoding=body.encoding,
                                         max_output_bytes=body.max_output_bytes, exec_id=body.exec_id)
    return _model(result)


def _float_query(request: Request, name: str, default: float) -> float:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise errors.InvalidField(f"query.{name}", "must be a number of seconds") from None
    if not 0 <= value <= 3600:
        raise errors.InvalidField(f"query.{name}", "must be between 0 and 3600")
    return value


async def list_execs(request: Request) -> Response:
    return JSONResponse({"execs": _engine(request).list_execs(sid(request))})


async def poll_exec(request: Request) -> Response:
    result = await _engine(request).poll_exec(sid(request), request.path_params["xid"],
                                              request.query_params.get("cursor", ""),
                                              _float_query(request, "wait_s", 0.0))
    return _model(result)


async def exec_input(request: Request) -> Response:
    body = await read_json(request, ExecInputBody)
    try:
        data = base64.b64decode(body.data_b64, validate=True)
    except (binascii.Error, ValueError):
        raise errors.BadRequest("data_b64 is not valid base64") from None
    await _engine(request).exec_input(sid(request), request.path_params["xid"], data, eof=body.eof)
    return Response(status_code=204)


async def signal_exec(request: Request) -> Response:
    body = await read_json(request, ExecSignal)
    await _engine(request).signal_exec(sid(request), request.path_params["xid"], body.signal)
    return Response(status_code=204)


async def stop_exec(request: Request) -> Response:
    result = await _engine(request).stop_exec(sid(request), request.path_params["xid"],
                                              _float_query(request, "grace_s", 2.0))
    return _model(result)


async def attach_viewer(request: Request) -> Response:
    session_id = sid(request)
    body = await read_json(request, AttachViewerBody)
    out = await _engine(request).live.attach(
        session_id, body.connection_id, read_only=body.read_only, stream_id=body.stream, last_seq=body.last_seq,
        share_id=body.share_id, expires_at=body.expires_at)
    return JSONResponse(out)


async def detach_viewer(request: Request) -> Response:
    reason = request.query_params.get("reason", "detached")[:200]
    notify = request.query_params.get("notify", "1") != "0"
    _engine(request).live.detach(request.path_params["cid"], reason, notify=notify)
    return Response(status_code=204)


async def ws_message(request: Request) -> Response:
    """A WebSocket message API Gateway routed to `$default` (or another host forwarded): the answer goes back
    through the Management API, never in this response (API Gateway's $default integration has no route
    response)."""
    connection_id = request.headers.get(WS_CONNECTION_HEADER, "")
    if not _CONNECTION_ID.fullmatch(connection_id):
        raise errors.BadRequest(f"missing or malformed {WS_CONNECTION_HEADER} header")
    body = await request.body()
    if len(body) > WS_MAX_MESSAGE_BYTES:
        raise errors.PayloadTooLarge(f"message is over {WS_MAX_MESSAGE_BYTES} bytes")
    served = await _engine(request).live.message(connection_id, body,
                                                 forwarded=request.headers.get(FORWARDED_HEADER) == "1")
    if not served:
        raise errors.Conflict("this host holds no viewer for the connection")  # 409: the forwarder looks again
    return Response(status_code=202)


# --- files in a session's home (tmux_host/files.py): raw bytes in and out ------------------------------------
async def _file_body(request: Request, cap: int) -> bytes:
    """The body (the file's bytes), refused past ``cap`` before more of it is read."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > cap:
        raise errors.PayloadTooLarge(f"the file is {length} bytes; the limit is {cap}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise errors.PayloadTooLarge(f"the file is over {cap} bytes; the limit is {cap}")
    return bytes(body)


def _file_path(request: Request, default: str | None = None) -> str:
    path = request.query_params.get("path", default)
    if path is None:
        raise FileBadPath("give the file's path (query parameter path)")
    return path


async def put_file(request: Request) -> Response:
    session_id = sid(request)
    path = _file_path(request)
    raw_mode = request.query_params.get("mode")
    if raw_mode is not None and not re.fullmatch(FILE_MODE, raw_mode):
        raise errors.BadRequest("mode must be octal permission bits, e.g. 0644")
    data = await _file_body(request, _settings(request).max_file_bytes)
    out = await files.write(_engine(request), session_id, path, data, None if raw_mode is None else int(raw_mode, 8))
    return JSONResponse(out)


async def get_file(request: Request) -> Response:
    data, meta = await files.read(_engine(request), sid(request), _file_path(request))
    return Response(data, media_type="application/octet-stream",
                    headers={FILE_PATH_HEADER: quote(meta["path"]), FILE_MODE_HEADER: meta["mode"]})


async def list_files(request: Request) -> Response:
    return JSONResponse(await files.listing(_engine(request), sid(request), _file_path(request, ".")))


async def health(request: Request) -> Response:
    h = _engine(request).health()
    protection: TaskProtection | None = request.app.state.protection
    h["task_protection"] = protection.describe() if protection is not None else None  # None: not on ECS
    return JSONResponse(h, status_code=503 if h["status"] == "down" else 200)


async def metrics(request: Request) -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
    rid, _ = request_id_of(request.headers.get(REQUEST_ID_HEADER))
    return JSONResponse({"error": {"code": code, "message": str(exc.detail), "request_id": rid}},
                        status_code=exc.status_code, headers={REQUEST_ID_HEADER: rid})


S = "/v1/sessions/{sid}"
ROUTES = [
    Route("/v1/sessions", endpoint("/v1/sessions", create_session), methods=["POST"]),
    Route("/v1/sessions", endpoint("/v1/sessions", list_sessions), methods=["GET"]),
    Route(S, endpoint(S, kill_session), methods=["DELETE"]),
    Route(S + "/input", endpoint(S + "/input", send_input), methods=["POST"]),
    Route(S + "/screen", endpoint(S + "/screen", screen), methods=["GET"]),
    Route(S + "/resize", endpoint(S + "/resize", resize), methods=["POST"]),
    Route(S + "/exec", endpoint(S + "/exec", exec_), methods=["POST"]),
    Route(S + "/execs", endpoint(S + "/execs", list_execs), methods=["GET"]),
    Route(S + "/execs/{xid}", endpoint(S + "/execs/{xid}", poll_exec), methods=["GET"]),
    Route(S + "/execs/{xid}", endpoint(S + "/execs/{xid}", stop_exec), methods=["DELETE"]),
    Route(S + "/execs/{xid}/input", endpoint(S + "/execs/{xid}/input", exec_input), methods=["POST"]),
    Route(S + "/execs/{xid}/signal", endpoint(S + "/execs/{xid}/signal", signal_exec), methods=["POST"]),
    Route(S + "/viewers", endpoint(S + "/viewers", attach_viewer), methods=["POST"]),
    Route("/v1/viewers/{cid:path}", endpoint("/v1/viewers/{cid}", detach_viewer), methods=["DELETE"]),
    Route(WS_HOST_MESSAGE_PATH, endpoint(WS_HOST_MESSAGE_PATH, ws_message), methods=["POST"]),
    Route(S + "/files", endpoint(S + "/files", put_file), methods=["PUT"]),
    Route(S + "/files", endpoint(S + "/files", get_file), methods=["GET"]),
    Route(S + "/files/list", endpoint(S + "/files/list", list_files), methods=["GET"]),
    Route("/health", endpoint("/health", health, auth=False), methods=["GET"]),
    Route("/metrics", endpoint("/metrics", metrics), methods=["GET"]),
]


def create_app(
    settings: Settings | None = None, *, registry: Registry | None = None, engine: Engine | None = None,
) -> Starlette:
    settings = settings or get_settings()
    engine = engine or Engine(settings, registry=registry)
    # On ECS: the task is protected from scale-in while the host holds sessions
    protection = None if settings.ecs_agent_uri is None else TaskProtection(
        settings.ecs_agent_uri, lambda: engine.session_count, engine.sessions_changed, settings.heartbeat_interval_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await engine.start()
        if protection is not None:
            protection.start()
        try:
            yield
        finally:
            if protection is not None:
                await protection.stop()
            await engine.stop()

    app = Starlette(routes=ROUTES, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.engine = engine
    app.state.protection = protection
    app.state.settings = settings
    app.state.secret = settings.require_host_secret().encode()
    return app


__all__ = ["create_app"]
