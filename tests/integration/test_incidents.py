"""Incidents from CloudWatch alarm notifications (services/incidents.py, the alerts function) against the real
PostgreSQL of the test run, with a small HTTP server of this test as the webhook: an alarm opens an incident at
the guide's priority and sends the guide's initial message, a repeat updates the same incident (one row, even
when both arrive at once) and sends an update, OK resolves it with the duration; a webhook that fails or hangs
is recorded on the incident and never fails the invocation."""
from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest

from functions.alerts.handler import handler, parse
from tests.conftest import Deps
from tests.hosting import isolated_aws_env
from tests.integration.test_recordings_storage import Moto
from tmuxi import secrets
from tmuxi.db import incidents as db
from tmuxi.db.pool import connection
from tmuxi.services import incidents
from tmuxi.settings import env_name, get_settings

EVENTS = Path(__file__).resolve().parents[2] / "events" / "sns"


def _event(name: str, alarm_name: str) -> dict[str, Any]:
    """The sample SNS event ``name`` with the alarm renamed (the database is shared by the whole run)."""
    ev: dict[str, Any] = json.loads((EVENTS / name).read_text())
    alarm = json.loads(ev["Records"][0]["Sns"]["Message"])
    alarm["AlarmName"] = alarm_name
    ev["Records"][0]["Sns"]["Message"] = json.dumps(alarm)
    return ev


def _fields(key: str, state: str = "ALARM", *, at: str = "2026-11-28T10:06:12.345+0000",
            description: str = "severity=critical rule=ServiceDown: no healthy tmux host behind the NLB",
            reason: str = "Threshold Crossed") -> dict[str, str]:
    alarm = json.loads(_event("alarm.json", key)["Records"][0]["Sns"]["Message"])
    alarm.update(NewStateValue=state, StateChangeTime=at, AlarmDescription=description, NewStateReason=reason)
    return parse(json.dumps(alarm))


@dataclass
class Webhook:
    """A Slack-style incoming webhook: records the ``text`` of each POST and answers ``mode``: ok (200), fail
    (500) or hang (no answer until the test ends)."""

    url: str = ""
    mode: str = "ok"
    texts: list[str] = field(default_factory=list)
    attempts: int = 0
    release: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def webhook(deps: Deps, monkeypatch: pytest.MonkeyPatch) -> Iterator[Webhook]:
    hook = Webhook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["content-length"]))
            hook.attempts += 1
            if hook.mode == "hang":
                hook.release.wait(30)
                return
            if hook.mode == "fail":
                self.send_response(500)
            else:
                hook.texts.append(json.loads(body)["text"])
                self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hook.url = f"http://127.0.0.1:{server.server_port}/services/T000/B000/XXXX"
    monkeypatch.setenv(env_name("alert_webhook_url"), hook.url)
    # a hanging webhook is given up on after this (5 s in production: the same code path, faster)
    monkeypatch.setenv(env_name("alert_webhook_timeout_s"), "0.3")
    get_settings.cache_clear()
    try:
        yield hook
    finally:
        hook.release.set()
        server.shutdown()
        server.server_close()
        monkeypatch.undo()
        get_settings.cache_clear()


def _key() -> str:
    return f"tmuxi-test-{uuid.uuid4().hex[:10]}-ServiceDown"


def _rows(key: str) -> list[dict[str, Any]]:
    with connection() as conn:
        return conn.execute("SELECT * FROM incidents WHERE key = %s ORDER BY id", (key,)).fetchall()


def _kinds(incident_id: int) -> list[str]:
    return [e["kind"] for e in db.events(incident_id)]


def test_an_alarm_opens_a_p1_incident_and_sends_the_initial_message(webhook: Webhook) -> None:
    key = _key()
    out = incidents.on_alarm(_fields(key))
    assert out["action"] == "opened" and out["priority"] == "P1" and out["notification"] == "sent"
    (row,) = _rows(key)
    assert (row["priority"], row["rule"], row["status"], row["update_count"]) == ("P1", "ServiceDown",
                                                                                  "investigating", 1)
    assert row["title"] == "no healthy tmux host behind the NLB" and row["resolved_at"] is None
    (text,) = webhook.texts
    assert text.startswith("🚨 INCIDENT ALERT - P1 🚨\nService: Tmux Integration System\nStatus: Investigating")
    assert "Impact: Complete service unavailability" in text and key in text
    assert "Started: 2026-11-28 10:06:12 UTC" in text and "Updates: Will follow every 15 minutes" in text
    assert _kinds(row["id"]) == ["opened", "notified"]


