"""The local API Gateway WebSocket API: speaks API Gateway's WebSocket shape so the local path is the AWS path.

One process holds every connection and serves the Management API (``@connections``), as API Gateway's WebSocket
API is an endpoint of its own (docs/websocket.md, "Where each message goes"). An ASGI app served by uvicorn with
its sans-I/O ``websockets`` protocol (``WsProtocol`` below; ``wsproto`` is not installed here). All three of
uvicorn's WebSocket protocols implement the ASGI "websocket.http.response" extension, which is how a refused
``$connect`` answers the handshake with the function's own HTTP status (401, 403, ...) instead of a bare 403.

For every WebSocket connection (any path, ``?ticket=...``) it
  1. gives it a connectionId like API Gateway's (10 random bytes, URL-safe base64: ``L0SM9cOFvHcCIhw=``), builds
     the ``$connect`` event exactly as API Gateway does and invokes the ws Lambda handler in a thread pool with a
     LambdaContext: statusCode 200 accepts, any other status refuses the handshake with that status (its headers
     and body);
  2. for every message, selects the route on ``$request.body.action`` (``ws_route_key``): a function route
     (attach, detach) is a MESSAGE event to the handler, whose ``body``, if any, goes back to the client (a
     two-way route); ``$default`` is the HTTP integration: the raw frame POSTed to ``{target}/v1/ws/message`` of
     the hosts in turn (as an NLB spreads requests; the next on a connection error), with the host secret, the
     connectionId and a request id. A connection's messages are handled one at a time, in the order sent
     (keystrokes); different connections concurrently. No host reachable -> an ``unavailable`` error frame;
  3. enforces API Gateway's limits: a frame over 32 KB is answered ``too_large`` and goes nowhere, a message over
     128 KB closes the connection (1009), a binary frame closes it (1003: API Gateway takes text frames only), idle
     for ``idle_timeout_s`` or open for ``max_connection_s`` -> closed (1001); on any close the ``$disconnect``
     event (disconnectStatusCode, disconnectReason) goes to the handler.

The Management API (``/@connections/{id}``, also under ``/{stage}``): POST delivers the body (a text frame when it
is UTF-8, else binary) and answers 200 once queued; GET describes the connection; DELETE closes it (204; then
``$disconnect``). Errors are restJson errors botocore parses (``x-amzn-ErrorType`` + ``{"message"}``), so boto3's
``apigatewaymanagementapi`` client raises GoneException (410, unknown connection), ForbiddenException (403),
PayloadTooLargeException (413, over 128 KB) and LimitExceededException (429). Every request must be SigV4-signed
(service ``execute-api``) with the local stack's AWS credentials, checked with botocore's own signer: a user's
shell on this machine can reach the port. Each connection has a bounded outbound queue (``max_outbound_bytes`` of
unsent data: queued here or in the transport's write buffer; the kernel's send buffer is capped too): a POST that
would exceed it answers 429 and delivers nothing, so a client that stops reading never blocks a poster nor grows
memory.

Also: ``GET /health``, ``GET /metrics`` (Prometheus text; WS_* metrics with component="gateway"). The ticket in a
handshake's query string is never logged (uvicorn's own WebSocket log lines, which carry it, are silenced).

Run it: ``python -m local.ws_gateway [--host H] [--port P]`` or ``serve()`` (settings.gateway_bind /
gateway_ws_port, gateway_ws_targets, host_secret, aws_region; credentials from AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY as botocore resolves them).
"""
from __future__ import annotations

import asyncio
import base64
import calendar
import concurrent.futures
import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import aiohttp  # at start, not on the first keystroke (importing it takes ~1 s)

from local.gateway import (
    DEFAULT_ACCOUNT,
    DEFAULT_API_ID,
    DEFAULT_STAGE,
    HTTP_PROTOCOL,
    BackgroundServer,
    LambdaHandler,
    MalformedLambdaResponse,
    _init_worker_loop,
    _request_time,
    split_headers,
    split_query,
    translate_response,
)
from local.lambda_context import LambdaContext
from tmuxi.host_client import REQUEST_ID_HEADER, SECRET_HEADER
from tmuxi.routes import (
    INTEGRATION_TIMEOUT_S,
    WS_CONNECTION_HEADER,
    WS_HOST_MESSAGE_PATH,
    WS_IDLE_TIMEOUT_S,
    WS_MAX_CONNECTION_S,
    WS_MAX_FRAME_BYTES,
    WS_MAX_MESSAGE_BYTES,
    WS_ROUTES,
    ws_route_key,
)

# A connection's unsent outbound data (queued here + the transport's write buffer) may not exceed this: a POST
# that would is answered 429 LimitExceededException (API Gateway's "client side buffer is full").
MAX_OUTBOUND_BYTES = 1 << 20
# The kernel's send buffer of a WebSocket connection (Linux doubles it). Left to autotuning it grows to 4 MiB
# (net.ipv4.tcp_wmem), which a client that stops reading would hold on top of the outbound queue (measured: a
# stalled client took 5.1 MB of posts before the first 429 with it, ~1.3 MB with this).
SEND_BUFFER_BYTES = 64 * 1024
HANDLER_WORKERS = 8  # threads invoking the ws function ($connect, attach, detach, $disconnect)
CONNECT_TIMEOUT_S = 2.0  # connecting to a host ($default); a refused connection fails at once
# Pooled connections to the hosts are dropped after this much idleness: shorter than the hosts' uvicorn keep-alive
# (5 s), so a request is never sent on a connection the host is closing (it could not be retried: see _to_host).
TARGET_KEEPALIVE_S = 4.0
# Management API connections (the hosts' boto3 pools) are kept open this long when idle: longer than the REST
# gateway's 5 s, so a host that posts now and then rarely finds its pooled connection just closed (its client
# makes one attempt per call).
MANAGEMENT_KEEP_ALIVE_S = 60
MAX_SIGNATURE_SKEW_S = 300  # SigV4: a request's X-Amz-Date within 5 minutes of now, as AWS requires
SERVICE = "execute-api"

