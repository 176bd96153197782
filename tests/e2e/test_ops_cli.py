"""`python -m ops`, the operator CLI, against a running local stack: the health report and its exit code, the
guide's log analysis on lines shaped like the system's own, the capacity report against the host registry, the
upgrade check's smoke test through the gateway, and the command list."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from psycopg.rows import dict_row

from tests.conftest import StackHandle

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("health", "incidents", "logs", "capacity", "maintenance", "upgrade-check", "backup", "restore")


def _ops(*args: str) -> subprocess.CompletedProcess[str]:
    # the stack fixture put its settings (TMUXI_DATABASE_URL, TMUXI_REDIS_URL, TMUXI_GATEWAY_PORT, ...) here
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "layers"), str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "ops", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120, check=False)


def test_help_lists_every_command() -> None:
    r = _ops("--help")
    assert r.returncode == 0, r.stderr
    for cmd in COMMANDS:
        assert cmd in r.stdout, cmd
    sub = _ops("logs", "--help")
    assert sub.returncode == 0 and "analyze" in sub.stdout


def test_health_reports_healthy_stack(stack: StackHandle) -> None:
    r = _ops("health", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["status"] == "ok"
    by_name = {c["component"]: c for c in doc["checks"]}
    for name in ("postgres", "migrations", "redis", "gateway", *(f"host {h}" for h in stack.stack.host_ports)):
        assert by_name[name]["status"] == "ok", by_name.get(name)
    assert by_name["gateway"]["data"]["url"] == stack.gateway_url

    table = _ops("health")
    assert table.returncode == 0 and "Health: ok" in table.stdout


def _line(**fields: object) -> str:
    base: dict[str, object] = {"level": "INFO", "location": "_log:370", "message": "request",
                               "timestamp": "2026-11-28 10:31:51,370+0000", "service": "tmuxi"}
    return json.dumps({**base, **fields})


def test_logs_analyze_counts(tmp_path: Path) -> None:
    lines = [
        _line(method="GET", route="/sessions", status=200, duration=3.2, user="alice"),
        _line(method="GET", route="/sessions", status=200, duration=4.0, user="alice"),
        _line(method="POST", route="/sessions", status=201, duration=650.5, user="bob"),
        _line(method="POST", route="/sessions/{id}/exec", status=200, duration=1200.0, user="alice"),
        _line(method="GET", route="/sessions/{id}", status=404, duration=2.0),
        _line(method="POST", route="/sessions", status=503, duration=250.0, level="WARNING"),
        _line(method="POST", route="/sessions", status=500, duration=12.0, level="ERROR",
              message="unhandled error"),
        _line(level="ERROR", message="host unreachable", host_id="host-2"),
        _line(level="ERROR", message="host unreachable", host_id="host-1"),
        _line(message="maintenance task done", task="reconcile", status="ok", duration=5.0),
        _line(method="GET", route="/health", status=200, duration=900.0, timestamp="2026-11-27 09:00:00,000+0000"),
        # as `aws logs tail --format short` writes a Lambda's line: its time first
        "2026-11-28T10:31:52 " + _line(method="GET", route="/validate", status=200, duration=1.5, user="bob"),
        "[stack] supervisor process=gateway pid=12 exit_code=1 status=exited action=restart",
        "Traceback (most recent call last):",
        "",
    ]
    log = tmp_path / "gateway.log"
    log.write_text("\n".join(lines) + "\n")

    r = _ops("logs", "analyze", str(log), "--slow-ms", "200", "--top", "2", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["requests"] == 9  # "status": "ok" of a maintenance line is no HTTP status
    assert doc["status_codes"] == {"200": 5, "201": 1, "404": 1, "500": 1, "503": 1}
    assert doc["error_rate"] == round(2 / 9, 4)
    assert {e["message"]: e["count"] for e in doc["errors"]} == {
        "host unreachable": 2, "unhandled error": 1, "Traceback (most recent call last):": 1}
    assert doc["slow_requests"] == 4
    assert [s["duration"] for s in doc["slowest"]] == [1200.0, 900.0]
    assert {s["route"]: s["count"] for s in doc["slow_by_route"]} == {
        "POST /sessions/{id}/exec": 1, "GET /health": 1, "POST /sessions": 2}
    assert doc["top_users"] == [{"user": "alice", "count": 3}, {"user": "bob", "count": 2}]

    # --since drops the day-old line (and the plain lines, which carry no time)
    since = _ops("logs", "analyze", str(log), "--since", "2026-11-28T00:00:00", "--json")
    assert since.returncode == 0, since.stderr
    recent = json.loads(since.stdout)
    assert recent["requests"] == 8 and recent["slow_requests"] == 3
    assert "Traceback (most recent call last):" not in {e["message"] for e in recent["errors"]}


def test_capacity_matches_host_registry(stack: StackHandle) -> None:
    r = _ops("capacity", "--growth-percent", "50", "--months", "2", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    with psycopg.connect(os.environ["TMUXI_DATABASE_URL"], row_factory=dict_row) as conn:
        rows = conn.execute("SELECT id, capacity, active_sessions FROM hosts WHERE id = ANY(%s)",
                            (list(stack.stack.host_ports),)).fetchall()
    reported = {h["id"]: h for h in doc["hosts"]}
    for row in rows:
        assert reported[row["id"]]["live"] is True
        assert reported[row["id"]]["capacity"] == row["capacity"]
        assert reported[row["id"]]["active_sessions"] == row["active_sessions"]
    live = [h for h in doc["hosts"] if h["live"] and not h["draining"]]
    assert doc["capacity"] == sum(h["capacity"] for h in live)
    assert doc["current_sessions"] == sum(h["active_sessions"] for h in doc["hosts"] if h["live"])
    proj = doc["projection"]
    assert proj["growth_percent_per_month"] == 50 and proj["growth_source"] == "given"
    assert [m["month"] for m in proj["months"]] == [1, 2]
    if doc["current_sessions"]:  # the guide's formula: (capacity - current) / (current x growth)
        expected = (doc["capacity"] - doc["current_sessions"]) / (doc["current_sessions"] * 0.5)
        assert proj["months_to_limit"] == round(expected, 2)
    assert doc["recommendation"]["action"] == "Monitor only"  # a test stack is nearly empty


def test_upgrade_check_backs_up_and_smoke_test_passes(stack: StackHandle, tmp_path: Path) -> None:
    name, _ = stack.new_user()
    creds = tmp_path / "creds.json"
    creds.write_text(json.dumps({"username": name, "password": "pw-" + name}))
    store = tmp_path / "backups"
    r = _ops("upgrade-check", "--store-url", str(store), "--password-file", str(creds), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    steps = {s["step"]: s for s in doc["steps"]}
    assert doc["status"] == "ok"
    assert steps["backup"]["status"] == "ok", steps["backup"]  # through ops/backup_cmds.py
    assert Path(steps["backup"]["data"]["manifest"].removeprefix("file://")).is_relative_to(store)
    assert steps["migrations (dry run)"]["data"]["pending"] == []
    for step in ("smoke: login", "smoke: create session", "smoke: exec echo ok", "smoke: delete session"):
        assert steps[step]["status"] == "ok", steps.get(step)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"username": name, "password": "wrong"}))
    failed = _ops("upgrade-check", "--no-backup", "--password-file", str(bad), "--json")
    assert failed.returncode == 1
    assert {s["step"]: s["status"] for s in json.loads(failed.stdout)["steps"]}["backup"] == "skipped"
    assert {s["step"]: s["status"] for s in json.loads(failed.stdout)["steps"]}["smoke: login"] == "failed"


def test_logs_analyze_reads_the_stack_logs_by_default(stack: StackHandle) -> None:
    assert stack.client.get("/health").status_code == 200  # at least one request line in gateway.log
    # a user who makes many requests: the API's request lines name who asked (the authorizer's principal)
    name, h = stack.new_user()
    for _ in range(40):
        assert stack.client.get("/sessions", headers=h).status_code == 200
    user_id = stack.client.get("/validate", headers=h).json()["user_id"]
    r = _ops("logs", "analyze", "--json", "--top", "200")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert str(stack.stack.log_dir / "gateway.log") in doc["files"]
    assert doc["requests"] > 0 and doc["status_codes"]
    top = {u["user"]: u["count"] for u in doc["top_users"]}
    assert top.get(user_id, 0) >= 40, (name, user_id, doc["top_users"][:5])


def test_maintenance_weekly_runs_the_tasks(stack: StackHandle) -> None:
    with psycopg.connect(os.environ["TMUXI_DATABASE_URL"]) as conn:
        before = conn.execute("SELECT coalesce(max(id), 0) FROM maintenance_runs").fetchone()
    r = _ops("maintenance", "weekly", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    steps = {s["step"]: s for s in doc["steps"]}
    # "skipped": the stack's scheduler was running the same task at that moment (its advisory lock)
    for task in ("health", "reconcile", "cleanup", "prune_live", "retention", "vacuum"):
        assert steps[f"task {task}"]["status"] in ("ok", "skipped"), steps[f"task {task}"]
    assert steps["health report"]["status"] == "ok"
    assert steps["open incidents"]["status"] == "ok"
    # earlier failed runs (none expected here) are reported degraded: for a person to read, not a failure of this run
    assert steps["failed maintenance runs (7 days)"]["status"] in ("ok", "degraded")
    with psycopg.connect(os.environ["TMUXI_DATABASE_URL"]) as conn:  # the function itself ran: its records
        tasks = {row[0] for row in conn.execute("SELECT task FROM maintenance_runs WHERE id > %s", before)}
    assert {"vacuum", "retention", "cleanup"} <= tasks


def test_incidents_open_lists_only_unresolved(stack: StackHandle) -> None:
    with psycopg.connect(os.environ["TMUXI_DATABASE_URL"]) as conn:
        open_id, resolved_id = (conn.execute(
            "INSERT INTO incidents (key, priority, rule, title, status, opened_at, resolved_at, last_state)"
            " VALUES (%s, 'P2', 'HighErrorRate', 'errors above 1%%', %s, now(), %s, 'ALARM') RETURNING id",
            (f"ops-test-{status}", status, None if status == "investigating" else datetime.now(UTC)),
        ).fetchone()[0] for status in ("investigating", "resolved"))
    try:
        r = _ops("incidents", "--open", "--json")
        assert r.returncode == 0, r.stderr
        ids = {i["id"] for i in json.loads(r.stdout)["incidents"]}
        assert open_id in ids and resolved_id not in ids
        every = {i["id"] for i in json.loads(_ops("incidents", "--since", "1h", "--json").stdout)["incidents"]}
        assert {open_id, resolved_id} <= every
    finally:
        with psycopg.connect(os.environ["TMUXI_DATABASE_URL"]) as conn:
            conn.execute("DELETE FROM incidents WHERE id = ANY(%s)", ([open_id, resolved_id],))


def test_health_exit_2_when_the_gateway_is_down(stack: StackHandle) -> None:
    from local.services import free_port

    r = _ops("health", "--json", "--gateway-url", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert r.returncode == 2, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["status"] == "down"
    assert {c["component"]: c["status"] for c in doc["checks"]}["gateway"] == "down"


def test_backup_then_restore_into_an_empty_database_is_verified_by_the_cli(stack: StackHandle,
                                                                            tmp_path: Path) -> None:
    """The operator's procedure end to end: `python -m ops backup` of the stack's database, then `python -m ops
    restore` into an empty database; the CLI's verification (row counts and checksums of every table) passes, and
    the restored rows are the backed-up ones. A second restore into that (now full) database is refused."""
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    _, h = stack.new_user()
    sid = stack.create_session(h, name="backed-up")["id"]
    b = _ops("backup", "--store-url", str(tmp_path / "backups"), "--json")
    assert b.returncode == 0, b.stdout + b.stderr
    manifest = json.loads(b.stdout)
    admin = os.environ["TMUXI_DATABASE_URL"]
    name = f"restore_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    target = make_conninfo(admin, dbname=name)
    try:
        r = _ops("restore", manifest["manifest"], "--database-url", target, "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        doc = json.loads(r.stdout)
        assert doc["status"] == "ok" and all(t["ok"] for t in doc["tables"]), doc
        assert {t["name"] for t in doc["tables"]} >= {"users", "sessions", "audit_events", "maintenance_runs"}
        with psycopg.connect(target) as conn:
            row = conn.execute("SELECT name FROM sessions WHERE id = %s", (uuid.UUID(sid),)).fetchone()
        assert row is not None and row[0] == "backed-up"
        again = _ops("restore", manifest["manifest"], "--database-url", target, "--json")
        assert again.returncode == 1 and json.loads(again.stdout)["status"] == "refused", again.stdout
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
