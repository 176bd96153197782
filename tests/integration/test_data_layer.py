"""PostgreSQL repository and Redis cache against the real servers (no hosts needed)."""
from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import redis as redis_lib

from tests.conftest import Deps
from tests.hosting import wait_for
from tmuxi import auth, cache
from tmuxi.db import repo
from tmuxi.db.migrate import migrate
from tmuxi.db.pool import connection
from tmuxi.errors import HostUnavailable, QuotaExceeded, Unauthorized
from tmuxi.models import Principal
from tmuxi.services import auth as auth_service


def _user(role: str = "user") -> uuid.UUID:
    return repo.create_user(f"u{uuid.uuid4().hex[:12]}", auth.hash_password("pw"), role)


_FAKE_HOSTS: list[str] = []


@pytest.fixture(autouse=True)
def _retire_fake_hosts() -> Any:
    """Fake hosts must not attract real sessions of later tests: age them out afterwards."""
    yield
    if _FAKE_HOSTS:
        from tmuxi.db.pool import connection

        with connection() as conn:
            conn.execute("UPDATE hosts SET last_heartbeat = 'epoch' WHERE id = ANY(%s)", (_FAKE_HOSTS,))
        _FAKE_HOSTS.clear()


def _host(host_id: str, capacity: int, age_s: float = 0) -> None:
    _FAKE_HOSTS.append(host_id)
    repo.upsert_host(host_id, f"http://127.0.0.1:1/{host_id}", capacity, 0, datetime.now(UTC))
    if age_s:
        from tmuxi.db.pool import connection

        with connection() as conn:
            conn.execute("UPDATE hosts SET last_heartbeat = now() - make_interval(secs => %s) WHERE id = %s",
                         (age_s, host_id))


def test_migrations_are_versioned_and_idempotent(deps: Deps) -> None:
    repo.host_counts(1, 1)  # the pool answers (the schema was migrated by the deps fixture)
    assert migrate(deps.database_url) == []
    from tmuxi.db.pool import connection

    with connection() as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
    from pathlib import Path

    import tmuxi.db

    files = sorted((Path(tmuxi.db.__file__).parent / "migrations").glob("[0-9][0-9][0-9][0-9]_*.sql"))
    assert [r["version"] for r in rows] == [int(f.name[:4]) for f in files] and len(files) >= 2


def test_quota_holds_under_concurrent_creates(deps: Deps) -> None:
    _host(f"qh-{uuid.uuid4().hex[:6]}", 1000)
    owner = _user()
    results: list[str] = []

    def create() -> None:
        try:
            repo.reserve_session(owner, None, 80, 24, quota=3, dead_after_s=30)
            results.append("ok")
        except QuotaExceeded:
            results.append("quota")

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["ok"] * 3 + ["quota"] * 5
    denied = [e for e in repo.audit_events(actor=owner) if e["status"] == "quota_exceeded"]
    assert len(denied) == 5


def test_placement_prefers_most_free_live_host(deps: Deps) -> None:
    tag = uuid.uuid4().hex[:6]
    _host(f"big-{tag}", 100000)
    _host(f"dead-{tag}", 10**7, age_s=600)  # more capacity but no heartbeat: never chosen
    owner = _user()
    row = repo.reserve_session(owner, "x", 80, 24, quota=5, dead_after_s=30)
    assert row["host_id"] == f"big-{tag}"
    assert row["state"] == "creating" and row["tmux_name"] == "t" + row["id"].hex


def test_no_live_host_is_a_clean_503(deps: Deps) -> None:
    owner = _user()
    with pytest.raises(HostUnavailable):
        repo.reserve_session(owner, None, 80, 24, quota=5, dead_after_s=0.000001)


