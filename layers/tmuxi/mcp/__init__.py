"""MCP (Model Context Protocol) server: a user's sessions as tools for agent frameworks.

The tools (``tools.py``) call the REST API with the caller's own token, so an agent can do exactly what that user
can do through the API, and nothing more. Two transports, one set of tools:

* stdio, a process the user starts (``python -m tmuxi.mcp --api-url URL``, the token in ``TMUXI_TOKEN``):
  ``__main__.py``;
* Streamable HTTP through the gateway (``POST <gateway>/mcp`` with ``Authorization: Bearer <token>``): the mcp
  Lambda function (``functions/mcp``) serves ``http.py``, stateless with JSON answers (one request, one
  invocation), and forwards the caller's Authorization header to the REST API.

Nothing here is imported by the API function: the ``mcp`` package is imported by this package's modules only.
"""
