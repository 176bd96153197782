"""Lambda entry point of MCP's Streamable HTTP transport (``/mcp``): the MCP tools (``tmuxi.mcp``) behind Mangum,
stateless with JSON answers, each tool call made to the REST API with the caller's own token.

Its own function (with a layer of its own: layers/build.py OWN_LAYERS), so that the API function never imports the
``mcp`` package: its cold start is unchanged.

SnapStart: everything is imported here, before the snapshot; what is per environment (the REST client, its
connections) is created on the first request, after a restore. There are no hooks to register
(``tmuxi.snapstart.install`` primes the core's secrets, PostgreSQL and Redis libraries, which this function neither
uses nor has). The SDK's request-state key (random, made at import) is then shared by the copies of one version,
which is what a key for state that any copy may be handed back needs.
"""
from __future__ import annotations

from mangum import Mangum

from tmuxi.mcp.http import create_app

handler = Mangum(create_app(), lifespan="off")
