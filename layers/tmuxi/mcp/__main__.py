"""The MCP server over stdio, for an agent framework to start as a subprocess:

    TMUXI_TOKEN=<your token> python -m tmuxi.mcp --api-url http://127.0.0.1:8080

Every tool call goes to the REST API at --api-url (default: TMUXI_API_URL) with that token: the agent can do what
you can do through the API, as you. The token comes from the environment only (an argument would show in `ps`).
stdout carries the protocol; anything logged goes to stderr.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from tmuxi.mcp.client import RestClient, new_http_client
from tmuxi.mcp.tools import Backend, build_server
from tmuxi.settings import env_name, get_settings


class StaticBackend:
    """Every tool call with the one client (and token) of this process."""

    __slots__ = ("rest",)

    def __init__(self, rest: RestClient) -> None:
        self.rest = rest

    def client(self, ctx: object) -> RestClient:
        return self.rest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tmuxi.mcp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--api-url", help=f"the REST API's base URL (default: {env_name('api_url')})")
    args = ap.parse_args(argv)
    settings = get_settings()
    api_url = args.api_url or settings.api_url
    if not api_url:
        ap.error(f"give --api-url (or set {env_name('api_url')}): the REST API's base URL, e.g. "
                 "http://127.0.0.1:8080")
    if settings.token is None or not settings.token.get_secret_value():
        print(f"{env_name('token')} is not set: put your API token there (POST /auth/token gives one)",
              file=sys.stderr)
        return 2
    token = settings.token.get_secret_value()

    @asynccontextmanager
    async def backend() -> AsyncIterator[Backend]:
        async with new_http_client(api_url, token) as http:
            yield StaticBackend(RestClient(http))

    build_server(backend).run("stdio")
    return 0


if __name__ == "__main__":
    sys.exit(main())