FUNCTION_ROUTES = frozenset(r.key for r in WS_ROUTES if r.target == "function" and not r.key.startswith("$"))

# what a client is told (docs/websocket.md "Errors"); API Gateway's own words when a function route fails
TOO_LARGE = json.dumps({"type": "error", "code": "too_large",
                        "message": f"frame larger than {WS_MAX_FRAME_BYTES} bytes"}, separators=(",", ":"))
UNAVAILABLE = json.dumps({"type": "error", "code": "unavailable",
                          "message": "the terminal service is unavailable; retry shortly"}, separators=(",", ":"))
INTERNAL_ERROR = "Internal server error"
TIMED_OUT = "Endpoint request timed out"

# disconnectReason for a close code, as API Gateway words them (a client's own reason wins)
CLOSE_REASONS = {
    1000: "Connection Closed Normally",
    1001: "Going away",
    1003: "Unsupported data",
    1005: "Client-side close frame status not set",
    1006: "Connection closed abnormally",
    1007: "Invalid frame payload data",
    1009: "Message too big",
    1011: "Internal error",
    1012: "Service restart",
}

# our WebSocket protocol's ASGI additions: the event it sends instead of a message with an oversized frame, and
# the scope extension through which the app closes a connection at once and reads its write buffer
FRAME_TOO_LARGE = "tmuxi.websocket.frame_too_large"
EXTENSION = "tmuxi.websocket"


def _log() -> Any:
    from tmuxi.observability import logger  # lazy: keeps `import local.ws_gateway` cheap for tools

    return logger


def _metrics() -> Any:
    from tmuxi import observability

    return observability


def rest_gateway_metrics() -> tuple[bytes, str]:
    """The REST gateway's metrics: its workers are processes of their own (as Lambda execution environments are),
    each writing its metrics under ``gateway_metrics_dir``; prometheus_client's multiprocess collector adds them up.
    Served here because the REST gateway emulates API Gateway, which has no /metrics route."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    from tmuxi.settings import get_settings

    directory = get_settings().gateway_metrics_dir
    if directory is None or not directory.is_dir():
        return b"", CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST


# --- ids, times, events (pure functions; tested in tests/unit/test_ws_events.py) -------------------------------


def new_id() -> str:
    """An id shaped like API Gateway's connectionId / requestId / messageId: ``L0SM9cOFvHcCIhw=``."""
    return base64.urlsafe_b64encode(secrets.token_bytes(10)).decode("ascii")


