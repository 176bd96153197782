"""Scheduled maintenance: the tasks the maintenance function runs (functions/maintenance/handler.py TASKS), each on
its EventBridge schedule (tmuxi/schedules.py).

Every run (``run``):
  * takes its task's PostgreSQL advisory lock (``pg_try_advisory_lock``, one key per task) on a connection of its
    own; a run that finds it held -- another run of the task is under way, here or in another process -- is
    recorded ``skipped`` and does nothing. The lock goes with the connection, so a run that dies releases it.
  * is recorded in ``maintenance_runs`` (migration 0010): ``running``, then ``ok`` with its result or ``failed``
    with the error (and the error raised: the invocation fails, CloudWatch counts it, the next schedule retries).
  * is idempotent: each task works from the record's current state, and each of its writes says which state it
    changes from, so a run after a run (or after a crashed run) finishes what is left and repeats nothing.
  * works in batches of ``maintenance_batch_size`` rows (one short transaction each) with a progress log line
    per batch.
"""
from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from uuid import UUID

from tmuxi import cache, host_client, registry
from tmuxi.db import repo
from tmuxi.errors import AppError, NotFound, SessionGone
from tmuxi.observability import METRICS_NAMESPACE, logger
from tmuxi.schedules import SCHEDULES, rate_seconds
from tmuxi.services import live
from tmuxi.services import sessions as sessions_service
from tmuxi.settings import Settings, get_settings

if TYPE_CHECKING:
    import psycopg

Task = Callable[[Settings, "psycopg.Connection[Any]"], dict[str, Any]]

# Concurrent kills per host during cleanup: each is one HTTP call the host serves on its event loop (~5-20 ms, most
# of it tmux's own work); 8 keep a host busy without queueing its users' requests behind a long burst.
KILL_THREADS = 8
# A host whose current run started less than this many heartbeats ago may still be adopting the tmux sessions of its
# previous run: reconciliation does not judge its listing yet.
HOST_SETTLE_BEATS = 4
# A session activated less than this long ago is not judged missing from its host's listing (the listing is taken
# after the record is read; this only keeps the judgement well clear of a create finishing).
ACTIVE_SETTLE_S = 5.0


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)


def run(task: str, fn: Task) -> dict[str, Any]:
    """Run one task under its advisory lock, recorded. Returns ``{"task", "status", "result"}``; raises what the
    task raised (recorded ``failed``)."""
    s = get_settings()
    t0 = time.perf_counter()
    try:
        conn = repo.maintenance_lock_connection()
    except Exception as exc:  # PostgreSQL down: nothing can run (or be recorded); the invocation fails, retried
        logger.warning("maintenance task failed", extra={
            "task": task, "status": "failed", "duration": _ms(t0),
            "error": f"cannot connect to PostgreSQL for the task's lock: {type(exc).__name__}: {exc}"[:300]})
        raise
    try:
        if not repo.try_maintenance_lock(conn, task):
            result: dict[str, Any] = {"reason": "already running"}
            repo.start_maintenance_run(task, "skipped", result)
            logger.info("maintenance task skipped: already running",
                        extra={"task": task, "status": "skipped", "duration": _ms(t0)})
            return {"task": task, "status": "skipped", "result": result}
        run_id = repo.start_maintenance_run(task)
        try:
            result = fn(s, conn)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"[:1000]
            # the record may not be writable either (PostgreSQL down): then the log line below says it
            with contextlib.suppress(AppError):
                repo.finish_maintenance_run(run_id, "failed", {}, error)
            logger.warning("maintenance task failed", extra={"task": task, "status": "failed", "error": error[:300],
                                                             "duration": _ms(t0)})
            raise
        repo.finish_maintenance_run(run_id, "ok", result)
        logger.info("maintenance task done", extra={"task": task, "status": "ok", "duration": _ms(t0), **result})
        return {"task": task, "status": "ok", "result": result}
    finally:
        conn.close()  # releases the advisory lock


