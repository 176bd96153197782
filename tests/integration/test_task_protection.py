"""ECS task scale-in protection (tmux_host/protection.py) on a real host (real tmux, real uvicorn). The ECS agent is
AWS's, so here it is a small recording HTTP server at the project's boundary that answers as the agent does
(AWS's "Task scale-in protection endpoint" page): ``{"protection": {...}}``, or ``{"error": {...}}``."""
from __future__ import annotations

import asyncio
import http.server
import json
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.hosting import temp_host, wait_for
from tmux_host.protection import PROTECT_MINUTES, RENEW_BEFORE_S, TaskProtection
from tmuxi.host_client import HostClient
from tmuxi.observability import REGISTRY

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")

TASK_ARN = "arn:aws:ecs:us-east-1:111122223333:task/tmuxi/0123456789abcdef"


class FakeEcsAgent:
    """``PUT /task-protection/v1/state``: records each body; answers as the agent does, or, for the next
    ``fail_next`` calls, with the agent's error answer (the ECS API throttled it)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail_next = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_PUT(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                with fake.lock:
                    fake.calls.append(body)
                    failing = fake.fail_next > 0
                    fake.fail_next -= failing
                if self.path != "/task-protection/v1/state":
                    self._answer(404, {"error": {"Code": "NotFound", "Message": self.path}})
                elif failing:
                    self._answer(200, {"requestID": "r-1", "error": {
                        "Arn": TASK_ARN, "Code": "ThrottlingException", "Message": "Rate exceeded"}})
                else:
                    self._answer(200, {"protection": {
                        "ExpirationDate": "2030-01-01T00:00:00Z" if body["ProtectionEnabled"] else None,
                        "ProtectionEnabled": body["ProtectionEnabled"], "TaskArn": TASK_ARN}})

            def _answer(self, status: int, answer: dict[str, Any]) -> None:
                raw = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def seen(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.calls)


ON = {"ProtectionEnabled": True, "ExpiresInMinutes": PROTECT_MINUTES}
OFF = {"ProtectionEnabled": False}


@pytest.fixture
def agent() -> Iterator[FakeEcsAgent]:
    fake = FakeEcsAgent()
    yield fake
    fake.server.shutdown()


@pytest.fixture
def host(agent: FakeEcsAgent) -> Iterator[tuple[HostClient, str]]:
    with temp_host("tp", host_id="protect-host", ecs_agent_uri=agent.url + "/") as (client, settings):
        yield client, settings.advertised_host_url


def _failed_calls() -> float:
    return REGISTRY.get_sample_value("tmux_task_protection_updates_total",
                                     {"enabled": "true", "status": "failed"}) or 0.0


def test_protected_from_the_first_session_to_the_last(agent: FakeEcsAgent, host: tuple[HostClient, str]) -> None:
    client, _ = host
    assert client.health()["task_protection"]["enabled"] is False
    assert agent.seen() == []  # a task starts unprotected: nothing to say while the host holds nothing
    first, second = uuid.uuid4(), uuid.uuid4()
    client.create_session(first, 1, 80, 24)
    wait_for(lambda: agent.seen() == [ON], timeout=5, what="protection on with the first session")
    health = wait_for(lambda: (h := client.health()["task_protection"])["enabled"] and h, timeout=5,
                      what="the host noting it")
    assert health["enabled"] is True and PROTECT_MINUTES * 60 - 10 <= health["expires_in_s"] <= PROTECT_MINUTES * 60
    client.create_session(second, 2, 80, 24)
    client.kill_session(first)
    time.sleep(0.3)  # a change wakes the protection task at once: give a wrong call the time to be made
    assert agent.seen() == [ON], "already protected, and a session is still held: no call"
    client.kill_session(second)
    wait_for(lambda: agent.seen() == [ON, OFF], timeout=5, what="protection off with the last session")
    # the agent records the call as it gets it; the host notes it once the answer is back
    wait_for(lambda: not client.health()["task_protection"]["enabled"], timeout=5, what="the host noting it")
    assert client.health()["task_protection"] == {"enabled": False, "expires_in_s": None, "failures": 0,
                                                  "last_error": None}


def test_a_failing_agent_is_retried_counted_and_reported(agent: FakeEcsAgent,
                                                         host: tuple[HostClient, str]) -> None:
    client, _ = host
    failed_before = _failed_calls()
    agent.fail_next = 2
    client.create_session(uuid.uuid4(), 1, 80, 24)
    failing = wait_for(lambda: (h := client.health()["task_protection"])["failures"] and h, timeout=5,
                       what="the failure reported in /health")
    assert failing["enabled"] is False and "ThrottlingException" in failing["last_error"]
    # retried with backoff (0.5 s, then 1 s) until the agent takes it
    wait_for(lambda: agent.seen() == [ON, ON, ON], timeout=10, what="the retries")
    wait_for(lambda: client.health()["task_protection"]["enabled"], timeout=5, what="protected after the retries")
    assert client.health()["task_protection"]["failures"] == 0
    assert _failed_calls() - failed_before == 2


async def test_protection_is_renewed_before_it_expires(agent: FakeEcsAgent) -> None:
    changed = asyncio.Event()
    protection = TaskProtection(agent.url, lambda: 1, changed, 60)
    try:
        assert await protection.sync() and agent.seen() == [ON]
        assert await protection.sync() and agent.seen() == [ON], "fresh: not renewed"
        assert protection.expires_at is not None
        protection.expires_at = time.monotonic() + RENEW_BEFORE_S - 1  # as if half of the period had gone
        assert await protection.sync() and agent.seen() == [ON, ON]
        assert protection.expires_at - time.monotonic() > PROTECT_MINUTES * 60 - 10
    finally:
        await protection.stop()