def test_session_lifecycle_is_audited(deps: Deps) -> None:
    _host(f"lc-{uuid.uuid4().hex[:6]}", 1000)
    owner = _user()
    row = repo.reserve_session(owner, "n", 80, 24, quota=5, dead_after_s=30)
    assert repo.activate_session(row["id"], owner, "%1")["state"] == "active"  # type: ignore[index]
    assert repo.end_session(row["id"], owner, "deleted", "test") is None  # deleted only follows deleting
    assert repo.transition(row["id"], "deleting", owner, "by test")["state"] == "deleting"  # type: ignore[index]
    assert repo.activate_session(row["id"], owner, "%1") is None  # never back
    assert repo.end_session(row["id"], owner, "deleted", "by test") is not None
    assert repo.end_session(row["id"], owner, "deleted", "again") is None  # not live any more
    actions = [(e["action"], e["status"]) for e in reversed(repo.audit_events(session_id=row["id"]))]
    assert actions == [("session.create", "ok"), ("session.delete", "ok"), ("session.deleted", "ok")]
    ended = repo.get_session(row["id"])
    assert ended is not None and ended["state"] == "deleted" and ended["ended_at"] is not None
    assert ended["end_reason"] == "by test"


def test_the_database_refuses_transitions_the_state_machine_does_not_have(deps: Deps) -> None:
    """Enforced where the data lives: whatever updates the row, a session moves only along the machine's edges
    (migration 0006)."""
    _host(f"sm-{uuid.uuid4().hex[:6]}", 1000)
    owner = _user()
    row = repo.reserve_session(owner, None, 80, 24, quota=5, dead_after_s=30)
    sid = row["id"]
    with connection() as conn:
        with pytest.raises(psycopg.errors.CheckViolation, match="cannot go from creating to deleted"):
            conn.execute("UPDATE sessions SET state = 'deleted' WHERE id = %s", (sid,))  # not through deleting
        assert repo.end_session(sid, None, "exited", "its shell exited") is not None
        for later in ("active", "lost", "deleting"):  # an ended session stays ended
            with pytest.raises(psycopg.errors.CheckViolation, match="cannot go from exited"):
                conn.execute("UPDATE sessions SET state = %s WHERE id = %s", (later, sid))


def _redis(deps: Deps) -> redis_lib.Redis:
    return redis_lib.Redis.from_url(deps.redis.url, decode_responses=True)


def _wait_redis_up() -> None:
    deadline = time.monotonic() + 5
    while not cache.available():
        assert time.monotonic() < deadline, "redis did not come back"
        time.sleep(0.05)


def test_cache_generation_drops_entries_a_missed_invalidation_left_stale(deps: Deps) -> None:
    sid = str(uuid.uuid4())
    first = cache.admit("user:gen-test", "jti-gen", sid)
    assert isinstance(first, cache.Admission) and first.session is None
    cache.put_session(sid, {"state": "active"}, first.gen)
    cached = cache.admit("user:gen-test", "jti-gen", sid)
    assert isinstance(cached, cache.Admission) and cached.session == {"state": "active"}
    # Redis stops answering this process while the session is deleted: the invalidation is missed.
    _redis(deps).execute_command("CLIENT", "PAUSE", "600", "ALL")
    cache.invalidate_session(sid)
    time.sleep(0.7)  # pause over, retry window over
    got = cache.admit("user:gen-test", "jti-gen", sid)
    assert isinstance(got, cache.Admission) and got.session is None, "stale entry served after a missed invalidation"


def _principal(uid: uuid.UUID) -> tuple[str, Principal]:
    token, _ = auth.issue_token(uid, "someone", "user")
    return token, auth_service.authorize(token)


def test_revocation_holds_while_redis_is_down_and_after_it_restarts(deps: Deps) -> None:
    uid = _user()
    token, p = _principal(uid)
    auth_service.revoke(p)
    with pytest.raises(Unauthorized):
        auth_service.authorize(token)
    deps.redis.stop()
    try:
        t0 = time.monotonic()
        with pytest.raises(Unauthorized):
            auth_service.authorize(token)  # answered by PostgreSQL
        other, _ = _principal(uid)  # a valid token still works with Redis down
        assert auth_service.authorize(other).user_id == uid
        assert time.monotonic() - t0 < 2, "Redis down must not make auth hang"
    finally:
        deps.redis.start()  # same port, empty: the revocation list is gone from Redis
    _wait_redis_up()
    with pytest.raises(Unauthorized):
        auth_service.authorize(token)
    assert cache.is_revoked(p.jti) is True  # re-warmed from PostgreSQL


