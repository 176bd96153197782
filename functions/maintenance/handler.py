"""Lambda entry point of scheduled maintenance. An EventBridge schedule invokes it with a constant input naming
the task, ``{"task": "reconcile"}``; locally the stack's scheduler does the same (local/scheduler.py).

Tasks:
  reconcile   sessions on hosts that stopped heartbeating become lost; creates and deletes left half-done are
              finished or rolled back (services/sessions.py ``reconcile``).
  prune_live  WebSocket connect tickets past use, and connection records whose $disconnect never came
              (services/live.py ``prune``).

A task that fails raises: the invocation is an error, which CloudWatch counts and alarms on, and the next
schedule tries again.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tmuxi import snapstart
from tmuxi.observability import logger
from tmuxi.services import live, sessions

snapstart.install()  # SnapStart: libraries imported before the snapshot, state re-made after restore

TASKS: dict[str, Callable[[], dict[str, int]]] = {"reconcile": sessions.reconcile, "prune_live": live.prune}


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    task = event.get("task") if isinstance(event, dict) else None
    if task not in TASKS:
        raise ValueError(f"unknown maintenance task {task!r}: the schedule's input must be one of "
                         f"{[{'task': t} for t in TASKS]}")
    t0 = time.perf_counter()
    try:
        result = TASKS[task]()
    except Exception as exc:
        logger.warning("maintenance task failed", extra={"task": task, "status": "error", "error": str(exc)[:300],
                                                         "duration": round((time.perf_counter() - t0) * 1000, 3)})
        raise
    duration = round((time.perf_counter() - t0) * 1000, 3)
    logger.info("maintenance task done", extra={"task": task, "status": "ok", "duration": duration, **result})
    return {"task": task, "status": "ok", "result": result}
