"""Live output from the tmux host (tmux_host/stream.py): real tmux, real uvicorn, the real boto3 Management API
client; the Management API itself (AWS) is a small recording HTTP server here, so that each test can make one
connection slow, throttled or gone (the local gateway's own @connections is tested in test_ws_gateway.py)."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import httpx
import pytest
import uvicorn

from tests.hosting import SECRET, free_port, kill_tmux_servers, wait_for
from tmux_host.app import create_app
from tmuxi.host_client import HostClient, close_all
from tmuxi.routes import WS_CONNECTION_HEADER, WS_HOST_MESSAGE_PATH
from tmuxi.settings import Settings


class FakeManagementApi:
    """What API Gateway's @connections does, as far as a host can tell: 200 (delivered), 410 (gone), 429
    (throttled). Records every delivered message per connection."""

    def __init__(self) -> None:
        self.received: dict[str, list[dict[str, Any]]] = {}
        self.mode: dict[str, str] = {}  # connection -> "ok" | "gone" | "throttle"
        self.lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                cid = unquote(self.path.rsplit("/", 1)[-1])
                mode = fake.mode.get(cid, "ok")
                if mode == "ok":
                    with fake.lock:
                        fake.received.setdefault(cid, []).append(json.loads(body))
                    self._answer(200, b"")
                elif mode == "gone":
                    self._answer(410, b'{"message":"gone"}', "GoneException")
                else:
                    self._answer(429, b'{"message":"slow down"}', "LimitExceededException")

            def _answer(self, status: int, body: bytes, kind: str | None = None) -> None:
                self.send_response(status)
                self.send_header("content-length", str(len(body)))
                self.send_header("content-type", "application/json")
                if kind:
                    self.send_header("x-amzn-ErrorType", kind)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def messages(self, cid: str, kind: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            got = list(self.received.get(cid, []))
        return [m for m in got if kind is None or m.get("type") == kind]

    def text(self, cid: str) -> bytes:
        """Everything drawn on this connection's terminal: snapshots and output, in order."""
        return b"".join(base64.b64decode(m["data"]) for m in self.messages(cid) if m["type"] in ("output", "snapshot"))

    def position(self, cid: str) -> tuple[str, int]:
        stream, pos = "", 0
        for m in self.messages(cid):
            if m["type"] == "attached":
                stream, pos = m["stream"], m["seq"]
            elif m["type"] == "snapshot":
                pos = m["seq"]
            elif m["type"] == "output":
                assert m["seq"] == pos, f"output at {m['seq']}, expected {pos}: a byte lost or repeated"
                pos += len(base64.b64decode(m["data"]))
        return stream, pos


class Host:
    def __init__(self, settings: Settings, app: Any, server: uvicorn.Server, loop: asyncio.AbstractEventLoop) -> None:
        self.settings, self.app, self.server, self.loop = settings, app, server, loop
        self.url = f"http://127.0.0.1:{settings.host_port}"
        self.client = HostClient(self.url, secret=SECRET, settings=settings)
        self.http = httpx.Client(base_url=self.url, headers={"X-Tmuxi-Host-Secret": SECRET})

    def attach(self, sid: uuid.UUID, cid: str, **kw: Any) -> dict[str, Any]:
        resp = self.http.post(f"/v1/sessions/{sid}/viewers", json={"connection_id": cid, **kw})
        assert resp.status_code == 200, resp.text
        return resp.json()  # type: ignore[no-any-return]

    def send(self, cid: str, message: Any) -> httpx.Response:
        body = message if isinstance(message, bytes) else json.dumps(message).encode()
        return self.http.post(WS_HOST_MESSAGE_PATH, content=body, headers={WS_CONNECTION_HEADER: cid})

    def viewers(self) -> int:
        return len(self.app.state.engine.live.viewers)


@pytest.fixture(scope="module")
def fake() -> FakeManagementApi:
    return FakeManagementApi()


@pytest.fixture(scope="module")
def host(fake: FakeManagementApi) -> Iterator[Host]:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test-key")  # boto3 signs; the fake does not check
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test-secret")
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="ts"))
    d.chmod(0o711)
    settings = Settings(socket_dir=d / "s", data_dir=d / "data", host_secret=SECRET, host_port=free_port(),
                        host_id="stream-host", heartbeat_interval_s=60, ws_management_endpoint=fake.url,
                        stream_buffer_bytes=256 * 1024, stream_pause_after_s=1)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.host_port, log_level="warning",
                                           access_log=False, lifespan="on"))
    loops: list[asyncio.AbstractEventLoop] = []

    def run() -> None:
        loop = asyncio.new_event_loop()
        loops.append(loop)
        loop.run_until_complete(server.serve())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=15, what="host start")
        yield Host(settings, app, server, loops[0])
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        close_all()
        kill_tmux_servers(d)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def session(host: Host) -> Iterator[uuid.UUID]:
    sid = uuid.uuid4()
    host.client.create_session(sid, 1 + sid.int % 1000, 100, 30)
    wait_for(lambda: "$" in host.client.screen(sid).text or "#" in host.client.screen(sid).text, what="prompt")
    yield sid
    with contextlib.suppress(Exception):
        host.client.kill_session(sid)


