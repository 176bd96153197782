"""The guide's log analysis (``analyze-logs.sh``: error summary, HTTP status codes, recent errors, slow requests),
plus the top users, on the JSON lines this system writes (``tmuxi.observability.logger``: ``level``,
``message``, ``timestamp`` "2026-11-28 10:31:51,370+0000", and on request lines ``route``, ``status``,
``duration`` in ms). Lines that are not JSON (the stack's ``[stack] supervisor`` lines, uvicorn's, tracebacks)
count as errors when they say ERROR or Traceback, as the guide's ``grep -i error`` would; the rest is skipped.
A prefix before the JSON object is allowed: ``aws logs tail GROUP --since 1h --format short > api.log`` gives
lines ``2026-11-28T10:31:51 {...}``, analysed as they are."""
from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

ERROR_LEVELS = frozenset({"ERROR", "CRITICAL", "FATAL"})
# Who made a request, under the names the system's lines use for it.
USER_FIELDS = ("user", "username", "principal", "user_id")
_PLAIN_ERROR = re.compile(r"\b(ERROR|CRITICAL|Traceback)\b")
_TIME_FORMATS = ("%Y-%m-%d %H:%M:%S,%f%z", "%Y-%m-%dT%H:%M:%S.%f%z", "%Y-%m-%dT%H:%M:%S%z")


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    for fmt in _TIME_FORMATS:
        try:
            return datetime.strptime(value.replace("Z", "+0000"), fmt)
        except ValueError:
            continue
    return None


@dataclass
class LogReport:
    slow_ms: float
    top: int
    lines: int = 0
    json_lines: int = 0
    requests: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    users: Counter[str] = field(default_factory=Counter)
    slow: list[dict[str, Any]] = field(default_factory=list)
    slow_by_route: Counter[str] = field(default_factory=Counter)
    recent_errors: list[str] = field(default_factory=list)

    def feed(self, lines: Iterable[str], source: str, since: datetime | None = None) -> None:
        for raw in lines:
            line = raw.strip()
            if not line:
                continue
            self.lines += 1
            rec = _json(line)
            if rec is None:
                if _PLAIN_ERROR.search(line) and since is None:  # no time to filter a plain line on
                    self._error(line[:200], f"{source}: {line[:300]}")
                continue
            self.json_lines += 1
            at = parse_time(rec.get("timestamp"))
            if since is not None and (at is None or at < since):
                continue
            self._record(rec, source, at)

    def _record(self, rec: dict[str, Any], source: str, at: datetime | None) -> None:
        message = str(rec.get("message", ""))
        if str(rec.get("level", "")).upper() in ERROR_LEVELS:
            self._error(message, f"{source}: {rec.get('timestamp', '')} {message} {rec.get('error', '')}".strip())
        user = next((str(rec[k]) for k in USER_FIELDS if rec.get(k)), None)
        if user is not None:
            self.users[user] += 1
        status = rec.get("status")
        if not isinstance(status, int) or isinstance(status, bool):
            return  # a maintenance line's status="ok" is not an HTTP status
        self.requests += 1
        self.statuses[status] += 1
        duration = rec.get("duration")
        if isinstance(duration, int | float) and duration >= self.slow_ms:
            route = f"{rec.get('method', '')} {rec.get('route', '?')}".strip()
            self.slow_by_route[route] += 1
            self.slow.append({"source": source, "timestamp": rec.get("timestamp"), "route": route,
                              "status": status, "duration": float(duration)})

    def _error(self, key: str, line: str) -> None:
        self.errors[key] += 1
        self.recent_errors.append(line)
        del self.recent_errors[:-10]  # the guide shows the last 10

    def result(self) -> dict[str, Any]:
        server_errors = sum(n for s, n in self.statuses.items() if s >= 500)
        return {
            "lines": self.lines, "json_lines": self.json_lines, "requests": self.requests,
            "error_rate": round(server_errors / self.requests, 4) if self.requests else 0.0,
            "errors": [{"message": m, "count": n} for m, n in self.errors.most_common()],
            "status_codes": {str(s): n for s, n in sorted(self.statuses.items(), key=lambda kv: (-kv[1], kv[0]))},
            "slow_ms": self.slow_ms,
            "slow_requests": len(self.slow),
            "slow_by_route": [{"route": r, "count": n} for r, n in self.slow_by_route.most_common()],
            "slowest": sorted(self.slow, key=lambda r: -r["duration"])[: self.top],
            "top_users": [{"user": u, "count": n} for u, n in self.users.most_common(self.top)],
            "recent_errors": list(self.recent_errors),
        }


def _json(line: str) -> dict[str, Any] | None:
    """The JSON object of a line, also after a prefix (``aws logs tail --format short`` puts the time first)."""
    start = line.find("{")
    if start < 0 or not line.endswith("}"):
        return None
    try:
        rec = json.loads(line[start:])
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None
