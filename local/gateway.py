"""The local API Gateway: speaks API Gateway's REST shape so the local path is the AWS path.

For every HTTP request it
  1. matches the route table (``tmuxi.routes``) on the raw path's segments, as API Gateway does (a ``%2F``
     inside a path parameter never changes the route) -- unknown route -> the MISSING_AUTHENTICATION_TOKEN
     gateway response (configured as a 404 in our error shape);
  2. builds a REST proxy event (payload v1) exactly as API Gateway would;
  3. for a protected route: refuses with 401 when the identity source (the Authorization header) is absent,
     else builds the REQUEST authorizer event and invokes the real authorizer Lambda handler
     (``Exception("Unauthorized")`` -> 401, an explicit or implicit Deny -> 403, anything else -> 500), and
     on Allow puts ``principalId`` + the policy's context into ``requestContext.authorizer``;
  4. invokes the real API Lambda handler (Mangum) with a LambdaContext look-alike (or the function the route
     names, ``Route.function``: ``/mcp`` runs ``functions/mcp``);
  5. translates the proxy result (statusCode, headers, multiValueHeaders, body, isBase64Encoded) to HTTP.
It enforces API Gateway's 10 MB payload limit (413 from Content-Length, before reading the body) and 29 s
integration timeout (504 on timeout). Below the ASGI app, its HTTP protocol (``GatewayHttpProtocol``, uvicorn's
httptools protocol with limits) bounds what one request may cost the server before any of that runs: the
request URL (414) and header section (431) to ~10 KB each as API Gateway does, without buffering more, and the
time to receive a request's head and body (408, connection closed; see ``HEADER_TIMEOUT_S``).

The Lambda handlers are synchronous (Mangum drives its own ``run_until_complete``); where one runs depends on
what the route waits on (``Route.work``):
  - "data" routes (PostgreSQL and Redis only, well under a millisecond) run INLINE in the server's thread: the
    running loop steps aside for the call and the handler drives a loop of its own, so one worker process
    serves one such request at a time, exactly like one Lambda execution environment. No thread hop and no
    GIL hand-over per request: that hop and the contention cost more than the handler itself (measured: one
    worker process spent ~1.1 ms of CPU per request with a thread pool, see bench/bench_gateway.py).
    Such a call cannot be pre-empted; it is bounded by its dependencies' timeouts (Redis 0.25 s, PostgreSQL
    ``db_timeout_s``) rather than by the 29 s integration timeout.
    A data route whose raw path holds a percent-escape runs in the pool instead: the API decodes the path
    before routing, so only such a path could reach another FastAPI route than the one matched here (the API
    refuses that with 404 too, functions/api/app.py); inline work is never a tmux host call.
  - "slow" routes (a tmux host call) run in a small thread pool, "long" routes (exec, create) in a larger one,
    so neither holds up the rest; the integration timeout applies to both.
  - "hash" routes (login: ~50 ms of scrypt) run in a pool of their own per worker process (``hash_workers``
    threads at a lower CPU priority, at most ``hash_queue`` more waiting): a login flood is throttled -- 429
    THROTTLED with Retry-After, as API Gateway throttles -- and never queues terminal work behind it.
Authorizer + integration run in ONE call (one hop for pool routes).

WebSocket: ``LocalGateway(websocket=...)`` takes an ASGI app for ``websocket`` scopes (the API Gateway
WebSocket API comes in a later issue); without one, WebSocket connections are refused.

Run it: ``uvicorn local.gateway:create_gateway_app --factory --loop uvloop --http local.gateway:GatewayHttpProtocol``
or ``serve()``.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import fnmatch
import functools
import importlib
import json
import multiprocessing
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from local import web
from local.lambda_context import LambdaContext
from tmuxi.routes import (
    AUTHORIZER,
    GATEWAY_RESPONSES,
    INTEGRATION_TIMEOUT_S,
    MAX_PAYLOAD_BYTES,
    ROUTES,
    AuthorizerConfig,
    Route,
    RouteTable,
)

LambdaHandler = Callable[[dict[str, Any], Any], Any]
ASGIApp = Callable[..., Any]

DEFAULT_STAGE = "local"
DEFAULT_API_ID = "local"
DEFAULT_REGION = "us-east-1"
DEFAULT_ACCOUNT = "123456789012"


def _log() -> Any:
    from tmuxi.observability import logger  # lazy: keeps `import local.gateway` cheap for tools

    return logger


# --- event building (pure functions; also used to generate events/ and by tests) -------------------------

_TIME_CACHE: list[Any] = [0, ""]


def _request_time(epoch_s: int) -> str:
    if _TIME_CACHE[0] != epoch_s:
        _TIME_CACHE[0] = epoch_s
        _TIME_CACHE[1] = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(epoch_s))
    return str(_TIME_CACHE[1])


def encode_body(body: bytes) -> tuple[str | None, bool]:
    """API Gateway proxy ``body`` + ``isBase64Encoded``: text when the bytes are UTF-8, base64 otherwise."""
    if not body:
        return None, False
    try:
        return body.decode("utf-8"), False
    except UnicodeDecodeError:
        return base64.b64encode(body).decode("ascii"), True


def split_headers(
    headers: list[tuple[str, str]],
) -> tuple[dict[str, str] | None, dict[str, list[str]] | None]:
    """``headers`` (last value wins) and ``multiValueHeaders`` (all values), as API Gateway gives them."""
    single: dict[str, str] = {}
    multi: dict[str, list[str]] = {}
    for k, v in headers:
        single[k] = v
        lst = multi.get(k)
        if lst is None:
            multi[k] = [v]
        else:
            lst.append(v)
    return (single or None), (multi or None)


def split_query(query: str) -> tuple[dict[str, str] | None, dict[str, list[str]] | None]:
    if not query:
        return None, None
    single: dict[str, str] = {}
    multi: dict[str, list[str]] = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        single[k] = v
        multi.setdefault(k, []).append(v)
    return (single or None), (multi or None)


def build_rest_event(
    *,
    method: str,
    path: str,
    resource: str,
    headers: list[tuple[str, str]] | None = None,
    query: str = "",
    path_params: dict[str, str] | None = None,
    body: bytes = b"",
    source_ip: str = "127.0.0.1",
    stage: str = DEFAULT_STAGE,
    api_id: str = DEFAULT_API_ID,
    account_id: str = DEFAULT_ACCOUNT,
    stage_variables: dict[str, str] | None = None,
    request_id: str | None = None,
    now_ms: int | None = None,
    domain: str | None = None,
) -> dict[str, Any]:
    """An API Gateway REST proxy event (payload format 1.0) for one request."""
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    request_id = request_id or str(uuid.uuid4())
    single_h, multi_h = split_headers(headers or [])
    single_q, multi_q = split_query(query)
    body_s, b64 = encode_body(body)
    user_agent = single_h.get("user-agent") if single_h else None
    if domain is None:
        host = (single_h.get("host") if single_h else None) or "localhost"
        domain = host[: host.rindex(":")] if ":" in host and not host.endswith("]") else host
    return {
        "resource": resource,
        "path": path,
        "httpMethod": method,
        "headers": single_h,
        "multiValueHeaders": multi_h,
        "queryStringParameters": single_q,
        "multiValueQueryStringParameters": multi_q,
        "pathParameters": path_params or None,
        "stageVariables": stage_variables or None,
        "requestContext": {
            "resourceId": resource,
            "resourcePath": resource,
            "httpMethod": method,
            "extendedRequestId": request_id,
            "requestTime": _request_time(now_ms // 1000),
            "path": f"/{stage}{path}",
            "accountId": account_id,
            "protocol": "HTTP/1.1",
            "stage": stage,
            "domainPrefix": domain.split(".", 1)[0],
            "requestTimeEpoch": now_ms,
            "requestId": request_id,
            "identity": {
                "cognitoIdentityPoolId": None, "accountId": None, "cognitoIdentityId": None, "caller": None,
                "sourceIp": source_ip, "principalOrgId": None, "accessKey": None,
                "cognitoAuthenticationType": None, "cognitoAuthenticationProvider": None, "userArn": None,
                "userAgent": user_agent, "user": None,
            },
            "domainName": domain,
            "apiId": api_id,
        },
        "body": body_s,
        "isBase64Encoded": b64,
    }


def method_arn(event: dict[str, Any], region: str = DEFAULT_REGION) -> str:
    rc = event["requestContext"]
    return (f"arn:aws:execute-api:{region}:{rc['accountId']}:{rc['apiId']}/{rc['stage']}/"
            f"{event['httpMethod']}{event['path']}")


def build_authorizer_event(rest_event: dict[str, Any], region: str = DEFAULT_REGION) -> dict[str, Any]:
    """The REQUEST authorizer event API Gateway sends for ``rest_event`` (no body)."""
    return {
        "type": "REQUEST",
        "methodArn": method_arn(rest_event, region),
        "resource": rest_event["resource"],
        "path": rest_event["path"],
        "httpMethod": rest_event["httpMethod"],
        "headers": rest_event["headers"],
        "multiValueHeaders": rest_event["multiValueHeaders"],
        "queryStringParameters": rest_event["queryStringParameters"],
        "multiValueQueryStringParameters": rest_event["multiValueQueryStringParameters"],
        "pathParameters": rest_event["pathParameters"],
        "stageVariables": rest_event["stageVariables"],
        "requestContext": rest_event["requestContext"],
    }


# --- authorizer policy evaluation -------------------------------------------------------------------------


class AuthorizerConfigurationError(Exception):
    """The authorizer returned something API Gateway would refuse (-> 500)."""


@functools.lru_cache(maxsize=256)
def _arn_pattern(resource: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(resource))


def _actions_match(action: Any) -> bool:
    actions = action if isinstance(action, list) else [action]
    return any(a in ("execute-api:Invoke", "execute-api:*", "*") for a in actions)


def evaluate_policy(result: Any, arn: str) -> tuple[bool, str, dict[str, Any]]:
    """(allowed, principalId, context) for an authorizer's answer, as API Gateway evaluates it: an explicit
    Deny wins, otherwise some Allow statement must match the method ARN."""
    if not isinstance(result, dict) or "principalId" not in result or "policyDocument" not in result:
        raise AuthorizerConfigurationError("authorizer result lacks principalId or policyDocument")
    context = result.get("context") or {}
    if not isinstance(context, dict) or any(
        not isinstance(v, str | int | float | bool) for v in context.values()
    ):
        raise AuthorizerConfigurationError("authorizer context values must be strings, numbers or booleans")
    doc = result["policyDocument"]
    statements = doc.get("Statement") if isinstance(doc, dict) else None
    if isinstance(statements, dict):
        statements = [statements]
    if not isinstance(statements, list):
        raise AuthorizerConfigurationError("policyDocument has no Statement")
    allowed = False
    for st in statements:
        if not isinstance(st, dict) or not _actions_match(st.get("Action")):
            continue
        resources = st.get("Resource")
        resources = resources if isinstance(resources, list) else [resources]
        if not any(isinstance(r, str) and _arn_pattern(r).match(arn) for r in resources):
            continue
        effect = st.get("Effect")
        if effect == "Deny":
            return False, str(result["principalId"]), context
        if effect == "Allow":
            allowed = True
    return allowed, str(result["principalId"]), context


def _context_value(v: Any) -> str:
    # REST API proxy events carry authorizer context values as strings.
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def authorizer_request_context(principal_id: str, context: dict[str, Any], latency_ms: int) -> dict[str, Any]:
    out: dict[str, Any] = {k: _context_value(v) for k, v in context.items()}
    out["principalId"] = principal_id
    out["integrationLatency"] = latency_ms
    return out


# --- response translation ---------------------------------------------------------------------------------


class MalformedLambdaResponse(Exception):
    pass


_HOP_BY_HOP = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})


def _hv(value: Any) -> bytes:
    s = value if isinstance(value, str) else str(value)
    try:
        return s.encode("latin-1")
    except UnicodeEncodeError:
        return s.encode("utf-8")


def translate_response(result: Any) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """A Lambda proxy result -> (status, headers, body). ``multiValueHeaders`` win over ``headers`` for the
    same name, as in API Gateway."""
    if not isinstance(result, dict) or not isinstance(result.get("statusCode"), int):
        raise MalformedLambdaResponse("Lambda proxy result lacks an integer statusCode")
    status = result["statusCode"]
    if not 100 <= status <= 599:
        raise MalformedLambdaResponse(f"invalid statusCode {status}")
    body = result.get("body")
    if body is None:
        raw = b""
    elif not isinstance(body, str):
        raise MalformedLambdaResponse("Lambda proxy result body must be a string")
    elif result.get("isBase64Encoded"):
        try:
            raw = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MalformedLambdaResponse("body is not valid base64") from exc
    else:
        raw = body.encode("utf-8")
    out: list[tuple[bytes, bytes]] = []
    multi = result.get("multiValueHeaders") or {}
    for k, v in (result.get("headers") or {}).items():
        lk = k.lower()
        if lk in _HOP_BY_HOP or k in multi:
            continue
        out.append((lk.encode("latin-1"), _hv(v)))
    for k, vs in multi.items():
        lk = k.lower()
        if lk in _HOP_BY_HOP:
            continue
        for v in vs if isinstance(vs, list) else [vs]:
            out.append((lk.encode("latin-1"), _hv(v)))
    return status, out, raw


# --- the gateway ------------------------------------------------------------------------------------------

# Password hashing ("hash" routes), per worker process: this many threads hash at once, this many more requests
# may wait; beyond that 429 THROTTLED. A hashing thread is a core's worth of scrypt (which releases the GIL); it
# runs at the lowest CPU priority, so on a busy machine the CPU goes to terminal work first and a login waits
# a little longer instead (measured: a login flood left screen reads at ~1.1x their latency with nice 19, 2.2x
# with nice 0; tests/integration/test_gateway_edge.py).
HASH_WORKERS = 1
HASH_QUEUE = 4
HASH_THREAD_NICE = 19
THROTTLED_RETRY_AFTER_S = 1


def _init_worker_loop() -> None:
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency, but stay runnable without it
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)


def _init_hash_worker() -> None:
    _init_worker_loop()
    with contextlib.suppress(OSError, AttributeError):  # Linux: a thread's own nice value (its tid)
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + HASH_THREAD_NICE))


@dataclass(slots=True)
class _Cached:
    expires: float
    allowed: bool
    principal_id: str
    context: dict[str, Any]


# status, body, and the response's configured headers (lower-case names, as ASGI sends them)
_GW = {k: (r.status, r.body_bytes(), [(n.lower().encode(), v.encode()) for n, v in r.headers.items()])
       for k, r in GATEWAY_RESPONSES.items()}
_CLOSE = (b"connection", b"close")
_RETRY_AFTER = (b"retry-after", str(THROTTLED_RETRY_AFTER_S).encode())


class LocalGateway:
    """ASGI app emulating an API Gateway REST API with a Lambda REQUEST authorizer and a Lambda proxy
    integration. ``api_handler`` / ``authorizer_handler`` default to the real Lambda handlers (imported on
    first use); tests may pass fakes."""

    def __init__(
        self,
        *,
        api_handler: LambdaHandler | None = None,
        authorizer_handler: LambdaHandler | None = None,
        routes: tuple[Route, ...] = ROUTES,
        authorizer: AuthorizerConfig = AUTHORIZER,
        stage: str = DEFAULT_STAGE,
        api_id: str = DEFAULT_API_ID,
        region: str = DEFAULT_REGION,
        account_id: str = DEFAULT_ACCOUNT,
        stage_variables: dict[str, str] | None = None,
        max_workers: int = 4,
        long_running_workers: int = 32,
        hash_workers: int = HASH_WORKERS,
        hash_queue: int = HASH_QUEUE,
        inline: bool = True,
        integration_timeout_s: float = INTEGRATION_TIMEOUT_S,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
        api_timeout_s: float = 30.0,
        websocket: ASGIApp | None = None,
    ) -> None:
        self._api = api_handler
        self._authorizer = authorizer_handler
        self.table = RouteTable(routes)
        self.authorizer = authorizer
        self._identity = authorizer.identity_header.lower().encode("latin-1")
        self.stage = stage
        self.api_id = api_id
        self.region = region
        self.account_id = account_id
        self.stage_variables = stage_variables
        self.integration_timeout_s = integration_timeout_s
        self.max_payload_bytes = max_payload_bytes
        self.api_timeout_s = api_timeout_s
        self.websocket = websocket
        # Handlers run in threads (Mangum drives its own event loop per call). Quick routes share a small pool:
        # more runnable threads than cores only adds GIL contention (measured: 4 threads ~1,400 RPS, 64 threads
        # ~1,000 on 2 cores). Long-running routes (exec, create) get their own pool so they never starve them.
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="lambda", initializer=_init_worker_loop
        )
        self._slow_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=long_running_workers, thread_name_prefix="lambda-long", initializer=_init_worker_loop
        )
        # Password hashing: a pool of its own with a bounded queue (admitted = running + waiting, counted
        # until the thread is done with it, even past an integration timeout).
        self._hash_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=hash_workers, thread_name_prefix="lambda-hash", initializer=_init_hash_worker
        )
        self._hash_capacity = hash_workers + hash_queue
        self._hash_admitted = 0
        self._hash_lock = threading.Lock()
        self.inline = inline
        self._inline_loop: asyncio.AbstractEventLoop | None = None
        self._cache: dict[str, _Cached] = {}
        self._resolve_lock = threading.Lock()
        self._functions: dict[str, LambdaHandler] = {}  # Route.function -> handler, other than "api"

    # handlers are imported lazily: importing the API pulls FastAPI and the services
    def _handlers(self) -> tuple[LambdaHandler, LambdaHandler]:
        if self._api is None or self._authorizer is None:
            with self._resolve_lock:
                if self._api is None:
                    from functions.api.handler import handler as api

                    self._api = api
                if self._authorizer is None:
                    from functions.authorizer.handler import handler as authz

                    self._authorizer = authz
        return self._api, self._authorizer

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._slow_pool.shutdown(wait=False, cancel_futures=True)
        self._hash_pool.shutdown(wait=False, cancel_futures=True)
        if self._inline_loop is not None:
            self._inline_loop.close()
            self._inline_loop = None

    # ------------------------------------------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            if self.websocket is not None:
                await self.websocket(scope, receive, send)
            else:
                await send({"type": "websocket.close", "code": 1008})
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await asyncio.get_running_loop().run_in_executor(self._pool, self._handlers)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    @staticmethod
    async def _send(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _gateway_response(self, send: Any, kind: str, request_id: str,
                                *extra: tuple[bytes, bytes]) -> None:
        status, body, configured = _GW[kind]
        await self._send(send, status, [*configured, (b"x-amzn-errortype", kind.encode()),
                                        (b"x-amzn-requestid", request_id.encode()), *extra], body)

    async def _http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        request_id = str(uuid.uuid4())
        method: str = scope["method"]
        raw_path = scope.get("raw_path")
        path = raw_path.decode("latin-1") if raw_path else scope["path"]
        if len(path) > 1 and path[-1] == "/":  # API Gateway ignores a trailing slash
            path = path.rstrip("/") or "/"
        if web.wants(method, path):  # the web terminal's static pages (local/web.py), not an API route
            await web.serve(scope, path, send)
            return
        matched = self.table.match(method, path)
        if matched is None:
            await self._gateway_response(send, "MISSING_AUTHENTICATION_TOKEN", request_id)
            return
        route, path_params = matched

        # headers (and the payload limit, before reading anything)
        headers: list[tuple[str, str]] = []
        identity: str | None = None
        for k, v in scope["headers"]:
            if k == b"content-length" and v.isdigit() and int(v) > self.max_payload_bytes:
                # from the header, before reading any of it; the connection is closed, not drained
                await self._gateway_response(send, "REQUEST_TOO_LARGE", request_id, _CLOSE)
                return
            if k == self._identity:
                identity = v.decode("latin-1")
            headers.append((k.decode("latin-1"), v.decode("latin-1")))
        client = scope.get("client")
        source_ip = client[0] if client else "127.0.0.1"
        server = scope.get("server")
        headers.append(("x-forwarded-for", source_ip))
        headers.append(("x-forwarded-proto", scope.get("scheme", "http")))
        if server and server[1]:
            headers.append(("x-forwarded-port", str(server[1])))

        if route.work == "hash" and self._hash_admitted >= self._hash_capacity:  # cheap early refusal
            await self._gateway_response(send, "THROTTLED", request_id, _RETRY_AFTER)
            return

        # body
        message = await receive()
        if message["type"] != "http.request":
            return  # client went away
        body = message.get("body", b"")
        if message.get("more_body", False):
            buf = bytearray(body)
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return
                buf += message.get("body", b"")
                if len(buf) > self.max_payload_bytes:
                    await self._gateway_response(send, "REQUEST_TOO_LARGE", request_id, _CLOSE)
                    return
                if not message.get("more_body", False):
                    break
            body = bytes(buf)
        if len(body) > self.max_payload_bytes:
            await self._gateway_response(send, "REQUEST_TOO_LARGE", request_id)
            return

        event = build_rest_event(
            method=method, path=path, resource=route.resource, headers=headers,
            query=scope.get("query_string", b"").decode("latin-1"), path_params=path_params, body=body,
            source_ip=source_ip, stage=self.stage, api_id=self.api_id, account_id=self.account_id,
            stage_variables=self.stage_variables, request_id=request_id,
        )

        auth_event: dict[str, Any] | None = None
        cached: _Cached | None = None
        if route.protected:
            if not identity:  # a missing identity source: API Gateway answers 401 without invoking
                await self._gateway_response(send, "UNAUTHORIZED", request_id)
                return
            if self.authorizer.result_ttl_s > 0:
                cached = self._cache.get(identity)
                if cached is not None and cached.expires < time.monotonic():
                    self._cache.pop(identity, None)
                    cached = None
            if cached is not None:
                if not cached.allowed:
                    await self._gateway_response(send, "ACCESS_DENIED", request_id)
                    return
                event["requestContext"]["authorizer"] = authorizer_request_context(
                    cached.principal_id, cached.context, 0)
            else:
                auth_event = build_authorizer_event(event, self.region)

        try:
            if route.work == "data" and self.inline and "%" not in path:
                outcome = self._invoke_inline(auth_event, event)
            elif route.work == "hash":
                future = self._submit_hash(auth_event, event)
                if future is None:
                    await self._gateway_response(send, "THROTTLED", request_id, _RETRY_AFTER)
                    return
                outcome = await asyncio.wait_for(asyncio.wrap_future(future), self.integration_timeout_s)
            else:
                outcome = await asyncio.wait_for(
                    asyncio.get_running_loop().run_in_executor(
                        self._slow_pool if route.work == "long" else self._pool, self._invoke, auth_event, event,
                        route.function),
                    self.integration_timeout_s,
                )
        except TimeoutError:
            _log().warning("integration timeout", extra={"route": route.resource, "request_id": request_id})
            await self._gateway_response(send, "INTEGRATION_TIMEOUT", request_id)
            return

        kind, payload, decision = outcome
        if decision is not None and self.authorizer.result_ttl_s > 0 and identity is not None:
            decision.expires = time.monotonic() + self.authorizer.result_ttl_s
            self._cache[identity] = decision
        if kind != "ok":
            await self._gateway_response(send, kind, request_id)
            return
        status, out_headers, out_body = payload
        out_headers.append((b"x-amzn-requestid", request_id.encode()))
        await self._send(send, status, out_headers, out_body)

    def _submit_hash(
        self, auth_event: dict[str, Any] | None, event: dict[str, Any]
    ) -> concurrent.futures.Future[tuple[str, Any, _Cached | None]] | None:
        """``_invoke`` in the hash pool, or None when as many requests as it admits are running or waiting."""
        with self._hash_lock:
            if self._hash_admitted >= self._hash_capacity:
                return None
            self._hash_admitted += 1
        try:
            future = self._hash_pool.submit(self._invoke, auth_event, event)
        except BaseException:
            self._hash_done(None)
            raise
        future.add_done_callback(self._hash_done)  # done, failed or cancelled while still waiting
        return future

    def _hash_done(self, _future: object) -> None:
        with self._hash_lock:
            self._hash_admitted -= 1

    def _invoke_inline(
        self, auth_event: dict[str, Any] | None, event: dict[str, Any]
    ) -> tuple[str, Any, _Cached | None]:
        """``_invoke`` in the server's own thread. The handler (Mangum) calls ``asyncio.get_event_loop()`` and
        ``run_until_complete``, which refuse to run inside a running loop: the server's loop is set aside for
        the call (nothing else runs in this thread meanwhile) and the handler gets a plain asyncio loop of its
        own, kept for the next call. A plain asyncio loop: uvloop's was slower here (measured ~400 vs ~350 us
        per invocation; in the main thread it sets up signal handling on every run)."""
        if self._inline_loop is None:
            self._inline_loop = asyncio.SelectorEventLoop()
        outer = asyncio.events._get_running_loop()
        asyncio.events._set_running_loop(None)
        asyncio.set_event_loop(self._inline_loop)
        try:
            return self._invoke(auth_event, event)
        finally:
            asyncio.events._set_running_loop(outer)

    # runs in a pool thread (its own event loop) or inline: authorizer, then the integration ---------------
    def _invoke(
        self, auth_event: dict[str, Any] | None, event: dict[str, Any], function: str = "api"
    ) -> tuple[str, Any, _Cached | None]:
        from tmuxi.observability import request_context

        with request_context(event["requestContext"]["requestId"]):  # the gateway's own lines carry it too
            return self._invoke_handlers(auth_event, event, function)

    def _function(self, name: str) -> LambdaHandler:
        """The handler of ``functions/<name>`` (``Route.function``): the API's, or another one's, imported on first
        use (the API's own workers never import what only another function needs)."""
        handler = self._functions.get(name)
        if handler is None:
            with self._resolve_lock:
                handler = self._functions.get(name)
                if handler is None:
                    handler = importlib.import_module(f"functions.{name}.handler").handler
                    self._functions[name] = handler
        return handler

    def _invoke_handlers(
        self, auth_event: dict[str, Any] | None, event: dict[str, Any], function: str = "api"
    ) -> tuple[str, Any, _Cached | None]:
        api, authz = self._handlers()
        if function != "api":
            api = self._function(function)
        decision: _Cached | None = None
        if auth_event is not None:
            t0 = time.perf_counter()
            try:
                result = authz(auth_event, LambdaContext("authorizer", timeout_s=self.api_timeout_s,
                                                         region=self.region, account_id=self.account_id))
                allowed, principal_id, context = evaluate_policy(result, auth_event["methodArn"])
            except AuthorizerConfigurationError as exc:
                _log().error("authorizer configuration error", extra={"error": str(exc)})
                return "AUTHORIZER_CONFIGURATION_ERROR", None, None
            except Exception as exc:
                if str(exc) == "Unauthorized" and type(exc) is Exception:
                    return "UNAUTHORIZED", None, None
                _log().exception("authorizer failed")
                return "AUTHORIZER_FAILURE", None, None
            decision = _Cached(0.0, allowed, principal_id, context)
            if not allowed:
                return "ACCESS_DENIED", None, decision
            event["requestContext"]["authorizer"] = authorizer_request_context(
                principal_id, context, int((time.perf_counter() - t0) * 1000))
        try:
            result = api(event, LambdaContext(function, timeout_s=self.api_timeout_s, region=self.region,
                                              account_id=self.account_id,
                                              request_id=event["requestContext"]["requestId"]))
            return "ok", translate_response(result), decision
        except MalformedLambdaResponse as exc:
            _log().error("malformed Lambda proxy response", extra={"error": str(exc)})
        except Exception:
            _log().exception("integration failed")
        return "INTEGRATION_FAILURE", None, decision


# --- HTTP: requests bounded as API Gateway bounds them ------------------------------------------------------
# uvicorn's httptools protocol buffers a request line and headers of any size and waits for a request's head
# and body for ever (only an idle kept-alive connection is timed out, by timeout_keep_alive), so a few clients
# could hold any amount of a worker's memory and connections. ``GatewayHttpProtocol`` (uvicorn
# ``--http local.gateway:GatewayHttpProtocol``) adds the limits; its per-request cost is a few attribute
# updates (the read deadlines are checked by one timer per worker, not one per request).
MAX_URL_BYTES = 10 * 1024  # request target (path + query) longer -> 414 (API Gateway: URLs up to ~10 KB)
MAX_HEADER_BYTES = 10 * 1024  # header section (names, values, separators) larger -> 431 (API Gateway: ~10 KB)
HEADER_TIMEOUT_S = 10.0  # a request's line and headers must arrive within this of their first byte (a new
#                          connection: of its opening) -> 408 and the connection closed (nothing sent yet: closed)
BODY_TIMEOUT_S = 10.0  # its body (Content-Length or chunked) within this of the headers -> 408, closed
KEEP_ALIVE_TIMEOUT_S = 5  # an idle kept-alive connection is closed after this (uvicorn's timeout_keep_alive)
DEADLINE_CHECK_S = 0.5  # how often a worker checks its connections' read deadlines (so they hold to within this)
LINGER_S = 1.0  # after refusing a request (414/431): what the client still sends is read and dropped for at
#                 most this long, so that it reads the answer rather than a connection reset
HTTP_PROTOCOL = "local.gateway:GatewayHttpProtocol"


def _raw_response(status: int, reason: str, code: str, message: str) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":")).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


