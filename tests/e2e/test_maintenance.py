"""Scheduled maintenance (issue 11, part C) against the local stack: real tmux hosts, PostgreSQL and Redis. Each task
is run in this process as the maintenance function runs it (``maintenance.run``: advisory lock, run record); the
stack's own scheduler runs the same tasks meanwhile, so assertions are on the record and the hosts, whoever did
the work -- the lock makes sure it was done once."""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from functions.maintenance.handler import TASKS
from tests.conftest import StackHandle
from tests.hosting import wait_for
from tmuxi import cache, host_client, registry
from tmuxi.db import repo
from tmuxi.db.pool import connection
from tmuxi.schedules import SCHEDULES, rate_seconds
from tmuxi.services import maintenance
from tmuxi.settings import get_settings

ROOT = Path(__file__).resolve().parents[2]


def _row(sid: str | uuid.UUID) -> dict[str, Any]:
    row = repo.get_session(uuid.UUID(str(sid)))
    assert row is not None
    return row


def _idle(sid: str | uuid.UUID, minutes: int = 120) -> None:
    with connection() as conn:
        conn.execute("UPDATE sessions SET last_active_at = now() - make_interval(mins => %s) WHERE id = %s",
                     (minutes, uuid.UUID(str(sid))))


def _held(host_id: str) -> set[str]:
    return {x["session_id"] for x in host_client.HostClient(registry.host_url(host_id)).list_sessions()}


def _account(sid: str) -> int:
    with connection() as conn:
        row = conn.execute("SELECT u.account_no FROM sessions s JOIN users u ON u.id = s.owner_id WHERE s.id = %s",
                           (uuid.UUID(sid),)).fetchone()
    assert row is not None
    return int(row["account_no"])


def test_cleanup_ends_exactly_the_idle_sessions(stack: StackHandle) -> None:
    """Idle past the timeout: deleted, tmux session killed, audited with the reason. Recently active through the
    API, typed into over the host (as WebSocket keystrokes arrive: the host reports them with its heartbeat), or
    already ended: left exactly as they were."""
    _, h = stack.new_user()
    idle, active, typed, ended = (stack.create_session(h, name="maint") for _ in range(4))
    assert stack.client.delete(f"/sessions/{ended['id']}", headers=h).status_code == 204
    for s in (idle, typed, ended):
        _idle(s["id"])
    # a keystroke straight to the host, as `$default` delivers one: the API never sees it
    host_client.HostClient(registry.host_url(typed["host_id"])).send_input(uuid.UUID(typed["id"]), data=b"x")
    wait_for(lambda: (_row(typed["id"])["last_active_at"] > _row(idle["id"])["last_active_at"]
                      + datetime.timedelta(minutes=60)),
             timeout=10, what="the host's heartbeat reports the input")
    before = {s["id"]: _row(s["id"]) for s in (active, typed, ended)}

    out = maintenance.run("cleanup", TASKS["cleanup"])
    assert out["status"] in ("ok", "skipped")  # skipped: the stack's scheduler's run had the lock
    gone = wait_for(lambda: (r := _row(idle["id"]))["state"] == "deleted" and r, timeout=15,
                    what="the idle session deleted")
    assert gone["end_reason"] == repo.IDLE_REASON
    assert idle["id"] not in _held(idle["host_id"])
    events = repo.audit_events(session_id=uuid.UUID(idle["id"]))
    assert {e["action"] for e in events} >= {"session.delete", "session.deleted"}
    assert [e["detail"]["reason"] for e in events if e["action"] == "session.delete"] == [repo.IDLE_REASON]
    for s in (active, typed, ended):
        now = _row(s["id"])
        assert (now["state"], now["end_reason"]) == (before[s["id"]]["state"], before[s["id"]]["end_reason"]), s
    assert active["id"] in _held(active["host_id"]) and typed["id"] in _held(typed["host_id"])
    # idempotent: a second run finds nothing more to do
    again = maintenance.run("cleanup", TASKS["cleanup"])
    assert again["status"] == "skipped" or again["result"]["deleted"] == 0


