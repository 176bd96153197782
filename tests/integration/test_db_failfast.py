"""PostgreSQL outages fail fast (issue 8, part 3) and migrations are a step of their own (part 5), against a real
PostgreSQL of this module's own (an embedded one, paused with SIGSTOP or killed and restarted: the shared one is
never disturbed) and the shared redis-server. Requests go through the local gateway in this process, with the
real API and authorizer handlers: a "data" route runs inline in the gateway's one server thread, as one Lambda
execution environment serves one request at a time, so a request held by the database holds up every request
behind it -- which is what fail-fast is for."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
import pytest

from local.gateway import BackgroundGateway
from local.services import EmbeddedPostgres, new_password
from tests.conftest import Deps, reset_process_state
from tmuxi import auth
from tmuxi.db import pool, repo
from tmuxi.db.breaker import BreakerOpen, CircuitBreaker
from tmuxi.db.migrate import SchemaBehind, latest_version, migrate
from tmuxi.errors import DependencyUnavailable
from tmuxi.settings import get_settings

ROOT = Path(__file__).resolve().parents[2]
# settings of this module (restored after it): the user's cached state is fresh for 1 s only, so the outages below
# outlast it (cached reads go on with the state PostgreSQL last gave, cache.USER_STATE_KEEP_S), and the loops
# below must not meet the rate limit
MODULE_ENV = {"TMUXI_USER_STATE_TTL_S": "1", "TMUXI_RATE_LIMIT_PER_MINUTE": "1000000"}
# Requests refused while the database is down, and reads the cache answers meanwhile: median under 100 ms (issue 8:
# "answer 503 within 100 ms"), 95th percentile under 300 ms (probes included: each waits up to 100 ms for a
# connection), and none near a database wait (db_timeout_s 1 s, the client bound 2.5 s) on a busy 2-core machine
FAST_MS, FAST_P95_MS, FAST_MAX_MS = 100, 300, 900


@dataclass
class OwnPostgres:
    server: EmbeddedPostgres
    url: str
    pgdata: Path

    def pids(self) -> list[int]:
        """The postmaster and every process it started (backends, checkpointer, ...)."""
        master = int((self.pgdata / "postmaster.pid").read_text().split()[0])
        out = [master]
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    if int(stat.rsplit(")", 1)[1].split()[1]) == master:
                        out.append(int(entry))
        return out

    def signal_all(self, sig: int) -> list[int]:
        """``sig`` to the postmaster first (it starts nothing more once stopped or dead), then to its children as
        they are then; one that exited meanwhile (a backend, an autovacuum worker) is skipped."""
        master, *before = self.pids()  # a killed postmaster's children are not its children any more
        os.kill(master, sig)
        children = sorted(set(before) | set(self.pids()[1:]))
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return [master, *children]

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.signal_all(signal.SIGSTOP)
        try:
            yield
        finally:
            self.signal_all(signal.SIGCONT)

    def kill(self) -> None:
        pids = self.signal_all(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in pids):  # reaped: a restart takes a live pid for a server
            assert time.monotonic() < deadline, "postgres did not die"
            time.sleep(0.01)

    def restart(self) -> None:
        self.url = self.server.start()

    def running(self) -> bool:
        try:
            return Path(f"/proc/{self.pids()[0]}").exists()
        except (OSError, ValueError, IndexError):
            return False


@pytest.fixture(scope="module")
def db(deps: Deps) -> Iterator[OwnPostgres]:
    # not under deps.base: the wheel opens every parent of a data dir it starts (test_local_postgres checks it)
    base = Path(tempfile.mkdtemp(prefix="tmuxi-failfast-", dir="/tmp"))
    base.chmod(0o711)
    server = EmbeddedPostgres(base / "pg", password=new_password())
    url = server.start()
    # the settings' own db_* defaults (the stack fixture, if it ran, left the pool size it gives its processes)
    db_vars = [k for k in os.environ if k.startswith("TMUXI_DB_")]
    saved = {k: os.environ.get(k) for k in [*MODULE_ENV, "TMUXI_DATABASE_URL", *db_vars]}
    for k in db_vars:
        del os.environ[k]
    os.environ.update(MODULE_ENV)
    os.environ["TMUXI_DATABASE_URL"] = url
    reset_process_state()
    own = OwnPostgres(server, url, server.data_dir.resolve())
    try:
        yield own
    finally:
        with contextlib.suppress(Exception):  # a test that failed half-way may have left it stopped
            own.signal_all(signal.SIGCONT)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_process_state()
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(autouse=True)
def _fresh_pool(db: OwnPostgres) -> Iterator[None]:
    """Each test starts with a new pool and a closed breaker, and leaves the server running (resumed, or
    restarted if it failed while the server was killed)."""
    pool.close_pool()
    yield
    if db.running():
        db.signal_all(signal.SIGCONT)
    else:
        db.restart()
    pool.close_pool()


@dataclass
class Api:
    client: httpx.Client
    headers: dict[str, str]
    session_id: str

    def get(self, path: str, timeout: float = 10.0) -> tuple[httpx.Response | None, float]:
        """(the response, or None if it did not come within ``timeout``; milliseconds taken)."""
        t0 = time.perf_counter()
        try:
            r: httpx.Response | None = self.client.get(path, headers=self.headers, timeout=timeout)
        except httpx.TimeoutException:
            r = None
        return r, (time.perf_counter() - t0) * 1000


@pytest.fixture(scope="module")
def api(db: OwnPostgres) -> Iterator[Api]:
    """The local gateway (real handlers, in this process), a user with a token, and one active session of
    theirs on a host row that heartbeats (no tmux needed: only the record is read)."""
    name = f"ff{uuid.uuid4().hex[:10]}"
    user_id = repo.create_user(name, auth.hash_password("pw-" + name), "user")
    host_id = f"ff-{uuid.uuid4().hex[:6]}"
    repo.upsert_host(host_id, f"http://127.0.0.1:1/{host_id}", 100, 0, datetime.now(UTC))
    row = repo.reserve_session(user_id, "ff", 80, 24, quota=5, dead_after_s=60)
    assert repo.activate_session(row["id"], user_id, "%1") is not None
    with BackgroundGateway() as gw, httpx.Client(base_url=gw.url, timeout=10) as client:
        r = client.post("/auth/token", json={"username": name, "password": "pw-" + name})
        assert r.status_code == 200, r.text
        yield Api(client, {"authorization": f"Bearer {r.json()['access_token']}"}, str(row["id"]))


def _warm(api: Api) -> None:
    """PostgreSQL up: the session's and the user's cache entries are in Redis, and the pool holds a connection."""
    for path in (f"/sessions/{api.session_id}", "/sessions", f"/sessions/{api.session_id}"):
        r, _ = api.get(path)
        assert r is not None and r.status_code == 200, r and r.text


def _discover_outage(api: Api) -> float:
    """The first request that meets the outage: 503, within the client bound on a use of a connection (the
    statement timeout + 0.5 s; pool.py says what each case costs). Returns its milliseconds."""
    s = get_settings()
    bound_ms = (s.db_statement_timeout_s + pool.CLIENT_MARGIN_S) * 1000
    r, ms = api.get("/sessions", timeout=bound_ms / 1000 + 3)
    assert r is not None, "the request was still waiting on the paused database"
    assert r.status_code == 503 and r.json()["error"]["code"] == "dependency_unavailable", r.text
    assert ms < bound_ms + 1000, ms
    return ms


def _fast_503s(api: Api, n: int, gap_s: float) -> list[float]:
    times = []
    for _ in range(n):
        r, ms = api.get("/sessions", timeout=3)
        assert r is not None and r.status_code == 503, r and r.text
        assert int(r.headers["retry-after"]) >= 1
        times.append(ms)
        time.sleep(gap_s)
    return times


def _assert_fast(times: list[float], what: str) -> None:
    ordered = sorted(times)
    median, p95 = statistics.median(ordered), ordered[int(0.95 * (len(ordered) - 1))]
    assert median < FAST_MS and p95 < FAST_P95_MS and ordered[-1] < FAST_MAX_MS, (
        f"{what}: median {median:.1f} ms, p95 {p95:.1f} ms, max {ordered[-1]:.1f} ms (n={len(ordered)})")


def test_requests_that_need_a_paused_database_answer_503_within_100_ms(db: OwnPostgres, api: Api) -> None:
    """The first request pays the client bound once; then every request is refused at once, with Retry-After,
    probes (one a second, each waiting at most 0.1 s for a connection) included; /health answers at once with
    postgres "down"."""
    _warm(api)
    with db.paused():
        _discover_outage(api)
        assert pool.breaker().state == "open"
        _assert_fast(_fast_503s(api, n=25, gap_s=0.05), "GET /sessions while paused")  # ~1.5 s: probes too
        health_ms, body = [], {}
        for _ in range(40):  # /health reads PostgreSQL at most once a second: until it has
            r, ms = api.get("/health", timeout=3)
            assert r is not None and r.status_code == 200
            health_ms.append(ms)
            body = r.json()
            if body["checks"]["postgres"] == "down":
                break
            time.sleep(0.05)
        assert body["checks"]["postgres"] == "down" and body["status"] == "down", body
        _assert_fast(health_ms, "GET /health while paused")


def test_cached_reads_are_not_delayed_by_a_paused_database(db: OwnPostgres, api: Api) -> None:
    """While requests that need PostgreSQL keep coming (each refused at once), reads the cache answers keep
    being answered at once, although they queue behind them in the gateway's one inline thread (a Lambda
    environment's one request at a time)."""
    _warm(api)
    with db.paused():
        _discover_outage(api)
        stop = time.monotonic() + 2.5  # two probes or three
        needing: list[tuple[int | None, float]] = []
        cached: list[tuple[int | None, float]] = []

        def loop(path: str, out: list[tuple[int | None, float]]) -> None:
            while time.monotonic() < stop:
                r, ms = api.get(path, timeout=3)
                out.append((r.status_code if r is not None else None, ms))

        threads = [threading.Thread(target=loop, args=("/sessions", needing)),
                   threading.Thread(target=loop, args=(f"/sessions/{api.session_id}", cached))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
    assert {code for code, _ in needing} == {503}, needing[:5]
    assert {code for code, _ in cached} == {200}, cached[:5]
    assert len(cached) >= 50, len(cached)
    _assert_fast([ms for _, ms in cached], "cached GET /sessions/{id} while paused")
    _assert_fast([ms for _, ms in needing], "GET /sessions while paused")


def _recovers(api: Api) -> float:
    """Seconds from now to the first 200 of a request that needs PostgreSQL; then 20 more succeed too."""
    t0 = time.monotonic()
    while True:
        r, _ = api.get("/sessions", timeout=5)
        assert r is not None
        if r.status_code == 200:
            break
        assert r.status_code == 503 and time.monotonic() - t0 < 5, r.text
        time.sleep(0.02)
    took = time.monotonic() - t0
    for _ in range(20):
        r, _ = api.get("/sessions", timeout=5)
        assert r is not None and r.status_code == 200, r and r.text
    return took


def test_the_first_requests_after_a_pause_succeed(db: OwnPostgres, api: Api) -> None:
    _warm(api)
    with db.paused():
        _discover_outage(api)
    # the next probe (at most db_retry_s after the last) closes the breaker; nothing stale answers after it
    assert _recovers(api) < get_settings().db_retry_s + 0.5
    assert pool.breaker().state == "closed"


def test_the_first_requests_after_a_restart_succeed(db: OwnPostgres, api: Api) -> None:
    """Killed: the pooled connection is reset, so the outage is known at once (503 in milliseconds, and the next
    request probes); restarted: requests succeed again within the probe interval, on new connections."""
    _warm(api)
    db.kill()
    r, ms = api.get("/sessions", timeout=5)
    assert r is not None and r.status_code == 503 and ms < FAST_MAX_MS, (r and r.text, ms)
    _assert_fast(_fast_503s(api, n=10, gap_s=0.05), "GET /sessions while killed")
    db.restart()
    assert _recovers(api) < get_settings().db_retry_s + 0.5


def test_a_restart_no_request_saw_costs_no_request(db: OwnPostgres, api: Api) -> None:
    """PostgreSQL restarted while this process was idle (as a Lambda environment frozen meanwhile): its pooled
    connection is dead, found so by the check before use, and replaced; the request succeeds."""
    _warm(api)
    db.kill()
    db.restart()
    time.sleep(max(0.0, get_settings().db_check_idle_s + 0.2))
    r, _ = api.get("/sessions")
    assert r is not None and r.status_code == 200, r and r.text


def test_a_pooled_connection_that_died_while_idle_is_replaced(db: OwnPostgres) -> None:
    """A thawed Lambda environment: its connection was ended meanwhile (here by the server, as an idle timeout
    or a failover would) -- the next use is checked, finds it dead, and gets a new one."""
    with pool.connection() as conn:
        pid = conn.execute("SELECT pg_backend_pid() AS pid").fetchone()
    with psycopg.connect(db.url, autocommit=True) as admin:
        assert pid is not None
        admin.execute("SELECT pg_terminate_backend(%s)", (pid["pid"],))
    time.sleep(get_settings().db_check_idle_s + 0.2)
    with pool.connection() as conn:
        assert conn.execute("SELECT pg_backend_pid() AS pid").fetchone() != pid
    assert pool.breaker().state == "closed"


def test_one_probe_at_a_time_the_others_are_refused_at_once(db: OwnPostgres) -> None:
    """Once the retry time has come, of eight concurrent requests one probes (and waits at most
    db_probe_timeout_s) and seven are refused without touching the pool."""
    s = get_settings()
    with pool.connection() as conn:
        conn.execute("SELECT 1")
    with db.paused():
        discovered: list[BaseException] = []

        def discover() -> None:
            try:
                with pool.connection() as conn:
                    conn.execute("SELECT 1")
            except DependencyUnavailable as exc:
                discovered.append(exc)

        t = threading.Thread(target=discover, daemon=True)
        t.start()
        t.join(timeout=s.db_statement_timeout_s + pool.CLIENT_MARGIN_S + 3)
        assert discovered, "still waiting on the paused database"
        time.sleep(s.db_retry_s + 0.05)
        barrier = threading.Barrier(8)
        results: list[tuple[float, DependencyUnavailable | None]] = []

        def one() -> None:
            barrier.wait()
            t0 = time.perf_counter()
            try:
                with pool.connection() as c:
                    c.execute("SELECT 1")
                results.append((time.perf_counter() - t0, None))
            except DependencyUnavailable as exc:
                results.append((time.perf_counter() - t0, exc))

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
    refusals = [exc for _, exc in results if exc is not None]
    assert len(refusals) == 8
    # the probe alone asked the pool (and timed out); the others were refused by the breaker, asking nothing
    causes = sorted(type(exc.__cause__).__name__ for exc in refusals)
    assert causes == ["NoneType"] * 7 + ["PoolTimeout"], causes
    times = sorted(t for t, _ in results)
    assert times[-1] < s.db_probe_timeout_s + 0.2, times  # the probe: its wait, a little more
    assert times[-2] < FAST_P95_MS / 1000, times  # the others: at once (a busy machine's scheduling aside)
    assert all(exc.details["retry_after_s"] > 0 for exc in refusals)


def test_statement_timeout_cancels_a_slow_statement_and_the_breaker_stays_closed(db: OwnPostgres) -> None:
    s = get_settings()
    with pool.connection() as conn:
        row = conn.execute("SHOW statement_timeout").fetchone()
        assert row == {"statement_timeout": f"{s.db_statement_timeout_s:g}s"}
    t0 = time.monotonic()
    with pytest.raises(DependencyUnavailable) as exc, pool.connection() as conn:
        conn.execute("SELECT pg_sleep(%s)", (s.db_statement_timeout_s + 1,))
    assert isinstance(exc.value.__cause__, psycopg.errors.QueryCanceled)
    assert time.monotonic() - t0 < s.db_statement_timeout_s + pool.CLIENT_MARGIN_S
    assert pool.breaker().state == "closed"  # the server answered: it is up
    with pool.connection() as conn:
        assert conn.execute("SELECT 1 AS one").fetchone() == {"one": 1}


def test_the_pool_is_sized_for_one_request_at_a_time(db: OwnPostgres) -> None:
    """Lambda: nothing connects before the first request (a cold start, a SnapStart snapshot), and requests one
    after another use one connection."""
    p = pool.get_pool()
    assert p.get_stats()["pool_size"] == 0
    for _ in range(20):
        repo.host_counts(60, 600)
    assert p.get_stats()["pool_size"] == 1
    assert (p.min_size, p.max_size) == (0, 2)


# --- migrations: a step of their own -------------------------------------------------------------------------


@contextlib.contextmanager
def _fresh_database(db: OwnPostgres) -> Iterator[str]:
    name = f"fresh_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db.url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield psycopg.conninfo.make_conninfo(db.url, dbname=name)
    finally:
        with psycopg.connect(db.url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


def _use_database(url: str | None) -> None:
    if url is None:
        os.environ.pop("TMUXI_DATABASE_URL", None)
    else:
        os.environ["TMUXI_DATABASE_URL"] = url
    get_settings.cache_clear()
    pool.close_pool()


def test_the_pool_never_migrates_and_names_the_fix_while_the_schema_is_behind(db: OwnPostgres) -> None:
    with _fresh_database(db) as url:
        _use_database(url)
        try:
            with pytest.raises(SchemaBehind) as exc:
                repo.host_counts(60, 600)
            assert f"version 0, this code needs {latest_version()}" in exc.value.message
            assert "python -m tmuxi.db.migrate" in exc.value.message and exc.value.status == 503
            with psycopg.connect(url) as conn:  # nothing was created
                assert conn.execute("SELECT to_regclass('schema_migrations')").fetchone() == (None,)
            assert migrate(url)[-1] == latest_version()
            assert repo.host_counts(60, 600) == (0, 0)  # checked again, and now current: no restart needed
        finally:
            _use_database(db.url)


def _migrate_command(url: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TMUXI_DATABASE_URL"}
    if url is not None:
        env["TMUXI_DATABASE_URL"] = url
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "layers"), str(ROOT)])
    return subprocess.run([sys.executable, "-m", "tmuxi.db.migrate"], env=env, capture_output=True, text=True,
                          timeout=60, check=False, cwd=ROOT)


