"""Lambda entry point of scheduled maintenance. An EventBridge schedule invokes it with a constant input naming
the task, ``{"task": "reconcile"}``; locally the stack's scheduler does the same (local/scheduler.py).

Tasks (their schedules: tmuxi/schedules.py SCHEDULES; their logic: services/maintenance.py):
  reconcile   sessions on hosts that stopped heartbeating become lost; creates and deletes left half-done are
              finished or rolled back; tmux sessions without a row killed, active rows without a tmux session
              lost; Redis entries of ended sessions deleted.
  prune_live  WebSocket connect tickets past use, and connection records whose $disconnect never came
              (services/live.py ``prune``).
  cleanup     sessions idle past TMUXI_SESSION_IDLE_TIMEOUT_S (or older than TMUXI_SESSION_MAX_LIFETIME_S) deleted.
  health      PostgreSQL, Redis, each host: EMF metrics postgres_up, redis_up, hosts_up ...
  capacity    active sessions (all, per host), host CPU/memory, request rate: EMF metrics.
  retention   revoked tokens past expiry, old audit events, old ended sessions deleted.
  vacuum      VACUUM ANALYZE of the tables.
  backup      a backup of the database (services/backup.py ``run_task``).

Every run takes its task's advisory lock (a second run at once is ``skipped``) and is recorded in
``maintenance_runs``. A task that fails raises: the invocation is an error, which CloudWatch counts and alarms on,
and the next schedule tries again.
"""
from __future__ import annotations

from typing import Any

from tmuxi import snapstart
from tmuxi.observability import request_context
from tmuxi.services import backup, maintenance

snapstart.install()  # SnapStart: libraries imported before the snapshot, state re-made after restore

TASKS: dict[str, maintenance.Task] = {
    "reconcile": maintenance.reconcile,
    "prune_live": maintenance.prune_live,
    "cleanup": maintenance.cleanup,
    "health": maintenance.health,
    "capacity": maintenance.capacity,
    "retention": maintenance.retention,
    "vacuum": maintenance.vacuum,
    "backup": lambda s, conn: dict(backup.run_task()),  # services/backup.py (its own engineer's)
}


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """``event``: the EventBridge rule's constant input, ``{"task": <name>}``. Returns ``{"task", "status"
    (ok / skipped), "result"}``; a failed task raises (logged and recorded by ``maintenance.run``)."""
    task = event.get("task") if isinstance(event, dict) else None
    if task not in TASKS:
        raise ValueError(f"unknown maintenance task {task!r}: the schedule's input must be one of "
                         f"{[{'task': t} for t in TASKS]}")
    request_id = getattr(context, "aws_request_id", None)
    with request_context(request_id if isinstance(request_id, str) else None):  # on every line of the run
        result: dict[str, Any] = maintenance.run(task, TASKS[task])
    return result