def test_a_watched_session_is_not_idle_and_max_lifetime_ends_even_active_ones(stack: StackHandle) -> None:
    """A viewer attached (a WebSocket connection watching, no keystroke): its host reports the session active with
    each heartbeat. With a maximum lifetime set, a session older than it is deleted, active or not, saying why."""
    from websockets.sync.client import connect

    _, h = stack.new_user()
    watched, old, young = (stack.create_session(h, name="maint") for _ in range(3))
    # a real viewer: a WebSocket connection through the local WebSocket API (a viewer attached straight to the host
    # with a made-up connection id is dropped as soon as its first frame meets GoneException)
    ticket = stack.client.post("/ws/tickets", headers=h).json()["ticket"]
    with connect(f"{stack.stack.ws_url}?ticket={ticket}") as ws:
        ws.send(json.dumps({"action": "attach", "session_id": watched["id"], "read_only": True}))
        deadline = time.monotonic() + 10
        while json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))["type"] != "attached":
            pass
        _idle(watched["id"])  # idle but for the viewer: only the host's report can make it recent again
        wait_for(lambda: _row(watched["id"])["last_active_at"] > _row(old["id"])["last_active_at"]
                 - datetime.timedelta(minutes=5), timeout=10, what="the host reports the viewer")
    with connection() as conn:
        conn.execute("UPDATE sessions SET created_at = now() - interval '2 days' WHERE id = %s",
                     (uuid.UUID(old["id"]),))
    s = get_settings().model_copy(update={"session_max_lifetime_s": 86400})
    maintenance.cleanup(s)
    assert (_row(old["id"])["state"], _row(old["id"])["end_reason"]) == ("deleted", repo.LIFETIME_REASON)
    assert old["id"] not in _held(old["host_id"])
    assert _row(young["id"])["state"] == "active" and _row(watched["id"])["state"] == "active"


def test_reconcile_repairs_each_kind_of_drift(stack: StackHandle) -> None:
    _, h = stack.new_user()
    base = stack.create_session(h, name="maint")
    host_id, account = base["host_id"], _account(base["id"])
    client = host_client.HostClient(registry.host_url(host_id))
    # 1. a tmux session on a host with no row (a create whose record was lost)
    orphan = uuid.uuid4()
    client.create_session(orphan, account, 80, 24)
    assert str(orphan) in _held(host_id)
    # 2. a row active with no tmux session (killed behind the record's back), active for a while
    missing = stack.create_session(h, name="maint")
    host_client.HostClient(registry.host_url(missing["host_id"])).kill_session(uuid.UUID(missing["id"]))
    with connection() as conn:
        conn.execute("UPDATE sessions SET state_changed_at = now() - interval '1 minute' WHERE id = %s",
                     (uuid.UUID(missing["id"]),))
    # 3. a Redis entry of an ended session
    ended = stack.create_session(h, name="maint")
    assert stack.client.delete(f"/sessions/{ended['id']}", headers=h).status_code == 204
    cache.put_session(ended["id"], {"id": ended["id"], "state": "active"}, 0)
    assert ended["id"] in (cache.cached_session_ids() or [])
    # 4. a host that stopped heartbeating (nothing answers at its address) with a session on it
    ghost, ghost_sid = f"ghost-{uuid.uuid4().hex[:6]}", uuid.uuid4()
    with connection() as conn:
        conn.execute("INSERT INTO hosts (id, url, capacity, last_heartbeat, started_at) VALUES"
                     " (%s, 'http://127.0.0.1:9', 10, now() - interval '1 hour', now() - interval '2 hours')",
                     (ghost,))
        conn.execute("INSERT INTO sessions (id, owner_id, state, host_id, tmux_name, cols, rows)"
                     " SELECT %s, owner_id, 'active', %s, %s, 80, 24 FROM sessions WHERE id = %s",
                     (ghost_sid, ghost, "t" + ghost_sid.hex, uuid.UUID(base["id"])))

    out = maintenance.run("reconcile", TASKS["reconcile"])
    assert out["status"] in ("ok", "skipped")
    wait_for(lambda: str(orphan) not in _held(host_id), timeout=15, what="the orphan tmux session killed")
    lost = wait_for(lambda: (r := _row(missing["id"]))["state"] == "lost" and r, timeout=15,
                    what="the row without a tmux session ended")
    assert lost["end_reason"] == "its tmux host does not have it"
    wait_for(lambda: ended["id"] not in (cache.cached_session_ids() or []), timeout=15,
             what="the ended session's cache entry gone")
    assert wait_for(lambda: (r := _row(ghost_sid))["state"] == "lost" and r, timeout=15,
                    what="the dead host's session lost")["end_reason"] == "its tmux host stopped answering"
    assert _row(base["id"])["state"] == "active" and base["id"] in _held(host_id)  # the truth is left alone


