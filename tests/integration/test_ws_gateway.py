"""The local API Gateway WebSocket API (local/ws_gateway.py), served by uvicorn as the stack serves it, with real
WebSocket clients (``websockets``), a real HTTP server as the ``$default`` integration's target (it records what
reaches it) and boto3's real ``apigatewaymanagementapi`` client for @connections. The gateway is the unit under
test: a stand-in ws function is passed to its constructor (the real one is tested with the stack)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
import websockets
from botocore.config import Config

from local.services import free_port
from local.ws_gateway import MAX_OUTBOUND_BYTES, BackgroundWsGateway
from tests.conftest import StackHandle
from tests.hosting import wait_for
from tmuxi.routes import WS_MAX_FRAME_BYTES

AK = "AKIA" + secrets.token_hex(8).upper()
SK = secrets.token_urlsafe(30)
HOST_SECRET = "ws-host-" + secrets.token_hex(20)
REGION = "us-east-1"


class Target:
    """A tmux host's `$default` endpoint, as far as the gateway can tell: records every POST it gets."""

    def __init__(self, delay: Callable[[bytes], float] = lambda body: 0.0) -> None:
        self.messages: list[dict[str, Any]] = []
        self.delay = delay
        target = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the hosts' uvicorn

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                time.sleep(target.delay(body))
                target.messages.append({"path": self.path, "body": body,
                                        "secret": self.headers.get("X-Tmuxi-Host-Secret"),
                                        "connection_id": self.headers.get("X-Tmuxi-Connection-Id"),
                                        "request_id": self.headers.get("X-Request-Id")})
                self.send_response(202)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def bodies(self, connection_id: str | None = None) -> list[bytes]:
        return [m["body"] for m in list(self.messages) if connection_id in (None, m["connection_id"])]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class WsFunction:
    """Stand-in for the ws Lambda function: records its events. Tickets starting "good" connect, "disabled" get
    403, anything else 401; attach / detach answer with what they were asked."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        assert context.get_remaining_time_in_millis() > 0
        assert context.aws_request_id == event["requestContext"]["requestId"]
        self.events.append(event)
        rc = event["requestContext"]
        if rc["eventType"] == "CONNECT":
            ticket = (event.get("queryStringParameters") or {}).get("ticket", "")
            if ticket.startswith("good"):
                return {"statusCode": 200}
            status = 403 if ticket.startswith("disabled") else 401
            return {"statusCode": status, "headers": {"content-type": "application/json"},
                    "body": json.dumps({"error": {"code": "refused", "message": "no"}})}
        if rc["eventType"] == "MESSAGE":
            msg = json.loads(event["body"])
            return {"statusCode": 200, "body": json.dumps({"type": f"{rc['routeKey']}ed",
                                                           "session_id": msg.get("session_id")})}
        return {"statusCode": 200}

    def of(self, event_type: str, connection_id: str | None = None) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e["requestContext"]["eventType"] == event_type
                and connection_id in (None, e["requestContext"]["connectionId"])]

    def connection_id(self, ticket: str) -> str:
        for e in self.of("CONNECT"):
            if (e.get("queryStringParameters") or {}).get("ticket") == ticket:
                return str(e["requestContext"]["connectionId"])
        raise LookupError(ticket)

    def disconnect(self, connection_id: str, timeout: float = 5.0) -> dict[str, Any]:
        found = wait_for(lambda: self.of("DISCONNECT", connection_id), timeout=timeout, what="$disconnect")
        return found[0]["requestContext"]  # type: ignore[no-any-return]


@pytest.fixture
def target() -> Iterator[Target]:
    t = Target()
    yield t
    t.stop()


@pytest.fixture
def function() -> WsFunction:
    return WsFunction()


def gateway(function: WsFunction, targets: list[str], **kwargs: Any) -> BackgroundWsGateway:
    return BackgroundWsGateway(handler=function, targets=targets, host_secret=HOST_SECRET, credentials=(AK, SK),
                               region=REGION, **kwargs)


@pytest.fixture
def gw(function: WsFunction, target: Target) -> Iterator[BackgroundWsGateway]:
    with gateway(function, [target.url]) as g:
        yield g


def management(gw: BackgroundWsGateway, secret: str = SK) -> Any:
    """boto3's own client for the Management API; no retries, so each call is one request."""
    return boto3.client("apigatewaymanagementapi", endpoint_url=gw.url, region_name=REGION, aws_access_key_id=AK,
                        aws_secret_access_key=secret, config=Config(retries={"total_max_attempts": 1}))