def test_revocation_that_missed_redis_is_still_refused_when_redis_answers_again(deps: Deps) -> None:
    """Redis (not restarted, its revocation list still marked loaded) misses a revocation: the token must not
    work once Redis answers again."""
    _wait_redis_up()
    uid = _user()
    token, p = _principal(uid)
    auth_service.admit(p)  # this process has the token's entry in memory: "not revoked"
    _redis(deps).set("revocations:loaded", "1")
    _redis(deps).execute_command("CLIENT", "PAUSE", "600", "ALL")
    auth_service.revoke(p)  # PostgreSQL records it; the Redis write times out
    time.sleep(0.7)  # pause over, retry window over
    with pytest.raises(Unauthorized):
        auth_service.admit(p)
    with pytest.raises(Unauthorized):
        auth_service.authorize(token)


def _rate_key(key: str) -> str:
    return f"rl:{key}:{int(time.time()) // 60}"


def test_rate_limit_counts_here_and_reaches_redis_within_the_sync_interval(deps: Deps) -> None:
    key = f"user:{uuid.uuid4()}"
    counts = [a.count for a in (cache.admit(key, "j", None) for _ in range(3)) if isinstance(a, cache.Admission)]
    assert counts == [1, 2, 3]
    time.sleep(cache.RATE_SYNC_S)
    assert isinstance(cache.admit(key, "j", None), cache.Admission)  # due for a sync: it carries all four
    assert int(_redis(deps).get(_rate_key(key)) or 0) == 4


def test_rate_limit_is_exact_near_the_limit_across_processes(deps: Deps) -> None:
    """Two trackers stand for two processes (two Lambda environments): near the limit every request is
    counted in Redis, so together they admit exactly ``limit`` requests."""
    key, limit = f"user:{uuid.uuid4()}", 3 * cache.RATE_SYNC_REQUESTS
    client = cache._gate.client()
    assert client is not None
    a, b = cache.Tracker(), cache.Tracker()
    admitted = 0
    try:
        for i in range(2 * limit):
            count, _ = (a if i % 2 else b).admit(client, _rate_key(key), 60, limit, ["k"])
            admitted += count <= limit
    finally:
        a.drop()
        b.drop()
    assert admitted == limit
    assert int(_redis(deps).get(_rate_key(key)) or 0) >= limit


def test_tracker_sees_changes_written_by_other_processes(deps: Deps) -> None:
    """What a tracker holds in memory is invalidated by Redis as soon as anyone changes it."""
    client = cache._gate.client()
    assert client is not None
    other = cache.Tracker()  # another process's view
    sid, jti = str(uuid.uuid4()), uuid.uuid4().hex
    keys = [f"revoked:{jti}", f"session:{sid}"]
    rk = _rate_key("user:tracked")
    try:
        assert other.admit(client, rk, 60, 10**6, keys)[1] == [None, None]
        cache.put_session(sid, {"state": "active"}, 0)
        cache.mark_revoked(jti, 60)
        revoked, entry = other.admit(client, rk, 60, 10**6, keys)[1]
        assert revoked == "1" and entry is not None and '"active"' in entry
        cache.invalidate_session(sid)  # e.g. a delete served by this process
        assert other.admit(client, rk, 60, 10**6, keys)[1][1] is None
    finally:
        other.drop()


