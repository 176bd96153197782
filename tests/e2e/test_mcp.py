"""The MCP server end to end, driven by the mcp package's own client against the real stack: over stdio (the
server a user starts, ``python -m tmuxi.mcp``, as a subprocess with TMUXI_TOKEN) and over Streamable HTTP through
the local gateway's ``/mcp`` (the mcp function behind the authorizer, forwarding the caller's token)."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, TextContent

from tmuxi.settings import env_name

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TOOLS = {"create_session", "list_sessions", "delete_session", "exec", "exec_poll", "list_execs", "exec_input",
         "exec_signal", "exec_stop", "send_and_wait", "read_screen", "write_file", "read_file", "list_dir"}
Connect = Callable[[str], AbstractAsyncContextManager[Client]]


def _stdio_params(api_url: str, token: str | None) -> StdioServerParameters:
    """The stdio server as a user starts it: the token in the environment, nothing else of this process's."""
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": f"{ROOT / 'layers'}{os.pathsep}{ROOT}"}
    if token is not None:
        env[env_name("token")] = token
    return StdioServerParameters(command=sys.executable, args=["-m", "tmuxi.mcp", "--api-url", api_url], env=env,
                                 cwd=str(ROOT))


def _text(result: CallToolResult) -> str:
    return "".join(c.text for c in result.content if isinstance(c, TextContent))


async def _ok(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, (tool, _text(result))
    out = result.structured_content
    assert isinstance(out, dict), result
    assert json.loads(_text(result)) == out  # the same answer as text, for clients that read only that
    return out


async def _refused(client: Client, tool: str, **arguments: Any) -> str:
    result = await client.call_tool(tool, arguments)
    assert result.is_error, (tool, result)
    return _text(result)


@pytest.fixture(scope="module")
def tokens(stack: Any) -> tuple[str, str]:
    """Two users' tokens."""
    (_, a), (_, b) = stack.new_user(), stack.new_user()
    return a["authorization"].removeprefix("Bearer "), b["authorization"].removeprefix("Bearer ")


def _transports(stack: Any) -> dict[str, Connect]:
    @asynccontextmanager
    async def stdio(token: str) -> AsyncIterator[Client]:
        async with Client(_stdio_params(stack.gateway_url, token), read_timeout_seconds=60) as client:
            yield client

    @asynccontextmanager
    async def http(token: str) -> AsyncIterator[Client]:
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60) as h, \
                Client(streamable_http_client(f"{stack.gateway_url}/mcp", http_client=h),
                       read_timeout_seconds=60) as client:
            yield client

    return {"stdio": stdio, "http": http}


@pytest.fixture(params=["stdio", "http"])
def connect(request: pytest.FixtureRequest, stack: Any) -> Connect:
    return _transports(stack)[request.param]


