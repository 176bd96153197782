"""The local API Gateway: speaks API Gateway's REST shape so the local path is the AWS path.

For every HTTP request it
  1. matches the route table (``tmuxi.routes``) -- unknown route -> the MISSING_AUTHENTICATION_TOKEN gateway
     response (configured as a 404 in our error shape);
  2. builds a REST proxy event (payload v1) exactly as API Gateway would;
  3. for a protected route: refuses with 401 when the identity source (the Authorization header) is absent,
     else builds the REQUEST authorizer event and invokes the real authorizer Lambda handler
     (``Exception("Unauthorized")`` -> 401, an explicit or implicit Deny -> 403, anything else -> 500), and
     on Allow puts ``principalId`` + the policy's context into ``requestContext.authorizer``;
  4. invokes the real API Lambda handler (Mangum) with a LambdaContext look-alike;
  5. translates the proxy result (statusCode, headers, multiValueHeaders, body, isBase64Encoded) to HTTP.
It enforces API Gateway's 10 MB payload limit and 29 s integration timeout (504 on timeout).

The Lambda handlers are synchronous (Mangum drives its own ``run_until_complete``); where one runs depends on
what the route waits on (``Route.work``):
  - "data" routes (PostgreSQL and Redis only, well under a millisecond) run INLINE in the server's thread: the
    running loop steps aside for the call and the handler drives a loop of its own, so one worker process
    serves one such request at a time, exactly like one Lambda execution environment. No thread hop and no
    GIL hand-over per request: that hop and the contention cost more than the handler itself (measured: one
    worker process spent ~1.1 ms of CPU per request with a thread pool, see bench/bench_gateway.py).
    Such a call cannot be pre-empted; it is bounded by its dependencies' timeouts (Redis 0.25 s, PostgreSQL
    ``db_timeout_s``) rather than by the 29 s integration timeout.
  - "slow" routes (a tmux host call, password hashing) run in a small thread pool, "long" routes (exec,
    create) in a larger one, so neither holds up the rest; the integration timeout applies to both.
Authorizer + integration run in ONE call (one hop for pool routes).

WebSocket: ``LocalGateway(websocket=...)`` takes an ASGI app for ``websocket`` scopes (the API Gateway
WebSocket API comes in a later issue); without one, WebSocket connections are refused.

Run it: ``uvicorn local.gateway:create_gateway_app --factory --loop uvloop --http httptools`` or ``serve()``.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import fnmatch
import functools
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

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


def _init_worker_loop() -> None:
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency, but stay runnable without it
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)


@dataclass(slots=True)
class _Cached:
    expires: float
    allowed: bool
    principal_id: str
    context: dict[str, Any]


_GW = {k: (r.status, r.body_bytes()) for k, r in GATEWAY_RESPONSES.items()}


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
        self.inline = inline
        self._inline_loop: asyncio.AbstractEventLoop | None = None
        self._cache: dict[str, _Cached] = {}
        self._resolve_lock = threading.Lock()

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

    async def _gateway_response(self, send: Any, kind: str, request_id: str) -> None:
        status, body = _GW[kind]
        await self._send(send, status, [(b"content-type", b"application/json"),
                                        (b"x-amzn-errortype", kind.encode()),
                                        (b"x-amzn-requestid", request_id.encode())], body)

    async def _http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        request_id = str(uuid.uuid4())
        method: str = scope["method"]
        raw_path = scope.get("raw_path")
        path = raw_path.decode("latin-1") if raw_path else scope["path"]
        if len(path) > 1 and path[-1] == "/":  # API Gateway ignores a trailing slash
            path = path.rstrip("/") or "/"
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
                await self._gateway_response(send, "REQUEST_TOO_LARGE", request_id)
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
                    await self._gateway_response(send, "REQUEST_TOO_LARGE", request_id)
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
            if route.work == "data" and self.inline:
                outcome = self._invoke_inline(auth_event, event)
            else:
                outcome = await asyncio.wait_for(
                    asyncio.get_running_loop().run_in_executor(
                        self._slow_pool if route.work == "long" else self._pool, self._invoke, auth_event, event),
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
        self, auth_event: dict[str, Any] | None, event: dict[str, Any]
    ) -> tuple[str, Any, _Cached | None]:
        api, authz = self._handlers()
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
            result = api(event, LambdaContext("api", timeout_s=self.api_timeout_s, region=self.region,
                                              account_id=self.account_id,
                                              request_id=event["requestContext"]["requestId"]))
            return "ok", translate_response(result), decision
        except MalformedLambdaResponse as exc:
            _log().error("malformed Lambda proxy response", extra={"error": str(exc)})
        except Exception:
            _log().exception("integration failed")
        return "INTEGRATION_FAILURE", None, decision


# --- entry points -----------------------------------------------------------------------------------------


def create_gateway_app(**kwargs: Any) -> LocalGateway:
    """The gateway ASGI app (``uvicorn local.gateway:create_gateway_app --factory``)."""
    return LocalGateway(**kwargs)


def _uvicorn_config(app: Any, host: str, port: int, **kwargs: Any) -> Any:
    import uvicorn

    # proxy_headers off: the gateway is the edge, so sourceIp is the TCP peer, never a client's X-Forwarded-For
    opts: dict[str, Any] = {"loop": "uvloop", "http": "httptools", "lifespan": "on", "access_log": False,
                            "proxy_headers": False, "log_level": "warning", "timeout_keep_alive": 30}
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


class BackgroundGateway:
    """The gateway served by uvicorn in a daemon thread (tests, benchmarks). ``port=0`` picks a free port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **gateway_kwargs: Any) -> None:
        import uvicorn

        self.app = create_gateway_app(**gateway_kwargs)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self.server = uvicorn.Server(_uvicorn_config(self.app, self.host, self.port))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="local-gateway", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> BackgroundGateway:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the local gateway did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> BackgroundGateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
    "LocalGateway",
    "build_authorizer_event",
    "build_rest_event",
    "create_gateway_app",
    "evaluate_policy",
    "serve",
    "translate_response",
]
