"""The host as an ECS task: who it is and what it reports to CloudWatch.

Every task of the service runs the same image with the same settings, so a host on ECS takes its identity from
the task metadata endpoint (``ECS_CONTAINER_METADATA_URI_V4``): its host id is the task's id (32 hex digits, unique
for the task's life) and its advertised URL the task's private address, where the API, the other hosts and the NLB
reach it. Sessions-per-task is published as an EMF log line (CloudWatch Logs turns it into a metric) for the
service's autoscaling (cdk/host.py ``sessions_metric``).
"""
from __future__ import annotations

import json
import os
import time
import urllib.request
from typing import Any

from tmuxi.observability import logger
from tmuxi.settings import Settings, env_name, get_settings

METRICS_NAMESPACE = "Tmuxi"  # = cdk/names.py METRICS_NAMESPACE
METRICS_SERVICE = "tmux-host"


def task_identity(metadata_uri: str, port: int, *, attempts: int = 5, timeout_s: float = 2.0) -> tuple[str, str]:
    """(host id, advertised URL) of this task, from its metadata endpoint. Retried briefly (the agent may still be
    starting); raises RuntimeError naming the fix when it cannot be read."""
    last: Exception | None = None
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(f"{metadata_uri.rstrip('/')}/task", timeout=timeout_s) as resp:  # noqa: S310
                task: dict[str, Any] = json.load(resp)
            task_id = str(task["TaskARN"]).rsplit("/", 1)[-1]
            address = next(ip for c in task["Containers"] for n in c.get("Networks", [])
                           for ip in n.get("IPv4Addresses", []))
            return task_id[:32], f"http://{address}:{port}"
        except (OSError, ValueError, KeyError, StopIteration) as exc:
            last = exc
            time.sleep(min(0.2 * 2**attempt, 2.0))
    raise RuntimeError(f"cannot read this task's identity from {metadata_uri}/task ({last!r}): set "
                       f"{env_name('host_id')} and {env_name('host_url')} explicitly")


def apply_task_identity() -> Settings:
    """On ECS, make the task's id and address this process's host id and URL (unless given explicitly), before
    anything reads the settings for them; elsewhere the settings as they are."""
    settings = get_settings()
    uri = settings.ecs_container_metadata_uri
    if uri is None or {"host_id", "host_url"} <= settings.model_fields_set:
        return settings
    host_id, url = task_identity(uri, settings.host_port)
    updates = {f: v for f, v in (("host_id", host_id), ("host_url", url)) if f not in settings.model_fields_set}
    for field, value in updates.items():  # for this process and the one it re-executes itself as (setpriv)
        os.environ[env_name(field)] = value
    get_settings.cache_clear()
    settings = get_settings()
    logger.info("host identity from the ECS task", extra={"host_id": settings.host_id, "url": settings.host_url})
    return settings


def emit_sessions_metric(settings: Settings, active_sessions: int) -> None:
    """One EMF line: ``tmux_active_sessions`` of this task, dimensions service and environment."""
    from aws_lambda_powertools import Metrics
    from aws_lambda_powertools.metrics import MetricUnit

    metrics = Metrics(namespace=METRICS_NAMESPACE, service=METRICS_SERVICE)
    metrics.add_dimension(name="environment", value=settings.environment)
    metrics.add_metric(name="tmux_active_sessions", unit=MetricUnit.Count, value=active_sessions)
    metrics.flush_metrics()