async def test_tools_create_exec_read_the_screen_and_delete(connect: Connect, tokens: tuple[str, str],
                                                             stack: Any) -> None:
    token, _ = tokens
    async with connect(token) as client:
        listed = {t.name: t for t in (await client.list_tools()).tools}
        assert set(listed) >= TOOLS
        assert "exec_poll" in (listed["exec"].description or "")  # what an agent reads to go on
        assert "session_id" in listed["exec"].input_schema["required"]

        session = await _ok(client, "create_session", name="mcp")
        sid = session["id"]
        try:
            assert session["name"] == "mcp" and session["state"] == "active"
            assert sid in {s["id"] for s in (await _ok(client, "list_sessions"))["sessions"]}
            # an id is one path segment: one that would change the route is only a wrong id (nothing deleted)
            for bad in (f"{sid}?", f"{sid}#", f"{sid}/../{sid}", f"{sid}/.."):
                assert "HTTP 4" in await _refused(client, "delete_session", session_id=bad), bad
            ran = await _ok(client, "exec", session_id=sid, command="echo hi; echo $((6 * 7))", timeout_s=10)
            assert ran["exit_code"] == 0
            assert ran["stdout"] == "hi\n42\n" and ran["stderr"] == ""
            screen = await _ok(client, "read_screen", session_id=sid)
            assert (screen["cols"], screen["rows"]) == (session["cols"], session["rows"])
            assert "echo hi; echo $((6 * 7))" in screen["text"]  # the command, as if typed
            # a refusal carries the REST API's message, which names the field
            assert "timeout_s" in await _refused(client, "exec", session_id=sid, command="true", timeout_s=999)
        finally:
            assert await _ok(client, "delete_session", session_id=sid) == {"deleted": sid}
        gone = await _refused(client, "read_screen", session_id=sid)
        assert "410 session_gone" in gone and "deleted by its owner" in gone
    # the REST API agrees: the tools did all of it as this user
    r = stack.client.get(f"/sessions/{sid}", headers={"authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.json()["state"] == "deleted"


async def test_long_commands_send_and_wait_and_files_through_the_tools(connect: Connect,
                                                                      tokens: tuple[str, str]) -> None:
    token, _ = tokens
    async with connect(token) as client:
        sid = (await _ok(client, "create_session", name="mcp-agent"))["id"]
        try:
            # a command longer than its wait: polled from its cursor, fed a line, stopped
            first = await _ok(client, "exec", session_id=sid, command="echo start; read -r x; echo got:$x; sleep 30",
                              timeout_s=0.5)
            assert first["running"] and first["stdout"] == "start\n", first
            xid = first["exec_id"]
            assert xid in {e["exec_id"] for e in (await _ok(client, "list_execs", session_id=sid))["execs"]}
            await _ok(client, "exec_input", session_id=sid, exec_id=xid, text="line", enter=True)
            more = await _ok(client, "exec_poll", session_id=sid, exec_id=xid, cursor=first["cursor"], wait_s=5)
            assert more["stdout"] == "got:line\n", more  # only what came after the cursor
            final = await _ok(client, "exec_stop", session_id=sid, exec_id=xid, grace_s=1)
            assert not final["running"] and final["exit_code"] in (130, 143, 137), final
            # interactive: type and wait for the prompt, answered with the screen
            waited = await _ok(client, "send_and_wait", session_id=sid, text="echo mcp-$((40 + 2))", until="prompt")
            assert waited["matched"] and "mcp-42" in waited["screen"]["text"]
            # files: written, listed and read back exactly
            await _ok(client, "write_file", session_id=sid, path="notes/a.txt", content="héllo\n")
            names = {e["name"] for e in (await _ok(client, "list_dir", session_id=sid, path="notes"))["entries"]}
            assert names == {"a.txt"}
            read = await _ok(client, "read_file", session_id=sid, path="notes/a.txt")
            assert read["content"] == "héllo\n" and read["encoding"] == "utf-8"
        finally:
            await _ok(client, "delete_session", session_id=sid)


async def test_another_users_session_is_refused_and_untouched(connect: Connect, tokens: tuple[str, str],
                                                              stack: Any) -> None:
    mine, theirs = tokens
    owner = {"authorization": f"Bearer {theirs}"}
    sid = stack.create_session(owner, name="not-yours")["id"]
    try:
        async with connect(mine) as client:
            for tool, args in [("read_screen", {}), ("exec", {"command": "touch /tmp/pwned"}),
                               ("send_and_wait", {"text": "echo pwned"}), ("delete_session", {})]:
                message = await _refused(client, tool, session_id=sid, **args)
                assert "404 not_found" in message and "not-yours" not in message, (tool, message)
            assert sid not in json.dumps(await _ok(client, "list_sessions", state="all"))
        assert stack.get_session(owner, sid)["state"] == "active"
    finally:
        stack.client.delete(f"/sessions/{sid}", headers=owner)


def test_http_without_a_valid_token_is_refused_by_the_gateway(stack: Any) -> None:
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}
    accept = {"accept": "application/json, text/event-stream"}
    for headers in ({}, {"authorization": "Bearer not-a-token"}):
        r = httpx.post(f"{stack.gateway_url}/mcp", json=initialize, headers={**accept, **headers}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text


def test_stdio_server_without_a_token_refuses_to_start_and_says_where_it_goes(stack: Any) -> None:
    import subprocess

    params = _stdio_params(stack.gateway_url, None)
    done = subprocess.run([params.command, *params.args], env=params.env, cwd=params.cwd, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and env_name("token") in done.stderr, done.stderr


async def test_http_get_is_405_and_a_post_gets_a_json_answer(stack: Any, tokens: tuple[str, str]) -> None:
    """Stateless with JSON answers (what fits a function invocation): no event stream, no MCP session."""
    auth = {"authorization": f"Bearer {tokens[0]}"}
    r = httpx.get(f"{stack.gateway_url}/mcp", headers={**auth, "accept": "text/event-stream"}, timeout=30)
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    listing = {"jsonrpc": "2.0", "id": 7, "method": "tools/list", "params": {}}
    r = httpx.post(f"{stack.gateway_url}/mcp", json=listing, timeout=30, headers={
        **auth, "accept": "application/json, text/event-stream", "mcp-protocol-version": "2025-06-18"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text
    assert "mcp-session-id" not in r.headers
    assert {t["name"] for t in r.json()["result"]["tools"]} >= TOOLS