def test_the_same_alarm_again_updates_its_incident_and_sends_an_update(webhook: Webhook) -> None:
    key = _key()
    first = incidents.on_alarm(_fields(key))
    again = incidents.on_alarm(_fields(key, at="2026-11-28T10:07:12.345+0000", reason="still below 1"))
    assert again["action"] == "updated" and again["id"] == first["id"]
    (row,) = _rows(key)
    assert row["update_count"] == 2 and row["last_reason"] == "still below 1"
    assert len(webhook.texts) == 2 and webhook.texts[1].startswith("📊 INCIDENT UPDATE - P1\n")
    assert "Current findings: alarm " + key + " is still ALARM (2 notifications): still below 1" in webhook.texts[1]
    assert _kinds(row["id"]) == ["opened", "notified", "updated", "notified"]


def test_ok_resolves_the_incident_with_the_duration_and_the_next_alarm_opens_another(webhook: Webhook) -> None:
    key = _key()
    opened = incidents.on_alarm(_fields(key))
    out = incidents.on_alarm(_fields(key, "OK", at="2026-11-28T10:18:42.345+0000", reason="back above 1"))
    assert out == {"action": "resolved", "id": opened["id"], "priority": "P1", "notification": "sent"}
    (row,) = _rows(key)
    assert row["status"] == "resolved" and row["resolved_at"] is not None and row["last_state"] == "OK"
    text = webhook.texts[-1]
    assert text.startswith("✅ INCIDENT RESOLVED - P1\nService: Tmux Integration System\nStatus: Resolved")
    assert "Duration: 12m 30s" in text and "Follow-up: Post-incident review scheduled" in text
    # an OK with nothing open is recorded (logged) and sends nothing
    assert incidents.on_alarm(_fields(key, "OK"))["action"] == "ignored" and len(webhook.texts) == 2
    # resolved is over: the alarm firing again is a new incident
    again = incidents.on_alarm(_fields(key, at="2026-11-28T11:00:00.000+0000"))
    assert again["action"] == "opened" and again["id"] != opened["id"] and len(_rows(key)) == 2


def test_a_late_ok_of_an_earlier_episode_does_not_resolve_the_open_incident(webhook: Webhook) -> None:
    key = _key()
    incidents.on_alarm(_fields(key, at="2026-11-28T10:06:12.345+0000"))
    assert incidents.on_alarm(_fields(key, "OK", at="2026-11-28T10:00:00.000+0000"))["action"] == "ignored"
    assert _rows(key)[0]["resolved_at"] is None


def test_a_warning_opens_a_p3_and_a_critical_repeat_escalates_it(webhook: Webhook) -> None:
    key = _key()
    warning = "severity=warning rule=HighCPUUsage: tmux hosts' CPU above the threshold for 10 minutes"
    assert incidents.on_alarm(_fields(key, description=warning))["priority"] == "P3"
    assert webhook.texts[0].startswith("🚨 INCIDENT ALERT - P3 🚨") and "Updates:" not in webhook.texts[0]
    assert incidents.on_alarm(_fields(key))["priority"] == "P1"  # the same alarm, now critical: escalated
    assert incidents.on_alarm(_fields(key, description=warning))["priority"] == "P1"  # never lowered
    assert _rows(key)[0]["priority"] == "P1"


def test_insufficient_data_updates_the_open_incident_only(webhook: Webhook) -> None:
    key = _key()
    assert incidents.on_alarm(_fields(key, "INSUFFICIENT_DATA"))["action"] == "ignored" and _rows(key) == []
    incidents.on_alarm(_fields(key))
    out = incidents.on_alarm(_fields(key, "INSUFFICIENT_DATA", reason="no datapoints"))
    assert out["action"] == "updated"
    assert _rows(key)[0]["last_state"] == "INSUFFICIENT_DATA" and _rows(key)[0]["resolved_at"] is None
    assert "is now INSUFFICIENT_DATA: no datapoints" in webhook.texts[-1]


def test_two_notifications_of_one_alarm_at_once_give_one_incident(webhook: Webhook) -> None:
    for _ in range(5):
        key = _key()
        start = threading.Barrier(2)
        results: list[dict[str, Any]] = []
        errors: list[BaseException] = []

        def notify(key: str = key, start: threading.Barrier = start, results: list[dict[str, Any]] = results,
                   errors: list[BaseException] = errors) -> None:
            start.wait()
            try:
                results.append(incidents.on_alarm(_fields(key)))
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=notify) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []
        assert sorted(r["action"] for r in results) == ["opened", "updated"]
        (row,) = _rows(key)
        assert row["update_count"] == 2
    assert sum(t.startswith("🚨") for t in webhook.texts) == 5 and sum(t.startswith("📊") for t in webhook.texts) == 5


