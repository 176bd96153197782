"""Incidents from CloudWatch alarms (operations guide, "Incident Response"), and the guide's messages about them.

An alarm notification (functions/alerts/handler.py ``parse``) becomes, by its new state:
  ALARM               opens an incident at the guide's priority, or, while one is open for the alarm, updates it
                      (update_count, last reason; the priority escalates if the new one is higher, never drops)
  OK                  resolves the open one (none open: logged, nothing else)
  INSUFFICIENT_DATA   updates the open one (none open: logged, nothing else)
One alarm has at most one open incident (the alarm's name is the key; db/incidents.py says how concurrent
notifications end up in one row). Each change posts one of the guide's three templates -- initial on open,
update on a repeat, resolution with the duration -- to the webhook of ``alert_webhook_url`` /
``alert_webhook_secret_id`` (Slack-style JSON ``{"text": ...}``), after the change is committed.

The record is what matters: a message that cannot be sent (webhook down, slow, refusing; its secret unreadable)
is recorded as a ``notify_failed`` event of the incident and logged, never raised -- the invocation succeeds, so
SNS and Lambda do not retry the notification (which would count it again). Each attempt waits at most
``alert_webhook_timeout_s`` (5 s) and a failed one is retried once, so a notification costs at most ~10 s of the
function's 60 s.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from tmuxi.db import incidents as db
from tmuxi.observability import logger
from tmuxi.settings import env_name, get_settings

SERVICE = "Tmux Integration System"
TEAM = "Platform Team"

# The guide's classification table: description and response time of each priority.
CLASSIFICATION = {
    "P1": ("Service completely down", "15 minutes"),
    "P2": ("Major feature degraded", "1 hour"),
    "P3": ("Minor issues", "4 hours"),
    "P4": ("Monitoring/alerts", "Next business day"),
}
# The initial message's impact line (the guide's P1 template says "Complete service unavailability").
IMPACT = {
    "P1": "Complete service unavailability",
    "P2": "Major feature degraded",
    "P3": "Minor issue: a single feature affected",
    "P4": "Monitoring only: no user impact known",
}
SEVERITY_PRIORITY = {"critical": "P1", "warning": "P3"}
# Where the guide's table names the rule's case as an example of another priority: "High error rates, slow
# response" are its P2 examples (HighErrorRate is a critical alert, HighResponseTime a warning).
RULE_PRIORITY = {"HighErrorRate": "P2", "HighResponseTime": "P2"}


def priority_for(severity: str, rule: str) -> str:
    """The guide's priority of an alarm: by its rule where the guide's table names it, else critical -> P1,
    warning -> P3; an alarm with any other severity is a monitoring problem (P4: its description is wrong)."""
    return RULE_PRIORITY.get(rule) or SEVERITY_PRIORITY.get(severity, "P4")


def _time(value: str) -> datetime | None:
    """CloudWatch's StateChangeTime (``2026-11-28T10:06:12.345+0000``), or None when it has none."""
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        return None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def duration_text(seconds: float) -> str:
    """``1h 5m 3s``, ``5m 0s``, ``12s``."""
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m}m {s}s" if h else f"{m}m {s}s" if m else f"{s}s"


def _stamp(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# --- the guide's communication templates -------------------------------------------------------------------
def initial_message(inc: Mapping[str, Any]) -> str:
    p = inc["priority"]
    description, response = CLASSIFICATION[p]
    lines = [f"🚨 INCIDENT ALERT - {p} 🚨", f"Service: {SERVICE}", f"Status: {inc['status'].capitalize()}",
             f"Impact: {IMPACT[p]}", f"Alarm: {inc['key']} ({inc['rule']}: {inc['title']})",
             f"Started: {_stamp(inc['opened_at'])}", f"Investigating team: {TEAM}",
             f"Response time: {response} ({p}: {description})"]
    if p == "P1":
        lines.append("Updates: Will follow every 15 minutes")
    return "\n".join(lines)


def update_message(inc: Mapping[str, Any]) -> str:
    p = inc["priority"]
    state = inc["last_state"]
    findings = (f"alarm {inc['key']} is still {state} ({inc['update_count']} notifications)"
                if state == "ALARM" else f"alarm {inc['key']} is now {state}")
    if inc["last_reason"]:
        findings += f": {inc['last_reason']}"
    return "\n".join([
        f"📊 INCIDENT UPDATE - {p}", f"Service: {SERVICE}", f"Status: {inc['status'].capitalize()}",
        f"Current findings: {findings}",
        f"Next steps: the {p} response procedure (operations guide, Incident Response), within "
        f"{CLASSIFICATION[p][1].lower()}",
        "ETA: when the alarm returns to OK", f"Time: {_stamp(inc['updated_at'])}",
    ])


def resolution_message(inc: Mapping[str, Any]) -> str:
    duration = duration_text((inc["resolved_at"] - inc["opened_at"]).total_seconds())
    return "\n".join([
        f"✅ INCIDENT RESOLVED - {inc['priority']}", f"Service: {SERVICE}", "Status: Resolved",
        f"Root cause: to be established in the post-incident review (alarm {inc['rule']}: {inc['title']})",
        f"Resolution: alarm {inc['key']} returned to OK" + (f": {inc['last_reason']}" if inc["last_reason"] else ""),
        f"Duration: {duration}", "Follow-up: Post-incident review scheduled", f"Time: {_stamp(inc['resolved_at'])}",
    ])


# --- the webhook -------------------------------------------------------------------------------------------
def _webhook_url() -> str | None:
    s = get_settings()
    if s.alert_webhook_secret_id:
        from tmuxi import secrets

        url = secrets.get_json(s.alert_webhook_secret_id, "alert_webhook_secret_id").get("url")
        if not isinstance(url, str) or not url:
            raise RuntimeError(f"the secret {s.alert_webhook_secret_id!r} ({env_name('alert_webhook_secret_id')})"
                               " has no 'url': add the webhook URL to the secret's JSON as a non-empty string")
        return url
    return s.alert_webhook_url.get_secret_value() if s.alert_webhook_url else None


def _failure(exc: BaseException) -> str:
    """What went wrong, without the URL (a credential: httpx's status errors quote it)."""
    import httpx

    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, httpx.TimeoutException):
        return f"{type(exc).__name__}: no answer within {get_settings().alert_webhook_timeout_s:g} s"
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _post(url: str, text: str) -> int:
    """POST the message; returns the attempts it took (raises the last failure after two)."""
    import httpx  # on first use: the function's cold start does not need it (~60 ms)

    timeout = get_settings().alert_webhook_timeout_s
    for attempt in (1, 2):
        try:
            r = httpx.post(url, json={"text": text}, timeout=timeout)
            r.raise_for_status()
            return attempt
        except httpx.HTTPError as exc:
            # a refusal (4xx but 429) will be refused again: no retry
            if attempt == 2 or (isinstance(exc, httpx.HTTPStatusError)
                                and 400 <= exc.response.status_code < 500 and exc.response.status_code != 429):
                raise
    raise AssertionError("unreachable")


