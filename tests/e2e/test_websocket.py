"""Live terminals through the whole local stack: REST (tickets, sessions, shares), the local WebSocket API (the
ws function on $connect/attach/detach, `$default` to the hosts), the hosts' output senders posting through
@connections. The client is Python `websockets`, as in examples/ws_client.py."""
from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import StackHandle

pytestmark = pytest.mark.slow


class Term:
    """One WebSocket connection: what it received, as a terminal would see it."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []
        self.stream = ""
        self.pos = 0

    async def send(self, **msg: Any) -> None:
        await self.ws.send(json.dumps(msg))

    async def next(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for m in self.messages:
                if m.get("type") == kind and not m.get("_seen"):
                    m["_seen"] = True
                    return m
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {kind!r} message; got {[m.get('type') for m in self.messages]}")
            await self._read(remaining)

    async def _read(self, timeout: float) -> None:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        m = json.loads(raw)
        if m["type"] == "attached":
            self.stream, self.pos = m["stream"], m["seq"]
        elif m["type"] == "snapshot":
            self.pos = m["seq"]
        elif m["type"] == "output":
            assert m["seq"] == self.pos, "a byte lost or repeated"
            self.pos += len(base64.b64decode(m["data"]))
        self.messages.append(m)

    def text(self) -> bytes:
        return b"".join(base64.b64decode(m["data"]) for m in self.messages if m["type"] in ("output", "snapshot"))

    async def wait_text(self, needle: bytes, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{needle!r} never came")
            await self._read(remaining)


def ticket(stack: StackHandle, headers: dict[str, str]) -> str:
    r = stack.client.post("/ws/tickets", headers=headers)
    assert r.status_code == 201, r.text
    return str(r.json()["ticket"])


def new_session(stack: StackHandle, headers: dict[str, str]) -> str:
    r = stack.client.post("/sessions", headers=headers, json={"cols": 100, "rows": 30})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def ws_url(stack: StackHandle, t: str) -> str:
    return f"{stack.stack.ws_url}?ticket={t}"


async def attached(stack: StackHandle, headers: dict[str, str], sid: str, **kw: Any) -> Term:
    term = Term(await connect(ws_url(stack, ticket(stack, headers)), max_size=None))
    await term.send(action="attach", session_id=sid, **kw)
    await term.next("attached")
    return term


async def test_type_and_see_output_then_resume_after_a_drop(stack: StackHandle) -> None:
    _, h = stack.new_user()
    sid = new_session(stack, h)
    term = await attached(stack, h, sid)
    await term.next("snapshot")
    await term.send(action="input", data="echo ws-$((6*7))\r")
    await term.wait_text(b"ws-42")
    stream, pos = term.stream, term.pos
    await term.ws.close()
    # output while nobody watches
    r = stack.client.post(f"/sessions/{sid}/input", headers=h, json={"text": "echo missed-$((5*5))", "enter": True})
    assert r.status_code == 204
    deadline = time.monotonic() + 10
    while "missed-25" not in stack.client.get(f"/sessions/{sid}/screen", headers=h).json()["text"]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    again = Term(await connect(ws_url(stack, ticket(stack, h))))
    again.pos = pos
    await again.send(action="attach", session_id=sid, stream=stream, last_seq=pos)
    got = await again.next("attached")
    assert got["seq"] == pos and got["stream"] == stream
    await again.wait_text(b"missed-25")
    assert not [m for m in again.messages if m["type"] == "snapshot"], "resumed, so no snapshot"
    await again.ws.close()


async def test_a_ticket_is_single_use_and_required(stack: StackHandle) -> None:
    _, h = stack.new_user()
    t = ticket(stack, h)
    async with connect(ws_url(stack, t)):
        pass
    with pytest.raises(InvalidStatus) as reused:
        async with connect(ws_url(stack, t)):
            pass
    assert reused.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as missing:
        async with connect(stack.stack.ws_url):
            pass
    assert missing.value.response.status_code == 401


async def test_bad_messages_get_clear_errors_and_leave_others_untouched(stack: StackHandle) -> None:
    _, h = stack.new_user()
    _, other_h = stack.new_user()
    sid = new_session(stack, h)
    others = new_session(stack, other_h)
    watcher = await attached(stack, h, sid)
    await watcher.next("snapshot")
    t = Term(await connect(ws_url(stack, ticket(stack, h)), max_size=None))
    await t.send(action="input", data="echo before-attach\r")
    assert (await t.next("error"))["code"] == "not_attached"
    await t.ws.send("not json")
    assert (await t.next("error"))["code"] == "bad_frame"
    await t.send(action="dance")
    assert (await t.next("error"))["code"] == "unknown_action"
    await t.send(action="attach", session_id=others)
    assert (await t.next("error"))["code"] == "not_found"
    await t.ws.send(json.dumps({"action": "input", "data": "x" * 40_000}))
    assert (await t.next("error"))["code"] == "too_large"
    await t.send(action="attach", session_id=sid, read_only=True)
    await t.next("attached")
    await t.send(action="input", data="echo read-only-typed\r")
    assert (await t.next("error"))["code"] == "read_only"
    # the other connection is untouched and still live; nothing reached the terminal
    await watcher.send(action="input", data="echo still-$((3*3))\r")
    await watcher.wait_text(b"still-9")
    assert b"before-attach" not in watcher.text() and b"read-only-typed" not in watcher.text()
    with pytest.raises(ConnectionClosed) as closed:  # over API Gateway's 128 KB message limit
        await t.ws.send("x" * (130 * 1024))
        while True:  # (messages already on their way come first)
            await asyncio.wait_for(t.ws.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    await watcher.send(action="ping", id="p1")
    assert (await watcher.next("pong"))["id"] == "p1"
    await watcher.ws.close()


async def test_read_only_share_sees_output_until_revoked(stack: StackHandle) -> None:
    _, h = stack.new_user()
    sid = new_session(stack, h)
    share = stack.client.post(f"/sessions/{sid}/shares", headers=h, json={"expires_in_s": 600}).json()
    r = stack.client.post("/ws/share-tickets", json={"share_token": share["token"]})
    assert r.status_code == 201, r.text
    viewer = Term(await connect(ws_url(stack, r.json()["ticket"])))
    await viewer.send(action="attach", session_id=sid)
    assert (await viewer.next("attached"))["read_only"] is True
    owner = await attached(stack, h, sid)
    await owner.send(action="input", data="echo shared-$((7*7))\r")
    await viewer.wait_text(b"shared-49")
    await viewer.send(action="input", data="echo viewer-typed\r")
    assert (await viewer.next("error"))["code"] == "read_only"
    assert stack.client.delete(f"/sessions/{sid}/shares/{share['id']}", headers=h).status_code == 204
    assert "revoked" in (await viewer.next("detached"))["reason"]
    await owner.ws.close()
    await viewer.ws.close()


async def test_deleting_the_session_detaches_viewers_and_finishes_its_recording(stack: StackHandle) -> None:
    _, h = stack.new_user()
    sid = new_session(stack, h)
    term = await attached(stack, h, sid)
    marker = uuid.uuid4().hex[:8]
    await term.send(action="input", data=f"echo rec-{marker}\r")
    await term.wait_text(f"rec-{marker}".encode())
    assert stack.client.delete(f"/sessions/{sid}", headers=h).status_code == 204
    assert (await term.next("detached"))["state"] == "deleted"
    deadline = time.monotonic() + 15
    while not (recs := stack.client.get(f"/sessions/{sid}/recordings", headers=h).json()["recordings"]):
        assert time.monotonic() < deadline, "the recording was not stored"
        await asyncio.sleep(0.1)
    cast = stack.client.get(f"/sessions/{sid}/recordings/{recs[0]['name']}", headers=h)
    assert cast.status_code == 200
    lines = cast.text.splitlines()
    assert json.loads(lines[0])["version"] == 2
    assert f"rec-{marker}" in "".join(json.loads(line)[2] for line in lines[1:] if json.loads(line)[1] == "o")
    await term.ws.close()


def test_the_example_client_relays_a_terminal(stack: StackHandle) -> None:
    """examples/ws_client.py, run as a person would, in a terminal (a pty): type, see the output, detach."""
    import os
    import pty
    import select
    import subprocess
    import sys
    from pathlib import Path

    name, _ = stack.new_user()
    root = Path(__file__).resolve().parents[2]
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, str(root / "examples" / "ws_client.py"), "--api", stack.gateway_url, "--ws",
         stack.stack.ws_url, "--user", name],
        stdin=follower, stdout=follower, stderr=follower, close_fds=True,
        env={**os.environ, "TMUXI_PASSWORD": "pw-" + name})
    os.close(follower)
    seen = b""

    def read_until(needle: bytes, timeout: float = 20.0) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while needle not in seen:
            assert time.monotonic() < deadline, f"{needle!r} never shown: {seen[-500:]!r}"
            if select.select([leader], [], [], 0.1)[0]:
                seen += os.read(leader, 65536)

    try:
        read_until(b"created session")
        time.sleep(0.5)  # the shell's prompt
        os.write(leader, b"echo example-$((8*8))\r")
        read_until(b"example-64")
        os.write(leader, b"\x1d")  # Ctrl-]: detach
        assert proc.wait(timeout=10) == 0
        read_until(b"keeps running")
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)


async def test_a_hostile_shell_cannot_reach_another_users_viewers(stack: StackHandle) -> None:
    """From inside a session's shell, as its user: posting to another user's WebSocket connection through the
    Management API (even knowing its id) is refused, and sending messages as it to a host needs the host secret;
    killing your own output client only costs your own viewers a fresh screen."""
    from tmuxi.db.pool import connection

    _, victim_h = stack.new_user()
    _, attacker_h = stack.new_user()
    victim_sid, attacker_sid = new_session(stack, victim_h), new_session(stack, attacker_h)
    victim = await attached(stack, victim_h, victim_sid)
    await victim.next("snapshot")
    with connection() as conn:
        row = conn.execute("SELECT id FROM ws_connections WHERE session_id = %s", (victim_sid,)).fetchone()
    assert row is not None
    cid = row["id"]
    hosts = [stack.stack.host_url(h) for h in stack.stack.host_ports]
    script = (
        "import urllib.request, urllib.parse, sys\n"
        "def post(url, data, headers={}):\n"
        "    try:\n"
        "        return urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers,"
        " method='POST'), timeout=5).status\n"
        "    except urllib.error.HTTPError as e:\n"
        "        return e.code\n"
        f"q = urllib.parse.quote({cid!r}, safe='')\n"
        f"print('mgmt', post({stack.stack.ws_gateway_url!r} + '/@connections/' + q,"
        " b'{\"type\":\"output\",\"seq\":0,\"data\":\"aGFja2Vk\"}'))\n"
        f"for h in {hosts!r}:\n"
        f"    print('host', post(h + '/v1/ws/message', b'{{\"action\":\"input\",\"data\":\"echo pwned\\\\r\"}}',"
        f" {{'X-Tmuxi-Connection-Id': {cid!r}}}))\n"
    )
    r = stack.client.post(f"/sessions/{attacker_sid}/exec", headers=attacker_h,
                          json={"command": f"python3 - <<'PY'\n{script}PY", "timeout_s": 15})
    assert r.status_code == 200, r.text
    out = r.json()["stdout"]
    assert "mgmt 403" in out and out.count("host 401") == len(hosts), out
    # the victim saw none of it, and still works
    await victim.send(action="input", data="echo fine-$((4*4))\r")
    await victim.wait_text(b"fine-16")
    assert b"hacked" not in victim.text() and b"pwned" not in victim.text()
    # the attacker kills its own output client: its own viewer gets a fresh screen, the victim's stream goes on
    watcher = await attached(stack, attacker_h, attacker_sid)
    await watcher.next("snapshot")
    r = stack.client.post(f"/sessions/{attacker_sid}/exec", headers=attacker_h,
                          json={"command": "pkill -f -- '-s _out' ; echo killed", "timeout_s": 10})
    assert r.status_code == 200 and "killed" in r.json()["stdout"], r.text
    await watcher.next("snapshot", timeout=15)  # resynced once the host restarted it
    await watcher.send(action="input", data="echo back-$((5*5))\r")
    await watcher.wait_text(b"back-25")
    await victim.send(action="input", data="echo still-$((6*6))\r")
    await victim.wait_text(b"still-36")
    await victim.ws.close()
    await watcher.ws.close()