def test_the_migrate_command_applies_reports_and_names_the_fix(db: OwnPostgres) -> None:
    with _fresh_database(db) as url:
        first = _migrate_command(url)
        assert first.returncode == 0, first.stderr
        assert "schema at version 0" in first.stdout and f"applied {latest_version():04d}_" in first.stdout
        assert "password" not in first.stdout and db.server.password not in first.stdout + first.stderr
        again = _migrate_command(url)
        assert again.returncode == 0 and "done: nothing to apply" in again.stdout, again.stdout + again.stderr
    unset = _migrate_command(None)
    assert unset.returncode == 1 and "TMUXI_DATABASE_URL is not set" in unset.stderr
    unreachable = _migrate_command(psycopg.conninfo.make_conninfo(db.url, host="/nonexistent-socket-dir"))
    assert unreachable.returncode == 1 and "cannot reach PostgreSQL" in unreachable.stderr
    assert "check TMUXI_DATABASE_URL" in unreachable.stderr
    make = subprocess.run(["make", "-n", "migrate"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert "-m tmuxi.db.migrate" in make.stdout, make.stdout + make.stderr


# --- the breaker's own rules (a clock of the test's own) -----------------------------------------------------


def test_the_breaker_opens_probes_one_at_a_time_and_ignores_stale_reports() -> None:
    now = [100.0]
    b = CircuitBreaker(retry_s=1.0, probe_lease_s=5.0, clock=lambda: now[0])
    before = b.admit()  # admitted while closed, reports late
    early = b.admit()
    assert not early.probe and b.failed(early) and b.state == "open"
    assert not b.failed(before) and b.retry_in_s() == pytest.approx(1.0)  # one outage opens it once
    with pytest.raises(BreakerOpen):
        b.admit()
    now[0] += 1.0
    probe = b.admit()
    assert probe.probe and b.state == "half-open"
    with pytest.raises(BreakerOpen):
        b.admit()  # one probe at a time
    assert b.failed(probe) is False and b.state == "open"  # still down: the next probe a retry later
    with pytest.raises(BreakerOpen):
        b.admit()
    now[0] += 1.0
    probe = b.admit()
    now[0] += 6.0  # that probe never reported: after its lease another may go
    second = b.admit()
    assert second.probe
    assert b.succeeded(second) and b.state == "closed"
    assert not b.succeeded(probe) and not b.failed(probe) and not b.failed(before)  # stale: nothing changes
    assert b.state == "closed" and not b.admit().probe
    now[0] += 1.0
    assert b.failed(b.admit(), retry_in_s=0.0) and b.admit().probe  # a reset connection: probe at once