async def connect(gw: BackgroundWsGateway, function: WsFunction, **kwargs: Any) -> tuple[Any, str]:
    ticket = "good-" + secrets.token_hex(6)
    ws = await websockets.connect(f"{gw.ws_url}?ticket={ticket}", **kwargs)
    return ws, function.connection_id(ticket)


async def poll(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    return await asyncio.to_thread(wait_for, predicate, timeout, 0.02, what)


# --- $connect ----------------------------------------------------------------------------------------------


async def test_connect_is_accepted_or_refused_with_the_functions_status(
        function: WsFunction, target: Target, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    # uvicorn at its most talkative: its WebSocket lines (and websockets' own) carry the request's query string
    with gateway(function, [target.url], uvicorn_options={"log_level": "debug"}) as gw:
        await _connect_and_refuse(gw, function)
    gateway_lines = [r for r in caplog.records if not r.name.startswith("websockets.client")]  # not the client's
    logged = "\n".join(json.dumps(r.__dict__, default=str) for r in gateway_lines)  # every line, all its keys
    assert [r.getMessage() for r in gateway_lines].count("ws connect refused") == 2  # it did log them ...
    assert "bad-" not in logged and "disabled-" not in logged and "good-" not in logged  # ... never a ticket


async def _connect_and_refuse(gw: BackgroundWsGateway, function: WsFunction) -> None:
    ws, cid = await connect(gw, function, user_agent_header="tmuxi-test/1")
    event = function.of("CONNECT", cid)[0]
    rc = event["requestContext"]
    assert rc["routeKey"] == "$connect" and rc["identity"] == {"sourceIp": "127.0.0.1", "userAgent": "tmuxi-test/1"}
    assert event["headers"]["x-forwarded-for"] == "127.0.0.1" and "sec-websocket-key" in event["headers"]
    await ws.close()

    for ticket, status in (("bad-" + secrets.token_hex(8), 401), ("disabled-" + secrets.token_hex(8), 403)):
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(f"{gw.ws_url}?ticket={ticket}")
        assert refused.value.response.status_code == status
        assert json.loads(refused.value.response.body)["error"]["code"] == "refused"
        refused_id = function.connection_id(ticket)
        assert not function.of("DISCONNECT", refused_id)  # never connected: no $disconnect, as in API Gateway
    function.disconnect(cid)


async def test_a_failing_connect_function_refuses_with_500(target: Target) -> None:
    def broken(event: dict[str, Any], context: Any) -> Any:
        raise RuntimeError("boom")

    with BackgroundWsGateway(handler=broken, targets=[target.url], host_secret=HOST_SECRET, credentials=(AK, SK),
                             region=REGION) as g:
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(f"{g.ws_url}?ticket=good")
        assert refused.value.response.status_code == 500


# --- routes ------------------------------------------------------------------------------------------------


async def test_attach_goes_to_the_function_and_its_body_comes_back(
        gw: BackgroundWsGateway, function: WsFunction, target: Target) -> None:
    ws, cid = await connect(gw, function)
    async with ws:
        await ws.send(json.dumps({"action": "attach", "session_id": "s-1"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 5)) == {"type": "attached", "session_id": "s-1"}
        await ws.send(json.dumps({"action": "detach"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "detached"
    messages = function.of("MESSAGE", cid)
    assert [m["requestContext"]["routeKey"] for m in messages] == ["attach", "detach"]
    assert json.loads(messages[0]["body"]) == {"action": "attach", "session_id": "s-1"}
    assert messages[0]["requestContext"]["messageId"] and messages[0]["requestContext"]["connectedAt"]
    assert target.bodies(cid) == []


async def test_everything_else_goes_to_a_host_with_the_connection_id(
        gw: BackgroundWsGateway, function: WsFunction, target: Target) -> None:
    ws, cid = await connect(gw, function)
    frames = ["not json", json.dumps({"action": "no-such-route"}), json.dumps({"action": "$connect"}),
              json.dumps({"action": "input", "data": "ls\r"}), json.dumps([1, 2])]
    async with ws:
        for f in frames:
            await ws.send(f)
        await poll(lambda: len(target.bodies(cid)) == len(frames), what="frames at the host")
    assert target.bodies(cid) == [f.encode() for f in frames]
    m = target.messages[0]
    assert m["path"] == "/v1/ws/message" and m["secret"] == HOST_SECRET and m["request_id"]
    assert len({x["request_id"] for x in target.messages}) == len(frames)
    assert function.of("MESSAGE", cid) == []


async def test_each_connections_messages_arrive_in_order_under_load(
        function: WsFunction) -> None:
    # the host answers after a random pause: were one connection's messages in flight together, they would
    # overtake each other
    target = Target(delay=lambda body: random.random() * 0.002)
    try:
        with gateway(function, [target.url]) as g:
            conns = [await connect(g, function) for _ in range(8)]
            n = 150

            async def keystrokes(ws: Any) -> None:
                for i in range(n):
                    await ws.send(json.dumps({"action": "input", "data": str(i)}))

            await asyncio.gather(*(keystrokes(ws) for ws, _ in conns))
            await poll(lambda: len(target.messages) == n * len(conns), timeout=60, what="every keystroke")
            for ws, cid in conns:
                assert [json.loads(b)["data"] for b in target.bodies(cid)] == [str(i) for i in range(n)]
                await ws.close()
    finally:
        target.stop()


async def test_a_slow_host_call_holds_up_only_its_own_connection(function: WsFunction) -> None:
    target = Target(delay=lambda body: 1.5 if b"slow" in body else 0.0)
    try:
        with gateway(function, [target.url]) as g:
            (a, a_id), (b, b_id) = await connect(g, function), await connect(g, function)
            await a.send("slow")
            await a.send("next")
            t0 = time.monotonic()
            await b.send("fast")
            await poll(lambda: target.bodies(b_id) == [b"fast"], what="b's message")
            assert time.monotonic() - t0 < 1.0
            assert target.bodies(a_id) == []  # a's second message waits behind its first
            await poll(lambda: target.bodies(a_id) == [b"slow", b"next"], what="a's messages")
            await a.close()
            await b.close()
    finally:
        target.stop()


async def test_hosts_are_taken_in_turn_and_an_unreachable_one_is_skipped(function: WsFunction) -> None:
    t1, t2 = Target(), Target()
    dead = f"http://127.0.0.1:{free_port()}"
    try:
        with gateway(function, [t1.url, dead, t2.url]) as g:
            ws, cid = await connect(g, function)
            async with ws:
                for i in range(9):
                    await ws.send(f"k{i}")
                await poll(lambda: len(t1.messages) + len(t2.messages) == 9, what="all nine")
            assert len(t1.messages) >= 3 and len(t2.messages) >= 3
            assert sorted(t1.bodies() + t2.bodies()) == sorted(f"k{i}".encode() for i in range(9))
    finally:
        t1.stop()
        t2.stop()


async def test_no_reachable_host_is_an_unavailable_error(function: WsFunction) -> None:
    with gateway(function, [f"http://127.0.0.1:{free_port()}"]) as g:
        ws, _ = await connect(g, function)
        async with ws:
            await ws.send(json.dumps({"action": "input", "data": "x"}))
            error = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert error["type"] == "error" and error["code"] == "unavailable" and error["message"]
            await ws.send(json.dumps({"action": "attach", "session_id": "s"}))  # the connection stays usable
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "attached"


# --- limits ------------------------------------------------------------------------------------------------


async def test_a_frame_over_32kb_is_refused_and_goes_nowhere(
        gw: BackgroundWsGateway, function: WsFunction, target: Target) -> None:
    (a, a_id), (b, b_id) = await connect(gw, function), await connect(gw, function)
    await a.send("x" * (WS_MAX_FRAME_BYTES + 1))
    error = json.loads(await asyncio.wait_for(a.recv(), 5))
    assert error["type"] == "error" and error["code"] == "too_large"
    await a.send("y" * WS_MAX_FRAME_BYTES)  # at the limit: delivered
    await a.send(["z" * 30_000] * 3)  # one 90 KB message in three frames of 30 KB: delivered, as API Gateway does
    await b.send("from-b")
    await poll(lambda: len(target.bodies(a_id)) == 2 and target.bodies(b_id) == [b"from-b"], what="the rest")
    assert target.bodies(a_id) == [b"y" * WS_MAX_FRAME_BYTES, b"z" * 90_000]
    await a.send(["w" * 30_000, "w" * (WS_MAX_FRAME_BYTES + 1)])  # a fragmented message with one frame too large
    assert json.loads(await asyncio.wait_for(a.recv(), 5))["code"] == "too_large"
    await a.close()
    await b.close()
    assert len(target.bodies(a_id)) == 2


@pytest.mark.parametrize("message", [["m" * 30_000] * 5, "m" * 200_000], ids=["fragmented", "one-frame"])
async def test_a_message_over_128kb_closes_the_connection_with_1009(
        gw: BackgroundWsGateway, function: WsFunction, target: Target, message: Any) -> None:
    (a, a_id), (b, b_id) = await connect(gw, function), await connect(gw, function)
    with pytest.raises(websockets.ConnectionClosed):
        await a.send(message)
        await asyncio.wait_for(a.recv(), 5)
    assert a.close_code == 1009
    assert function.disconnect(a_id)["disconnectStatusCode"] == 1009
    await b.send("b-still-here")  # the other connection is untouched
    await poll(lambda: target.bodies(b_id) == [b"b-still-here"], what="b's message")
    await b.close()
    assert target.bodies(a_id) == []


async def test_a_binary_frame_closes_the_connection_with_1003(
        gw: BackgroundWsGateway, function: WsFunction, target: Target) -> None:
    ws, cid = await connect(gw, function)
    await ws.send(b"\x00\x01")
    with pytest.raises(websockets.ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 1003
    assert function.disconnect(cid)["disconnectStatusCode"] == 1003
    assert target.bodies(cid) == []


async def test_idle_and_old_connections_are_closed_with_1001(function: WsFunction, target: Target) -> None:
    with gateway(function, [target.url], idle_timeout_s=0.6, max_connection_s=2.0) as g:
        t0 = time.monotonic()
        idle, idle_id = await connect(g, function)
        busy, busy_id = await connect(g, function)

        async def keep_talking() -> None:  # a connection that keeps talking lives 2 s at most
            with contextlib.suppress(websockets.ConnectionClosed):
                while True:
                    await busy.send(json.dumps({"action": "ping"}))
                    await asyncio.sleep(0.15)

        talking = asyncio.create_task(keep_talking())
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(idle.recv(), 5)
        assert idle.close_code == 1001 and 0.55 < time.monotonic() - t0 < 1.8
        rc = function.disconnect(idle_id)
        assert (rc["disconnectStatusCode"], rc["disconnectReason"]) == (1001, "Going away")

        await asyncio.wait_for(talking, 5)
        assert busy.close_code == 1001 and 1.9 < time.monotonic() - t0 < 4.0
        assert function.disconnect(busy_id)["disconnectStatusCode"] == 1001
        assert len(target.bodies(busy_id)) >= 10


async def test_a_client_close_runs_disconnect_with_its_code(gw: BackgroundWsGateway, function: WsFunction) -> None:
    ws, cid = await connect(gw, function)
    await ws.close(4000, "bye")
    rc = function.disconnect(cid)
    assert (rc["disconnectStatusCode"], rc["disconnectReason"]) == (4000, "bye")


# --- the Management API (@connections) ---------------------------------------------------------------------


async def test_boto3_posts_gets_and_deletes_connections(gw: BackgroundWsGateway, function: WsFunction) -> None:
    api = management(gw)
    ws, cid = await connect(gw, function, user_agent_header="viewer/2")
    await asyncio.to_thread(api.post_to_connection, ConnectionId=cid, Data=b'{"type":"output","seq":0}')
    assert await asyncio.wait_for(ws.recv(), 5) == '{"type":"output","seq":0}'  # UTF-8: a text frame
    await asyncio.to_thread(api.post_to_connection, ConnectionId=cid, Data=b"\xff\xfe")
    assert await asyncio.wait_for(ws.recv(), 5) == b"\xff\xfe"  # not UTF-8: a binary frame

    info = await asyncio.to_thread(api.get_connection, ConnectionId=cid)
    assert info["Identity"] == {"SourceIp": "127.0.0.1", "UserAgent": "viewer/2"}
    assert abs(info["ConnectedAt"].timestamp() - time.time()) < 30
    assert info["LastActiveAt"] >= info["ConnectedAt"]

    await asyncio.to_thread(api.delete_connection, ConnectionId=cid)
    with pytest.raises(websockets.ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 1000
    assert function.disconnect(cid)["disconnectStatusCode"] == 1000
    for call in (lambda: api.post_to_connection(ConnectionId=cid, Data=b"x"),
                 lambda: api.get_connection(ConnectionId=cid),
                 lambda: api.delete_connection(ConnectionId=cid),
                 lambda: api.post_to_connection(ConnectionId="L0SM9cOFvHcCIhw=", Data=b"x")):
        with pytest.raises(api.exceptions.GoneException):
            await asyncio.to_thread(call)


async def test_unsigned_or_wrongly_signed_requests_are_forbidden_and_deliver_nothing(
        gw: BackgroundWsGateway, function: WsFunction) -> None:
    ws, cid = await connect(gw, function)
    async with ws:
        async with httpx.AsyncClient(base_url=gw.url) as http:
            r = await http.post(f"/@connections/{cid}", content=b"unsigned")
            assert r.status_code == 403 and r.headers["x-amzn-errortype"] == "ForbiddenException"
            assert r.json()["message"] == "Missing Authentication Token"
            assert (await http.delete(f"/@connections/{cid}")).status_code == 403
        forged = management(gw, secret="not-" + SK)
        with pytest.raises(forged.exceptions.ForbiddenException):
            await asyncio.to_thread(forged.post_to_connection, ConnectionId=cid, Data=b"forged")
        with pytest.raises(forged.exceptions.ForbiddenException):
            await asyncio.to_thread(forged.delete_connection, ConnectionId=cid)
        # an unknown connection is no different to a forger: 403 before 410
        with pytest.raises(forged.exceptions.ForbiddenException):
            await asyncio.to_thread(forged.get_connection, ConnectionId="L0SM9cOFvHcCIhw=")
        await asyncio.to_thread(management(gw).post_to_connection, ConnectionId=cid, Data=b"signed")
        assert await asyncio.wait_for(ws.recv(), 5) == "signed"  # the first and only thing it got
        assert function.of("DISCONNECT", cid) == []


async def test_data_over_128kb_is_payload_too_large(gw: BackgroundWsGateway, function: WsFunction) -> None:
    api = management(gw)
    ws, cid = await connect(gw, function)
    async with ws:
        with pytest.raises(api.exceptions.PayloadTooLargeException):
            await asyncio.to_thread(api.post_to_connection, ConnectionId=cid, Data=b"o" * (128 * 1024 + 1))
        await asyncio.to_thread(api.post_to_connection, ConnectionId=cid, Data=b"o" * (128 * 1024))
        assert len(await asyncio.wait_for(ws.recv(), 5)) == 128 * 1024


async def test_a_stalled_client_gets_limit_exceeded_while_another_keeps_receiving(
        gw: BackgroundWsGateway, function: WsFunction) -> None:
    api = management(gw)
    # a client that never reads: its library stops reading the socket after one queued message
    stalled, stalled_id = await connect(gw, function, max_queue=1, close_timeout=0.5)
    reader, reader_id = await connect(gw, function)
    chunk = b"o" * 24_000  # about one output frame
    accepted = 0

    def flood() -> int:
        nonlocal accepted
        while accepted < 64 * MAX_OUTBOUND_BYTES:
            try:
                api.post_to_connection(ConnectionId=stalled_id, Data=chunk)
            except api.exceptions.LimitExceededException:
                return accepted
            accepted += len(chunk)
        raise AssertionError(f"no LimitExceededException after {accepted} bytes")

    accepted = await asyncio.to_thread(flood)
    # the bound: the gateway's queue (1 MiB) + the transport's and the kernel's buffers and what the client took
    assert MAX_OUTBOUND_BYTES <= accepted < 2 * MAX_OUTBOUND_BYTES, accepted
    assert gw.app.connections[stalled_id].queued <= MAX_OUTBOUND_BYTES
    with pytest.raises(api.exceptions.LimitExceededException):  # still full: no more is taken
        await asyncio.to_thread(api.post_to_connection, ConnectionId=stalled_id, Data=chunk)

    for i in range(20):  # meanwhile another connection gets everything
        await asyncio.to_thread(api.post_to_connection, ConnectionId=reader_id, Data=chunk + str(i).encode())
        assert await asyncio.wait_for(reader.recv(), 5) == (chunk + str(i).encode()).decode()

    t0 = time.monotonic()  # and the stalled one can still be closed, at once
    await asyncio.to_thread(api.delete_connection, ConnectionId=stalled_id)
    assert function.disconnect(stalled_id)["disconnectStatusCode"] == 1000
    assert time.monotonic() - t0 < 2
    await reader.close()
    stalled.transport.abort()


# --- health and metrics ------------------------------------------------------------------------------------


async def test_health_and_metrics(gw: BackgroundWsGateway, function: WsFunction, target: Target) -> None:
    async with httpx.AsyncClient(base_url=gw.url) as http:
        def received() -> float:
            r = httpx.get(gw.url + "/metrics")
            line = next(x for x in r.text.splitlines()
                        if x.startswith('tmux_websocket_messages_received_total{component="gateway"}'))
            return float(line.split()[-1])

        before = await asyncio.to_thread(received)
        ws, cid = await connect(gw, function)
        async with ws:
            health = (await http.get("/health")).json()
            assert health["status"] == "ok" and health["connections"] == 1
            await ws.send("one")
            await poll(lambda: target.bodies(cid) == [b"one"], what="the message")
        assert await asyncio.to_thread(received) == before + 1
        assert 'tmux_websocket_connections{component="gateway"}' in (await http.get("/metrics")).text
        assert (await http.get("/nope")).status_code == 404


# --- in the local stack ------------------------------------------------------------------------------------


def _environ(proc: subprocess.Popen[bytes] | None) -> dict[str, str]:
    """The environment a child of the stack was started with."""
    assert proc is not None and proc.poll() is None
    raw = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
    return dict(x.decode().split("=", 1) for x in raw if b"=" in x)


async def test_the_stack_wires_the_websocket_api_to_the_hosts_and_back(stack: StackHandle) -> None:
    s = stack.stack
    hosts = ",".join(s.host_url(h) for h in sorted(s.host_ports))
    ws_env = _environ(s.ws_gateway_proc)
    assert ws_env["TMUXI_GATEWAY_WS_TARGETS"] == hosts and ws_env["TMUXI_GATEWAY_WS_PORT"] == str(s.gateway_ws_port)
    for proc in (s.ws_gateway_proc, s.gateway_proc, *s.host_procs.values()):
        env = _environ(proc)
        assert {k: env.get(k) for k in s.aws_env} == s.aws_env
        assert env["TMUXI_WS_MANAGEMENT_ENDPOINT"] == s.ws_gateway_url
    assert "AWS_ACCESS_KEY_ID" not in _environ(s.scheduler_proc)
    secrets_file = json.loads((s.data_dir / "secrets.json").read_text())
    assert secrets_file["aws_access_key_id"] == s.aws_env["AWS_ACCESS_KEY_ID"]
    assert (s.data_dir / "secrets.json").stat().st_mode & 0o777 == 0o600

    api = boto3.client("apigatewaymanagementapi", endpoint_url=s.ws_gateway_url,
                       region_name=s.aws_env["AWS_DEFAULT_REGION"], aws_access_key_id=s.aws_env["AWS_ACCESS_KEY_ID"],
                       aws_secret_access_key=s.aws_env["AWS_SECRET_ACCESS_KEY"],
                       config=Config(retries={"total_max_attempts": 1}))
    with pytest.raises(api.exceptions.GoneException):
        await asyncio.to_thread(api.get_connection, ConnectionId="L0SM9cOFvHcCIhw=")

    # the real ws function refuses a made-up ticket; a real one connects, and input reaches a host ($default),
    # whose answer (input before attach: not_attached) comes back through @connections
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(f"{s.ws_url}?ticket=made-up")
    assert refused.value.response.status_code == 401
    _, headers = stack.new_user()
    r = stack.client.post("/ws/tickets", headers=headers)
    assert r.status_code == 201, r.text
    async with websockets.connect(f"{s.ws_url}?ticket={r.json()['ticket']}") as ws:
        await ws.send(json.dumps({"action": "input", "data": "ls\r"}))
        answer = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert (answer["type"], answer["code"]) == ("error", "not_attached")


def test_a_killed_websocket_gateway_is_restarted_on_its_port(stack: StackHandle) -> None:
    s = stack.stack
    old = s.ws_gateway_proc
    assert old is not None
    before = s.restarts.get("ws-gateway", 0)
    old.kill()
    old.wait()
    # what the supervisor's thread does (make run): notice the exit, start it again after the backoff

    def restarted() -> bool:
        s.supervise_once()
        return s.restarts.get("ws-gateway", 0) > before

    wait_for(restarted, timeout=15, what="a restart")
    new = s.ws_gateway_proc
    assert new is not None and new.pid != old.pid and new.poll() is None
    assert httpx.get(s.ws_gateway_url + "/health", timeout=5).json()["targets"] == len(s.host_ports)
    assert s.log_dir is not None and "ws-gateway" not in s.failed
