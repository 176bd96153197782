"""Observability objects, created once: the structured JSON logger, the Prometheus registry and the metric
names from the operations guide. No metric label carries a session or user id.

Request ids: API Gateway's ``requestContext.requestId`` is the correlation id of everything one request causes.
The API and the authorizer bind it for the request (``request_context``), the API's host client sends it to the
tmux host (``X-Request-Id``), and the host binds it for its own handling of the request, so every log line written
meanwhile -- by the edge, the services, the host's engine -- carries it as ``correlation_id`` (the key Powertools'
``Logger.set_correlation_id`` writes). It is bound with Powertools' *thread-safe* keys (a ContextVar): its plain
``append_keys`` / ``set_correlation_id`` change one dict shared by every thread, and the local gateway runs
several Lambda invocations at once in the threads of one process, the host many requests on one event loop."""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import orjson
from aws_lambda_powertools import Logger
from aws_lambda_powertools.logging.formatter import RESERVED_LOG_ATTRS, LambdaPowertoolsFormatter

from tmuxi.settings import get_settings
from tmuxi.snapstart import prime_before_snapshot


class _Deferred:
    """A prometheus_client object (the registry, a metric) made on first use. Importing prometheus_client costs
    a cold start ~50 ms (it imports http.server and the exposition code with it: bench/bench_coldstart.py), and in
    AWS nothing scrapes a Lambda function's registry; the tmux host's /metrics and the local gateway's do. The
    first use of any of them makes them all, in the order declared, so an exposition lists every metric as before.
    Used exactly as the object itself (``ERRORS.labels(...).inc()``, ``generate_latest(REGISTRY)``)."""

    __slots__ = ("_kind", "_args", "_kwargs", "_real")
    _declared: list[_Deferred] = []
    _made = False
    _lock = threading.RLock()

    def __init__(self, kind: str, *args: Any, **kwargs: Any) -> None:
        self._kind, self._args, self._kwargs, self._real = kind, args, kwargs, None
        self._declared.append(self)
        if _Deferred._made:
            _Deferred.make_all()

    def __getattr__(self, attr: str) -> Any:
        if self._real is None:
            _Deferred.make_all()
        return getattr(self._real, attr)

    @staticmethod
    def make_all() -> None:
        with _Deferred._lock:
            import prometheus_client

            for obj in _Deferred._declared:
                if obj._real is None:
                    kwargs = {k: v._real if isinstance(v, _Deferred) else v for k, v in obj._kwargs.items()}
                    obj._real = getattr(prometheus_client, obj._kind)(*obj._args, **kwargs)
            _Deferred._made = True


if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
else:
    def _deferred(kind: str) -> Any:
        return lambda *args, **kwargs: _Deferred(kind, *args, **kwargs)

    CollectorRegistry, Counter, Gauge, Histogram = map(_deferred, ("CollectorRegistry", "Counter", "Gauge",
                                                                    "Histogram"))
prime_before_snapshot(_Deferred.make_all)

_RESERVED = frozenset(RESERVED_LOG_ATTRS)
_DEFAULT_KEYS = {"level": "%(levelname)s", "location": "%(funcName)s:%(lineno)d", "timestamp": "%(asctime)s"}
_JSON_LITERALS = frozenset({"true", "false", "null", "NaN", "Infinity"})


