"""The alerts function reads CloudWatch alarm notifications from SNS (events/sns/alarm.json is the shape SNS
delivers) and logs each as one structured line at the guide's priority."""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest

from functions.alerts.handler import handler, parse

EVENT = json.loads((Path(__file__).resolve().parents[2] / "events" / "sns" / "alarm.json").read_text())


def _with_message(message: object) -> dict[str, object]:
    ev = copy.deepcopy(EVENT)
    ev["Records"][0]["Sns"]["Message"] = message if isinstance(message, str) else json.dumps(message)
    return ev


def test_a_critical_alarm_becomes_a_p1_line_naming_the_guides_rule(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        assert handler(EVENT, None) == {"alarms": 1, "skipped": 0}
    fields = parse(EVENT["Records"][0]["Sns"]["Message"])
    assert fields["rule"] == "ServiceDown" and fields["severity"] == "critical" and fields["priority"] == "P1"
    assert fields["state"] == "ALARM" and fields["previous_state"] == "OK"
    (record,) = [r for r in caplog.records if r.getMessage() == "alarm"]
    assert record.levelno == logging.ERROR and record.__dict__["status"] == "alarm"


def test_a_warning_is_p3_and_its_recovery_is_logged_at_info(caplog: pytest.LogCaptureFixture) -> None:
    alarm = json.loads(EVENT["Records"][0]["Sns"]["Message"])
    alarm.update(AlarmDescription="severity=warning rule=HighCPUUsage: ...", NewStateValue="OK", OldStateValue="ALARM")
    assert parse(json.dumps(alarm))["priority"] == "P3"
    with caplog.at_level(logging.INFO):
        handler(_with_message(alarm), None)
    (record,) = [r for r in caplog.records if r.getMessage() == "alarm"]
    assert record.levelno == logging.INFO and record.__dict__["status"] == "ok"


@pytest.mark.parametrize("message", ["not json", {"hello": "world"}, ["AlarmName"]])
def test_what_is_not_an_alarm_notification_is_skipped_not_raised(message: object) -> None:
    assert handler(_with_message(message), None) == {"alarms": 0, "skipped": 1}
    with pytest.raises(ValueError):
        parse(message if isinstance(message, str) else json.dumps(message))
