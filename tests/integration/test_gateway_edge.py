"""The stack's own gateway process (uvicorn, its worker processes, the real Lambda handlers, PostgreSQL, Redis,
two tmux hosts) at the edge: an encoded ``/`` in a path parameter never reaches another route, oversize
requests are refused without growing the workers, slow clients are dropped in bounded time without holding
anything up, and a login flood is throttled rather than slowing other users' terminals. All traffic goes to
127.0.0.1, bounded in count and time."""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import random
import re
import select
import shutil
import socket
import statistics
import time
from typing import Any

import httpx
import pytest

from local.gateway import BODY_TIMEOUT_S, HEADER_TIMEOUT_S, MAX_HEADER_BYTES, MAX_URL_BYTES
from tests.hosting import wait_for
from tests.integration import gateway_flood
from tests.integration.test_api_handler import authorize, invoke, token_of
from tmuxi.host_client import SECRET_HEADER
from tmuxi.routes import GATEWAY_RESPONSES
from tmuxi.settings import get_settings

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")


@pytest.fixture(scope="module")
def user(stack: Any) -> dict[str, str]:
    headers: dict[str, str] = stack.new_user()[1]
    return headers


@pytest.fixture(scope="module")
def session(stack: Any, user: dict[str, str]) -> str:
    r = stack.client.post("/sessions", json={"name": "edge"}, headers=user)
    assert r.status_code == 201, r.text
    sid: str = r.json()["id"]
    return sid


def host_secret() -> str:
    secret = get_settings().host_secret
    assert secret is not None
    return secret.get_secret_value()


def host_screen_reads(stack: Any) -> float:
    """Screen captures the tmux hosts have served (their /metrics)."""
    total = 0.0
    for host_id in stack.stack.host_ports:
        r = httpx.get(stack.stack.host_url(host_id) + "/metrics", timeout=5,
                      headers={SECRET_HEADER: host_secret()})
        assert r.status_code == 200
        for line in r.text.splitlines():
            if line.startswith("tmux_requests_total{") and 'route="/v1/sessions/{sid}/screen"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


# --- routing: the resource API Gateway matched, nothing else --------------------------------------------------


def test_an_encoded_slash_in_an_id_is_404_and_never_reaches_a_host(stack: Any, user: dict[str, str],
                                                                    session: str) -> None:
    before = host_screen_reads(stack)
    with httpx.Client(base_url=stack.gateway_url, headers=user, timeout=10) as c:
        encoded = [c.get(f"/sessions/{session}{slash}screen") for slash in ("%2F", "%2f")]
        encoded.append(c.delete(f"/sessions/{session}%2Fscreen"))
        assert host_screen_reads(stack) == before  # none of them captured a screen
        alive = c.get(f"/sessions/{session}")
        screen = c.get(f"/sessions/{session}/screen")
    for r in encoded:
        assert r.status_code == 404, r.text
        assert r.json() == {"error": {"code": "not_found", "message": "no such route"}}
        assert "x-amzn-errortype" not in r.headers  # matched /sessions/{id} at the edge, refused by the API
    assert alive.status_code == 200 and alive.json()["state"] == "active"
    assert screen.status_code == 200
    wait_for(lambda: host_screen_reads(stack) == before + 1, 5)  # the metric does count real captures


def test_the_api_serves_only_the_resource_api_gateway_matched(stack: Any, user: dict[str, str],
                                                               session: str) -> None:
    """The API Lambda alone, with an API-Gateway-shaped event whose path says /screen and whose resource says
    /sessions/{id} (what API Gateway sends for ``/sessions/<id>%2Fscreen``)."""
    token = token_of(user)
    ctx = authorize(token)
    before = host_screen_reads(stack)
    crafted = invoke("screen", ctx, token, resource="/sessions/{id}", path=f"/sessions/{session}/screen",
                     pathParameters={"id": f"{session}/screen"},
                     requestContext={"resourcePath": "/sessions/{id}", "resourceId": "/sessions/{id}"})
    assert crafted.status == 404, crafted
    assert crafted.body == {"error": {"code": "not_found", "message": "no such route"}}
    assert host_screen_reads(stack) == before
    matching = invoke("screen", ctx, token, path=f"/sessions/{session}/screen", pathParameters={"id": session})
    assert matching.status == 200, matching