def test_retention_deletes_exactly_what_is_past_age(stack: StackHandle) -> None:
    _, h = stack.new_user()
    owner = _row(stack.create_session(h, name="maint")["id"])["owner_id"]
    tag = uuid.uuid4().hex
    old_sid, young_sid = uuid.uuid4(), uuid.uuid4()
    with connection() as conn:
        conn.execute("INSERT INTO revoked_tokens (jti, user_id, expires_at) VALUES"
                     " (%s, %s, now() - interval '1 hour'), (%s, %s, now() + interval '1 hour')",
                     (f"old-{tag}", owner, f"young-{tag}", owner))
        conn.execute("INSERT INTO audit_events (at, action, status, detail) VALUES"
                     " (now() - interval '91 days', 'test.old', 'ok', %s),"
                     " (now() - interval '89 days', 'test.young', 'ok', %s)",
                     (json.dumps({"tag": tag}), json.dumps({"tag": tag})))
        for sid, days in ((old_sid, 31), (young_sid, 29)):
            conn.execute("INSERT INTO sessions (id, owner_id, state, tmux_name, cols, rows, created_at, ended_at,"
                         " end_reason) VALUES (%s, %s, 'deleted', %s, 80, 24, now() - make_interval(days => %s),"
                         " now() - make_interval(days => %s), 'test')", (sid, owner, "t" + sid.hex, days + 1, days))
        # a share of the old session: deleted with it (it refers to it)
        conn.execute("INSERT INTO ws_shares (id, session_id, created_by, token_hash, expires_at, created_at)"
                     " VALUES (%s, %s, %s, %s, now() - interval '30 days', now() - interval '31 days')",
                     (uuid.uuid4(), old_sid, owner, os.urandom(32)))

    out = maintenance.run("retention", TASKS["retention"])
    assert out["status"] == "ok", out
    assert out["result"]["revoked_tokens"] >= 1 and out["result"]["ended_sessions"] >= 1
    with connection() as conn:
        jtis = {r["jti"] for r in conn.execute("SELECT jti FROM revoked_tokens WHERE jti LIKE %s",
                                               (f"%-{tag}",)).fetchall()}
        actions = {r["action"] for r in conn.execute("SELECT action FROM audit_events WHERE detail->>'tag' = %s",
                                                     (tag,)).fetchall()}
        shares = conn.execute("SELECT count(*) AS n FROM ws_shares WHERE session_id = %s", (old_sid,)).fetchone()
    assert jtis == {f"young-{tag}"}
    assert actions == {"test.young"}
    assert repo.get_session(old_sid) is None and repo.get_session(young_sid) is not None
    assert shares is not None and shares["n"] == 0


def test_two_runs_at_once_one_works_and_the_other_is_skipped(stack: StackHandle) -> None:
    """The advisory lock: while a run of a task is under way, another run of it (any process) is recorded
    ``skipped`` and does nothing; a failed run is recorded ``failed`` with its error."""
    task = f"test-{uuid.uuid4().hex[:8]}"
    inside, release = threading.Event(), threading.Event()
    work: list[int] = []

    def slow(s: Any, conn: Any) -> dict[str, Any]:
        work.append(1)
        inside.set()
        assert release.wait(10)
        return {"done": len(work)}

    results: list[dict[str, Any]] = []
    t = threading.Thread(target=lambda: results.append(maintenance.run(task, slow)))
    t.start()
    assert inside.wait(10)
    second = maintenance.run(task, slow)  # meanwhile
    release.set()
    t.join(10)
    assert second == {"task": task, "status": "skipped", "result": {"reason": "already running"}}
    assert results == [{"task": task, "status": "ok", "result": {"done": 1}}]
    assert work == [1]
    runs = repo.maintenance_runs(task)
    assert sorted(r["status"] for r in runs) == ["ok", "skipped"]
    assert all(r["finished_at"] is not None for r in runs)
    # the lock goes with its run: the next run works
    assert maintenance.run(task, lambda s, conn: {"n": 1})["status"] == "ok"

    def broken(s: Any, conn: Any) -> dict[str, Any]:
        raise RuntimeError("disk on fire")

    try:
        maintenance.run(task, broken)
        raise AssertionError("a failing task raises")
    except RuntimeError:
        pass
    failed = repo.maintenance_runs(task, limit=1)[0]
    assert (failed["status"], failed["error"]) == ("failed", "RuntimeError: disk on fire")


