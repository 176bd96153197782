"""The API's HTTP client for the tmux hosts (tmuxi/host_client.py, ``_Pool``) against a peer that misbehaves the
ways a host or the network can: it closes an idle keep-alive connection, cuts an answer short, answers garbage or
nothing, sends a chunked body. The peer is a real TCP server on loopback (a host's side of the boundary, played
by this file); the client is the project's own, unmocked. A real host is behind tests/integration/test_host_api.py.
"""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tmuxi import errors, host_client
from tmuxi.host_client import HostClient
from tmuxi.settings import Settings

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}"

Serve = Callable[[socket.socket, bytes], bool]  # (connection, the request's bytes) -> keep the connection open


class Peer:
    """A TCP server that reads each request (headers and a Content-Length body) and lets ``serve`` answer it."""

    def __init__(self, serve: Serve) -> None:
        self.serve = serve
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        self.requests: list[bytes] = []
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the client may drop the connection (a reset): it is done with it
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, rest = buf.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(rest) < length:
                    rest += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + rest[:length])
                buf = rest[length:]
                if not self.serve(conn, self.requests[-1]):
                    return

    def close(self) -> None:
        self._stop = True
        self.listener.close()


@pytest.fixture
def peer() -> Iterator[Callable[[Serve], Peer]]:
    made: list[Peer] = []

    def make(serve: Serve) -> Peer:
        made.append(Peer(serve))
        return made[-1]

    yield make
    host_client.close_all()
    for p in made:
        p.close()


def client(p: Peer, timeout_s: float = 2.0) -> HostClient:
    return HostClient(p.url, secret="s" * 32, timeout_s=timeout_s, settings=Settings())


def keep(conn: socket.socket, _: bytes) -> bool:
    conn.sendall(OK)
    return True


def test_a_connection_the_host_keeps_carries_the_next_request(peer: Callable[[Serve], Peer]) -> None:
    p = peer(keep)
    c = client(p)
    assert [c._request("GET", "/v1/x").json() for _ in range(3)] == [{"ok": True}] * 3
    assert p.connections == 1
    first = p.requests[0]
    assert first.startswith(b"GET /v1/x HTTP/1.1\r\n") and b"X-Tmuxi-Host-Secret: " + b"s" * 32 in first


def test_an_idle_connection_the_host_closed_is_replaced_not_an_error(peer: Callable[[Serve], Peer]) -> None:
    def answer_then_close(conn: socket.socket, _: bytes) -> bool:
        conn.sendall(OK)  # keep-alive by its headers; then closed, as at a host's keep-alive timeout or restart
        return False

    p = peer(answer_then_close)
    c = client(p)
    c._request("POST", "/v1/x", json={"n": 1})
    time.sleep(0.05)  # the FIN has arrived
    assert c._request("POST", "/v1/x", json={"n": 2}).json() == {"ok": True}  # a change: must not be sent twice
    assert p.connections == 2 and len(p.requests) == 2


def test_an_answer_saying_close_is_not_reused(peer: Callable[[Serve], Peer]) -> None:
    def close_header(conn: socket.socket, _: bytes) -> bool:
        conn.sendall(OK.replace(b"content-length", b"connection: close\r\ncontent-length"))
        time.sleep(0.2)  # still open when the client is done: only the header says not to reuse it
        return False

    p = peer(close_header)
    c = client(p)
    c._request("GET", "/v1/x")
    c._request("GET", "/v1/x")
    assert p.connections == 2


def test_an_answer_cut_short_is_outcome_unknown_for_a_change_and_unavailable_for_a_read(
        peer: Callable[[Serve], Peer]) -> None:
    def half(conn: socket.socket, _: bytes) -> bool:
        conn.sendall(OK[:-4])  # the body promised 11 bytes; 7 came, then the connection closed
        return False

    c = client(peer(half))
    with pytest.raises(errors.OutcomeUnknown):
        c._request("POST", "/v1/sessions/x/exec", json={"command": "true"})
    with pytest.raises(errors.HostUnavailable) as info:
        c._request("GET", "/v1/sessions/x/screen")
    assert not isinstance(info.value, errors.OutcomeUnknown)


