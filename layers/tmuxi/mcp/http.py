"""MCP's Streamable HTTP transport as the mcp Lambda function serves it (``functions/mcp``, behind ``/mcp``).

Stateless, with JSON answers: each POST carries its own JSON-RPC message(s) and gets its answer in the response,
with no MCP session, no server-sent event stream and nothing kept between requests. That fits a function
invocation (one request, one invocation, any execution environment) and API Gateway (no streaming). GET (an
event stream) is answered 405, as the protocol provides for a server without one; DELETE (end a session) too,
by the SDK: there is none.

Each tool call carries the Authorization header of the request that brought it to the REST API (``settings.api_url``):
the authorizer admitted it for this route, and the API checks it again for each call, as it does for any client.

Per request, a fresh Streamable HTTP app (the SDK's session manager runs once) around the one ``MCPServer``
built at import; the REST client (its connection pool) is one per event loop: in Lambda the one loop Mangum
runs every invocation on; in the local gateway, one per worker thread.
"""
from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import Receive, Scope, Send

from tmuxi.mcp.client import RestClient, new_http_client
from tmuxi.mcp.tools import Backend, build_server
from tmuxi.settings import env_name, get_settings

PATH = "/mcp"  # tmuxi.routes: the resource of the mcp routes
# No DNS-rebinding check (Host / Origin allow-lists): that protects a server on a user's machine that a web page
# could reach without credentials; here every request needs a bearer token, which a browser never adds by itself.
_TRANSPORT_SECURITY = TransportSecuritySettings(enable_dns_rebinding_protection=False)
_NOT_ALLOWED = (b'{"jsonrpc":"2.0","id":null,"error":{"code":-32000,'
                b'"message":"Method Not Allowed: this server answers POST only (stateless, no event stream)"}}')

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = weakref.WeakKeyDictionary()
_clients_lock = threading.Lock()


def _api_url() -> str:
    url = get_settings().api_url
    if not url:
        raise RuntimeError(f"{env_name('api_url')} is not set: the mcp function calls the REST API there")
    return url


def _http() -> httpx.AsyncClient:
    """The REST client of the running event loop (created on first use: never before a SnapStart snapshot)."""
    loop = asyncio.get_running_loop()
    with _clients_lock:
        client = _clients.get(loop)
        if client is None or client.is_closed:
            client = _clients[loop] = new_http_client(_api_url())
        return client


class ForwardingBackend:
    """Each tool call with the Authorization header of its HTTP request."""

    __slots__ = ("http",)

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    def client(self, ctx: Context) -> RestClient:
        headers = ctx.headers
        authorization = headers.get("authorization") if headers is not None else None
        if not authorization:  # (the authorizer refuses such a request before it gets here)
            raise ToolError("no Authorization header: send your token as 'Authorization: Bearer <token>'")
        return RestClient(self.http, authorization)


@asynccontextmanager
async def _forwarding() -> AsyncIterator[Backend]:
    yield ForwardingBackend(_http())


class StatelessMcpApp:
    """The ASGI app of ``/mcp``."""

    def __init__(self, server: MCPServer[Backend]) -> None:
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] == "GET":
            await send({"type": "http.response.start", "status": 405, "headers": [
                (b"content-type", b"application/json"), (b"allow", b"POST, DELETE"),
                (b"content-length", str(len(_NOT_ALLOWED)).encode())]})
            await send({"type": "http.response.body", "body": _NOT_ALLOWED})
            return
        app = self.server.streamable_http_app(
            streamable_http_path=PATH, stateless_http=True, json_response=True,
            transport_security=_TRANSPORT_SECURITY)
        async with app.router.lifespan_context(app):  # the SDK's session manager, for this request
            await app(scope, receive, send)


def create_app() -> StatelessMcpApp:
    return StatelessMcpApp(build_server(_forwarding))