def _dumps(obj: Any) -> str:
    try:
        return orjson.dumps(obj, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # e.g. an int beyond 64 bits: the standard library takes anything
        return json.dumps(obj, default=str, separators=(",", ":"), ensure_ascii=False)


def _may_be_json(msg: str) -> bool:
    """Powertools JSON-decodes string messages that are JSON documents ('{"a": 1}', '42', 'true')."""
    s = msg.strip()
    return not s or s[0] in '{["-0123456789' or s in _JSON_LITERALS


class JsonFormatter(LambdaPowertoolsFormatter):
    """Powertools' JSON formatter with a fast path for the usual record (a plain string message, no %-args,
    no exception, default key formats): the same keys, in the same order, built directly rather than through a
    copy of the record, %-formatting of each key and a JSON-decoding attempt of the message. A request log
    line costs about a third (bench/profile_api.py). The per-request keys (thread-safe keys: the correlation id)
    are placed where Powertools places them, after the logger's own keys and before the record's extras. Every
    other record goes through Powertools unchanged."""

    def format(self, record: logging.LogRecord) -> str:  # noqa: A003 - logging's name
        msg = record.msg
        fmt = self.log_format
        if (record.exc_info or record.args or not isinstance(msg, str) or _may_be_json(msg)
                or any(fmt.get(k) != v for k, v in _DEFAULT_KEYS.items())):
            return super().format(record)
        out: dict[str, Any] = {}
        for key, value in fmt.items():
            if key == "level":
                out[key] = record.levelname
            elif key == "location":
                out[key] = f"{record.funcName}:{record.lineno}"
            elif key == "timestamp":
                out[key] = self.formatTime(record)
            elif key == "message":
                out[key] = msg
            elif value and key in _RESERVED:  # a custom %-format of a record attribute: Powertools does it
                return super().format(record)
            else:
                out[key] = value
        for key, value in self.thread_safe_get_current_keys().items():
            if value and key in _RESERVED:  # a %-format of a record attribute: Powertools does it
                return super().format(record)
            out[key] = value
        out["message"] = msg
        for key, value in record.__dict__.items():
            if key not in _RESERVED:
                out[key] = value
        out["xray_trace_id"] = self._get_latest_trace_id()
        return self.serialize({k: v for k, v in out.items() if v is not None})


def _make_logger() -> Logger:
    s = get_settings()
    return Logger(service=s.service_name, level=s.log_level, logger_formatter=JsonFormatter(json_serializer=_dumps))


logger = _make_logger()

CORRELATION_KEY = "correlation_id"
_FORMATTER = logger.registered_formatter


def request_id() -> str | None:
    """The id of the request being served in this thread / task (None outside one)."""
    value = _FORMATTER.thread_safe_get_current_keys().get(CORRELATION_KEY)
    return value if isinstance(value, str) else None


class _RequestContext:
    """``request_context``: a class rather than a generator (about 1 us a request instead of 3.5)."""

    __slots__ = ("rid", "outer")

    def __init__(self, rid: str | None) -> None:
        self.rid = rid
        self.outer: Any = None

    def __enter__(self) -> None:
        if self.rid:
            self.outer = _FORMATTER.thread_safe_get_current_keys().get(CORRELATION_KEY)
            _FORMATTER.thread_safe_append_keys(**{CORRELATION_KEY: self.rid})

    def __exit__(self, *exc: object) -> None:
        if self.rid:
            _FORMATTER.thread_safe_remove_keys((CORRELATION_KEY,))
            if self.outer is not None:
                _FORMATTER.thread_safe_append_keys(**{CORRELATION_KEY: self.outer})


def request_context(rid: str | None) -> contextlib.AbstractContextManager[None]:
    """``with request_context(rid):`` every log line written inside (in this thread or task, and in tasks it
    starts) carries ``rid`` as ``correlation_id``; None binds nothing.

    Binding makes a new dict of keys for this context (Powertools' ``thread_safe_append_keys``); unbinding removes
    the key from that same dict in place (its ``thread_safe_remove_keys``). So tasks and callbacks started during
    the request -- which copy the context, and with it that dict -- carry the id while the request is served and
    stop carrying it when it ends: a tmux server's supervisor, started by the request that created its user's
    first session, does not log under that request's id for the rest of its life. An id bound further out (none
    in this project) is put back."""
    return _RequestContext(rid)


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
# WebSocket (the guide's tmux_websocket_*): "component" is "host" (output senders, input) or "gateway" (the local
# gateway's WebSocket side and @connections).
WS_CONNECTIONS = Gauge("tmux_websocket_connections", "Open WebSocket connections (gateway) or attached viewers (host)",
                       ["component"], registry=REGISTRY)
WS_SENT = Counter("tmux_websocket_messages_sent", "WebSocket messages sent to clients", ["component"],
                  registry=REGISTRY)
WS_RECEIVED = Counter("tmux_websocket_messages_received", "WebSocket messages received from clients",
                      ["component"], registry=REGISTRY)
WS_ERRORS = Counter("tmux_websocket_connection_errors", "WebSocket errors", ["component", "kind"], registry=REGISTRY)
WS_LATENCY = Histogram("tmux_websocket_latency_seconds", "WebSocket operation latency", ["component", "operation"],
                       buckets=_BUCKETS, registry=REGISTRY)
WS_BYTES = Counter("tmux_websocket_bytes_sent", "Terminal output bytes delivered to viewers", ["component"],
                   registry=REGISTRY)
# ECS task scale-in protection (tmux_host/protection.py): calls to the ECS agent's endpoint by the state asked for
# ("true" / "false") and outcome ("ok" / "failed"), and whether the host's task is protected now.
TASK_PROTECTION_UPDATES = Counter("tmux_task_protection_updates", "Calls to the ECS agent's task protection endpoint",
                                  ["enabled", "status"], registry=REGISTRY)
TASK_PROTECTED = Gauge("tmux_task_protected", "1 while this host's ECS task is protected from scale-in",
                       registry=REGISTRY)

# --- issue 11: dependency health, process metrics, and EMF from the functions -----------------------------------
# postgres_up / redis_up (the guide's names; ops/prometheus/rules/critical.yml DatabaseDown, RedisDown): the
# dependency as this process last saw it -- 1 when its last check reached it, 0 when not. Labelled by the component
# that checked, so a process that never checks one (a tmux host does not use Redis) exports nothing for it rather
# than an unlabelled gauge's initial 0, which would read as "down". Set by tmuxi.services.health (the API's
# /health; the local WebSocket gateway's /health and /metrics, component "ws") and, for PostgreSQL, by each tmux
# host heartbeat (tmuxi.registry, component "host").
POSTGRES_UP = Gauge("postgres_up", "1 when this process's last PostgreSQL check reached it, 0 when not",
                    ["component"], registry=REGISTRY)
REDIS_UP = Gauge("redis_up", "1 when this process's last Redis check reached it, 0 when not", ["component"],
                 registry=REGISTRY)

if TYPE_CHECKING:
    from prometheus_client import ProcessCollector
else:
    ProcessCollector = _deferred("ProcessCollector")
# process_resident_memory_bytes, process_cpu_seconds_total, process_start_time_seconds (HighMemoryUsage,
# HighCPUUsage, PodCrashLooping): prometheus_client registers its process collector only in its default registry,
# and REGISTRY is one of our own, so it is added here (deferred like the metrics: it reads /proc at scrape time).
PROCESS = ProcessCollector(registry=REGISTRY)

# EMF (CloudWatch embedded metric format) from the Lambda functions: nothing scrapes a function's Prometheus
# registry, so each invocation prints one EMF document that CloudWatch Logs turns into metrics in METRICS_NAMESPACE.
# Dimensions: service, environment and component only -- never a user, session or connection id, nor the route or
# status (each distinct set of dimensions is a billed custom metric); those go in the document's metadata,
# searchable with Logs Insights. tmux_errors and tmux_authentication_failures are written as 0 or 1 on every
# invocation, so their CloudWatch Average is the fraction of invocations that failed.
METRICS_NAMESPACE = "Tmuxi"  # = cdk/names.py METRICS_NAMESPACE (the layer does not import the CDK app)
EMF_METRIC_NAMES = ("tmux_requests", "tmux_request_duration_seconds", "tmux_errors", "tmux_authentication_failures")
_EMF_UNITS = ("Count", "Seconds", "Count", "Count")  # CloudWatch's unit names, in EMF_METRIC_NAMES's order


class _EmfTemplate:
    """The fixed part of one component's document: its metric directive (namespace, the one dimension set, the
    metrics with their units) and its dimension values, made once. Written directly rather than through
    Powertools' EphemeralMetrics, whose validation of every add_metric / add_metadata and copy of the sets on
    flush cost ~30 us a document alone and ~90 us of the API handler's p50 in place (this: ~2 us), for a document
    that never changes shape; the document is the one Powertools wrote (same keys in the same order, values as
    one-element lists)."""

    __slots__ = ("directive", "dimensions")

    def __init__(self, component: str) -> None:
        s = get_settings()
        self.dimensions = {"environment": s.environment, "component": component, "service": s.service_name}
        self.directive = [{"Namespace": METRICS_NAMESPACE, "Dimensions": [list(self.dimensions)],
                           "Metrics": [{"Name": n, "Unit": u} for n, u in zip(EMF_METRIC_NAMES, _EMF_UNITS,
                                                                                strict=True)]}]


_emf_templates: dict[str, _EmfTemplate] = {}


def emit_request_metrics(component: str, *, route: str, status: int | str, duration_s: float, error: bool,
                         auth_failure: bool = False, request_id: str | None = None) -> None:
    """Print this invocation's EMF document: one line on stdout (``sys.stdout`` as it is now), which Lambda sends
    to CloudWatch Logs, written with one call so that threads' documents do not interleave (the local gateway
    runs several invocations at once)."""
    t = _emf_templates.get(component)
    if t is None:
        t = _emf_templates[component] = _EmfTemplate(component)
    doc: dict[str, Any] = {"_aws": {"Timestamp": int(time.time() * 1000), "CloudWatchMetrics": t.directive},
                           **t.dimensions, "route": route, "status": str(status)}
    if request_id:
        doc["request_id"] = request_id
    doc["tmux_requests"] = [1.0]
    doc["tmux_request_duration_seconds"] = [float(duration_s)]
    doc["tmux_errors"] = [1.0 if error else 0.0]
    doc["tmux_authentication_failures"] = [1.0 if auth_failure else 0.0]
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE).decode())
