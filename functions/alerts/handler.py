"""Lambda entry point of alarm notifications: CloudWatch alarms -> the SNS alarm topic -> here.

Each SNS record carries a CloudWatch alarm state change (JSON). The alarm's description names the operations
guide's rule and severity (``severity=critical rule=ServiceDown: ...``, cdk/monitoring.py); this function logs
each notification as one structured line (``alarm``, ``rule``, ``severity``, ``priority``, ``status`` = the new
state) and hands it to services/incidents.py, which opens, updates or resolves the alarm's incident and sends the
guide's message. A record that is not an alarm notification is logged and skipped, never retried forever; a
database that cannot be reached raises (Lambda retries the asynchronous invocation; a failed webhook does not).
"""
from __future__ import annotations

import json
import re
import time
from typing import Any

from tmuxi.observability import logger, request_context
from tmuxi.services import incidents

_TAGS = re.compile(r"\b(severity|rule)=([A-Za-z0-9_-]+)")


def parse(message: str) -> dict[str, str]:
    """The fields of one CloudWatch alarm notification (raises ValueError if it is not one)."""
    try:
        alarm = json.loads(message)
    except ValueError:
        raise ValueError("not JSON") from None
    if not isinstance(alarm, dict) or "AlarmName" not in alarm or "NewStateValue" not in alarm:
        raise ValueError("not a CloudWatch alarm notification (no AlarmName / NewStateValue)")
    description = str(alarm.get("AlarmDescription") or "")
    tags = dict(_TAGS.findall(description))
    severity = tags.get("severity", "warning")
    rule = tags.get("rule", str(alarm["AlarmName"]))
    return {
        "alarm": str(alarm["AlarmName"]),
        "rule": rule,
        "severity": severity,
        "priority": incidents.priority_for(severity, rule),
        # the description's summary after the tags (cdk/monitoring.py: "severity=... rule=...: summary")
        "title": (description.split(":", 1)[1].strip() if ":" in description else "")[:200] or rule,
        "state": str(alarm["NewStateValue"]),
        "previous_state": str(alarm.get("OldStateValue", "")),
        "reason": str(alarm.get("NewStateReason", ""))[:500],
        "at": str(alarm.get("StateChangeTime", "")),
    }


def handler(event: dict[str, Any], context: Any) -> dict[str, int]:
    """Counts: ``alarms`` handled, ``skipped`` records, and per outcome (opened / updated / resolved / ignored,
    and ``notify_failed``)."""
    t0 = time.perf_counter()
    request_id = getattr(context, "aws_request_id", None)
    with request_context(request_id if isinstance(request_id, str) else None):
        result = _handle(event)
        # the invocation's last line: its status and duration, under its request id (as every function's)
        logger.info("alerts invocation", extra={"status": "ok", "duration": round((time.perf_counter() - t0) * 1000, 3),
                                                **result})
    return result


def _handle(event: dict[str, Any]) -> dict[str, int]:
    records = event.get("Records") if isinstance(event, dict) else None
    seen = skipped = 0
    counts = dict.fromkeys(("opened", "updated", "resolved", "ignored", "notify_failed"), 0)
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
            outcome = incidents.on_alarm(fields)
            counts[outcome["action"]] += 1
            counts["notify_failed"] += outcome["notification"] == "failed"
    return {"alarms": seen, "skipped": skipped, **counts}