# --- cleanup ------------------------------------------------------------------------------------------------
def cleanup(s: Settings, conn: Any = None) -> dict[str, Any]:
    """Delete the sessions idle past ``session_idle_timeout_s`` (and, when ``session_max_lifetime_s`` is set, those
    older than it), the way the API's DELETE does -- ``deleting`` (audited, with the reason), the tmux session
    killed, ``deleted`` -- batch by batch. A session whose host does not answer stays ``deleting``: reconciliation
    finishes it (as it does an API delete's). Activity: the API bumps ``last_active_at`` on input, resize, exec;
    hosts bump it for sessions with WebSocket input or viewers (their heartbeat, ``repo.touch_sessions``)."""
    t0 = time.perf_counter()
    counts: Counter[str] = Counter()
    batches = 0
    while True:
        rows = repo.begin_cleanup_batch(s.session_idle_timeout_s, s.session_max_lifetime_s, s.maintenance_batch_size)
        if not rows:
            break
        batches += 1
        cache.invalidate_sessions([str(r["id"]) for r in rows])
        gone = _kill_on_hosts(rows, s)
        done = repo.finish_deletes(gone)
        cache.invalidate_sessions([str(r["id"]) for r in done])
        counts["deleted"] += len(done)
        counts["pending"] += len(rows) - len(done)
        for r in done:
            counts["idle" if r["end_reason"] == repo.IDLE_REASON else "max_lifetime"] += 1
        logger.info("cleanup progress", extra={"status": "running", "batch": batches, "taken": len(rows),
                                               "deleted_so_far": counts["deleted"], "duration": _ms(t0)})
        if len(rows) < s.maintenance_batch_size:
            break
    # the guide's tmux_session_cleanup_rate: sessions cleaned per run (Sum over a period is the rate)
    _emit({"sessions_cleaned": counts["deleted"], "sessions_cleanup_pending": counts["pending"]}, s)
    return {"deleted": counts["deleted"], "idle": counts["idle"], "max_lifetime": counts["max_lifetime"],
            "pending": counts["pending"], "batches": batches}


def _kill_on_hosts(rows: list[dict[str, Any]], s: Settings) -> list[UUID]:
    """Kill the tmux sessions of these sessions on their hosts; the ids whose tmux session is gone. Each host is
    listed once: a session it does not hold needs no call (most of an idle backlog, after a host restart); the
    others are killed a few at a time. A host that does not answer keeps its sessions out of the result."""
    by_host: dict[str, list[UUID]] = {}
    for r in rows:
        by_host.setdefault(str(r["host_id"]), []).append(r["id"])
    gone: list[UUID] = []
    for host_id, ids in by_host.items():
        try:
            client = host_client.HostClient(registry.host_url(host_id), settings=s)
            held = {UUID(x["session_id"]) for x in client.list_sessions()}
        except AppError as exc:
            logger.warning("cleanup: a host did not answer; reconciliation finishes its deletes",
                           extra={"host_id": host_id, "error": exc.code, "sessions": len(ids)})
            continue
        gone.extend(sid for sid in ids if sid not in held)
        to_kill = [sid for sid in ids if sid in held]

        def kill(sid: UUID, client: host_client.HostClient = client) -> UUID | None:
            try:
                client.kill_session(sid)
            except (NotFound, SessionGone):
                pass
            except AppError:
                return None
            return sid

        with ThreadPoolExecutor(max_workers=KILL_THREADS) as pool:
            gone.extend(sid for sid in pool.map(kill, to_kill) if sid is not None)
    return gone


# --- reconcile ----------------------------------------------------------------------------------------------
def reconcile(s: Settings, conn: Any = None) -> dict[str, Any]:
    """Bring the record, the hosts and Redis back in line:
      * hosts that stopped heartbeating: their sessions lost; creates and deletes left half-done finished
        (services/sessions.py ``reconcile``);
      * per live host: tmux sessions the record does not have there (holding) are killed; sessions the record has
        active there that the host does not hold are ended (``lost``, or ``exited`` when the host says so);
      * Redis: cached entries of sessions that ended or no longer exist are deleted. (The host registry keeps
        nothing in Redis -- addresses come from PostgreSQL alone -- so a dead host leaves no key there.)"""
    counts: dict[str, Any] = dict(sessions_service.reconcile(s))
    counts.update(_host_drift(s))
    counts["stale_cache_keys"] = _stale_cache_keys()
    return counts