@pytest.mark.parametrize("victim", ["invalidation connection", "tracked connection"])
def test_tracker_serves_nothing_stale_after_a_connection_is_closed(deps: Deps, victim: str) -> None:
    """Once either connection is gone Redis no longer tells this process about changes: what it remembers
    must not be served."""
    sid = str(uuid.uuid4())
    first = cache.admit("user:conn-loss", "jti-loss", sid)
    assert isinstance(first, cache.Admission)
    cache.put_session(sid, {"state": "active"}, first.gen)
    # a fill after a miss is not flushed (put_session): this process's memory learns of it when Redis's
    # announcement arrives, a moment later
    wait_for(lambda: (c := cache.admit("user:conn-loss", "jti-loss", sid)) and isinstance(c, cache.Admission)
             and c.session == {"state": "active"}, timeout=5, what="the entry served from memory")
    r = _redis(deps)
    if victim == "invalidation connection":
        r.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    else:
        tracked = [c["id"] for c in r.client_list() if "t" in c["flags"]]
        assert tracked
        for cid in tracked:
            r.execute_command("CLIENT", "KILL", "ID", cid)
    r.delete(f"session:{sid}")  # a change Redis can no longer announce to this process
    again = cache.admit("user:conn-loss", "jti-loss", sid)
    assert isinstance(again, cache.Admission) and again.session is None


def test_rate_limit_falls_back_per_process_when_redis_is_down(deps: Deps) -> None:
    key = f"user:{uuid.uuid4()}"
    _, p = _principal(_user())
    deps.redis.stop()
    try:
        assert cache.admit(key, "j", None) is cache.DOWN
        local = [cache.local_rate_count(f"user:{p.user_id}") for _ in range(3)]
        assert local == [1, 2, 3]
        assert auth_service.admit(p) is None  # still admitted (count 4 of 1200), answered without Redis
    finally:
        deps.redis.start()
    _wait_redis_up()


# --- listing sessions: keyset pages -------------------------------------------------------------------------
_MANY = 2500
# as in a system that has run a while: most sessions ended; of every 50, 10 live (one still being created)
_STATES = ["creating"] + ["active"] * 9 + ["lost", "failed"] + ["exited"] * 3 + ["deleted"] * 35


@pytest.fixture(scope="module")
def many_sessions(deps: Deps) -> Iterator[tuple[uuid.UUID, uuid.UUID]]:
    """(owner, other): 2,500 sessions each in every state, created in the same stretch of time, eight at a time
    at the same instant (four of each: their ids order them). Removed afterwards."""
    from tmuxi.db.pool import connection

    owner, other = _user(), _user()
    with connection() as conn:
        conn.execute(
            "INSERT INTO sessions (id, owner_id, state, tmux_name, cols, rows, created_at)"
            " SELECT gen_random_uuid(), o, (%(states)s::text[])[1 + i %% 50], 'tlist', 80, 24,"
            "  now() - (i / 4) * interval '1 millisecond'"
            " FROM unnest(%(owners)s::uuid[]) AS o, generate_series(0, %(n)s - 1) AS i",
            {"owners": [owner, other], "states": _STATES, "n": _MANY},
        )
        conn.execute("ANALYZE sessions")
    try:
        yield owner, other
    finally:
        with connection() as conn:
            conn.execute("DELETE FROM sessions WHERE owner_id = ANY(%s)", ([owner, other],))


def _sessions_of(owner: uuid.UUID | None) -> list[dict[str, Any]]:
    """Every session of ``owner`` (everyone's: None), newest first, ordered here rather than by PostgreSQL."""
    from tmuxi.db.pool import connection

    with connection() as conn:
        rows = conn.execute("SELECT id, state, created_at FROM sessions WHERE %(o)s::uuid IS NULL OR owner_id = %(o)s",
                            {"o": owner}).fetchall()
    return sorted(rows, key=lambda r: (r["created_at"], r["id"]), reverse=True)


def _walk_pages(p: Principal, state: str, limit: int) -> list[list[uuid.UUID]]:
    """Every page of the service's listing, following next_cursor (decoded as the route decodes it)."""
    from tmuxi.pagination import decode_cursor
    from tmuxi.services import sessions as sessions_service

    pages: list[list[uuid.UUID]] = []
    after = None
    while True:
        page = sessions_service.list_sessions(p, state, limit, after)
        pages.append([s.id for s in page.sessions])
        if page.next_cursor is None:
            return pages
        assert len(pages) <= _MANY, "the cursor does not advance"
        after = decode_cursor(page.next_cursor)


