"""Lambda entry point of alarm notifications: CloudWatch alarms -> the SNS alarm topic -> here.

Each SNS record carries a CloudWatch alarm state change (JSON). The alarm's description names the operations
guide's rule and severity (``severity=critical rule=ServiceDown: ...``, cdk/monitoring.py); this function turns
each notification into one structured log line (``alarm``, ``rule``, ``severity``, ``priority``, ``status`` =
the new state) that the log analysis and the incident records build on. A record that is not an alarm
notification is logged and skipped, never retried forever.
"""
from __future__ import annotations

import json
import re
from typing import Any

from tmuxi.observability import logger, request_context

# The guide's incident classification: critical alerts open P1 incidents, warnings P3.
PRIORITY = {"critical": "P1", "warning": "P3"}
_TAGS = re.compile(r"\b(severity|rule)=([A-Za-z0-9_-]+)")


def parse(message: str) -> dict[str, str]:
    """The fields of one CloudWatch alarm notification (raises ValueError if it is not one)."""
    try:
        alarm = json.loads(message)
    except ValueError:
        raise ValueError("not JSON") from None
    if not isinstance(alarm, dict) or "AlarmName" not in alarm or "NewStateValue" not in alarm:
        raise ValueError("not a CloudWatch alarm notification (no AlarmName / NewStateValue)")
    tags = dict(_TAGS.findall(str(alarm.get("AlarmDescription") or "")))
    severity = tags.get("severity", "warning")
    return {
        "alarm": str(alarm["AlarmName"]),
        "rule": tags.get("rule", str(alarm["AlarmName"])),
        "severity": severity,
        "priority": PRIORITY.get(severity, "P4"),
        "state": str(alarm["NewStateValue"]),
        "previous_state": str(alarm.get("OldStateValue", "")),
        "reason": str(alarm.get("NewStateReason", ""))[:500],
        "at": str(alarm.get("StateChangeTime", "")),
    }


def handler(event: dict[str, Any], context: Any) -> dict[str, int]:
    records = event.get("Records") if isinstance(event, dict) else None
    seen = skipped = 0
    for record in records or []:
        sns = record.get("Sns") if isinstance(record, dict) else None
        message_id = sns.get("MessageId") if isinstance(sns, dict) else None
        with request_context(message_id if isinstance(message_id, str) else None):
            try:
                fields = parse(str((sns or {}).get("Message", "")))
            except ValueError as exc:
                skipped += 1
                logger.warning("not an alarm notification", extra={"status": "skipped", "error": str(exc)})
                continue
            seen += 1
            level = (logger.error if fields["severity"] == "critical" else logger.warning) \
                if fields["state"] == "ALARM" else logger.info
            level("alarm", extra={**fields, "status": fields["state"].lower()})
    return {"alarms": seen, "skipped": skipped}