@pytest.mark.parametrize("mode", ["fail", "hang"])
def test_a_webhook_that_fails_or_hangs_is_recorded_and_does_not_fail_the_invocation(
        webhook: Webhook, mode: str) -> None:
    webhook.mode = mode
    key = _key()
    t0 = time.monotonic()
    counts = handler(_event("alarm.json", key), None)
    took = time.monotonic() - t0
    assert counts["opened"] == 1 and counts["notify_failed"] == 1
    # two attempts of at most 0.3 s each (TMUXI_ALERT_WEBHOOK_TIMEOUT_S), not the hang
    assert webhook.attempts == 2 and took < 3
    (row,) = _rows(key)
    failed = db.events(row["id"])[-1]
    assert failed["kind"] == "notify_failed" and failed["detail"]["message"] == "initial"
    assert failed["detail"]["error"] == ("HTTP 500" if mode == "fail" else "ReadTimeout: no answer within 0.3 s")
    assert webhook.url not in json.dumps(failed["detail"])  # the URL is a credential


def test_no_webhook_configured_records_the_incident_and_sends_nothing(deps: Deps) -> None:
    assert get_settings().alert_webhook_url is None and get_settings().alert_webhook_secret_id is None
    key = _key()
    assert incidents.on_alarm(_fields(key))["notification"] == "off"
    assert _kinds(_rows(key)[0]["id"]) == ["opened"]


def test_the_sample_events_drive_the_function_end_to_end(webhook: Webhook, caplog: pytest.LogCaptureFixture) -> None:
    key = _key()
    with caplog.at_level(logging.INFO):
        assert handler(_event("alarm.json", key), None) == {
            "alarms": 1, "skipped": 0, "opened": 1, "updated": 0, "resolved": 0, "ignored": 0, "notify_failed": 0}
    (line,) = [r for r in caplog.records if r.getMessage() == "alarm"]
    assert line.levelno == logging.ERROR and line.__dict__["status"] == "alarm" and line.__dict__["priority"] == "P1"
    assert handler(_event("alarm_ok.json", key), None)["resolved"] == 1
    assert [t.splitlines()[0] for t in webhook.texts] == ["🚨 INCIDENT ALERT - P1 🚨", "✅ INCIDENT RESOLVED - P1"]
    assert "Duration: 12m 30s" in webhook.texts[1]
    (listed,) = [i for i in incidents.list_incidents() if i["key"] == key]
    assert listed["status"] == "resolved"
    assert key not in [i["key"] for i in incidents.list_incidents(open_only=True)]


@pytest.fixture
def secret_store(webhook: Webhook, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """A moto Secrets Manager (found through AWS_ENDPOINT_URL_SECRETS_MANAGER, as the code passes no endpoint)."""
    isolated_aws_env(monkeypatch, tmp_path)
    monkeypatch.delenv(env_name("alert_webhook_url"))
    server = Moto()
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", server.url)
    secrets.clear()
    get_settings.cache_clear()
    try:
        yield boto3.session.Session().client("secretsmanager", endpoint_url=server.url, region_name="us-east-1")
    finally:
        secrets.clear()
        with contextlib.suppress(Exception):
            server.stop()


def test_the_webhook_url_can_come_from_a_secret(secret_store: Any, webhook: Webhook,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    good, empty = (f"tmuxi-test/{uuid.uuid4().hex[:8]}/{n}" for n in ("hook", "empty"))
    secret_store.create_secret(Name=good, SecretString=json.dumps({"url": webhook.url}))
    secret_store.create_secret(Name=empty, SecretString=json.dumps({"other": "x"}))
    monkeypatch.setenv(env_name("alert_webhook_secret_id"), good)
    get_settings.cache_clear()
    assert incidents.on_alarm(_fields(_key()))["notification"] == "sent" and len(webhook.texts) == 1
    # a secret without the URL: recorded on the incident, naming the fix
    monkeypatch.setenv(env_name("alert_webhook_secret_id"), empty)
    get_settings.cache_clear()
    out = incidents.on_alarm(_fields(key := _key()))
    assert out["notification"] == "failed"
    failed = db.events(_rows(key)[0]["id"])[-1]
    assert failed["kind"] == "notify_failed" and "has no 'url'" in failed["detail"]["error"]


def test_the_guides_classification_and_the_duration_text() -> None:
    assert [incidents.duration_text(s) for s in (12, 300, 3903)] == ["12s", "5m 0s", "1h 5m 3s"]
    row = {"id": 1, "key": "k", "priority": "P2", "rule": "HighErrorRate", "title": "5xx", "status": "investigating"}
    text = incidents.initial_message({**row, "opened_at": datetime(2026, 1, 1, tzinfo=UTC)})
    assert "Response time: 1 hour (P2: Major feature degraded)" in text and "Updates:" not in text