def iso_ms(epoch_ms: int) -> str:
    """ISO 8601 in UTC with milliseconds, as the Management API gives ``connectedAt`` / ``lastActiveAt``."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_ms // 1000)) + f".{epoch_ms % 1000:03d}Z"


def close_reason(code: int, reason: str | None = None) -> str:
    return reason or CLOSE_REASONS.get(code, "")


@dataclass(frozen=True, slots=True)
class ConnectionContext:
    """What every event of one connection repeats in its ``requestContext``."""

    connection_id: str
    connected_at_ms: int
    source_ip: str
    user_agent: str | None
    domain: str
    stage: str = DEFAULT_STAGE
    api_id: str = DEFAULT_API_ID

    def request_context(self, route_key: str, event_type: str, request_id: str, now_ms: int,
                        **extra: Any) -> dict[str, Any]:
        """``requestContext`` for one event; ``extra`` (messageId, disconnectStatusCode, disconnectReason) goes
        where API Gateway puts it."""
        identity: dict[str, Any] = {"sourceIp": self.source_ip}
        if self.user_agent is not None:
            identity["userAgent"] = self.user_agent
        rc: dict[str, Any] = {"routeKey": route_key}
        if "messageId" in extra:
            rc["messageId"] = extra.pop("messageId")
        if "disconnectStatusCode" in extra:
            rc["disconnectStatusCode"] = extra.pop("disconnectStatusCode")
        rc.update({"eventType": event_type, "extendedRequestId": request_id,
                   "requestTime": _request_time(now_ms // 1000), "messageDirection": "IN"})
        rc.update(extra)  # disconnectReason
        rc.update({"stage": self.stage, "connectedAt": self.connected_at_ms, "requestTimeEpoch": now_ms,
                   "identity": identity, "requestId": request_id, "domainName": self.domain,
                   "connectionId": self.connection_id, "apiId": self.api_id})
        return rc


def domain_of(headers: Sequence[tuple[str, str]]) -> str:
    host = next((v for k, v in headers if k.lower() == "host"), "") or "localhost"
    return host[: host.rindex(":")] if ":" in host and not host.endswith("]") else host


def build_connect_event(ctx: ConnectionContext, headers: Sequence[tuple[str, str]], query: str, *,
                        request_id: str, now_ms: int) -> dict[str, Any]:
    """The ``$connect`` event: the handshake's headers (with the X-Forwarded-* API Gateway adds) and query string;
    the query keys are absent when there is no query, as in API Gateway."""
    single_h, multi_h = split_headers(list(headers))
    event: dict[str, Any] = {"headers": single_h, "multiValueHeaders": multi_h}
    single_q, multi_q = split_query(query)
    if single_q is not None:
        event["queryStringParameters"] = single_q
        event["multiValueQueryStringParameters"] = multi_q
    event["requestContext"] = ctx.request_context("$connect", "CONNECT", request_id, now_ms)
    event["isBase64Encoded"] = False
    return event


def build_message_event(ctx: ConnectionContext, route_key: str, body: str, *, request_id: str, message_id: str,
                        now_ms: int) -> dict[str, Any]:
    """A MESSAGE event for a function route (the frame's text as ``body``)."""
    return {"requestContext": ctx.request_context(route_key, "MESSAGE", request_id, now_ms, messageId=message_id),
            "body": body, "isBase64Encoded": False}


def build_disconnect_event(ctx: ConnectionContext, code: int, reason: str, *, request_id: str,
                           now_ms: int) -> dict[str, Any]:
    """The ``$disconnect`` event: API Gateway's fixed headers and the close's status code and reason."""
    headers = {"Host": ctx.domain, "x-api-key": "", "X-Forwarded-For": "", "x-restapi": ""}
    return {"headers": headers, "multiValueHeaders": {k: [v] for k, v in headers.items()},
            "requestContext": ctx.request_context("$disconnect", "DISCONNECT", request_id, now_ms,
                                                  disconnectStatusCode=code, disconnectReason=reason),
            "isBase64Encoded": False}


def connection_id_of(raw_path: str, stage: str) -> str | None:
    """The connection id of a Management API path: ``/@connections/{id}`` or ``/{stage}/@connections/{id}``
    (the id percent-decoded, as botocore encodes it)."""
    for prefix in ("/@connections/", f"/{stage}/@connections/", "/%40connections/", f"/{stage}/%40connections/"):
        if raw_path.startswith(prefix):
            rest = raw_path[len(prefix):]
            return unquote(rest) if rest and "/" not in rest else None
    return None


def reply_of(result: Any) -> str | bytes | None:
    """What a function route's result sends back to the client: its ``body`` (bytes when base64-encoded)."""
    if not isinstance(result, dict):
        return None
    body = result.get("body")
    if not isinstance(body, str) or not body:
        return None
    if result.get("isBase64Encoded"):
        with contextlib.suppress(ValueError):
            return base64.b64decode(body, validate=True)
        return None
    return body


# --- SigV4: the Management API takes signed requests only ---------------------------------------------------

_AUTH_RE = re.compile(r"AWS4-HMAC-SHA256\s+Credential=([^,\s]+),\s*SignedHeaders=([^,\s]+),\s*"
                      r"Signature=([0-9a-f]{64})")


class SignatureError(Exception):
    """A Management API request that is not signed with our credentials (-> 403 ForbiddenException)."""


class SigV4Verifier:
    """Checks a request's AWS Signature Version 4 against one set of credentials, recomputing it with botocore's
    own signer (``SigV4Auth``) over the headers the request says it signed."""

    def __init__(self, access_key: str, secret_key: str, region: str, token: str | None = None,
                 service: str = SERVICE, max_skew_s: float = MAX_SIGNATURE_SKEW_S) -> None:
        if not access_key or not secret_key:
            raise ValueError("SigV4 verification needs an access key id and a secret access key")
        self.access_key = access_key
        self._secret_key = secret_key
        self.region = region
        self._token = token
        self.service = service
        self.max_skew_s = max_skew_s

    def verify(self, method: str, raw_path: str, query: str, headers: Sequence[tuple[str, str]], body: bytes,
               now: float | None = None) -> None:
        """Returns if the request is signed with our credentials; raises SignatureError saying why not."""
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        values: dict[str, list[str]] = {}
        for k, v in headers:
            values.setdefault(k.lower(), []).append(v)
        auth = values.get("authorization")
        if not auth:
            raise SignatureError("Missing Authentication Token")
        m = _AUTH_RE.fullmatch(auth[0].strip())
        if m is None:
            raise SignatureError("Authorization header is not an AWS4-HMAC-SHA256 signature")
        credential, signed_list, signature = m.groups()
        parts = credential.split("/")
        if len(parts) != 5 or parts[4] != "aws4_request":
            raise SignatureError("malformed credential scope")
        access_key, date, region, service = parts[:4]
        if not hmac.compare_digest(access_key.encode(), self.access_key.encode()):
            raise SignatureError("The security token included in the request is invalid")
        if region != self.region or service != self.service:
            raise SignatureError(f"Credential should be scoped to region {self.region!r} and service "
                                 f"{self.service!r}")
        signed = signed_list.split(";")
        if "host" not in signed or "x-amz-date" not in signed:
            raise SignatureError("the signature must cover the host and x-amz-date headers")
        missing = [h for h in signed if h not in values]
        if missing:
            raise SignatureError(f"signed header(s) not in the request: {', '.join(missing)}")
        amz_date = values["x-amz-date"][0]
        try:
            t = calendar.timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ"))
        except ValueError:
            raise SignatureError("malformed X-Amz-Date") from None
        if date != amz_date[:8]:
            raise SignatureError("credential scope date differs from X-Amz-Date")
        if abs((time.time() if now is None else now) - t) > self.max_skew_s:
            raise SignatureError("Signature expired")
        token = values.get("x-amz-security-token")
        if self._token is not None and (
                token is None or "x-amz-security-token" not in signed
                or not hmac.compare_digest(token[0].encode(), self._token.encode())):
            raise SignatureError("The security token included in the request is invalid")
        if self._token is None and token is not None:
            raise SignatureError("The security token included in the request is invalid")
        digest = hashlib.sha256(body).hexdigest()
        if "x-amz-content-sha256" in values and values["x-amz-content-sha256"][0] != digest:
            raise SignatureError("X-Amz-Content-SHA256 does not match the body")

        # the request as the client signed it: only the headers it signed (a signed X-Amz-Content-SHA256 is the
        # body's hash, checked above); botocore hashes the body itself
        host = values["host"][0]
        request = AWSRequest(method=method.upper(), url=f"http://{host}{raw_path}" + (f"?{query}" if query else ""),
                             headers={h: ",".join(values[h]) for h in signed}, data=body)
        request.context["timestamp"] = amz_date
        signer = SigV4Auth(Credentials(self.access_key, self._secret_key, self._token), self.service, self.region)
        if signer.signed_headers(signer.headers_to_sign(request)) != signed_list:
            raise SignatureError("SignedHeaders lists headers botocore would not sign")
        expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
        if not hmac.compare_digest(expected, signature):
            raise SignatureError("The request signature we calculated does not match the signature you provided")


def _env_credentials() -> tuple[str, str, str | None] | None:
    """The credentials botocore finds in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN)."""
    from botocore.credentials import EnvProvider

    found = EnvProvider().load()
    if found is None:
        return None
    frozen = found.get_frozen_credentials()
    return frozen.access_key, frozen.secret_key, frozen.token


# --- one connection -----------------------------------------------------------------------------------------


class _Connection:
    """An open connection: its identity, deadlines and bounded outbound queue (drained by its sender task)."""

    __slots__ = ("ctx", "last_active_ms", "idle_deadline", "end_deadline", "outbox", "queued", "wake",
                 "closing", "close_now", "buffered", "max_outbound", "send")

    def __init__(self, ctx: ConnectionContext, now: float, idle_timeout_s: float, max_connection_s: float,
                 max_outbound: int, send: Any, close_now: Callable[[int, str], None] | None,
                 buffered: Callable[[], int] | None) -> None:
        self.ctx = ctx
        self.last_active_ms = ctx.connected_at_ms
        self.idle_deadline = now + idle_timeout_s
        self.end_deadline = now + max_connection_s
        # (ASGI send message, bytes, when queued)
        self.outbox: deque[tuple[dict[str, Any], int, float]] = deque()
        self.queued = 0
        self.wake = asyncio.Event()
        self.closing: tuple[int, str] | None = None  # (code, reason) once the gateway closes it
        self.close_now = close_now
        self.buffered = buffered or (lambda: 0)
        self.max_outbound = max_outbound
        self.send = send  # the ASGI send of its connection

    @property
    def id(self) -> str:
        return self.ctx.connection_id

    def offer(self, data: str | bytes, size: int) -> bool:
        """Queue ``data`` for the client unless the unsent data would exceed the bound (or it is closing)."""
        if self.closing is not None or self.queued + self.buffered() + size > self.max_outbound:
            return False
        message = {"type": "websocket.send", "text": data} if isinstance(data, str) else \
            {"type": "websocket.send", "bytes": data}
        self.outbox.append((message, size, time.perf_counter()))
        self.queued += size
        self.wake.set()
        return True


# --- the gateway --------------------------------------------------------------------------------------------


class LocalWsGateway:
    """ASGI app emulating an API Gateway WebSocket API: a Lambda integration for ``$connect``, ``$disconnect``
    and the function routes, an HTTP integration to the tmux hosts for ``$default``, and the Management API.
    ``handler`` defaults to the real ws function (imported on first use); tests may pass a stand-in.
    ``targets`` / ``host_secret`` / ``credentials`` / ``region`` default to the settings (and, for the
    credentials, to AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)."""

    def __init__(
        self,
        *,
        handler: LambdaHandler | None = None,
        targets: Sequence[str] | None = None,
        host_secret: str | None = None,
        credentials: tuple[str, str] | None = None,
        region: str | None = None,
        stage: str = DEFAULT_STAGE,
        api_id: str = DEFAULT_API_ID,
        account_id: str = DEFAULT_ACCOUNT,
        idle_timeout_s: float = WS_IDLE_TIMEOUT_S,
        max_connection_s: float = WS_MAX_CONNECTION_S,
        max_outbound_bytes: int = MAX_OUTBOUND_BYTES,
        max_message_bytes: int = WS_MAX_MESSAGE_BYTES,
        integration_timeout_s: float = INTEGRATION_TIMEOUT_S,
        handler_workers: int = HANDLER_WORKERS,
    ) -> None:
        settings = None
        if targets is None or host_secret is None or region is None:
            from tmuxi.settings import get_settings

            settings = get_settings()
        if targets is None:
            assert settings is not None
            targets = [t.strip() for t in (settings.gateway_ws_targets or "").split(",") if t.strip()]
        self.targets = [t.rstrip("/") for t in targets]
        if host_secret is None and settings is not None and settings.host_secret is not None:
            host_secret = settings.host_secret.get_secret_value()
        if self.targets and not host_secret:
            raise ValueError("the $default integration needs the host secret (TMUXI_HOST_SECRET)")
        self._host_secret = host_secret or ""
        self.region = region if region is not None else settings.aws_region if settings is not None else "us-east-1"
        if credentials is not None:
            self.verifier: SigV4Verifier | None = SigV4Verifier(credentials[0], credentials[1], self.region)
        else:
            found = _env_credentials()
            self.verifier = SigV4Verifier(found[0], found[1], self.region, found[2]) if found else None
        self._handler = handler
        self.stage = stage
        self.api_id = api_id
        self.account_id = account_id
        self.idle_timeout_s = idle_timeout_s
        self.max_connection_s = max_connection_s
        self.max_outbound_bytes = max_outbound_bytes
        self.max_message_bytes = max_message_bytes
        self.integration_timeout_s = integration_timeout_s
        self.connections: dict[str, _Connection] = {}
        self._next_target = 0
        self._client: Any = None  # aiohttp.ClientSession, made on the server's loop
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=handler_workers, thread_name_prefix="ws-lambda", initializer=_init_worker_loop)
        self._resolve_lock = threading.Lock()

    # the handler is imported lazily: the ws function pulls in the services
    def _handler_fn(self) -> LambdaHandler:
        if self._handler is None:
            with self._resolve_lock:
                if self._handler is None:
                    from functions.ws.handler import handler

                    self._handler = handler
        return self._handler

    def _http_client(self) -> Any:
        """aiohttp: a keystroke's hop to a host costs ~0.3 ms with it, ~0.6 ms with httpx (measured here)."""
        if self._client is None:
            self._client = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.integration_timeout_s, connect=CONNECT_TIMEOUT_S),
                connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=TARGET_KEEPALIVE_S),
                trust_env=False)  # never a proxy from the environment between the gateway and the hosts
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._http_client()
                if self.verifier is None:
                    _log().error("no AWS credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY): every @connections "
                                 "request will be refused")
                try:
                    await asyncio.get_running_loop().run_in_executor(self._pool, self._handler_fn)
                except ImportError as exc:  # connections are refused (500) until it can be imported
                    _log().error("the ws function cannot be imported", extra={"error": str(exc)})
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # --- Lambda invocations (in the pool, each thread with an event loop of its own) ------------------------
    def _invoke(self, event: dict[str, Any]) -> Any:
        from tmuxi.observability import request_context

        rid = event["requestContext"]["requestId"]
        with request_context(rid):  # the gateway's own lines about it carry it too
            return self._handler_fn()(event, LambdaContext("ws", timeout_s=self.integration_timeout_s,
                                                           region=self.region, account_id=self.account_id,
                                                           request_id=rid))

    async def _call(self, event: dict[str, Any], operation: str) -> tuple[str, Any]:
        """("ok", result) | ("failed", None) | ("timeout", None)."""
        obs = _metrics()
        t0 = time.perf_counter()
        try:
            result = await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(self._pool, self._invoke, event),
                self.integration_timeout_s)
        except TimeoutError:
            _log().warning("ws function timed out", extra={"route": event["requestContext"]["routeKey"],
                                                            "request_id": event["requestContext"]["requestId"]})
            obs.WS_ERRORS.labels(component="gateway", kind="function_timeout").inc()
            return "timeout", None
        except Exception:
            _log().exception("ws function failed", extra={"route": event["requestContext"]["routeKey"],
                                                         "request_id": event["requestContext"]["requestId"]})
            obs.WS_ERRORS.labels(component="gateway", kind="function_failed").inc()
            return "failed", None
        finally:
            obs.WS_LATENCY.labels(component="gateway", operation=operation).observe(time.perf_counter() - t0)
        return "ok", result

    # --- WebSocket ----------------------------------------------------------------------------------------
    async def _websocket(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        user_agent = next((v for k, v in headers if k.lower() == "user-agent"), None)
        client = scope.get("client")
        source_ip = client[0] if client else "127.0.0.1"
        server = scope.get("server")
        headers += [("x-forwarded-for", source_ip), ("x-forwarded-proto", "https" if scope.get("scheme") == "wss"
                                                     else "http")]
        if server and server[1]:
            headers.append(("x-forwarded-port", str(server[1])))
        now_ms = int(time.time() * 1000)
        ctx = ConnectionContext(new_id(), now_ms, source_ip, user_agent, domain_of(headers), self.stage, self.api_id)
        event = build_connect_event(ctx, headers, scope.get("query_string", b"").decode("latin-1"),
                                    request_id=new_id(), now_ms=now_ms)
        outcome, result = await self._call(event, "connect")
        status, out_headers, body, subprotocol = self._connect_answer(outcome, result)
        if status != 200:
            _log().info("ws connect refused", extra={"connection_id": ctx.connection_id, "status": status})
            await send({"type": "websocket.http.response.start", "status": status, "headers": out_headers})
            await send({"type": "websocket.http.response.body", "body": body})
            return
        accept: dict[str, Any] = {"type": "websocket.accept"}
        if subprotocol:
            accept["subprotocol"] = subprotocol
        try:
            await send(accept)
        except OSError:  # uvicorn's ClientDisconnected: it left while $connect ran, which admitted it
            await self._disconnected(ctx, 1006, CLOSE_REASONS[1006])
            return
        ext = scope.get("extensions", {}).get(EXTENSION) or {}
        loop = asyncio.get_running_loop()
        conn = _Connection(ctx, loop.time(), self.idle_timeout_s, self.max_connection_s, self.max_outbound_bytes,
                           send, ext.get("close"), ext.get("buffered"))
        self.connections[conn.id] = conn
        obs = _metrics()
        obs.WS_CONNECTIONS.labels(component="gateway").inc()
        _log().info("ws connected", extra={"connection_id": conn.id})
        sender = asyncio.ensure_future(self._sender(conn))
        code, reason = 1006, ""
        try:
            code, reason = await self._serve(conn, receive)
        finally:
            self.connections.pop(conn.id, None)
            conn.closing = conn.closing or (code, reason)
            sender.cancel()
            obs.WS_CONNECTIONS.labels(component="gateway").dec()
            _log().info("ws disconnected", extra={"connection_id": conn.id, "code": code,
                                                  "duration_s": round(time.time() - now_ms / 1000, 3)})
            await self._disconnected(ctx, code, reason)

    async def _disconnected(self, ctx: ConnectionContext, code: int, reason: str) -> None:
        """``$disconnect``, after the close, as API Gateway runs it (best effort: its outcome changes nothing)."""
        await self._call(build_disconnect_event(ctx, code, reason, request_id=new_id(),
                                                now_ms=int(time.time() * 1000)), "disconnect")

    @staticmethod
    def _connect_answer(outcome: str, result: Any) -> tuple[int, list[tuple[bytes, bytes]], bytes, str | None]:
        """$connect's outcome -> (status, headers, body, subprotocol)."""
        json_type = [(b"content-type", b"application/json")]
        if outcome == "timeout":
            return 504, json_type, json.dumps({"message": TIMED_OUT}).encode(), None
        if outcome != "ok":
            return 500, json_type, json.dumps({"message": INTERNAL_ERROR}).encode(), None
        try:
            status, headers, body = translate_response(result)
        except MalformedLambdaResponse as exc:
            _log().error("malformed $connect response", extra={"error": str(exc)})
            return 502, json_type, json.dumps({"message": INTERNAL_ERROR}).encode(), None
        subprotocol = next((v.decode("latin-1") for k, v in headers if k == b"sec-websocket-protocol"), None)
        return status, headers, body, subprotocol

    async def _serve(self, conn: _Connection, receive: Any) -> tuple[int, str]:
        """Take the connection's messages one at a time until it closes; its (code, reason)."""
        obs = _metrics()
        loop = asyncio.get_running_loop()
        pending: asyncio.Future[Any] | None = None
        try:
            while True:
                if pending is None:  # one receive at a time, never cancelled: no message is lost to a timeout
                    pending = asyncio.ensure_future(receive())
                timeout = None if conn.closing else min(conn.idle_deadline, conn.end_deadline) - loop.time()
                done, _ = await asyncio.wait({pending}, timeout=None if timeout is None else max(timeout, 0.0))
                if not done:
                    why = "idle" if conn.idle_deadline <= conn.end_deadline else "max_lifetime"
                    _log().info("ws connection timed out", extra={"connection_id": conn.id, "why": why})
                    await self._close(conn, 1001, CLOSE_REASONS[1001])
                    continue
                message, pending = pending.result(), None
                kind = message["type"]
                if kind == "websocket.disconnect":
                    if conn.closing is not None:
                        return conn.closing
                    code = int(message.get("code") or 1005)
                    return code, close_reason(code, message.get("reason"))
                conn.idle_deadline = loop.time() + self.idle_timeout_s
                conn.last_active_ms = int(time.time() * 1000)
                obs.WS_RECEIVED.labels(component="gateway").inc()
                if kind == FRAME_TOO_LARGE:
                    obs.WS_ERRORS.labels(component="gateway", kind="too_large").inc()
                    self._reply(conn, TOO_LARGE)
                elif kind == "websocket.receive":
                    text = message.get("text")
                    if text is None:  # API Gateway takes text frames only: a binary one closes the connection
                        obs.WS_ERRORS.labels(component="gateway", kind="binary").inc()
                        await self._close(conn, 1003, "Binary frames are not supported")
                    elif conn.closing is None:
                        await self._route(conn, text)
        finally:
            if pending is not None:
                pending.cancel()

    async def _close(self, conn: _Connection, code: int, reason: str) -> None:
        """Close from the gateway's side (idle, lifetime, DELETE, binary frame): the close frame goes at once, past
        anything still queued for the client; a client that does not read is dropped."""
        if conn.closing is not None:
            return
        conn.closing = (code, reason)
        conn.wake.set()
        if conn.close_now is not None:
            conn.close_now(code, reason)
        else:  # served by another ASGI server than ours
            with contextlib.suppress(Exception):
                await conn.send({"type": "websocket.close", "code": code, "reason": reason})

    def _reply(self, conn: _Connection, data: str | bytes) -> None:
        """A message from the gateway itself (an error, a function route's answer): dropped if the client's queue
        is full (it is not reading)."""
        size = len(data.encode() if isinstance(data, str) else data)
        if not conn.offer(data, size):
            _metrics().WS_ERRORS.labels(component="gateway", kind="dropped").inc()

    async def _sender(self, conn: _Connection) -> None:
        """Send the connection's queue in order, one message at a time; ends when the connection closes."""
        obs = _metrics()
        sent = obs.WS_SENT.labels(component="gateway")
        latency = obs.WS_LATENCY.labels(component="gateway", operation="deliver")
        while True:
            while not conn.outbox and conn.closing is None:
                conn.wake.clear()
                await conn.wake.wait()
            if conn.closing is not None:
                return
            message, size, t0 = conn.outbox.popleft()
            try:
                await conn.send(message)  # waits while the transport's buffer is above its high-water mark
            except Exception:  # the connection is gone
                return
            finally:
                conn.queued -= size
            sent.inc()
            latency.observe(time.perf_counter() - t0)

    async def _route(self, conn: _Connection, text: str) -> None:
        route = ws_route_key(text)
        request_id = new_id()
        if route in FUNCTION_ROUTES:
            event = build_message_event(conn.ctx, route, text, request_id=request_id, message_id=new_id(),
                                        now_ms=int(time.time() * 1000))
            outcome, result = await self._call(event, "route")
            if outcome == "ok":
                reply = reply_of(result)
                if reply is not None:
                    self._reply(conn, reply)
            else:  # what API Gateway tells the client when the integration fails or times out
                self._reply(conn, json.dumps({"message": TIMED_OUT if outcome == "timeout" else INTERNAL_ERROR,
                                              "connectionId": conn.id, "requestId": request_id}))
        elif not await self._to_host(conn, text.encode("utf-8"), request_id):
            _metrics().WS_ERRORS.labels(component="gateway", kind="unavailable").inc()
            self._reply(conn, UNAVAILABLE)

    async def _to_host(self, conn: _Connection, body: bytes, request_id: str) -> bool:
        """``$default``: POST the frame to the hosts in turn; the next one only when a host cannot be connected
        to (a request that was sent is never sent again: a keystroke must not arrive twice). False: no host
        answered."""
        n = len(self.targets)
        if not n:
            return False
        start = self._next_target
        self._next_target = (start + 1) % n
        headers = {SECRET_HEADER: self._host_secret, WS_CONNECTION_HEADER: conn.id, REQUEST_ID_HEADER: request_id}
        client = self._http_client()
        obs = _metrics()
        t0 = time.perf_counter()
        try:
            for i in range(n):
                target = self.targets[(start + i) % n]
                try:
                    async with client.post(target + WS_HOST_MESSAGE_PATH, data=body, headers=headers) as r:
                        await r.read()
                        status = r.status
                except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                    _log().warning("ws target unreachable", extra={"target": target, "error": type(exc).__name__,
                                                                   "request_id": request_id})
                    continue
                except (aiohttp.ClientError, TimeoutError) as exc:
                    _log().warning("ws target did not answer", extra={"target": target, "error": type(exc).__name__,
                                                                      "request_id": request_id})
                    return False
                if status >= 400:
                    obs.WS_ERRORS.labels(component="gateway", kind="integration_status").inc()
                    _log().warning("ws target refused a message", extra={"target": target, "status": status,
                                                                         "request_id": request_id})
                return True
            return False
        finally:
            obs.WS_LATENCY.labels(component="gateway", operation="integration").observe(time.perf_counter() - t0)

    # --- HTTP: @connections, /health, /metrics -------------------------------------------------------------
    async def _http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        method: str = scope["method"]
        raw = scope.get("raw_path")
        path = raw.decode("latin-1") if raw else scope["path"]
        if path == "/health" and method == "GET":
            body = json.dumps({"status": "ok", "connections": len(self.connections),
                               "targets": len(self.targets)}).encode()
            await _respond(send, 200, body)
            return
        if path == "/metrics" and method == "GET":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            if getattr(self._handler, "__module__", "functions.ws.handler") == "functions.ws.handler":
                # serving the real ws function (None until its first event): its PostgreSQL and Redis, checked at scrape
                # time as an exporter does (postgres_up / redis_up{component="ws"}); not in /health, which the
                # stack's supervisor probes with a short timeout that a PostgreSQL connect timeout would outlast
                from tmuxi.services import health

                with contextlib.suppress(Exception):  # a scrape answers whatever the check did
                    await asyncio.to_thread(health.health, "ws")
            await _respond(send, 200, generate_latest(_metrics().REGISTRY), content_type=CONTENT_TYPE_LATEST)
            return
        if path == "/metrics/rest" and method == "GET":
            body, content_type = await asyncio.to_thread(rest_gateway_metrics)
            await _respond(send, 200, body, content_type=content_type)
            return
        connection_id = connection_id_of(path, self.stage)
        if connection_id is None or method not in ("POST", "GET", "DELETE"):
            await _respond(send, 404, b'{"message":"Not Found"}')
            return
        request_id = new_id()
        obs = _metrics()
        body_or_none = await _read_body(scope, receive, self.max_message_bytes)
        if body_or_none is None:
            obs.WS_ERRORS.labels(component="gateway", kind="payload_too_large").inc()
            await _error(send, 413, "PayloadTooLargeException", f"data larger than {self.max_message_bytes} bytes",
                         request_id, close=True)
            return
        body = body_or_none
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        try:
            if self.verifier is None:
                raise SignatureError("this gateway has no AWS credentials to check signatures with")
            self.verifier.verify(method, path, scope.get("query_string", b"").decode("latin-1"), headers, body)
        except SignatureError as exc:
            obs.WS_ERRORS.labels(component="gateway", kind="forbidden").inc()
            client = scope.get("client")
            _log().warning("@connections request refused", extra={"method": method, "why": str(exc),
                                                                  "peer": client[0] if client else None})
            await _error(send, 403, "ForbiddenException", str(exc), request_id)
            return
        conn = self.connections.get(connection_id)
        if conn is None or conn.closing is not None:
            obs.WS_ERRORS.labels(component="gateway", kind="gone").inc()
            await _error(send, 410, "GoneException", "the connection is gone", request_id)
            return
        if method == "GET":
            info = {"connectedAt": iso_ms(conn.ctx.connected_at_ms),
                    "identity": {"sourceIp": conn.ctx.source_ip, "userAgent": conn.ctx.user_agent or ""},
                    "lastActiveAt": iso_ms(conn.last_active_ms)}
            await _respond(send, 200, json.dumps(info).encode(), request_id=request_id)
        elif method == "DELETE":
            await self._close(conn, 1000, CLOSE_REASONS[1000])
            await _respond(send, 204, b"", request_id=request_id)
        else:
            data: str | bytes
            try:
                data = body.decode("utf-8")
            except UnicodeDecodeError:
                data = body
            if not conn.offer(data, len(body)):
                obs.WS_ERRORS.labels(component="gateway", kind="limit_exceeded").inc()
                await _error(send, 429, "LimitExceededException", "the client's buffer is full", request_id)
                return
            await _respond(send, 200, b"", request_id=request_id)


async def _read_body(scope: dict[str, Any], receive: Any, limit: int) -> bytes | None:
    """The request's body, or None once it is larger than ``limit`` (refused from Content-Length when it says so,
    before reading any of it)."""
    for k, v in scope["headers"]:
        if k == b"content-length" and v.isdigit() and int(v) > limit:
            return None
    buf = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return bytes(buf)
        buf += message.get("body", b"")
        if len(buf) > limit:
            return None
        if not message.get("more_body", False):
            return bytes(buf)


async def _respond(send: Any, status: int, body: bytes, *, content_type: str = "application/json",
                   request_id: str | None = None, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()), *extra]
    if request_id is not None:
        headers.append((b"x-amzn-requestid", request_id.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _error(send: Any, status: int, error_type: str, message: str, request_id: str,
                 close: bool = False) -> None:
    """A restJson error as botocore parses it: the type in ``x-amzn-ErrorType``, ``{"message"}`` in the body."""
    extra = [(b"x-amzn-errortype", error_type.encode())]
    if close:
        extra.append((b"connection", b"close"))
    await _respond(send, status, json.dumps({"message": message}).encode(), request_id=request_id, extra=extra)


# --- the WebSocket protocol: uvicorn's sans-I/O websockets protocol with API Gateway's frame limit --------------
_QUIET = logging.getLogger("local.ws_gateway.protocol")
_QUIET.setLevel(logging.WARNING)  # uvicorn logs a handshake's path *with its query* (the ticket) at INFO
_PROTOCOL: list[type[Any]] = []


def _ws_protocol() -> type[Any]:
    """``WsProtocol``, built on first use (importing uvicorn's protocols is not free)."""
    if not _PROTOCOL:
        _PROTOCOL.append(_build_ws_protocol())
    return _PROTOCOL[0]


def __getattr__(name: str) -> Any:  # PEP 562: ``local.ws_gateway:WsProtocol`` for uvicorn --ws
    if name == "WsProtocol":
        return _ws_protocol()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build_ws_protocol() -> type[Any]:
    from uvicorn.config import Config
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
    from uvicorn.server import ServerState
    from websockets.exceptions import InvalidState
    from websockets.frames import Frame
    from websockets.http11 import Request

    class WsProtocol(WebSocketsSansIOProtocol):
        """uvicorn's sans-I/O ``websockets`` protocol, plus: a message with a frame larger than
        ``max_frame_bytes`` reaches the app as a ``FRAME_TOO_LARGE`` event, not as data (the message limit,
        ``ws_max_size``, closes with 1009 before reading the frame); the scope's ``EXTENSION`` gives the app
        ``close(code, reason)``, which sends the close frame at once (uvicorn's ``websocket.close`` first waits
        for the write buffer to drain, which a client that does not read never lets happen) and ``buffered()``,
        the transport's unsent bytes; no log line carries the handshake's query string."""

        max_frame_bytes = WS_MAX_FRAME_BYTES
        send_buffer_bytes = SEND_BUFFER_BYTES

        def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                     _loop: asyncio.AbstractEventLoop | None = None) -> None:
            super().__init__(config, server_state, app_state, _loop)
            self.logger = _QUIET
            self.conn.logger = _QUIET  # websockets logs the request line at DEBUG
            self.conn.debug = False
            self._largest_frame = 0

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            if sock is not None and self.send_buffer_bytes:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer_bytes)

        async def send(self, message: Any) -> None:
            await super().send(message)
            if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
                self.handshake_complete = True  # answered (refused): else uvicorn logs that it never was

        def handle_connect(self, event: Request) -> None:
            super().handle_connect(event)
            if self.response.status_code == 101:  # the app's task starts on the loop's next turn: in time
                extensions = self.scope.setdefault("extensions", {})
                extensions[EXTENSION] = {"close": self.close_now, "buffered": self.buffered}

        def handle_text(self, event: Frame) -> None:
            self._largest_frame = len(event.data)
            super().handle_text(event)

        def handle_bytes(self, event: Frame) -> None:
            self._largest_frame = len(event.data)
            super().handle_bytes(event)

        def handle_cont(self, event: Frame) -> None:
            self._largest_frame = max(self._largest_frame, len(event.data))
            super().handle_cont(event)

        def send_receive_event_to_app(self) -> None:
            if self._largest_frame <= self.max_frame_bytes:
                super().send_receive_event_to_app()
                return
            size = sum(len(f) for f in self.frames)
            self.frames = []
            if self.close_sent:
                return
            self.queue.put_nowait({"type": FRAME_TOO_LARGE, "frame_bytes": self._largest_frame,  # type: ignore[arg-type]
                                   "message_bytes": size})
            if not self.read_paused:  # as for a message: read on once the app has taken it
                self.read_paused = True
                self.transport.pause_reading()

        def shutdown(self) -> None:
            super().shutdown()
            if not self.writable.is_set():  # a client that does not read would hold up the server's exit
                self.transport.abort()

        def buffered(self) -> int:
            transport = self.transport
            return transport.get_write_buffer_size() if transport is not None else 0

        def close_now(self, code: int, reason: str) -> None:
            transport = self.transport
            if self.close_sent or not self.handshake_complete or transport is None or transport.is_closing():
                return
            self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
            with contextlib.suppress(InvalidState):
                self.conn.send_close(code, reason)
                transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = True
            if not self.writable.is_set():  # it is not reading: it would never get to the close frame
                transport.abort()
                return
            if self.read_paused:
                self.read_paused = False
                transport.resume_reading()
            self.close_timer = self.loop.call_later(self.close_timeout, transport.close)

    return WsProtocol


