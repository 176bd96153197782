"""Error bodies say what was wrong with the request (4xx) or that the service is busy or unavailable (5xx), never
how the system is built: no host ids or addresses, capacities, tmux text, the host's own messages or exception
text. Those go to the log with the request id. Driven in-process through the REAL API handler against the real
stack, plus a real tmux host of capacity 1 started here (the record is made to prefer it), stopped, or replaced
by a listener that never answers."""
from __future__ import annotations

import json
import logging
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.hosting import free_port, host_in_thread, kill_tmux_servers
from tests.integration.test_api_handler import Ctx, Result, authorize, invoke, token_of
from tests.integration.test_throttle import changed_settings
from tmuxi import errors, registry
from tmuxi.db import repo
from tmuxi.host_client import HostClient, HostResponse
from tmuxi.settings import Settings, get_settings

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")

# what must never reach a client
_INTERNALS = ("tmux", "capacity", "host-1", "host-2", "tiny-", "127.0.0.1", "timed out", "timeout", "connecterror",
              "readtimeout", "tmuxi_", "/tmp", "traceback", "unreachable", "registered", "answered", "invalid body",
              "input should", "can't find", "pane", "%")


def assert_clean(r: Result, *also: str) -> None:
    text = r.text.lower()
    for word in (*_INTERNALS, *(a.lower() for a in also)):
        assert word not in text, (word, r)
    body = r.body["error"]
    assert set(body) <= {"code", "message", "details"}, body
    if r.status >= 500:
        assert "details" not in body and "retry" in body["message"], body


class TinyHost:
    """A real tmux host of capacity 1, known to the record with a huge capacity so that placement prefers it
    (``claim`` before each create; the host's heartbeat is off, so the record says what we make it say)."""

    def __init__(self, host_id: str, url: str) -> None:
        self.host_id, self.url = host_id, url

    def point_at(self, url: str) -> None:
        repo.upsert_host(self.host_id, url, 10**6, 0, datetime.now(UTC))
        registry._url_cache.pop(self.host_id, None)

    def claim(self) -> None:
        self.point_at(self.url)


@pytest.fixture
def tiny_host(stack: Any) -> Iterator[TinyHost]:
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="tt"))
    d.chmod(0o711)  # users' accounts reach their own directories below
    host_id = f"tiny-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        socket_dir=d / "s", data_dir=d / "data", host_secret=get_settings().require_host_secret(),
        host_port=free_port(), host_id=host_id, host_capacity=1, heartbeat_interval_s=60,
    )
    try:
        with host_in_thread(settings) as url:
            yield TinyHost(host_id, url)
    finally:
        from tmuxi.db.pool import connection

        with connection() as conn:  # never again a placement target
            conn.execute("UPDATE hosts SET last_heartbeat = 'epoch' WHERE id = %s", (host_id,))
        registry._url_cache.pop(host_id, None)
        kill_tmux_servers(d)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def caller(stack: Any) -> tuple[str, Ctx]:
    _, headers = stack.new_user()
    token = token_of(headers)
    return token, authorize(token)


def _req(**over: Any) -> dict[str, Any]:
    rid = str(uuid.uuid4())
    over.setdefault("requestContext", {})["requestId"] = rid
    return over


def _logged_with(caplog: pytest.LogCaptureFixture, request_id: str) -> str:
    """Everything logged for one request id (its request line and the error's detail)."""
    return " ".join(json.dumps(r.__dict__, default=str) for r in caplog.records
                    if request_id in (getattr(r, "request_id", None), getattr(r, "correlation_id", None)))


