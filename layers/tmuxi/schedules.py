"""The one schedule table of scheduled maintenance: task -> EventBridge rate expression. The CDK app makes one
EventBridge rule per task from it (constant input ``{"task": <task>}`` to the maintenance function); the local
stack's scheduler (local/scheduler.py) runs the same tasks on the same intervals, with the same event.

Rate expressions are EventBridge's: ``rate(<value> <unit>)``, unit minute(s) / hour(s) / day(s), singular when the
value is 1 (https://docs.aws.amazon.com/scheduler/latest/UserGuide/schedule-types.html#rate-based)."""
from __future__ import annotations

import re

SCHEDULES: dict[str, str] = {
    "reconcile": "rate(1 minute)",    # drift between the record, the hosts and Redis; dead hosts
    "prune_live": "rate(5 minutes)",  # used WebSocket tickets, connections whose $disconnect never came
    "cleanup": "rate(5 minutes)",     # idle sessions (20 min idle timeout: at most 25 min before one ends)
    "health": "rate(1 minute)",       # PostgreSQL, Redis, each host: metrics for the alarms
    "capacity": "rate(5 minutes)",    # sessions per host, host CPU/memory, request rate: metrics
    "retention": "rate(1 day)",       # revoked tokens past expiry, old audit events, old ended sessions
    "vacuum": "rate(1 day)",          # VACUUM ANALYZE
    "backup": "rate(1 day)",          # the backup engineer's task (the handler runs it once its TASKS has it)
}

_RATE = re.compile(r"^rate\((\d+) (minute|minutes|hour|hours|day|days)\)\Z")
_UNIT_S = {"minute": 60, "hour": 3600, "day": 86400}


def rate_seconds(expression: str) -> int:
    """Seconds between runs of an EventBridge rate expression, e.g. ``rate(5 minutes)`` -> 300."""
    m = _RATE.match(expression)
    if m is None:
        raise ValueError(f"{expression!r} is not an EventBridge rate expression; write e.g. 'rate(5 minutes)' "
                         f"(unit minute(s), hour(s) or day(s))")
    value, unit = int(m.group(1)), m.group(2)
    if value < 1:
        raise ValueError(f"{expression!r}: the value must be a positive integer")
    if (value == 1) != (not unit.endswith("s")):
        raise ValueError(f"{expression!r}: EventBridge wants the singular unit for 1 and the plural otherwise")
    return value * _UNIT_S[unit.rstrip("s")]