_REFUSALS = {
    408: _raw_response(408, "Request Timeout", "request_timeout", "request not received in time"),
    414: _raw_response(414, "URI Too Long", "uri_too_long", f"request URL longer than {MAX_URL_BYTES} bytes"),
    431: _raw_response(431, "Request Header Fields Too Large", "headers_too_large",
                       f"request headers larger than {MAX_HEADER_BYTES} bytes"),
}


class _Refused(Exception):
    """Raised in a parser callback to stop parsing a request that is refused with ``status``."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


_PROTOCOL: list[type[Any]] = []


def _gateway_http_protocol() -> type[Any]:
    """``GatewayHttpProtocol``, built on first use (importing uvicorn's protocols is not free)."""
    if not _PROTOCOL:
        _PROTOCOL.append(_build_gateway_http_protocol())
    return _PROTOCOL[0]


def __getattr__(name: str) -> Any:  # PEP 562: ``local.gateway:GatewayHttpProtocol`` for uvicorn --http
    if name == "GatewayHttpProtocol":
        return _gateway_http_protocol()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build_gateway_http_protocol() -> type[Any]:
    import httptools
    from uvicorn.config import Config
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    watched: weakref.WeakSet[ServerState] = weakref.WeakSet()

    class GatewayHttpProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol, bounded: a request line whose URL is longer than ``max_url_bytes`` is
        answered 414, a header section larger than ``max_header_bytes`` 431, and no more than those two limits
        (plus the request line's method and version) of a request's head is ever given to the parser, whatever
        the client sends. A request whose head (``header_timeout_s``) or body (``body_timeout_s``) does not
        arrive in time is answered 408 and its connection closed; a connection that sends nothing is closed.
        Time during which the server itself does not read (it is still answering an earlier request on the
        connection) does not count. The limits are class attributes: a subclass may set others."""

        max_url_bytes = MAX_URL_BYTES
        max_header_bytes = MAX_HEADER_BYTES
        header_timeout_s = HEADER_TIMEOUT_S
        body_timeout_s = BODY_TIMEOUT_S
        deadline_check_s = DEADLINE_CHECK_S
        linger_s = LINGER_S

        def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                     _loop: asyncio.AbstractEventLoop | None = None) -> None:
            super().__init__(config, server_state, app_state, _loop)
            self._in_head = True  # reading a request's line and headers (or waiting for the next request)
            self._head_bytes = 0  # bytes of it given to the parser (with what followed it in the same reads)
            self._head_t = 0.0  # when its first byte came (a new connection: when it opened); 0: not reading one
            self._body_t = 0.0  # when the headers of a request whose body is still to come were complete
            self._refused = False
            # the most of a head that can be within the limits: method, URL, version, header lines
            self._head_limit = self.max_url_bytes + self.max_header_bytes + 64

        # the connection --------------------------------------------------------------------------------
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._head_t = self.loop.time()
            if self.server_state not in watched:
                watched.add(self.server_state)
                self._watch(self.loop, self.server_state)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # refused: what the client still sends is dropped until the connection closes
            if self.timeout_keep_alive_task is not None:
                self._unset_keepalive_if_required()
            if self._in_head:  # (a body is bounded by the ASGI app; uvicorn stops reading past 64 KB of it)
                if not self._head_t:
                    self._head_t = self.loop.time()
                n = self._head_bytes + len(data)
                if n > self._head_limit:
                    self._head_overflow(data)
                    return
                self._head_bytes = n
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                self._upgrade()
            except httptools.HttpParserError as exc:
                self._parse_failed(exc)

        def _head_overflow(self, data: bytes) -> None:
            """More than a head within the limits can hold: give the parser only that much."""
            room = self._head_limit - self._head_bytes
            self._head_bytes = self._head_limit
            try:
                self.parser.feed_data(data[:room])
            except httptools.HttpParserUpgrade:
                self._upgrade()
                return
            except httptools.HttpParserError as exc:
                self._parse_failed(exc)
                return
            if self._in_head:  # and the head is still not complete
                self._refuse(414 if len(self.url) > self.max_url_bytes else 431)
            else:  # it was: the rest is its body, or the next request
                self.data_received(data[room:])

        def _upgrade(self) -> None:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

        def _parse_failed(self, exc: Exception) -> None:
            if isinstance(exc.__context__, _Refused):  # raised by a callback below
                self._refuse(exc.__context__.status)
                return
            msg = "Invalid HTTP request received."  # as uvicorn answers
            self.logger.warning(msg)
            self.send_400_response(msg)

        def _refuse(self, status: int) -> None:
            """Answer ``status`` (unless another answer is under way) and close, reading and dropping what the
            client still sends for at most ``linger_s``, so that it gets the answer."""
            self._refused = True
            transport = self.transport
            if transport.is_closing():
                return
            if self.cycle is None or self.cycle.response_complete:
                transport.write(_REFUSALS[status])
                if transport.can_write_eof():
                    transport.write_eof()
                self.loop.call_later(self.linger_s, transport.close)
            else:
                transport.close()

        # parser callbacks ----------------------------------------------------------------------------------
        def on_headers_complete(self) -> None:
            self._in_head = False
            self._head_t = 0.0
            url = len(self.url)
            if url > self.max_url_bytes:
                raise _Refused(414)
            # the head's bytes bound the header section's size; count it exactly only when they could exceed it
            if self._head_bytes - url > self.max_header_bytes and \
                    sum(len(k) + len(v) + 4 for k, v in self.headers) > self.max_header_bytes:  # "k: v\r\n"
                raise _Refused(431)
            self._body_t = self.loop.time()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_head = True
            self._head_bytes = 0
            self._body_t = 0.0
            super().on_message_complete()

        # read deadlines ------------------------------------------------------------------------------------
        @classmethod
        def _watch(cls, loop: asyncio.AbstractEventLoop, server_state: ServerState) -> None:
            """One timer per server (worker process) checks its connections' read deadlines."""

            def check() -> None:
                try:
                    now = loop.time()
                    for conn in list(server_state.connections):
                        if isinstance(conn, GatewayHttpProtocol):
                            conn._check_deadlines(now)
                finally:
                    loop.call_later(cls.deadline_check_s, check)

            loop.call_later(cls.deadline_check_s, check)

        def _check_deadlines(self, now: float) -> None:
            transport = self.transport
            if self._refused or transport is None or transport.is_closing():
                return
            cycle = self.cycle
            if self.flow.read_paused or (self._head_t and cycle is not None and not cycle.response_complete):
                # the server is not reading, or still answering the previous request: not the client's time
                self._head_t = self._head_t and now
                self._body_t = self._body_t and now
                return
            if self._head_t:
                if now - self._head_t > self.header_timeout_s:
                    if self._head_bytes:
                        transport.write(_REFUSALS[408])
                    transport.close()
            elif self._body_t and now - self._body_t > self.body_timeout_s:
                if cycle is not None and not cycle.response_started:
                    transport.write(_REFUSALS[408])
                    cycle.disconnected = True  # the app reading the body gets http.disconnect
                    cycle.message_event.set()
                transport.close()

    return GatewayHttpProtocol


# --- entry points -----------------------------------------------------------------------------------------


def create_gateway_app(**kwargs: Any) -> LocalGateway:
    """The gateway ASGI app (``uvicorn local.gateway:create_gateway_app --factory``)."""
    die_with_master()
    return LocalGateway(**kwargs)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_master() -> None:
    """In a worker of ``uvicorn --workers N`` (a process started by multiprocessing, which is how uvicorn starts
    them, from its main thread): have the kernel SIGKILL this process the moment its master exits, however the
    master exits (SIGKILL included). An orphaned worker would otherwise go on serving on the shared listening
    socket, so a new gateway could not bind the port while the old code still answered. Does nothing in any
    other process, or off Linux."""
    parent = multiprocessing.parent_process()
    if parent is None or parent.pid is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        _log().warning("prctl(PR_SET_PDEATHSIG) failed: this worker may outlive its master",
                       extra={"errno": ctypes.get_errno()})
        return
    if os.getppid() != parent.pid:  # the master was already gone before the line above
        os.kill(os.getpid(), signal.SIGKILL)


def _uvicorn_config(app: Any, host: str, port: int, **kwargs: Any) -> Any:
    import uvicorn

    # proxy_headers off: the gateway is the edge, so sourceIp is the TCP peer, never a client's X-Forwarded-For
    opts: dict[str, Any] = {"loop": "uvloop", "http": _gateway_http_protocol(), "lifespan": "on",
                            "access_log": False, "proxy_headers": False, "log_level": "warning",
                            "timeout_keep_alive": KEEP_ALIVE_TIMEOUT_S}
    opts.update(kwargs)
    return uvicorn.Config(app, host=host, port=port, **opts)


def serve(host: str | None = None, port: int | None = None, **gateway_kwargs: Any) -> None:
    """Serve the gateway (blocking) on ``host:port`` (defaults: settings.gateway_bind / gateway_port)."""
    import uvicorn

    from tmuxi.settings import get_settings

    s = get_settings()
    config = _uvicorn_config(create_gateway_app(**gateway_kwargs), host or s.gateway_bind,
                             s.gateway_port if port is None else port)
    uvicorn.Server(config).run()


class BackgroundServer:
    """An ASGI app served by uvicorn in a daemon thread (tests, benchmarks). ``port=0`` picks a free port."""

    what = "the server"
    thread_name = "background-server"

    def __init__(self, app: Any, make_config: Callable[..., Any], host: str = "127.0.0.1", port: int = 0, *,
                 uvicorn_options: dict[str, Any] | None = None) -> None:
        import uvicorn

        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self.server = uvicorn.Server(make_config(self.app, self.host, self.port, **(uvicorn_options or {})))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name=self.thread_name, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> Any:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"{self.what} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class BackgroundGateway(BackgroundServer):
    """The gateway served by uvicorn in a daemon thread (tests, benchmarks)."""

    what = "the local gateway"
    thread_name = "local-gateway"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, uvicorn_options: dict[str, Any] | None = None,
                 **gateway_kwargs: Any) -> None:
        super().__init__(create_gateway_app(**gateway_kwargs), _uvicorn_config, host, port,
                         uvicorn_options=uvicorn_options)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="The local API Gateway (REST).")
    ap.add_argument("--host", default=None)
    ap.add_argument("--port", type=int, default=None)
    args = ap.parse_args()
    serve(args.host, args.port)


if __name__ == "__main__":
    main()


__all__ = [
    "BackgroundGateway",
    "BackgroundServer",
    "LocalGateway",
    "build_authorizer_event",
    "build_rest_event",
    "create_gateway_app",
    "evaluate_policy",
    "serve",
    "translate_response",
]
