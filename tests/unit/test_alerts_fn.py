"""The alerts function reads CloudWatch alarm notifications from SNS (events/sns/alarm.json is the shape SNS
delivers): the fields of each, at the guide's priority. What it does with them (incidents in PostgreSQL, the
guide's messages) is tests/integration/test_incidents.py."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest

from functions.alerts.handler import handler, parse

EVENT = json.loads((Path(__file__).resolve().parents[2] / "events" / "sns" / "alarm.json").read_text())
ALARM = json.loads(EVENT["Records"][0]["Sns"]["Message"])


def _with_message(message: object) -> dict[str, object]:
    ev = copy.deepcopy(EVENT)
    ev["Records"][0]["Sns"]["Message"] = message if isinstance(message, str) else json.dumps(message)
    return ev


def test_a_critical_alarm_is_p1_naming_the_guides_rule_and_its_summary() -> None:
    fields = parse(json.dumps(ALARM))
    assert fields["rule"] == "ServiceDown" and fields["severity"] == "critical" and fields["priority"] == "P1"
    assert fields["state"] == "ALARM" and fields["previous_state"] == "OK"
    assert fields["alarm"] == "tmuxi-prod-ServiceDown" and fields["title"] == "no healthy tmux host behind the NLB"


@pytest.mark.parametrize(("description", "priority"), [
    ("severity=warning rule=HighCPUUsage: ...", "P3"),
    # the guide's table names high error rates and slow responses as its P2 examples
    ("severity=critical rule=HighErrorRate: ...", "P2"),
    ("severity=warning rule=HighResponseTime: ...", "P2"),
    # a severity the guide does not have: the alarm's own configuration is wrong (monitoring: P4)
    ("severity=info rule=Something: ...", "P4"),
])
def test_the_priority_is_the_guides_for_the_severity_or_the_rule(description: str, priority: str) -> None:
    assert parse(json.dumps({**ALARM, "AlarmDescription": description}))["priority"] == priority


@pytest.mark.parametrize("message", ["not json", {"hello": "world"}, ["AlarmName"]])
def test_what_is_not_an_alarm_notification_is_skipped_not_raised(message: object) -> None:
    assert handler(_with_message(message), None) == {"alarms": 0, "skipped": 1, "opened": 0, "updated": 0,
                                                     "resolved": 0, "ignored": 0, "notify_failed": 0}
    with pytest.raises(ValueError):
        parse(message if isinstance(message, str) else json.dumps(message))


def test_the_invocation_ends_with_one_line_of_its_status_and_duration(caplog: pytest.LogCaptureFixture) -> None:
    class Context:
        aws_request_id = "4f1c2d3e-0000-4000-8000-000000000001"

    with caplog.at_level(logging.INFO):
        result = handler(_with_message("not json"), Context())
    (last,) = [r for r in caplog.records if r.getMessage() == "alerts invocation"]
    assert last is caplog.records[-1]
    assert last.__dict__["status"] == "ok" and last.__dict__["duration"] >= 0 and last.__dict__["skipped"] == 1
    assert result["skipped"] == 1
