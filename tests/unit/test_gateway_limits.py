"""The local gateway bounds requests as API Gateway does, over real HTTP (uvicorn in a thread, stand-in Lambda
handlers): URL (414) and header (431) limits without reading further, read timeouts for a request's head and
body (408), the 10 MB payload refused from Content-Length, password hashing in a bounded pool of its own (429),
and route matching on the raw path (``%2F`` never changes the route, and is never run inline). The timeouts
are shortened by a protocol subclass; the stack's own gateway process is tested with the real ones in
``tests/integration/test_gateway_edge.py``."""
from __future__ import annotations

import concurrent.futures
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from local.gateway import MAX_HEADER_BYTES, MAX_URL_BYTES, BackgroundGateway, _gateway_http_protocol
from tests.unit.test_gateway_app import BEARER, SID, Recorder, allow
from tmuxi.routes import GATEWAY_RESPONSES, Route, RouteTable

TIMEOUT_S = 1.0


class FastTimeouts(_gateway_http_protocol()):  # type: ignore[misc]
    header_timeout_s = TIMEOUT_S
    body_timeout_s = TIMEOUT_S
    deadline_check_s = 0.1


def ok(event: dict[str, Any]) -> dict[str, Any]:
    return {"statusCode": 200, "headers": {"content-type": "application/json"},
            "body": json.dumps({"resource": event["resource"], "path": event["path"],
                                "params": event["pathParameters"], "thread": threading.current_thread().name})}


@pytest.fixture
def gw() -> Iterator[BackgroundGateway]:
    with BackgroundGateway(api_handler=Recorder(ok), authorizer_handler=Recorder(allow), max_workers=2,
                           uvicorn_options={"http": FastTimeouts}) as g:
        yield g


def connect(gw: BackgroundGateway) -> socket.socket:
    return socket.create_connection((gw.host, gw.port), timeout=5)