def _notify(inc: Mapping[str, Any], message: str, text: str) -> str:
    """Send one message about ``inc``; returns ``sent``, ``failed`` or ``off`` (no webhook configured)."""
    t0 = time.perf_counter()
    try:
        url = _webhook_url()
        if url is None:
            return "off"
        attempts = _post(url, text)
    except Exception as exc:  # noqa: BLE001 - whatever it is, the incident record stands and the invocation succeeds
        error = _failure(exc)
        duration = round((time.perf_counter() - t0) * 1000, 3)
        db.add_event(inc["id"], "notify_failed", {"message": message, "error": error})
        logger.warning("incident notification failed", extra={
            "incident": inc["id"], "key": inc["key"], "notice": message, "status": "error", "error": error,
            "duration": duration, "fix": f"check the webhook of {env_name('alert_webhook_url')} / "
                                         f"{env_name('alert_webhook_secret_id')}"})
        return "failed"
    duration = round((time.perf_counter() - t0) * 1000, 3)
    db.add_event(inc["id"], "notified", {"message": message, "attempts": attempts})
    logger.info("incident notification sent", extra={"incident": inc["id"], "key": inc["key"], "notice": message,
                                                      "status": "ok", "attempts": attempts, "duration": duration})
    return "sent"


# --- alarms ------------------------------------------------------------------------------------------------
def on_alarm(fields: Mapping[str, str]) -> dict[str, Any]:
    """Apply one alarm notification (the fields of ``functions/alerts/handler.py`` ``parse``). Returns what it did:
    ``action`` opened / updated / resolved / ignored, the incident's ``id`` and ``priority`` (None if ignored),
    and ``notification`` sent / failed / off / none."""
    key, state, reason = fields["alarm"], fields["state"], fields.get("reason", "")
    rule = fields.get("rule") or key
    priority = priority_for(fields.get("severity", ""), rule)
    at = _time(fields.get("at", ""))
    detail = {"state": state, "previous_state": fields.get("previous_state", ""), "reason": reason,
              "at": fields.get("at", ""), "priority": priority}
    inc: dict[str, Any] | None
    if state == "ALARM":
        inc = db.record_alarm(key, priority, rule, fields.get("title") or rule, state, reason, at, detail)
        action = "opened" if inc["opened"] else "updated"
        text = initial_message(inc) if inc["opened"] else update_message(inc)
    elif state == "OK":
        found = db.resolve(key, state, reason, at, detail)
        action, inc = ("resolved", found) if found else ("ignored", None)
        text = resolution_message(found) if found else ""
    else:  # INSUFFICIENT_DATA (or a state CloudWatch may add): an update of the open incident, if any
        found = db.update_open(key, state, reason, detail)
        action, inc = ("updated", found) if found else ("ignored", None)
        text = update_message(found) if found else ""
    if inc is None:
        logger.info("alarm with no open incident", extra={"key": key, "state": state, "status": "ignored"})
        return {"action": action, "id": None, "priority": None, "notification": "none"}
    # the handler's "alarm" line carries the alarm's level; this one says what became of the incident
    logger.info(f"incident {action}", extra={"incident": inc["id"], "key": key, "priority": inc["priority"],
                                             "rule": rule, "status": action, "update_count": inc["update_count"]})
    message = {"opened": "initial", "updated": "update", "resolved": "resolution"}[action]
    return {"action": action, "id": inc["id"], "priority": inc["priority"],
            "notification": _notify(inc, message, text)}


def list_incidents(open_only: bool = False, since: datetime | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Incidents newest first (the operator's view): the open ones only, or those opened or open since a time."""
    return db.list_incidents(open_only, since, limit)
