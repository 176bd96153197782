"""A request's id from the edge (API Gateway's requestId) reaches the tmux host and every log line on the way, as
Powertools' ``correlation_id``: the authorizer's, the API's, the host's (its engine's too), never mixed between
requests served at once in threads (the local gateway) or tasks (the host's event loop). Real stack, real
handlers, a real host; log lines read as written (the stack's log files, or this process's log stream)."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from aws_lambda_powertools.logging.formatter import LambdaPowertoolsFormatter

from local.gateway import LocalGateway
from local.services import free_port
from tests.conftest import StackHandle
from tests.hosting import SECRET, host_in_thread, wait_for
from tests.unit.test_log_format import CASES, _record
from tmux_host.control import kill_tmux_servers, tmux_binary
from tmuxi.host_client import REQUEST_ID_HEADER, SECRET_HEADER, HostClient, close_all
from tmuxi.observability import JsonFormatter, _dumps, logger, request_context, request_id
from tmuxi.settings import Settings

needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")


class Captured(logging.Handler):
    """The JSON lines this process's logger writes, formatted where they were logged (as its own handler formats
    them), with the thread that wrote each: the stack's scheduler also logs from a thread of this process."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.threadName or "", self.format(record)))

    def lines(self, *threads: str) -> list[dict[str, Any]]:
        """The lines written by threads whose name starts with one of ``threads`` (all when none is given)."""
        return [json.loads(line) for name, line in list(self.records) if not threads or name.startswith(threads)]

    def text(self) -> str:
        return "\n".join(line for _, line in self.records)


@contextlib.contextmanager
def captured() -> Iterator[Captured]:
    cap = Captured()
    cap.setFormatter(logger.registered_formatter)
    logger._logger.addHandler(cap)
    try:
        yield cap
    finally:
        logger._logger.removeHandler(cap)


# --- the binding itself ---------------------------------------------------------------------------------------


def test_fast_path_writes_what_powertools_writes_with_a_correlation_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a request id bound, every record is still formatted exactly as Powertools formats it, and the usual
    one (the request line) still takes the fast path rather than Powertools' record copy."""
    fast = JsonFormatter(json_serializer=_dumps, service="tmuxi", sampling_rate=None)
    reference = LambdaPowertoolsFormatter(json_serializer=_dumps, service="tmuxi", sampling_rate=None)
    with request_context("rid-1"):
        for case in CASES:
            make = case.values[0]
            got, want = fast.format(make()), reference.format(make())  # type: ignore[operator]
            assert json.loads(got) == json.loads(want) and list(json.loads(got)) == list(json.loads(want)), case.id
            assert json.loads(got)["correlation_id"] == "rid-1"
        slow_calls: list[str] = []
        real = LambdaPowertoolsFormatter._extract_log_keys

        def counted(self: LambdaPowertoolsFormatter, log_record: logging.LogRecord) -> dict[str, Any]:
            slow_calls.append(log_record.getMessage())
            return real(self, log_record)

        monkeypatch.setattr(LambdaPowertoolsFormatter, "_extract_log_keys", counted)
        line = json.loads(fast.format(_record("request", method="GET", status=200, duration=1.25)))
    assert line["correlation_id"] == "rid-1" and line["status"] == 200
    assert slow_calls == []