# --- size limits: answered early, the workers stay flat -------------------------------------------------------


def gateway_pids(stack: Any) -> list[int]:
    root = stack.stack.gateway_proc.pid
    pids = [root]
    for task in os.listdir(f"/proc/{root}/task"):
        with open(f"/proc/{root}/task/{task}/children") as f:
            pids += [int(p) for p in f.read().split()]
    return pids


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        found = re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M)
    assert found is not None
    return int(found.group(1))


def stream_until_answered(url: str, head: bytes, total: int, deadline_s: float) -> tuple[bytes, int]:
    """Send ``head`` then up to ``total`` bytes of header value, stopping as soon as the server answers or
    closes; returns (what it answered, bytes sent)."""
    host, port = url.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(head)
        s.setblocking(False)
        chunk = b"a" * (256 << 10)
        deadline = time.monotonic() + deadline_s
        try:
            while sent < total and time.monotonic() < deadline:
                readable, writable, _ = select.select([s], [s], [], 0.5)
                if readable:
                    break
                if writable:
                    with contextlib.suppress(BlockingIOError):
                        sent += s.send(chunk)
        except OSError:  # reset: it stopped reading
            pass
        s.setblocking(True)
        s.settimeout(max(0.1, deadline - time.monotonic()))
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except OSError:
            pass
    return got, sent