def _host_drift(s: Settings) -> dict[str, int]:
    counts = {"orphans_killed": 0, "missing_ended": 0, "hosts_checked": 0}
    for host in repo.live_hosts(s.host_dead_after_s):
        host_id = str(host["id"])
        if host["up_s"] is None or float(host["up_s"]) < HOST_SETTLE_BEATS * s.heartbeat_interval_s:
            continue
        # the record first, then the host: every session active in this read was on the host before the listing
        expected = repo.active_sessions_on_host(host_id, ACTIVE_SETTLE_S)
        client = host_client.HostClient(str(host["url"]), settings=s)
        try:
            held = {UUID(x["session_id"]) for x in client.list_sessions()}
        except AppError:
            continue  # not answering: if it is dead, the dead-host path above takes its sessions
        counts["hosts_checked"] += 1
        # the host first, then the record: a session being created is already `creating` (holding) in it
        known = repo.holding_sessions_on_host(host_id, list(held))
        for sid in held - known:
            logger.info("reconcile: killing a tmux session the record does not have on its host",
                        extra={"host_id": host_id, "session_id": str(sid)})
            try:
                client.kill_session(sid)
            except (NotFound, SessionGone):
                pass
            except AppError:
                continue
            counts["orphans_killed"] += 1
        for sid in expected - held:
            # asked again, one by one (as the API's on_host does): a session that ended here on its own is
            # recorded as the host says (its report may be on its way), one it holds after all is left alone
            try:
                client.screen(sid)
                continue
            except SessionGone as exc:
                state, reason = exc.details.get("state"), exc.details.get("end_reason")
                if state not in ("exited", "lost"):
                    state, reason = "lost", None
            except NotFound:
                state, reason = "lost", None
            except AppError:
                continue
            reason = reason or "its tmux host does not have it"
            if repo.end_session(sid, None, str(state), str(reason), host_id=host_id) is not None:
                cache.invalidate_session(str(sid))
                counts["missing_ended"] += 1
    return counts


def _stale_cache_keys() -> int:
    ids = cache.cached_session_ids()
    if not ids:
        return 0
    valid: list[UUID] = []
    for raw in ids:
        try:
            valid.append(UUID(raw))
        except ValueError:
            continue
    stale = [str(sid) for sid in repo.not_live_sessions(valid)]
    cache.invalidate_sessions(stale)
    return len(stale)


# --- prune_live ---------------------------------------------------------------------------------------------
def prune_live(s: Settings, conn: Any = None) -> dict[str, Any]:
    return dict(live.prune())


# --- health -------------------------------------------------------------------------------------------------
def health(s: Settings, conn: Any = None) -> dict[str, Any]:
    """PostgreSQL, Redis and each heartbeating host's /health, published as metrics (EMF, namespace Tmuxi:
    postgres_up, redis_up, hosts_up, hosts_down, hosts_dead) and one log line. The run is ``ok`` whatever it
    found: the metrics carry the findings, the alarms act on them."""
    try:
        hosts = repo.live_hosts(s.host_dead_after_s)
        _, dead = repo.host_counts(s.host_dead_after_s, 600.0)
        postgres_up = 1
    except AppError:
        hosts, dead, postgres_up = [], 0, 0
    redis_up = int(cache.available())
    per_host: dict[str, str] = {}
    for h in hosts:
        try:
            per_host[str(h["id"])] = str(host_client.HostClient(str(h["url"]), settings=s,
                                                                timeout_s=min(2.0, s.host_timeout_s)).health()
                                         .get("status", "ok"))
        except AppError as exc:
            per_host[str(h["id"])] = f"unreachable ({exc.code})"
    up = sum(1 for v in per_host.values() if v in ("ok", "degraded"))
    result = {"postgres_up": postgres_up, "redis_up": redis_up, "hosts_up": up, "hosts_down": len(per_host) - up,
              "hosts_dead": dead, "hosts": per_host}
    _emit({"postgres_up": postgres_up, "redis_up": redis_up, "hosts_up": up, "hosts_down": len(per_host) - up,
           "hosts_dead": dead}, s, metadata={"hosts": per_host})
    logger.info("health", extra={"status": "ok" if postgres_up and redis_up and not result["hosts_down"]
                                 else "degraded", **result})
    return result