async def test_bound_per_task_and_per_thread_and_only_while_the_request_is_served() -> None:
    release = asyncio.Event()

    async def background() -> tuple[str | None, str | None]:
        during = request_id()
        await release.wait()
        return during, request_id()

    async def serve(rid: str) -> tuple[str | None, asyncio.Task[tuple[str | None, str | None]]]:
        with request_context(rid):
            started = asyncio.create_task(background())  # e.g. a tmux server's supervisor, started by a create
            await asyncio.sleep(0.01)  # the other request runs meanwhile on the same loop
            return request_id(), started

    served = await asyncio.gather(serve("a"), serve("b"))
    release.set()
    assert [s[0] for s in served] == ["a", "b"]
    # a task the request started carries its id while the request is served, not once it has been answered
    assert [await s[1] for s in served] == [("a", None), ("b", None)]
    assert request_id() is None

    barrier = threading.Barrier(2)
    seen: dict[str, str | None] = {}

    def thread(rid: str) -> None:
        with request_context(rid):
            barrier.wait()  # both bound at once
            seen[rid] = request_id()

    threads = [threading.Thread(target=thread, args=(r,)) for r in ("t1", "t2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"t1": "t1", "t2": "t2"}
    with request_context("outer"):
        with request_context("inner"):
            assert request_id() == "inner"
        assert request_id() == "outer"
    assert request_id() is None


# --- through the local stack (separate gateway and host processes) ------------------------------------------


def _json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for ln in path.read_text(errors="replace").splitlines():
        if ln.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(ln))
    return out


@needs_tmux
def test_the_edges_request_id_reaches_the_host_and_comes_back(stack: StackHandle) -> None:
    _, user = stack.new_user()
    created = stack.client.post("/sessions", json={"name": "rid"}, headers=user)
    assert created.status_code == 201, created.text
    sid, host_id = created.json()["id"], created.json()["host_id"]
    r = stack.client.post(f"/sessions/{sid}/exec", json={"command": "echo rid", "timeout_s": 10}, headers=user)
    assert r.status_code == 200 and r.json()["stdout"] == "rid\n", r.text
    rid = r.headers["x-amzn-requestid"]  # as API Gateway returns it
    refused = stack.client.get("/validate", headers={"authorization": "Bearer a.b.c"})
    assert refused.status_code == 401
    refused_id = refused.headers["x-amzn-requestid"]
    logs = stack.stack.log_dir
    assert logs is not None

    def lines_of(name: str, cid: str) -> list[dict[str, Any]]:
        return [ln for ln in _json_lines(logs / name) if ln.get("correlation_id") == cid]

    api = wait_for(lambda: [ln for ln in lines_of("gateway.log", rid) if ln["message"] == "request"],
                   what="the API's request line")
    assert api[0]["route"] == "/sessions/{id}/exec" and api[0]["request_id"] == rid
    host = wait_for(lambda: [ln for ln in lines_of(f"{host_id}.log", rid) if ln["message"] == "request"],
                    what="the host's request line")
    assert [ln["route"] for ln in host] == ["/v1/sessions/{sid}/exec"], host
    authz = wait_for(lambda: lines_of("gateway.log", refused_id), what="the authorizer's line")
    assert [(ln["message"], ln["reason"]) for ln in authz] == [("authorization refused", "malformed")]
    # nothing the gateway process logged with a request id carries another request's correlation id
    for ln in _json_lines(logs / "gateway.log"):
        if ln.get("request_id") and ln.get("message") in ("request", "request failed", "authorization refused"):
            assert ln.get("correlation_id") == ln["request_id"], ln


@needs_tmux
async def test_requests_served_at_once_in_the_gateways_threads_keep_their_own_ids(stack: StackHandle) -> None:
    _, user = stack.new_user()
    sid = stack.client.post("/sessions", json={"name": "rid-threads"}, headers=user).json()["id"]
    gw = LocalGateway(max_workers=4)  # the real authorizer and API handlers, in this process's threads
    try:
        transport = httpx.ASGITransport(app=gw)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost:8080", timeout=30) as c:
            # "slow" routes (a host call) run in the gateway's thread pool, "data" ones inline; refused tokens
            # run the authorizer each time (a refusal is not cached)
            calls = ([("GET", f"/sessions/{sid}/screen", user, "/sessions/{id}/screen")] * 8
                     + [("GET", f"/sessions/{sid}", user, "/sessions/{id}")] * 4
                     + [("GET", "/validate", {"authorization": f"Bearer a.b.{i}"}, None) for i in range(4)]
                     + [("POST", f"/sessions/{sid}/input", user, "/sessions/{id}/input")] * 2)
            with captured() as cap:
                answers = await asyncio.gather(*(
                    c.request(m, p, headers=h, json={"keys": ["Enter"]} if m == "POST" else None)
                    for m, p, h, _ in calls))
    finally:
        gw.close()
    assert [a.status_code for a in answers] == [200] * 12 + [401] * 4 + [204] * 2, [a.text for a in answers]
    ids = [a.headers["x-amzn-requestid"] for a in answers]
    assert len(set(ids)) == len(ids)
    # what the gateway's threads wrote: its pools' threads and this one (it runs "data" routes inline)
    lines = cap.lines("lambda", threading.current_thread().name)
    assert lines and all(ln.get("correlation_id") in ids for ln in lines), lines
    requests = {ln["correlation_id"]: ln for ln in lines if ln["message"] == "request"}
    assert set(requests) == set(ids[:12] + ids[16:]) and len(requests) == 14
    for rid, (_, _, _, route) in zip(ids, calls, strict=True):
        if route is not None:  # each request line is the request's own: its route and its request_id
            assert (requests[rid]["route"], requests[rid]["request_id"]) == (route, rid), requests[rid]
    refused = [ln["correlation_id"] for ln in lines if ln["message"] == "authorization refused"]
    assert sorted(refused) == sorted(ids[12:16])


# --- at the host ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def host() -> Iterator[tuple[str, Settings]]:
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="tr"))
    d.chmod(0o711)  # the users' accounts reach their own directories below
    settings = Settings(
        socket_dir=d / "s", data_dir=d / "data", host_secret=SECRET, host_port=free_port(), host_id="rid-host",
        heartbeat_interval_s=60,
        control_timeout_s=0.8,  # a stopped tmux server is given up on within a list request's 1 s refresh
    )
    try:
        with host_in_thread(settings) as url:
            yield url, settings
    finally:
        close_all()
        kill_tmux_servers(d)
        shutil.rmtree(d, ignore_errors=True)