def test_oversize_request_line_and_headers_are_refused_and_the_workers_stay_flat(stack: Any,
                                                                                   user: dict[str, str]) -> None:
    with httpx.Client(base_url=stack.gateway_url, headers=user, timeout=10) as c:
        long_url = c.get("/validate", params={"q": "a" * MAX_URL_BYTES})
        big_header = c.get("/validate", headers={"x-big": "b" * MAX_HEADER_BYTES})
        assert c.get("/validate").status_code == 200  # warm: every worker has served something
    assert long_url.status_code == 414 and long_url.json()["error"]["code"] == "uri_too_long"
    assert big_header.status_code == 431 and big_header.json()["error"]["code"] == "headers_too_large"

    pids = gateway_pids(stack)
    before = sum(rss_kb(p) for p in pids)
    size = 48 << 20
    heads = [b"GET /validate HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "] * 5 + [b"GET /validate?q="]
    with concurrent.futures.ThreadPoolExecutor(len(heads) + 1) as ex:
        streams = [ex.submit(stream_until_answered, stack.gateway_url, h, size, 20) for h in heads]
        peak = before
        while not all(f.done() for f in streams):  # the workers' memory while the clients send
            peak = max(peak, sum(rss_kb(p) for p in pids))
            time.sleep(0.02)
        results = [f.result() for f in streams]
    after = max(peak, sum(rss_kb(p) for p in pids))
    statuses = [r[0].split(b" ", 2)[1] if r[0].startswith(b"HTTP/1.1 ") else r[0][:40] for r in results]
    assert statuses == [b"431"] * 5 + [b"414"], statuses
    assert all(sent < size // 2 for _, sent in results), [sent for _, sent in results]
    assert after - before < 16 << 10, f"gateway RSS grew by {(after - before) >> 10} MB"
    with httpx.Client(base_url=stack.gateway_url, headers=user, timeout=10) as c:
        assert c.get("/validate").status_code == 200


# --- read timeouts: slow clients dropped, nobody else waits ---------------------------------------------------


def test_slow_clients_are_dropped_in_time_while_others_are_served(stack: Any, user: dict[str, str]) -> None:
    host, port = "127.0.0.1", stack.stack.gateway_port
    slow: dict[str, list[socket.socket]] = {"head": [], "body": [], "idle": []}
    try:
        for _ in range(20):  # half a head, then nothing
            s = socket.create_connection((host, port), timeout=5)
            s.sendall(b"GET /validate HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bea")
            slow["head"].append(s)
        for _ in range(10):  # a body shorter than its Content-Length
            s = socket.create_connection((host, port), timeout=5)
            s.sendall(b"POST /auth/token HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 60\r\n\r\n{\"username\": \"x\"")
            slow["body"].append(s)
        for _ in range(10):  # connected, never a byte
            slow["idle"].append(socket.create_connection((host, port), timeout=5))
        t0 = time.monotonic()
        open_socks = {s: name for name, socks in slow.items() for s in socks}
        got: dict[socket.socket, bytes] = {s: b"" for s in open_socks}
        closed_after: dict[str, list[float]] = {name: [] for name in slow}
        served: list[float] = []
        limit = max(HEADER_TIMEOUT_S, BODY_TIMEOUT_S)
        with httpx.Client(base_url=stack.gateway_url, headers=user, timeout=5) as c:
            while open_socks and time.monotonic() - t0 < limit + 5:
                r0 = time.monotonic()
                assert c.get("/validate").status_code == 200
                served.append(time.monotonic() - r0)
                readable, _, _ = select.select(list(open_socks), [], [], 0.2)
                for s in readable:
                    try:
                        chunk = s.recv(4096)
                    except ConnectionResetError:
                        chunk = b""
                    got[s] += chunk
                    if not chunk:
                        closed_after[open_socks.pop(s)].append(time.monotonic() - t0)
        assert not open_socks, f"{len(open_socks)} slow connections still open after {limit + 5} s"
    finally:
        for socks in slow.values():
            for s in socks:
                s.close()
    for name in ("head", "body"):
        assert all(got[s].startswith(b"HTTP/1.1 408 ") for s in slow[name]), name
    assert all(got[s] == b"" for s in slow["idle"])
    for name, times in closed_after.items():  # not before the timeout, and within it (+ the check interval)
        assert min(times) >= limit - 1 and max(times) < limit + 2, (name, times)
    assert len(served) >= 20 and statistics.median(served) < 0.1 and max(served) < 1.0, served


# --- login flood vs terminal work ----------------------------------------------------------------------------


def test_a_login_flood_is_throttled_and_does_not_slow_screen_reads(stack: Any, user: dict[str, str],
                                                                   session: str) -> None:
    """24 connections guess passwords (``gateway_flood.py``, a process of its own) while a user reads a screen;
    the screen's median latency is compared with the flood running and paused, in alternating phases (a shared
    machine's speed drifts). A throttled guesser tries again after 0.1 s (not the 1 s Retry-After asks), which
    keeps every gateway worker's hash pool full the whole time."""
    flooders, phases, reads = 24, 3, 20
    net = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}."  # noqa: S311 - fresh addresses each run
    mp = multiprocessing.get_context("spawn")
    go, stop = mp.Event(), mp.Event()
    counters = mp.Array("i", 4)  # in flight, 401 from the API, other answers of the API, throttled
    sample = mp.Queue()
    proc = mp.Process(target=gateway_flood.flood, daemon=True,
                      args=(stack.gateway_url, [net + str(i + 1) for i in range(flooders)], 0.1, go, stop,
                            counters, sample))
    unloaded: list[float] = []
    loaded: list[float] = []
    with httpx.Client(base_url=stack.gateway_url, headers=user, timeout=10) as c:

        def screen(into: list[float]) -> None:
            for _ in range(reads):
                t0 = time.perf_counter()
                r = c.get(f"/sessions/{session}/screen")
                into.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text

        screen([])  # warm
        proc.start()
        try:
            for _ in range(phases):
                go.clear()
                wait_for(lambda: counters[0] == 0, 30, 0.01)
                screen(unloaded)
                hashed, throttled = counters[1], counters[3]
                go.set()
                wait_for(lambda h=hashed, t=throttled: counters[1] >= h + 4 and counters[3] >= t + flooders,  # type: ignore[misc]
                         30, 0.01)
                screen(loaded)
        finally:
            stop.set()
            go.set()
            proc.join(60)
            if proc.is_alive():
                proc.kill()
    assert proc.exitcode == 0
    assert counters[1] >= phases * 4 and counters[2] == 0  # every admitted guess: 401 after its hash
    status, headers, body = sample.get(timeout=5)
    assert status == 429 and headers["retry-after"] == "1"
    assert json.loads(body) == GATEWAY_RESPONSES["THROTTLED"].body()
    quiet, busy = statistics.median(unloaded), statistics.median(loaded)
    print(f"screen median {quiet * 1000:.1f} ms without, {busy * 1000:.1f} ms during the flood; "
          f"{counters[1]} guesses hashed, {counters[3]} throttled")
    assert busy <= 2 * quiet, f"screen median {quiet * 1000:.1f} ms unloaded, {busy * 1000:.1f} ms in the flood"