def cid() -> str:
    return base64.b64encode(os.urandom(10)).decode()


def test_attach_gets_screen_then_live_output_in_order(host: Host, fake: FakeManagementApi,
                                                       session: uuid.UUID) -> None:
    c = cid()
    host.attach(session, c)
    wait_for(lambda: fake.messages(c, "snapshot"), what="snapshot")
    first = fake.messages(c)
    assert first[0]["type"] == "attached" and first[0]["cols"] == 100 and first[0]["rows"] == 30
    assert first[1]["type"] == "snapshot" and first[1]["gap"] is False
    assert host.send(c, {"action": "input", "data": "echo strm-$((6*7))\r"}).status_code == 202
    wait_for(lambda: b"strm-42" in fake.text(c), what="echo of the command's output")
    fake.position(c)  # every output frame starts where the previous one ended


def test_resume_sends_exactly_the_missed_bytes(host: Host, fake: FakeManagementApi, session: uuid.UUID) -> None:
    a = cid()
    host.attach(session, a)
    host.send(a, {"action": "input", "data": "echo one-$((1+1))\r"})
    try:
        wait_for(lambda: b"one-2" in fake.text(a), what="first output")
    except TimeoutError:
        import subprocess
        eng = host.app.state.engine
        rec = eng._sessions[session]
        sock = host.settings.resolved_socket_dir / host.settings.host_id / f"a{rec.account}" / "tmux"
        v = eng.live.viewers.get(a)
        print("DEBUG", fake.messages(a)[2:], eng.live.streams[session].buffer.end, v and (v.pos, v.need_snapshot,
              v.task, v.control, v.closing, v.wake.is_set()), rec, eng.servers[rec.account].out.alive,
              subprocess.run(["tmux", "-S", str(sock), "list-windows", "-a", "-F",
                              "#{session_name} #{window_id} #{pane_id}"], capture_output=True, text=True).stdout,
              subprocess.run(["tmux", "-S", str(sock), "list-clients", "-F",
                              "#{client_name} #{client_flags} #{client_session}"], capture_output=True,
                             text=True).stdout)
        raise
    stream, pos = fake.position(a)
    host.http.delete(f"/v1/viewers/{quote(a, safe='')}", params={"notify": "0"})  # the connection dropped
    wait_for(lambda: host.viewers() == 0, what="viewer gone")
    host.client.send_input(session, data=b"echo two-$((2+1))\r")  # output while nobody watches
    wait_for(lambda: "two-3" in host.client.screen(session).text, what="output while detached")
    b = cid()
    host.attach(session, b, stream=stream, last_seq=pos)
    wait_for(lambda: b"two-3" in fake.text(b), what="missed output")
    assert not fake.messages(b, "snapshot"), "the bytes were still buffered: no snapshot"
    assert fake.messages(b)[0]["seq"] == pos
    assert fake.position(b)[1] > pos
    assert b"echo two-$((2+1))" in fake.text(b) and b"one-2" not in fake.text(b)


def test_resume_from_another_stream_or_a_lost_position_is_a_gap(host: Host, fake: FakeManagementApi,
                                                                session: uuid.UUID) -> None:
    a = cid()
    host.attach(session, a, stream="0123456789abcdef", last_seq=5)
    wait_for(lambda: fake.messages(a, "snapshot"), what="snapshot")
    assert fake.messages(a, "snapshot")[0]["gap"] is True


def test_a_stalled_viewer_holds_nothing_up_and_gets_a_gap(host: Host, fake: FakeManagementApi,
                                                          session: uuid.UUID) -> None:
    slow, fast = cid(), cid()
    host.attach(session, slow)
    host.attach(session, fast)
    wait_for(lambda: fake.messages(fast, "snapshot") and fake.messages(slow, "snapshot"), what="snapshots")
    fake.mode[slow] = "throttle"  # from now on the slow one's client takes nothing
    # ~1 MB of output, four times the buffer: the fast viewer gets all of it, in order
    host.send(fast, {"action": "input", "data": "head -c 1000000 /dev/zero | base64 -w 100; echo flood-$((9*9))\r"})
    wait_for(lambda: b"flood-81" in fake.text(fast), timeout=30, what="the whole flood")
    stream, pos = fake.position(fast)
    buf = host.app.state.engine.live.streams[session].buffer
    assert len(buf._buf) <= host.settings.stream_buffer_bytes * 3 // 2  # bounded, whatever the slow one does
    assert pos - buf.start <= host.settings.stream_buffer_bytes * 3 // 2
    fake.mode[slow] = "ok"  # it reads again: it gets a fresh screen marked as a gap, then live output
    wait_for(lambda: len(fake.messages(slow, "snapshot")) == 2, timeout=10, what="slow viewer's resync")
    assert fake.messages(slow, "snapshot")[1]["gap"] is True
    fake.position(slow)  # and no byte repeated or skipped in what it did get