HOST_THREAD = "tmux-host"  # tests.hosting.host_in_thread serves the host's event loop in this thread


def _account() -> int:
    return 1000 + uuid.uuid4().int % 100_000


@needs_tmux
def test_the_host_serves_requests_at_once_each_under_its_own_id(host: tuple[str, Settings]) -> None:
    url, settings = host
    client = HostClient(url, secret=SECRET, settings=settings)
    account = _account()
    sids = [uuid.uuid4() for _ in range(6)]
    for sid in sids:
        client.create_session(sid, account, 80, 24)
    ids = {sid: f"req-{sid.hex}" for sid in sids}

    def run(sid: uuid.UUID) -> str:
        with request_context(ids[sid]):  # what the API binds; the host client sends it
            output: str = client.exec(sid, f"sleep 0.3; echo {sid.hex}", 10).stdout
            return output

    with captured() as cap, ThreadPoolExecutor(len(sids)) as pool:
        outputs = list(pool.map(run, sids))
    assert outputs == [f"{sid.hex}\n" for sid in sids]
    lines = cap.lines(HOST_THREAD)
    assert lines and all(ln.get("correlation_id") in ids.values() for ln in lines), lines
    served = [ln["correlation_id"] for ln in lines if ln.get("route") == "/v1/sessions/{sid}/exec"]
    assert sorted(served) == sorted(ids.values())  # each once: none served under another's id
    for sid in sids:
        client.kill_session(sid)


