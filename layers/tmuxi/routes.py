"""The REST edge in one table: every route API Gateway exposes, whether the Lambda authorizer protects it,
the authorizer's configuration and the configured "gateway responses" (the bodies API Gateway itself sends
when a request never reaches the API Lambda).

Used by the local gateway (``local/gateway.py``) now and by the CDK app later, so both expose exactly the
same surface. Pure data + a tiny matcher: no imports from the rest of the project.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

# --- routes -----------------------------------------------------------------------------------------------


WORK_KINDS = ("data", "slow", "long", "hash")
FUNCTION_KINDS = ("api", "mcp")


@dataclass(frozen=True, slots=True)
class Route:
    method: str  # HTTP method, upper case
    resource: str  # API Gateway resource path template, e.g. "/sessions/{id}"
    protected: bool  # True -> the REQUEST authorizer runs first
    name: str  # stable operation name (CDK construct ids, metrics, docs)
    # What the handler waits on, which decides how it is run and given time:
    #   "data": PostgreSQL and Redis only: answers in well under a millisecond, never waits on a terminal
    #           (the local gateway runs these inline: such a route must never call a tmux host);
    #   "slow": a call to a tmux host (milliseconds);
    #   "long": may wait seconds on a terminal (exec, create): never queued behind quick ones;
    #   "hash": password hashing (tens of milliseconds of CPU each): its own small, bounded pool, so a login
    #           flood is throttled (429) instead of queueing terminal work behind it.
    work: str = "data"
    # The Lambda function that serves it (functions/<function>/handler.py): the REST API's "api", or "mcp" (MCP's
    # Streamable HTTP transport, whose tools call the REST API in turn).
    function: str = "api"

    def __post_init__(self) -> None:
        if self.work not in WORK_KINDS:
            raise ValueError(f"route {self.method} {self.resource}: work must be one of {WORK_KINDS}")
        if self.function not in FUNCTION_KINDS:
            raise ValueError(f"route {self.method} {self.resource}: function must be one of {FUNCTION_KINDS}")

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", self.resource))


ROUTES: tuple[Route, ...] = (
    # auth
    Route("POST", "/auth/token", False, "login", work="hash"),
    Route("POST", "/auth/revoke", True, "revoke"),
    Route("GET", "/auth/health", False, "auth_health", work="slow"),
    Route("GET", "/validate", True, "validate"),
    # sessions
    Route("POST", "/sessions", True, "create_session", work="long"),
    Route("GET", "/sessions", True, "list_sessions"),
    Route("GET", "/sessions/{id}", True, "get_session"),
    Route("DELETE", "/sessions/{id}", True, "delete_session", work="slow"),
    Route("POST", "/sessions/{id}/input", True, "send_input", work="long"),  # with `wait`: waits on the terminal
    Route("GET", "/sessions/{id}/screen", True, "read_screen", work="slow"),
    Route("POST", "/sessions/{id}/resize", True, "resize", work="slow"),
    Route("POST", "/sessions/{id}/exec", True, "exec_command", work="long"),
    Route("GET", "/sessions/{id}/execs", True, "list_execs", work="slow"),
    Route("GET", "/sessions/{id}/execs/{exec_id}", True, "poll_exec", work="long"),  # may wait for output
    Route("DELETE", "/sessions/{id}/execs/{exec_id}", True, "stop_exec", work="long"),  # waits out the grace
    Route("POST", "/sessions/{id}/execs/{exec_id}/input", True, "exec_input", work="slow"),
    Route("POST", "/sessions/{id}/execs/{exec_id}/signal", True, "signal_exec", work="slow"),
    # files in the session's home (read and written by the host as the session's OS account)
    Route("PUT", "/sessions/{id}/files", True, "write_file", work="slow"),
    Route("GET", "/sessions/{id}/files", True, "read_file", work="slow"),
    Route("GET", "/sessions/{id}/files/list", True, "list_files", work="slow"),
    # live terminals (docs/websocket.md): connect tickets, read-only shares, recordings
    Route("POST", "/ws/tickets", True, "mint_ws_ticket"),
    Route("POST", "/ws/share-tickets", False, "redeem_share"),  # the share token is in the body, never the URL
    Route("POST", "/sessions/{id}/shares", True, "create_share"),
    Route("GET", "/sessions/{id}/shares", True, "list_shares"),
    Route("DELETE", "/sessions/{id}/shares/{share_id}", True, "revoke_share", work="slow"),  # detaches viewers
    Route("GET", "/sessions/{id}/recordings", True, "list_recordings", work="slow"),  # S3
    Route("GET", "/sessions/{id}/recordings/{name}", True, "get_recording", work="slow"),
    # MCP over Streamable HTTP (stateless, JSON answers: one request, one invocation). Its tools call this API with
    # the caller's token, so a tool call may wait as long as an exec. GET (a server-sent event stream) and DELETE
    # (end an MCP session) are answered 405 by the function: there is no stream and no session to end.
    Route("POST", "/mcp", True, "mcp", work="long", function="mcp"),
    Route("GET", "/mcp", True, "mcp_stream", work="slow", function="mcp"),
    Route("DELETE", "/mcp", True, "mcp_end", work="slow", function="mcp"),
    # users (admins only)
    Route("POST", "/users/{username}/disable", True, "disable_user"),
    Route("POST", "/users/{username}/enable", True, "enable_user"),
    Route("POST", "/users/{username}/revoke-tokens", True, "revoke_user_tokens"),
    Route("PATCH", "/users/{username}", True, "update_user"),
    Route("DELETE", "/users/{username}", True, "delete_user", work="slow"),  # ends their sessions on the hosts
    # operations / documentation
    Route("GET", "/health", False, "health", work="slow"),
    Route("GET", "/openapi.json", False, "openapi"),
    Route("GET", "/docs", False, "docs"),
)


@dataclass(frozen=True, slots=True)
class AuthorizerConfig:
    """How API Gateway runs the Lambda REQUEST authorizer."""

    identity_header: str = "Authorization"  # identity source: method.request.header.Authorization
    # API Gateway caches the authorizer's Allow/Deny per identity-source value (its default is 300 s). That is
    # safe here because the API itself re-checks expiry, revocation and the user's state (disabled, role, token
    # epoch) on every request (services.auth.admit, with the same lookup that fetches the session): a revoked
    # token, or one its user's change ended, is refused on the next request.
    result_ttl_s: int = 300

    @property
    def identity_source(self) -> str:
        return f"method.request.header.{self.identity_header}"


AUTHORIZER = AuthorizerConfig()

# API Gateway (REST) hard limits the local gateway also enforces.
MAX_PAYLOAD_BYTES = 10 * 1024 * 1024
INTEGRATION_TIMEOUT_S = 29.0
# The longest exec the REST API accepts: its answer must reach the client within the integration timeout
# (API Gateway answers 504 otherwise), with time left for the host call and the response.
EXEC_TIMEOUT_MAX_S = INTEGRATION_TIMEOUT_S - 4


class RouteTable:
    """Matches (method, path) to a route the way API Gateway does: on the segments of the path AS RECEIVED
    (percent-encoded), so an encoded ``/`` (``%2F``) stays inside its segment and never changes the route
    (``/sessions/<id>%2Fscreen`` is ``/sessions/{id}`` with id ``<id>/screen``). A static segment matches only
    itself, byte for byte; ``{param}`` matches exactly one non-empty segment and is returned decoded. The most
    specific resource wins: segment by segment from the left, a static segment before a parameter. A trailing
    slash is ignored."""

    __slots__ = ("_static", "_dynamic", "_paths")

    def __init__(self, routes: tuple[Route, ...] = ROUTES) -> None:
        self._static: dict[tuple[str, str], Route] = {}
        # (method, number of "/") -> [(pattern, route)], most specific first. A pattern matches the whole raw
        # path; each parameter is one group of "[^/]+" (one non-empty segment), static segments are literal.
        self._dynamic: dict[tuple[str, int], list[tuple[re.Pattern[str], Route]]] = {}
        self._paths: set[str] = set()
        for r in routes:
            self._paths.add(r.resource)
            if "{" not in r.resource:
                self._static[(r.method, r.resource)] = r
                continue
            rx = ""
            for seg in r.resource.split("/")[1:]:
                param = re.fullmatch(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", seg)
                if param is not None:
                    rx += f"/(?P<{param.group(1)}>[^/]+)"
                elif "{" in seg or "}" in seg:
                    raise ValueError(f"route {r.method} {r.resource}: a parameter must be a whole segment")
                else:
                    rx += "/" + re.escape(seg)
            self._dynamic.setdefault((r.method, r.resource.count("/")), []).append((re.compile(rx), r))
        for candidates in self._dynamic.values():  # static segments first, from the left (a stable sort)
            candidates.sort(key=lambda c: tuple(s[:1] == "{" for s in c[1].resource.split("/")))

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        """``path`` as received (percent-encoded, no query string); path parameters are returned decoded."""
        if len(path) > 1 and path[-1] == "/":
            path = path.rstrip("/") or "/"
        r = self._static.get((method, path))
        if r is not None:
            return r, {}
        candidates = self._dynamic.get((method, path.count("/")))
        if candidates is not None:
            for rx, route in candidates:
                found = rx.fullmatch(path)
                if found is not None:
                    return route, {k: unquote(v) for k, v in found.groupdict().items()}
        return None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter([*self._static.values(), *(r for c in self._dynamic.values() for _, r in c)])


# --- WebSocket API ----------------------------------------------------------------------------------------
# API Gateway routes a WebSocket message on ``$request.body.action``. Control routes run the ws function
# (``functions/ws``); everything else (``$default``: input, resize, ping, and whatever a client sends that is
# not JSON or names no known route) goes straight to the tmux hosts over an HTTP integration (in AWS: a VPC link
# to the hosts' NLB), so a keystroke never pays a function invocation.


@dataclass(frozen=True, slots=True)
class WsRoute:
    key: str  # route key: "$connect", "$disconnect", "$default" or an action
    target: str  # "function" (the ws Lambda) or "host" (HTTP integration to a tmux host)


WS_ROUTE_SELECTION = "$request.body.action"
WS_ROUTES: tuple[WsRoute, ...] = (
    WsRoute("$connect", "function"),
    WsRoute("$disconnect", "function"),
    WsRoute("attach", "function"),
    WsRoute("detach", "function"),
    WsRoute("$default", "host"),
)
WS_HOST_MESSAGE_PATH = "/v1/ws/message"  # where a host takes `$default` messages
WS_CONNECTION_ID = r"[A-Za-z0-9_=+/-]{1,128}"  # what a connectionId may look like (API Gateway's are base64)
WS_STREAM_ID = r"[0-9a-f]{1,32}"  # how hosts name a session's output stream (one per host run)
WS_CONNECTION_HEADER = "X-Tmuxi-Connection-Id"  # integration request header: context.connectionId
# API Gateway WebSocket limits (the local gateway enforces them too)
WS_MAX_FRAME_BYTES = 32 * 1024
WS_MAX_MESSAGE_BYTES = 128 * 1024
WS_IDLE_TIMEOUT_S = 600.0
WS_MAX_CONNECTION_S = 7200.0


def ws_route_key(body: str | bytes) -> str:
    """The route a message takes, as API Gateway selects it from ``$request.body.action``: a JSON object whose
    ``action`` names a route, else ``$default``."""
    try:
        msg = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return "$default"
    action = msg.get("action") if isinstance(msg, dict) else None
    if isinstance(action, str) and not action.startswith("$") and any(r.key == action for r in WS_ROUTES):
        return action
    return "$default"


# --- gateway responses ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GatewayResponse:
    """One API Gateway "gateway response" (``AWS::ApiGateway::GatewayResponse``) in our error shape."""

    type: str  # API Gateway response type, e.g. "UNAUTHORIZED"
    status: int
    code: str
    message: str
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}

    def template(self) -> str:
        """The ``application/json`` response template (static JSON)."""
        return json.dumps(self.body(), separators=(",", ":"))

    def body_bytes(self) -> bytes:
        return self.template().encode()


_UNAUTHORIZED_MSG = "missing, malformed, expired, revoked or wrongly signed token"

GATEWAY_RESPONSES: dict[str, GatewayResponse] = {
    r.type: r
    for r in (
        GatewayResponse("UNAUTHORIZED", 401, "unauthorized", _UNAUTHORIZED_MSG),
        GatewayResponse("ACCESS_DENIED", 403, "forbidden", "access denied"),
        # API Gateway answers an unknown resource/method with MISSING_AUTHENTICATION_TOKEN (403 by default);
        # we configure it as 404 so clients see an honest "no such route".
        GatewayResponse("MISSING_AUTHENTICATION_TOKEN", 404, "not_found", "no such route"),
        GatewayResponse("REQUEST_TOO_LARGE", 413, "payload_too_large", "request larger than 10 MB"),
        GatewayResponse("THROTTLED", 429, "rate_limited", "too many requests"),
        GatewayResponse("QUOTA_EXCEEDED", 429, "quota_exceeded", "usage plan quota exceeded"),
        # The authorizer fails only when what it reads (PostgreSQL, on a cache miss) cannot be reached: a 503 to
        # retry, not a 500 (configured as such; API Gateway's default is 500).
        GatewayResponse("AUTHORIZER_FAILURE", 503, "dependency_unavailable",
                        "the service is temporarily unavailable; retry shortly",
                        headers={"Content-Type": "application/json", "Retry-After": "1"}),
        GatewayResponse("AUTHORIZER_CONFIGURATION_ERROR", 500, "internal_error", "authorizer failed"),
        GatewayResponse("INTEGRATION_FAILURE", 502, "bad_gateway", "the API function failed"),
        GatewayResponse("INTEGRATION_TIMEOUT", 504, "gateway_timeout", "the API function timed out"),
        GatewayResponse("DEFAULT_4XX", 400, "bad_request", "bad request"),
        GatewayResponse("DEFAULT_5XX", 500, "internal_error", "internal error"),
    )
}


def gateway_response(kind: str) -> GatewayResponse:
    return GATEWAY_RESPONSES[kind]