# --- capacity -----------------------------------------------------------------------------------------------
def capacity(s: Settings, conn: Any = None) -> dict[str, Any]:
    """Active sessions in all and per host (with each host's capacity), each host's process CPU seconds and
    resident memory (its /metrics), and the request rate: actions recorded (audit events) per minute over the
    schedule's interval. EMF metrics (totals only: a host id as a dimension would be one billed metric per ECS
    task ever run; per host in the metadata) and one log line."""
    window_s = float(rate_seconds(SCHEDULES["capacity"]))
    counts = repo.capacity_counts(window_s)
    per_host: dict[str, dict[str, Any]] = {}
    for h in repo.live_hosts(s.host_dead_after_s):
        entry: dict[str, Any] = {"active": counts["per_host"].get(str(h["id"]), 0), "capacity": int(h["capacity"])}
        entry.update(_host_process_metrics(str(h["url"]), s))
        per_host[str(h["id"])] = entry
    active = sum(counts["per_host"].values())
    cap = sum(e["capacity"] for e in per_host.values())
    result = {"active_sessions": active, "capacity": cap,
              "utilisation": round(active / cap, 4) if cap else None,
              "actions_per_minute": round(counts["actions"] * 60.0 / window_s, 3), "hosts": per_host}
    metrics: dict[str, float] = {"active_sessions": active, "session_capacity": cap,
                                 "actions_per_minute": result["actions_per_minute"], "live_hosts": len(per_host)}
    mem = [e["memory_bytes"] for e in per_host.values() if "memory_bytes" in e]
    if mem:
        metrics["host_memory_bytes_max"] = max(mem)
    _emit(metrics, s, metadata={"hosts": per_host})
    logger.info("capacity", extra={"status": "ok", **result})
    return result


def _host_process_metrics(url: str, s: Settings) -> dict[str, float]:
    """The host process's CPU seconds and resident memory from its Prometheus /metrics (the process collector);
    nothing when it does not answer."""
    try:
        text = host_client.HostClient(url, settings=s, timeout_s=min(2.0, s.host_timeout_s))._request(
            "GET", "/metrics").text
    except AppError:
        return {}
    out: dict[str, float] = {}
    names = {"process_cpu_seconds_total": "cpu_seconds", "process_resident_memory_bytes": "memory_bytes"}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            try:
                out[names[name]] = float(value)
            except ValueError:
                continue
    return out


def _emit(values: dict[str, float], s: Settings, metadata: dict[str, Any] | None = None) -> None:
    """One EMF document (stdout; CloudWatch Logs makes the metrics). EphemeralMetrics: its own metric set, as in
    observability.emit_request_metrics."""
    from aws_lambda_powertools.metrics import EphemeralMetrics, MetricUnit

    m = EphemeralMetrics(namespace=METRICS_NAMESPACE, service="maintenance")
    m.add_dimension(name="environment", value=s.environment)
    for name, value in values.items():
        m.add_metric(name=name, unit=MetricUnit.Bytes if name.endswith("_bytes") else MetricUnit.Count, value=value)
    for k, v in (metadata or {}).items():
        m.add_metadata(key=k, value=v)
    m.flush_metrics()


# --- retention ----------------------------------------------------------------------------------------------
def retention(s: Settings, conn: Any = None) -> dict[str, Any]:
    """Delete, batch by batch: revoked tokens past their expiry, audit events older than
    ``audit_retention_days`` (and maintenance run records as old), sessions that ended more than
    ``ended_session_retention_days`` ago (with their shares and the tickets and connection records of them)."""
    t0 = time.perf_counter()
    n = s.maintenance_batch_size
    out = {"revoked_tokens": _batches("revoked_tokens", lambda: repo.delete_expired_revocations(n), n, t0),
           "audit_events": _batches("audit_events",
                                    lambda: repo.delete_old_audit_events(s.audit_retention_days, n), n, t0),
           "ended_sessions": _batches("ended_sessions", lambda: repo.delete_old_ended_sessions(
               s.ended_session_retention_days, n), n, t0),
           "maintenance_runs": repo.delete_old_maintenance_runs(s.audit_retention_days)}
    return out


def _batches(what: str, step: Callable[[], int], size: int, t0: float) -> int:
    total = 0
    while True:
        n = step()
        total += n
        if n:
            logger.info("retention progress", extra={"status": "running", "table": what, "deleted_so_far": total,
                                                     "duration": _ms(t0)})
        if n < size:
            return total


# --- vacuum -------------------------------------------------------------------------------------------------
def vacuum(s: Settings, conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """VACUUM ANALYZE each of the system's tables, on the run's own connection (outside a transaction, no
    statement timeout). Table by table, each logged, so a long one shows."""
    t0 = time.perf_counter()
    took: dict[str, float] = {}
    for table in repo.MAINTAINED_TABLES:
        t = time.perf_counter()
        repo.vacuum_analyze(conn, table)
        took[table] = _ms(t)
        logger.info("vacuum progress", extra={"status": "running", "table": table, "duration": took[table]})
    return {"tables": len(took), "duration_ms": _ms(t0), "per_table_ms": took}
