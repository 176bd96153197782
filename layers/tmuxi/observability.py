"""Observability objects, created once: the structured JSON logger, the Prometheus registry and the metric
names from the operations guide. No metric label carries a session or user id."""
from __future__ import annotations

from aws_lambda_powertools import Logger
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tmuxi.settings import get_settings

logger = Logger(service=get_settings().service_name, level=get_settings().log_level)

REGISTRY = CollectorRegistry(auto_describe=True)

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUEST_DURATION = Histogram(
    "tmux_request_duration_seconds", "Request duration", ["component", "route", "status"],
    buckets=_BUCKETS, registry=REGISTRY,
)
REQUESTS = Counter("tmux_requests", "Requests served", ["component", "route", "status"], registry=REGISTRY)
ACTIVE_SESSIONS = Gauge("tmux_active_sessions", "Sessions alive on this host", ["host"], registry=REGISTRY)
SESSIONS_CREATED = Counter("tmux_session_creation_rate", "Sessions created", ["host"], registry=REGISTRY)
SESSIONS_CLEANED = Counter("tmux_session_cleanup_rate", "Sessions ended", ["host", "reason"], registry=REGISTRY)
ERRORS = Counter("tmux_errors", "Errors", ["component", "kind"], registry=REGISTRY)
TIMEOUTS = Counter("tmux_timeouts", "Timeouts", ["component", "operation"], registry=REGISTRY)
AUTH_FAILURES = Counter("tmux_authentication_failures", "Rejected tokens or logins", ["reason"], registry=REGISTRY)