def read_until_closed(sock: socket.socket, timeout_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took (raises if it does not
    close within ``timeout_s``)."""
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    got = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"connection still open after {timeout_s} s (got {got[:80]!r})")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return got, time.monotonic() - t0
        got += chunk


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


# --- route matching on the raw path -------------------------------------------------------------------------


@pytest.mark.parametrize("path", [f"/sessions/{SID}%2Fscreen", f"/sessions/{SID}%2fscreen",
                                  f"/sessions/{SID}%2F..%2F..%2Fhealth"])
def test_an_encoded_slash_stays_in_its_segment(path: str) -> None:
    found = RouteTable().match("GET", path)
    assert found is not None
    route, params = found
    assert route.resource == "/sessions/{id}" and route.work == "data"
    assert params == {"id": path.split("/", 2)[2].replace("%2F", "/").replace("%2f", "/")}


def test_static_segments_match_raw_and_most_specific_wins() -> None:
    table = RouteTable((Route("GET", "/a/{x}/c", True, "p"), Route("GET", "/a/b/{y}", True, "q"),
                        Route("GET", "/{z}/b/c", True, "r"), Route("GET", "/a/b/c", True, "s")))
    assert table.match("GET", "/a/b/c")[0].name == "s"  # type: ignore[index]
    assert table.match("GET", "/a/b/d")[0].name == "q"  # type: ignore[index]
    assert table.match("GET", "/a/x/c")[0].name == "p"  # type: ignore[index]
    assert table.match("GET", "/q/b/c")[0].name == "r"  # type: ignore[index]
    assert table.match("GET", "/%61/b/c") == (table.match("GET", "/q/b/c")[0], {"z": "a"})  # %61 is no "a"
    assert table.match("GET", "/a/b") is None and table.match("GET", "/a/b/c/d") is None
    with pytest.raises(ValueError, match="whole segment"):
        RouteTable((Route("GET", "/a/x{y}", True, "bad"),))


def test_login_is_hash_work() -> None:
    found = RouteTable().match("POST", "/auth/token")
    assert found is not None and found[0].work == "hash"


def test_an_encoded_slash_is_never_run_inline(gw: BackgroundGateway) -> None:
    r = httpx.get(f"{gw.url}/sessions/{SID}%2Fscreen", headers=BEARER, timeout=5)
    plain = httpx.get(f"{gw.url}/sessions/{SID}", headers=BEARER, timeout=5)
    body = r.json()
    assert r.status_code == 200 and body["resource"] == "/sessions/{id}"
    assert body["params"] == {"id": f"{SID}/screen"} and body["path"] == f"/sessions/{SID}%2Fscreen"
    assert body["thread"].startswith("lambda")  # a pool thread, not the server's: the API may 404 it there
    assert plain.json()["thread"] == "local-gateway"  # the usual data route still runs inline


# --- size limits ----------------------------------------------------------------------------------------------


def test_url_and_header_limits(gw: BackgroundGateway) -> None:
    with httpx.Client(base_url=gw.url, headers=BEARER, timeout=5) as c:
        at_limit = c.get("/sessions/" + "a" * (MAX_URL_BYTES - len("/sessions/")))
        long_url = c.get("/sessions/" + "a" * MAX_URL_BYTES)
        long_query = c.get(f"/sessions/{SID}", params={"q": "a" * MAX_URL_BYTES})
        big_header = c.get(f"/sessions/{SID}", headers={"x-big": "b" * MAX_HEADER_BYTES})
        many = c.get(f"/sessions/{SID}", headers={f"x-h{i}": "v" * 100 for i in range(MAX_HEADER_BYTES // 100)})
        fine = c.get(f"/sessions/{SID}", headers={f"x-h{i}": "v" * 100 for i in range(60)})
    assert at_limit.status_code == 200 and fine.status_code == 200
    assert long_url.status_code == 414 and long_query.status_code == 414
    assert long_url.json() == {"error": {"code": "uri_too_long",
                                         "message": f"request URL longer than {MAX_URL_BYTES} bytes"}}
    assert big_header.status_code == 431 and many.status_code == 431
    assert big_header.json()["error"]["code"] == "headers_too_large"
    assert big_header.headers["connection"] == "close"


@pytest.mark.parametrize(("head", "status"), [
    (b"GET /sessions/x HTTP/1.1\r\nHost: x\r\nX-Big: ", 431),
    (b"GET /sessions/", 414),
])
def test_a_streamed_oversize_head_is_answered_without_reading_it(gw: BackgroundGateway, head: bytes,
                                                                  status: int) -> None:
    """The client keeps sending (up to 32 MB) and watches for an answer: it comes after ~20 KB."""
    with connect(gw) as s:
        s.sendall(head)
        s.setblocking(False)
        sent, chunk, deadline = 0, b"a" * 65536, time.monotonic() + 10
        while sent < 32 << 20 and time.monotonic() < deadline:
            readable, writable, _ = select.select([s], [s], [], 1)
            if readable:
                break
            if writable:
                sent += s.send(chunk)
        s.setblocking(True)
        raw, _ = read_until_closed(s, 5)
    assert status_of(raw) == status, raw[:200]
    assert sent < 16 << 20  # answered long before the end (the rest sat in socket buffers at most)


def test_pipelined_requests_and_large_bodies_are_served(gw: BackgroundGateway) -> None:
    """Whatever follows a complete head in the same read (its body, the next request) is not counted against
    the head limits."""
    body = b'{"text": "' + b"x" * (300 << 10) + b'"}'
    get = f"GET /sessions/{SID} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a.b.c\r\n\r\n".encode()
    post = (f"POST /sessions/{SID}/input HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a.b.c\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with connect(gw) as s:
        s.sendall(get + get + post + body)
        raw, _ = read_until_closed(s, 10)
    assert raw.count(b"HTTP/1.1 200 OK") == 3, raw[:300]


# --- read timeouts -------------------------------------------------------------------------------------------


def test_slow_heads_and_short_bodies_get_408_while_others_are_served(gw: BackgroundGateway) -> None:
    t0 = time.monotonic()
    slow_head = connect(gw)
    slow_head.sendall(b"GET /sessions/x HTTP/1.1\r\nHost: x\r\nX-Half: ")
    short_body = connect(gw)
    short_body.sendall(b"POST /auth/token HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"user")
    idle = connect(gw)  # never sends anything
    served = [httpx.get(f"{gw.url}/sessions/{SID}", headers=BEARER, timeout=5).status_code for _ in range(3)]
    results = {}
    for name, s in (("head", slow_head), ("body", short_body), ("idle", idle)):
        with s:
            results[name] = read_until_closed(s, TIMEOUT_S + 3)[0]
    elapsed = time.monotonic() - t0
    assert served == [200, 200, 200]
    assert status_of(results["head"]) == 408 and status_of(results["body"]) == 408, results
    assert b'"request_timeout"' in results["head"]
    assert results["idle"] == b""  # nothing asked, nothing answered: just closed
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 2


def test_time_spent_answering_does_not_count(gw: BackgroundGateway) -> None:
    """A handler slower than the read timeouts, and a kept-alive connection idle for a while between requests,
    are not timed out."""
    def slow(event: dict[str, Any]) -> dict[str, Any]:
        if event["resource"].endswith("/screen"):
            time.sleep(TIMEOUT_S * 1.5)
        return ok(event)

    with BackgroundGateway(api_handler=Recorder(slow), authorizer_handler=Recorder(allow), max_workers=2,
                           uvicorn_options={"http": FastTimeouts}) as g, \
            httpx.Client(base_url=g.url, headers=BEARER, timeout=10) as c:
        first = c.get(f"/sessions/{SID}/screen")
        time.sleep(TIMEOUT_S * 1.5)  # idle on a kept-alive connection (uvicorn's keep-alive timeout is 5 s)
        second = c.post(f"/sessions/{SID}/input", content=b'{"text": "x"}')
    assert first.status_code == 200 and second.status_code == 200


def test_payload_over_10_mb_is_refused_from_content_length_and_closed(gw: BackgroundGateway) -> None:
    with connect(gw) as s:
        t0 = time.monotonic()
        s.sendall(b"POST /auth/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 10485761\r\n\r\n{")
        raw, _ = read_until_closed(s, 5)
    assert status_of(raw) == 413 and b'"payload_too_large"' in raw and b"connection: close" in raw
    assert time.monotonic() - t0 < TIMEOUT_S  # at once, not after a body timeout


# --- password hashing: its own bounded pool -------------------------------------------------------------------


def test_hash_work_runs_in_its_own_bounded_pool() -> None:
    threads: dict[str, list[str]] = {}

    def handler(event: dict[str, Any]) -> dict[str, Any]:
        threads.setdefault(event["resource"], []).append(threading.current_thread().name)
        if event["resource"] == "/auth/token":
            time.sleep(0.5)
        return {"statusCode": 200, "body": "{}"}

    with BackgroundGateway(api_handler=Recorder(handler), authorizer_handler=Recorder(allow), max_workers=2,
                           hash_workers=1, hash_queue=2) as gw, \
            concurrent.futures.ThreadPoolExecutor(8) as ex:
        logins = [ex.submit(httpx.post, gw.url + "/auth/token", json={}, timeout=10) for _ in range(6)]
        time.sleep(0.2)  # the logins are in (or refused)
        t0 = time.monotonic()
        screen = httpx.get(f"{gw.url}/sessions/{SID}/screen", headers=BEARER, timeout=5)
        screen_s = time.monotonic() - t0
        answers = [f.result() for f in logins]
    codes = sorted(r.status_code for r in answers)
    assert codes == [200, 200, 200, 429, 429, 429]  # one hashing + two waiting; the rest refused at once
    throttled = next(r for r in answers if r.status_code == 429)
    assert throttled.headers["retry-after"] == "1" and throttled.headers["x-amzn-errortype"] == "THROTTLED"
    assert throttled.json() == GATEWAY_RESPONSES["THROTTLED"].body()
    assert screen.status_code == 200 and screen_s < 0.4  # not queued behind the logins
    assert threads["/auth/token"] == ["lambda-hash_0"] * 3 and threads["/sessions/{id}/screen"] == ["lambda_0"]