def test_two_cleanups_at_once_delete_each_session_once(stack: StackHandle) -> None:
    _, h = stack.new_user()
    made = [stack.create_session(h, name="maint") for _ in range(6)]
    for s in made:
        _idle(s["id"])
    outs: list[dict[str, Any]] = []
    threads = [threading.Thread(target=lambda: outs.append(maintenance.run("cleanup", TASKS["cleanup"])))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(outs) == 2
    for s in made:
        wait_for(lambda s=s: _row(s["id"])["state"] == "deleted", timeout=15, what="idle session deleted")
        actions = [e["action"] for e in repo.audit_events(session_id=uuid.UUID(s["id"]))]
        assert actions.count("session.delete") == 1 and actions.count("session.deleted") == 1, actions


def test_schedules_and_the_local_scheduler(stack: StackHandle) -> None:
    assert rate_seconds("rate(1 minute)") == 60 and rate_seconds("rate(5 minutes)") == 300
    assert rate_seconds("rate(1 day)") == 86400 and rate_seconds("rate(2 hours)") == 7200
    for bad in ("rate(1 minutes)", "rate(5 minute)", "rate(0 minutes)", "cron(0 * * * ? *)", "rate(5 seconds)"):
        try:
            rate_seconds(bad)
            raise AssertionError(f"{bad} accepted")
        except ValueError:
            pass
    from local.scheduler import schedules

    got = {s.name: (s.interval_s, s.event) for s in schedules()}
    assert set(got) == set(SCHEDULES) & set(TASKS)
    for name, (interval, event) in got.items():
        assert event == {"task": name}
        if name != "reconcile":  # the tests' stacks run it every TMUXI_RECONCILE_INTERVAL_S
            assert interval == rate_seconds(SCHEDULES[name])
    for name in SCHEDULES:
        assert json.loads((ROOT / "events" / "schedule" / f"{name}.json").read_text()) == {"task": name}


def test_local_invoke_runs_a_task_from_its_event_file(stack: StackHandle) -> None:
    """`python -m local.invoke maintenance events/schedule/capacity.json`: the handler with the event, the
    result as JSON on the last line; its EMF metrics and its run record are there."""
    _, h = stack.new_user()
    stack.create_session(h, name="maint")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'layers'}"}
    for given in ("events/schedule/capacity.json", "schedule/health"):
        p = subprocess.run([sys.executable, "-m", "local.invoke", "maintenance", given], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        lines = p.stdout.strip().splitlines()
        result = json.loads(lines[-1])
        task = "capacity" if "capacity" in given else "health"
        assert (result["task"], result["status"]) == (task, "ok"), result
        emf = [json.loads(x) for x in lines[:-1] if '"_aws"' in x]
        names = {m["Name"] for doc in emf for d in doc["_aws"]["CloudWatchMetrics"] for m in d["Metrics"]}
        if task == "capacity":
            assert result["result"]["active_sessions"] >= 1 and len(result["result"]["hosts"]) == 2
            assert {"active_sessions", "actions_per_minute"} <= names
        else:
            assert result["result"]["postgres_up"] == 1 and result["result"]["hosts_up"] == 2
            assert {"postgres_up", "redis_up", "hosts_up"} <= names
        assert repo.maintenance_runs(task, limit=1)[0]["status"] == "ok"
    p = subprocess.run([sys.executable, "-m", "local.invoke", "maintenance", "schedule/nope"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "schedule/reconcile.json" in p.stderr