# --- entry points -----------------------------------------------------------------------------------------


def _uvicorn_config(app: Any, host: str, port: int, **kwargs: Any) -> Any:
    import uvicorn

    opts: dict[str, Any] = {
        "loop": "uvloop",
        "http": HTTP_PROTOCOL,  # the REST gateway's bounded request heads and read timeouts (@connections)
        "ws": _ws_protocol(),
        "ws_max_size": app.max_message_bytes if isinstance(app, LocalWsGateway) else WS_MAX_MESSAGE_BYTES,
        "ws_per_message_deflate": False,
        "ws_ping_interval": None,  # API Gateway does not ping clients; idle ones are closed after idle_timeout_s
        "ws_ping_timeout": None,
        "lifespan": "on",
        "access_log": False,
        "proxy_headers": False,  # the gateway is the edge: sourceIp is the TCP peer
        "log_level": "warning",
        "timeout_keep_alive": MANAGEMENT_KEEP_ALIVE_S,
        "timeout_graceful_shutdown": 5,
    }
    opts.update(kwargs)
    return uvicorn.Config(app, host=host, port=port, **opts)


def serve(host: str | None = None, port: int | None = None, **gateway_kwargs: Any) -> None:
    """Serve the WebSocket gateway (blocking) on ``host:port`` (defaults: settings.gateway_bind /
    gateway_ws_port)."""
    import uvicorn

    from tmuxi.settings import get_settings

    s = get_settings()
    config = _uvicorn_config(LocalWsGateway(**gateway_kwargs), host or s.gateway_bind,
                             s.gateway_ws_port if port is None else port)
    uvicorn.Server(config).run()


class BackgroundWsGateway(BackgroundServer):
    """The WebSocket gateway served by uvicorn in a daemon thread (tests, benchmarks). ``port=0`` picks a free
    port. ``url`` is its HTTP URL (Management API endpoint, /health, /metrics)."""

    what = "the local WebSocket gateway"
    thread_name = "local-ws-gateway"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, uvicorn_options: dict[str, Any] | None = None,
                 **gateway_kwargs: Any) -> None:
        super().__init__(LocalWsGateway(**gateway_kwargs), _uvicorn_config, host, port,
                         uvicorn_options=uvicorn_options)

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="The local API Gateway (WebSocket API).")
    ap.add_argument("--host", default=None)
    ap.add_argument("--port", type=int, default=None)
    args = ap.parse_args()
    serve(args.host, args.port)


if __name__ == "__main__":
    main()


__all__ = [
    "BackgroundWsGateway",
    "ConnectionContext",
    "LocalWsGateway",
    "SigV4Verifier",
    "SignatureError",
    "build_connect_event",
    "build_disconnect_event",
    "build_message_event",
    "connection_id_of",
    "new_id",
    "serve",
]