def test_bytes_that_are_not_http_are_no_answer(peer: Callable[[Serve], Peer]) -> None:
    def garbage(conn: socket.socket, _: bytes) -> bool:
        conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        return True

    with pytest.raises(errors.HostUnavailable, match="no answer"):
        client(peer(garbage))._request("GET", "/v1/x")


def test_a_host_that_never_answers_is_given_up_on_at_the_timeout(peer: Callable[[Serve], Peer]) -> None:
    def silent(conn: socket.socket, _: bytes) -> bool:
        time.sleep(3)
        return False

    c = client(peer(silent), timeout_s=0.3)
    t = time.monotonic()
    with pytest.raises(errors.OutcomeUnknown):
        c._request("POST", "/v1/sessions/x/input", json={"data_b64": ""})
    assert time.monotonic() - t < 2


def test_a_chunked_answer_is_read_whole(peer: Callable[[Serve], Peer]) -> None:
    def chunked(conn: socket.socket, _: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nX-Tmuxi-File-Mode: 0644\r\n\r\n"
                     b"5\r\nhello\r\n")
        time.sleep(0.02)  # in two reads
        conn.sendall(b"6\r\n world\r\n0\r\n\r\n")
        return True

    resp = client(peer(chunked))._request("GET", "/v1/x")
    assert resp.content == b"hello world"
    assert resp.headers.get("x-tmuxi-file-mode") == resp.headers["X-Tmuxi-File-Mode"] == "0644"


def test_control_characters_never_reach_the_host(peer: Callable[[Serve], Peer]) -> None:
    p = peer(keep)
    c = client(p)
    with pytest.raises(ValueError, match="control characters"):
        c._request("GET", "/v1/x\r\nX-Injected: 1")
    with pytest.raises(ValueError, match="control characters"):
        HostClient(p.url, secret="s\r\nX-Injected: 1", settings=Settings())._request("GET", "/v1/x")
    c._request("GET", "/v1/x")  # the pool is still sound
    assert len(p.requests) == 1 and b"X-Injected" not in p.requests[0]


def test_a_host_that_refuses_connections_is_unavailable() -> None:
    s = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()  # nothing listens there now
    with pytest.raises(errors.HostUnavailable, match="unreachable"):
        HostClient(url, secret="s" * 32, timeout_s=1.0, settings=Settings())._request("POST", "/v1/x", json={})


def test_meanwhile_runs_once_the_request_is_sent_and_before_its_answer(peer: Callable[[Serve], Peer]) -> None:
    """What a service overlaps with the host's work (the audit event's commit, services.sessions.audited): the host
    has the request while it runs, and answers only after it here -- so it ran before the answer was read."""
    ran = threading.Event()
    seen: list[int] = []

    def answer_after_meanwhile(conn: socket.socket, _: bytes) -> bool:
        if ran.wait(2):
            conn.sendall(OK)
        return True

    def work() -> None:
        time.sleep(0.05)
        seen.append(len(p.requests))  # the host already had the request
        ran.set()

    p = peer(answer_after_meanwhile)
    c = client(p)
    assert c.meanwhile(work)._request("POST", "/v1/x", json={}).json() == {"ok": True}
    assert seen == [1]
    c._request("POST", "/v1/x", json={})  # once: the client it came from does not run it again
    assert seen == [1]


def test_meanwhile_does_not_run_when_nothing_could_be_sent() -> None:
    s = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()
    ran: list[bool] = []
    c = HostClient(url, secret="s" * 32, timeout_s=1.0, settings=Settings()).meanwhile(lambda: ran.append(True))
    with pytest.raises(errors.HostUnavailable):
        c._request("POST", "/v1/x", json={})
    assert ran == []


def test_what_meanwhile_raises_is_its_own_and_its_unread_answer_never_reaches_the_next_request(
        peer: Callable[[Serve], Peer]) -> None:
    p = peer(keep)
    c = client(p)

    def broken() -> None:
        raise OSError("the caller's own failure, not the host's")

    with pytest.raises(OSError, match="caller's own"):  # not turned into "the host did not answer"
        c.meanwhile(broken)._request("POST", "/v1/x", json={})
    assert c._request("GET", "/v1/y").json() == {"ok": True}
    assert p.connections == 2  # the first connection, its answer unread, was closed