@needs_tmux
def test_host_answers_carry_the_id_and_a_bad_id_is_replaced_unlogged(host: tuple[str, Settings]) -> None:
    url, _ = host
    bad = ["x" * 129, "a b", "<script>alert(1)</script>", "id;rm -rf", ""]
    with captured() as cap, httpx.Client(base_url=url, headers={SECRET_HEADER: SECRET}) as http:
        good = http.get(f"/v1/sessions/{uuid.uuid4()}/screen", headers={REQUEST_ID_HEADER: "Root-1.a:b_c"})
        replaced = [http.get(f"/v1/sessions/{uuid.uuid4()}/screen", headers={REQUEST_ID_HEADER: b})
                    for b in bad]
        none = http.get(f"/v1/sessions/{uuid.uuid4()}/screen")
        wrong_secret = http.get("/v1/sessions", headers={SECRET_HEADER: "wrong", REQUEST_ID_HEADER: "rid-401"})
        no_route = http.get("/v2/nothing", headers={REQUEST_ID_HEADER: "rid-nowhere"})
    assert good.status_code == 404 and good.headers[REQUEST_ID_HEADER] == "Root-1.a:b_c"
    assert good.json()["error"]["code"] == "not_found" and good.json()["error"]["request_id"] == "Root-1.a:b_c"
    assert wrong_secret.status_code == 401 and wrong_secret.headers[REQUEST_ID_HEADER] == "rid-401"
    assert wrong_secret.json()["error"]["request_id"] == "rid-401"
    assert no_route.status_code == 404 and no_route.json()["error"]["request_id"] == "rid-nowhere"
    assert no_route.headers[REQUEST_ID_HEADER] == "rid-nowhere"
    for r in [*replaced, none]:
        rid = r.headers[REQUEST_ID_HEADER]
        assert r.status_code == 404 and re.fullmatch(r"h-[0-9a-f]{16}", rid) and r.json()["error"]["request_id"] == rid
    lines = {ln["correlation_id"]: ln for ln in cap.lines(HOST_THREAD) if ln["message"] == "request"}
    assert lines["Root-1.a:b_c"]["status"] == 404 and "request_id_replaced" not in lines["Root-1.a:b_c"]
    assert lines["rid-401"]["status"] == 401
    assert all(lines[r.headers[REQUEST_ID_HEADER]]["request_id_replaced"] is True for r in replaced)
    assert "request_id_replaced" not in lines[none.headers[REQUEST_ID_HEADER]]
    for b in bad[:4]:
        assert b not in cap.text() and json.dumps(b)[1:-1] not in cap.text()


@needs_tmux
def test_an_engine_warning_during_a_request_carries_its_id_and_nothing_keeps_it_after(
        host: tuple[str, Settings]) -> None:
    url, settings = host
    client = HostClient(url, secret=SECRET, settings=settings)
    sid = uuid.uuid4()
    account = _account()
    with request_context("rid-create"):  # starts the user's tmux server and its supervisor task
        client.create_session(sid, account, 80, 24)
    sock = settings.resolved_socket_dir / settings.host_id / f"a{account}" / "tmux"
    pid = int(subprocess.run([tmux_binary(), "-S", str(sock), "display", "-p", "#{pid}"], capture_output=True,
                             text=True, check=True, timeout=10).stdout)
    # the refresh tmux's notifications of the new session schedule (20 ms on) is over before the server stops: the
    # one that meets the stopped server is the request's own
    time.sleep(0.3)
    with captured() as cap:
        os.kill(pid, signal.SIGSTOP)  # its user can do that: the host gives up on it after control_timeout_s
        try:
            with request_context("rid-list"):
                client.list_sessions()
            lost = wait_for(lambda: [ln for ln in cap.lines(HOST_THREAD)
                                     if ln["message"].startswith("tmux control connection")],
                            what="the supervisor's warning")
        finally:
            os.kill(pid, signal.SIGCONT)
    warned = [ln for ln in cap.lines(HOST_THREAD) if ln["message"] == "tmux server refresh failed"]
    assert warned and warned[0]["correlation_id"] == "rid-list", cap.lines(HOST_THREAD)
    # the supervisor was started by the create request, and logs after it (and outside any request): no id
    assert "correlation_id" not in lost[0], lost
    wait_for(lambda: client.exec(sid, "echo back", 5).stdout == "back\n", timeout=20, what="the server back")
    client.kill_session(sid)