def test_host_at_capacity_is_skipped_and_its_words_only_logged(tiny_host: TinyHost, caller: tuple[str, Ctx],
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """A host that answers "full" is not the client's problem: the create goes to another host, and what the
    full host said (its id, its capacity) is in the log only."""
    token, ctx = caller
    tiny_host.claim()
    first = invoke("create_session", ctx, token, body={"name": "tiny"})
    assert first.status == 201 and first.body["host_id"] == tiny_host.host_id, first
    tiny_host.claim()
    over = _req(body={"name": "tiny-2"})
    with caplog.at_level(logging.INFO):
        moved = invoke("create_session", ctx, token, **over)
    assert moved.status == 201 and moved.body["host_id"] != tiny_host.host_id, moved
    assert moved.body["state"] == "active"
    skipped = [r for r in caplog.records if r.getMessage() == "session creation failed on a host; trying another"]
    assert [(getattr(r, "host_id", None), getattr(r, "error", None)) for r in skipped] == [
        (tiny_host.host_id, "host_full")]
    for body in (first, moved):
        assert invoke("delete_session", ctx, token, pathParameters={"id": body.body["id"]}).status == 204


def test_no_live_host_is_503_without_operator_hints(caller: tuple[str, Ctx],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    token, ctx = caller
    over = _req(body={"name": "nowhere"})
    with changed_settings(host_dead_after_s=0.001), caplog.at_level(logging.INFO):  # no heartbeat that fresh
        r = invoke("create_session", ctx, token, **over)
    assert r.status == 503 and r.body["error"]["code"] == "host_unavailable", r
    assert_clean(r, "start a host", "raise")
    assert "TMUXI_HOST_CAPACITY" in _logged_with(caplog, over["requestContext"]["requestId"])


def test_silent_stopped_or_unknown_host_is_503_without_details(tiny_host: TinyHost, caller: tuple[str, Ctx],
                                                               caplog: pytest.LogCaptureFixture) -> None:
    token, ctx = caller
    tiny_host.claim()
    created = invoke("create_session", ctx, token, body={"name": "silent"})
    assert created.status == 201 and created.body["host_id"] == tiny_host.host_id, created
    sid = {"pathParameters": {"id": created.body["id"]}}
    assert invoke("screen", ctx, token, **sid).status == 200
    with socket.socket() as silent:  # accepts connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        tiny_host.point_at(f"http://127.0.0.1:{silent.getsockname()[1]}")
        over = _req(**sid)
        with changed_settings(host_timeout_s=0.3), caplog.at_level(logging.INFO):
            r = invoke("screen", ctx, token, **over)
        assert r.status == 503 and r.body["error"]["code"] == "host_unavailable", r
        assert {k.lower(): v for k, v in r.headers.items()}.get("retry-after") == "1", r.headers  # when to retry
        assert_clean(r, tiny_host.host_id, str(silent.getsockname()[1]))
        assert "no answer" in _logged_with(caplog, over["requestContext"]["requestId"])
        with changed_settings(host_timeout_s=0.3):  # input sent, no answer: it may have been typed
            typed = invoke("input", ctx, token, body={"text": "x"}, **sid)
        assert typed.status == 503 and typed.body["error"]["code"] == "outcome_unknown", typed
        assert "may have taken effect" in typed.body["error"]["message"]
        assert_clean(typed, tiny_host.host_id, str(silent.getsockname()[1]))
    tiny_host.point_at(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    r = invoke("input", ctx, token, body={"text": "x"}, **sid)
    assert r.status == 503, r
    assert_clean(r, tiny_host.host_id)
    # each input is audited, sent or not, and settled with what became of it (newest first)
    inputs = [(e["status"], e["detail"].get("error"))
              for e in repo.audit_events(uuid.UUID(created.body["id"]), None, 100) if e["action"] == "session.input"]
    assert inputs == [("error", "host_unavailable"), ("error", "outcome_unknown")], inputs
    tiny_host.claim()
    assert invoke("screen", ctx, token, **sid).status == 200
    assert invoke("delete_session", ctx, token, **sid).status == 204


def test_host_refusals_are_not_relayed_verbatim(tiny_host: TinyHost) -> None:
    secret = get_settings().require_host_secret()
    client = HostClient(tiny_host.url, secret=secret)
    # the host's own validation text (a request the API would never send)
    with pytest.raises(errors.BadRequest) as bad:
        client.resize(uuid.uuid4(), 1, 1)
    assert "invalid body" not in bad.value.message and "Input should" not in bad.value.message
    assert "invalid body" in str(bad.value.internal)  # kept for the log
    with pytest.raises(errors.NotFound) as missing:
        client.screen(uuid.uuid4())
    assert "host" not in missing.value.message
    # a wrong host secret is the service's fault, never the caller's 401
    with pytest.raises(errors.HostUnavailable):
        HostClient(tiny_host.url, secret="wrong-" + secret).list_sessions()
    # tmux's own text in a host error: logged, never in a body
    tmux_text = {"error": {"code": "internal_error", "message": "can't find pane: %3 (/tmp/tmuxi-0/a1/tmux)"}}
    err = HostClient._to_error(HostResponse(500, json.dumps(tmux_text).encode()))
    assert err.status == 500 and "pane" not in json.dumps(err.to_body()) and "/tmp" not in json.dumps(err.to_body())
    full = {"error": {"code": "host_full", "message": "host host-2 is at capacity (30 sessions)"}}
    err = HostClient._to_error(HostResponse(503, json.dumps(full).encode()))
    assert isinstance(err, errors.HostUnavailable)
    assert "capacity" not in json.dumps(err.to_body()) and "host-2" not in json.dumps(err.to_body())


def test_unexpected_exception_text_is_logged_not_sent(caller: tuple[str, Ctx], monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """An AppError (500) carrying internal text: the client gets the generic body, the log gets the text."""
    from tmuxi.services import sessions as sessions_service

    def boom(*_: Any, **__: Any) -> Any:
        raise errors.AppError("relation sessions_x does not exist at /var/lib/pg")

    token, ctx = caller
    monkeypatch.setattr(sessions_service, "list_sessions", boom)
    over = _req()
    with caplog.at_level(logging.INFO):
        r = invoke("list_sessions", ctx, token, **over)
    assert r.status == 500 and r.body == {"error": {"code": "internal_error", "message": "internal error"}}, r
    assert "sessions_x" in _logged_with(caplog, over["requestContext"]["requestId"])