def test_gone_connection_is_dropped(host: Host, fake: FakeManagementApi, session: uuid.UUID) -> None:
    c = cid()
    fake.mode[c] = "gone"
    before = host.viewers()
    host.attach(session, c)
    wait_for(lambda: host.viewers() == before, what="the gone viewer dropped")


def test_read_only_attach_cannot_type_or_resize(host: Host, fake: FakeManagementApi, session: uuid.UUID) -> None:
    c = cid()
    host.attach(session, c, read_only=True)
    host.send(c, {"action": "input", "data": "echo nope-$((1+2))\r"})
    host.send(c, {"action": "resize", "cols": 50, "rows": 10})
    wait_for(lambda: len(fake.messages(c, "error")) == 2, what="two errors")
    assert {e["code"] for e in fake.messages(c, "error")} == {"read_only"}
    host.client.send_input(session, data=b"echo marker-$((2+2))\r")
    wait_for(lambda: "marker-4" in host.client.screen(session).text, what="marker")
    assert "nope-3" not in host.client.screen(session).text
    assert host.client.screen(session).cols == 100


def test_bad_messages_get_errors_and_change_nothing(host: Host, fake: FakeManagementApi,
                                                    session: uuid.UUID) -> None:
    stranger = cid()  # never attached
    host.send(stranger, {"action": "input", "data": "echo x\r"})
    attached = cid()
    host.attach(session, attached)
    host.send(attached, b"not json")
    host.send(attached, {"action": "dance"})
    host.send(attached, {"action": "resize", "cols": 5, "rows": 10})
    host.send(attached, {"action": "input"})
    wait_for(lambda: len(fake.messages(attached, "error")) == 4 and fake.messages(stranger, "error"), what="errors")
    assert fake.messages(stranger, "error")[0]["code"] == "not_attached"
    assert [e["code"] for e in fake.messages(attached, "error")] == ["bad_frame", "unknown_action", "invalid",
                                                                      "invalid"]
    assert host.client.screen(session).cols == 100
    host.send(attached, {"action": "ping", "id": 7})
    wait_for(lambda: fake.messages(attached, "pong"), what="pong")
    assert fake.messages(attached, "pong")[0]["id"] == 7
    assert host.send("bad id!", {"action": "ping"}).status_code == 400


def test_session_end_detaches_its_viewers(host: Host, fake: FakeManagementApi) -> None:
    sid = uuid.uuid4()
    host.client.create_session(sid, 77, 80, 24)
    c = cid()
    host.attach(sid, c)
    host.send(c, {"action": "input", "data": "exit\r"})
    wait_for(lambda: fake.messages(c, "detached"), what="detached")
    assert fake.messages(c, "detached")[0].get("state") == "exited", fake.messages(c)
    assert host.viewers() == 0 or c not in host.app.state.engine.live.viewers


def test_a_pane_tmux_paused_is_resynced(host: Host, fake: FakeManagementApi, session: uuid.UUID) -> None:
    """The host falls behind (its event loop blocked for 2.5 s while the pane floods it: more than the pipe holds,
    so tmux has to queue it): tmux pauses the pane
    (pause-after=1), the host continues it and every viewer gets a fresh screen marked as a gap."""
    c = cid()
    host.attach(session, c)
    wait_for(lambda: fake.messages(c, "snapshot"), what="snapshot")
    host.send(c, {"action": "input",
                  "data": "for i in $(seq 1 40); do head -c 100000 /dev/zero | base64 -w 200; echo tick-$i; sleep 0.1;"
                          " done\r"})
    wait_for(lambda: b"tick-2" in fake.text(c), what="ticks")
    host.loop.call_soon_threadsafe(time.sleep, 2.5)  # the host is overloaded for a moment
    wait_for(lambda: len(fake.messages(c, "snapshot")) >= 2, timeout=15, what="a resync after the pause")
    assert fake.messages(c, "snapshot")[-1]["gap"] is True
    wait_for(lambda: b"tick-40" in fake.text(c), timeout=15, what="live output after the pause")


def test_replies_to_a_client_that_cannot_take_them_are_bounded(host: Host, fake: FakeManagementApi,
                                                                session: uuid.UUID) -> None:
    c = cid()
    host.attach(session, c)
    wait_for(lambda: fake.messages(c, "snapshot"), what="snapshot")
    fake.mode[c] = "throttle"  # its client takes nothing now, and keeps pinging
    for i in range(200):
        host.send(c, {"action": "ping", "id": i})
    viewer = host.app.state.engine.live.viewers[c]
    assert len(viewer.control) <= 64
    fake.mode[c] = "ok"
    wait_for(lambda: len(fake.messages(c, "pong")) >= 60, what="the pongs kept")
