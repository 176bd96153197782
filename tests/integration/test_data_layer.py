"""PostgreSQL repository and Redis cache against the real servers (no hosts needed)."""
from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
import redis as redis_lib

from tests.conftest import Deps
from tmuxi import auth, cache
from tmuxi.db import repo
from tmuxi.db.migrate import migrate
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
    repo.live_hosts(1)  # first use of the pool migrates
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
    repo.activate_session(row["id"], owner, "%1")
    assert repo.end_session(row["id"], owner, "deleted", "test") is not None
    assert repo.end_session(row["id"], owner, "deleted", "again") is None  # not live any more
    actions = [(e["action"], e["status"]) for e in reversed(repo.audit_events(session_id=row["id"]))]
    assert actions == [("session.create", "ok"), ("session.delete", "ok")]
    ended = repo.get_session(row["id"])
    assert ended is not None and ended["state"] == "deleted" and ended["ended_at"] is not None


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
    cached = cache.admit("user:conn-loss", "jti-loss", sid)
    assert isinstance(cached, cache.Admission) and cached.session == {"state": "active"}
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