def test_list_cursor_reaches_every_session_exactly_once_in_order(
        many_sessions: tuple[uuid.UUID, uuid.UUID]) -> None:
    owner, other = many_sessions
    _, p = _principal(owner)
    mine = _sessions_of(owner)
    assert len(mine) == _MANY
    for state, limit in [("all", 97), ("all", 1000), ("live", 100), ("lost", 33), ("creating", 1000)]:
        want = [r["id"] for r in mine if state == "all" or r["state"] == state
                or (state == "live" and r["state"] in repo.LIVE_STATES)]
        pages = _walk_pages(p, state, limit)
        assert [i for page in pages for i in page] == want, state  # each exactly once, newest first
        assert all(len(page) == limit for page in pages[:-1]) and 1 <= len(pages[-1]) <= limit
        assert len(pages) == -(-len(want) // limit)
    # the other owner's sessions, made at the same instants, are in none of these pages, and the other way round
    theirs = _sessions_of(other)
    assert len(theirs) == _MANY and not {r["id"] for r in theirs} & {i for pg in _walk_pages(p, "all", 500) for i in pg}
    _, q = _principal(other)
    assert [i for pg in _walk_pages(q, "live", 50) for i in pg] == [r["id"] for r in theirs
                                                                     if r["state"] in repo.LIVE_STATES]


def test_admin_list_pages_through_everyones_sessions(many_sessions: tuple[uuid.UUID, uuid.UUID]) -> None:
    admin = _user("admin")
    token, _ = auth.issue_token(admin, "an-admin", "admin")
    p = auth_service.authorize(token)
    everyone = _sessions_of(None)
    assert len(everyone) >= 2 * _MANY
    walked = [i for page in _walk_pages(p, "all", 1000) for i in page]
    assert walked == [r["id"] for r in everyone]
    live = [i for page in _walk_pages(p, "live", 250) for i in page]
    assert live == [r["id"] for r in everyone if r["state"] in repo.LIVE_STATES]


def _plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _plan_nodes(child)


# the index each filter's first page is read from: the one made for it
_FIRST_PAGE_INDEX = {
    ("owner", "all"): {"sessions_owner_created"}, ("admin", "all"): {"sessions_created"},
    ("owner", "live"): {"sessions_owner_live_created"}, ("admin", "live"): {"sessions_live_created"},
    ("owner", "lost"): {"sessions_owner_state_created"}, ("admin", "lost"): {"sessions_state_created"},
    # (nine in ten live sessions are active: the live index, filtered, serves as well)
    ("owner", "active"): {"sessions_owner_state_created", "sessions_owner_live_created"},
    ("admin", "active"): {"sessions_state_created", "sessions_live_created"},
    ("owner", "deleted"): {"sessions_owner_state_created", "sessions_owner_created"},
    ("admin", "deleted"): {"sessions_state_created", "sessions_created"},
}


@pytest.mark.parametrize(("whose", "state"), sorted(_FIRST_PAGE_INDEX))
def test_list_query_reads_one_page_from_an_index(many_sessions: tuple[uuid.UUID, uuid.UUID], whose: str,
                                                 state: str) -> None:
    """EXPLAIN ANALYZE of each shape of the listing: the first page is an ordered scan of the index made for its
    filter, stopping after the page and one more row (no sort, no sequential scan); a page further on reads
    no more than that, however many rows come before it."""
    from tmuxi.db.pool import connection

    owner, _ = many_sessions
    who = owner if whose == "owner" else None
    rows = [r for r in _sessions_of(who) if state == "all" or r["state"] == state
            or (state == "live" and r["state"] in repo.LIVE_STATES)]
    assert len(rows) >= 50
    for at in (None, len(rows) // 4, len(rows) // 2):
        after = None if at is None else (rows[at]["created_at"], rows[at]["id"])
        sql, params = repo.list_sessions_query(who, state, 10, after)
        with connection() as conn:
            plan = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params).fetchone()
        assert plan is not None
        nodes = list(_plan_nodes(plan["QUERY PLAN"][0]["Plan"]))
        kinds = [n["Node Type"] for n in nodes]
        scans = [n for n in nodes if "Index" in n["Node Type"] and "Index Name" in n]
        assert "Seq Scan" not in kinds and len(scans) == 1, (at, kinds)
        if at is None:
            assert "Sort" not in kinds and scans[0]["Node Type"] in ("Index Scan", "Index Only Scan"), kinds
            assert scans[0]["Index Name"] in _FIRST_PAGE_INDEX[whose, state], scans[0]["Index Name"]
        # at most twice the page (10 and one more), or, where little is left after the cursor and the planner
        # reads it all and sorts it, what is left: never the rows before the cursor
        read = scans[0]["Actual Rows"] + scans[0].get("Rows Removed by Filter", 0)
        left = len(rows) - (at or 0)
        assert read <= 2 * 11 or read <= min(left, 100), (at, scans[0]["Index Name"], read, scans[0].get("Filter"))


def test_list_last_page_costs_what_the_first_does(many_sessions: tuple[uuid.UUID, uuid.UUID]) -> None:
    owner, _ = many_sessions
    mine = _sessions_of(owner)
    near_end = (mine[-150]["created_at"], mine[-150]["id"])

    def best_of(after: tuple[Any, uuid.UUID] | None) -> float:
        times = []
        for _ in range(15):
            t0 = time.perf_counter()
            rows, more = repo.list_sessions(owner, "all", 100, after)
            times.append(time.perf_counter() - t0)
            assert len(rows) == 100 and more
        return min(times)

    best_of(None)  # warm the pool and the plan cache
    first, late = best_of(None), best_of(near_end)
    assert late < first * 3 + 0.002, (first, late)  # an offset would read 2,350 rows to skip them: ~20x


def test_placement_reads_each_live_hosts_own_sessions_not_the_table(deps: Deps) -> None:
    """Placement counts a host's sessions on the (host_id, state) index: with 2,000 live and 20,000 ended
    sessions, the plan reads the live ones of the live hosts and nothing else (no sequential scan)."""
    from tmuxi.db.pool import connection

    tag = uuid.uuid4().hex[:6]
    live_host, dead_host = f"pl-{tag}", f"pd-{tag}"
    _host(live_host, 100000)
    _host(dead_host, 100000, age_s=3600)
    owner = _user()
    with connection() as conn:
        conn.execute(
            "INSERT INTO sessions (id, owner_id, state, host_id, tmux_name, cols, rows)"
            " SELECT gen_random_uuid(), %(o)s, CASE WHEN i < %(live)s THEN 'active' ELSE 'deleted' END,"
            "  CASE WHEN i %% 2 = 0 THEN %(a)s ELSE %(b)s END, 'tpl', 80, 24 FROM generate_series(0, %(n)s - 1) i",
            {"o": owner, "live": 2000, "n": 22000, "a": live_host, "b": dead_host},
        )
        conn.execute("ANALYZE sessions")
        try:
            plan = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + repo.PLACEMENT_SQL,
                                (30, [h for h in _all_host_ids(conn) if h != live_host])).fetchone()
            assert plan is not None
            nodes = list(_plan_nodes(plan["QUERY PLAN"][0]["Plan"]))
            on_sessions = [n for n in nodes if n.get("Relation Name") == "sessions"]
            assert on_sessions and all(n["Node Type"] in ("Index Only Scan", "Index Scan", "Bitmap Heap Scan")
                                       for n in on_sessions), [n["Node Type"] for n in on_sessions]
            read = sum(n["Actual Rows"] * n.get("Actual Loops", 1) for n in on_sessions)
            assert read <= 1000 + 10, read  # the live host's 1,000 live sessions, not 22,000 rows
            row = conn.execute(repo.PLACEMENT_SQL, (30, [])).fetchone()
            assert row is not None and row["id"] == live_host and row["free"] == 100000 - 1000
        finally:
            conn.execute("DELETE FROM sessions WHERE owner_id = %s", (owner,))


def _all_host_ids(conn: Any) -> list[str]:
    return [r["id"] for r in conn.execute("SELECT id FROM hosts").fetchall()]
