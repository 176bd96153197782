"""Redis failing in ways other than going away, against a real redis-server of this module's own (the shared one
renames CONFIG and REPLICAOF away): an error reply -- OOM from a full Redis, READONLY from a replica during a
failover, BUSY while a script runs, WRONGTYPE from a key of the wrong type -- degrades exactly like Redis being
down (callers fall back to PostgreSQL; never a 5xx), every connection that saw it is closed, and no reply is ever
paired with another request. And the per-user rate limit stays within twice its setting across an outage, with
several API processes (subprocesses) counting through a real redis-server that is killed and restarted, or
paused."""
from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
import redis as redis_lib

from local.services import RedisServer, free_port
from tests.conftest import Deps, reset_process_state
from tests.integration.test_api_handler import Ctx, Result, authorize, invoke, token_of
from tmuxi import auth, cache
from tmuxi.db import repo
from tmuxi.observability import REGISTRY

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")

ROOT = Path(__file__).resolve().parents[2]


class FaultableRedis(RedisServer):
    """The local redis-server with CONFIG and REPLICAOF left in, to make it full or a replica at will."""

    def _config(self) -> str:
        kept = ('rename-command CONFIG ""', 'rename-command REPLICAOF ""')
        return "".join(line + "\n" for line in super()._config().splitlines() if line not in kept)


@pytest.fixture(scope="module")
def own_redis(deps: Deps) -> Iterator[FaultableRedis]:
    """This module's redis-server; this process's cache uses it (the stack's processes keep the shared one)."""
    srv = FaultableRedis()
    srv.start()
    shared = os.environ["TMUXI_REDIS_URL"]
    os.environ["TMUXI_REDIS_URL"] = srv.url
    reset_process_state()
    try:
        yield srv
    finally:
        os.environ["TMUXI_REDIS_URL"] = shared
        reset_process_state()
        srv.stop()


def _admin(srv: RedisServer) -> redis_lib.Redis:
    return redis_lib.Redis.from_url(srv.url, decode_responses=True, socket_timeout=5)


def _client_ids(admin: redis_lib.Redis) -> set[str]:
    return {str(c["id"]) for c in admin.client_list()} - {str(admin.client_id())}


def _error_replies() -> float:
    return REGISTRY.get_sample_value("tmux_errors_total", {"component": "cache", "kind": "redis_error_reply"}) or 0.0


def _until(pred: Callable[[], Any], bound_s: float, what: str) -> None:
    deadline = time.monotonic() + bound_s
    while not pred():
        assert time.monotonic() < deadline, f"not within {bound_s} s: {what}"
        time.sleep(0.02)


# --- error replies ----------------------------------------------------------------------------------------------
@dataclass
class Caller:
    user_id: str
    token: str
    ctx: Ctx
    sid: str

    def get(self) -> Result:
        return invoke("get_session", self.ctx, self.token, pathParameters={"id": self.sid})

    def admit(self) -> cache.Admission | object:
        return cache.admit(f"user:{self.user_id}", self.ctx["jti"], self.sid, user_id=self.user_id)

    def cached(self) -> dict[str, Any] | None:
        """The session entry this process has for the caller's session (None: none, or Redis down)."""
        adm = self.admit()
        return adm.session if isinstance(adm, cache.Admission) else None

    def rate_keys(self) -> list[str]:
        now = int(time.time()) // 60
        return [f"rl:user:{self.user_id}:{w}" for w in (now, now + 1)]


@pytest.fixture(scope="module")
def callers(stack: Any, own_redis: FaultableRedis) -> Iterator[list[Caller]]:
    """Two users, each with a session of their own."""
    out = []
    for _ in range(2):
        _, headers = stack.new_user()
        token = token_of(headers)
        ctx = authorize(token)
        r = invoke("create_session", ctx, token, body={"name": "redis-faults"})
        assert r.status == 201, r
        out.append(Caller(ctx["user_id"], token, ctx, r.body["id"]))
    yield out
    for c in out:
        invoke("delete_session", c.ctx, c.token, pathParameters={"id": c.sid})


def _busy_script(srv: RedisServer) -> None:
    with contextlib.suppress(redis_lib.RedisError), redis_lib.Redis.from_url(srv.url, socket_timeout=30) as r:
        r.eval("while true do end", 0)  # until SCRIPT KILL


def _busy(admin: redis_lib.Redis) -> bool:
    try:
        admin.ping()
    except redis_lib.ResponseError as exc:
        return str(exc).startswith("BUSY")
    return False


def _kill_script(admin: redis_lib.Redis) -> bool:
    try:
        admin.script_kill()
    except redis_lib.ResponseError as exc:
        if "NOTBUSY" not in str(exc):
            raise
    return not _busy(admin)


@contextlib.contextmanager
def _fault(kind: str, srv: RedisServer, victim: Caller) -> Iterator[None]:
    admin = _admin(srv)
    if kind == "oom":  # a full Redis: every write answers OOM
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        try:
            yield
        finally:
            admin.config_set("maxmemory", 0)
    elif kind == "readonly":  # a failover in progress: a replica (of a master nobody runs) answers READONLY
        admin.execute_command("REPLICAOF", "127.0.0.1", free_port())  # type: ignore[no-untyped-call]
        try:
            yield
        finally:
            admin.execute_command("REPLICAOF", "NO", "ONE")  # type: ignore[no-untyped-call]
    elif kind == "busy":  # a script over the busy threshold: every command answers BUSY
        admin.config_set("busy-reply-threshold", 20)
        script = threading.Thread(target=_busy_script, args=(srv,), daemon=True)
        script.start()
        _until(lambda: _busy(admin), 5, "redis busy")
        try:
            yield
        finally:
            _until(lambda: _kill_script(admin), 5, "script killed")
            script.join(5)
    elif kind == "wrongtype":  # one caller's rate window is a hash: its count's writes answer WRONGTYPE
        keys = victim.rate_keys()
        for k in keys:
            admin.delete(k)
            admin.hset(k, "x", "1")
        try:
            yield
        finally:
            admin.delete(*keys)
    else:
        raise ValueError(kind)


def _served_own(callers: list[Caller], where: str) -> None:
    """Each caller's GET answers 200 with their own session; whatever this process has cached for each
    caller's session is that session."""
    for c in callers:
        r = c.get()
        assert r.status == 200 and r.body["id"] == c.sid, (where, r)
        entry = c.cached()
        assert entry is None or entry["id"] == c.sid, (where, "another request's reply", entry, c.sid)


@pytest.mark.parametrize("fault", ["oom", "readonly", "busy", "wrongtype"])
def test_an_error_reply_is_redis_down_and_no_reply_goes_to_another_request(
        own_redis: FaultableRedis, callers: list[Caller], fault: str) -> None:
    admin = _admin(own_redis)
    _until(lambda: isinstance(callers[0].admit(), cache.Admission), 5, "redis answering")
    for c in callers:  # both sessions cached, in Redis and in this process's memory
        c.get()
        c.get()
        entry = c.cached()
        assert entry is not None and entry["id"] == c.sid, entry
    before_ids, before_errors = _client_ids(admin), _error_replies()
    with _fault(fault, own_redis, callers[0]):
        t0 = time.monotonic()
        # several retry windows (TMUXI_REDIS_RETRY_AFTER_S=0.2), each ending in a request that meets the error
        while time.monotonic() - t0 < 1.0 or _error_replies() < before_errors + 2:
            assert time.monotonic() - t0 < 6, f"no error reply reached the cache ({_error_replies() - before_errors})"
            _served_own(callers, f"during {fault}")
            time.sleep(0.03)
        ip = f"10.{uuid.uuid4().int % 250}.0.9"
        r = invoke("token", None, body={"username": "nobody-" + uuid.uuid4().hex[:8], "password": "guess"},
                   requestContext={"identity": {"sourceIp": ip}, "requestId": str(uuid.uuid4())})
        assert r.status == 401, r  # the failed-login counters fall back to this process
        r = invoke("openapi", None, requestContext={"identity": {"sourceIp": ip}, "requestId": str(uuid.uuid4())})
        assert r.status == 200, r  # so does the per-address count of routes without a token
    _until(lambda: all(isinstance(c.admit(), cache.Admission) for c in callers), 5, "redis back")
    for _ in range(3):
        _served_own(callers, f"after {fault}")
    for c in callers:  # served from the cache again, each their own
        entry = c.cached()
        assert entry is not None and entry["id"] == c.sid, entry
    assert not before_ids & _client_ids(admin), "a connection that saw the error reply is still open"


def test_an_error_reply_ahead_of_other_replies_closes_the_connection_at_once(own_redis: FaultableRedis) -> None:
    """An error reply to the first command of a pipelined batch, with the second command's reply behind it on the
    same connection: the connection is closed before anything else can read from it, and the next request on
    the same tracker gets its own reply."""
    admin = _admin(own_redis)
    client = cache._gate.client()
    assert client is not None
    mine, theirs = str(uuid.uuid4()), str(uuid.uuid4())
    cache.put_session(mine, {"id": mine}, 0)
    cache.put_session(theirs, {"id": theirs}, 0)
    rk_mine, rk_theirs = f"rl:user:{mine}:{int(time.time()) // 60}", f"rl:user:{theirs}:{int(time.time()) // 60}"
    existing = _client_ids(admin)
    tracker = cache.Tracker()  # a process's view, on connections of its own
    try:
        tracker.admit(client, rk_theirs, 60, 10**6, ["warm"])
        ours = _client_ids(admin) - existing
        assert len(ours) == 2, ours  # the tracked connection and its invalidation connection
        admin.hset(rk_mine, "x", "1")  # its count's write answers WRONGTYPE, ahead of the session's MGET reply
        with pytest.raises(redis_lib.ResponseError, match="WRONGTYPE"):
            tracker.admit(client, rk_mine, 60, 10**6, [f"session:{mine}"])
        _until(lambda: not ours & _client_ids(admin), 2, "the connections that saw the error reply closed")
        _, (entry,) = tracker.admit(client, rk_theirs, 60, 10**6, [f"session:{theirs}"])
        assert entry is not None and theirs in entry and mine not in entry, entry
    finally:
        tracker.drop()
        admin.delete(rk_mine)


# --- the rate limit across an outage ----------------------------------------------------------------------------
_REPORT = "report: "  # the lines a process answers with (its log lines go to stdout too)


def _rate_child() -> None:
    """One API process of the test below: on each command (stdin: ``run SECONDS MOST``) it makes its caller's
    requests through ``services.auth.admit`` and reports how many were admitted and refused."""
    from tmuxi.errors import RateLimited
    from tmuxi.models import Principal
    from tmuxi.services import auth as auth_service

    p = Principal(user_id=uuid.UUID(os.environ["RT_USER_ID"]), username=os.environ["RT_USERNAME"], role="user",
                  jti=uuid.uuid4().hex, exp=int(time.time()) + 3600, epoch=0)
    repo.get_user_state(p.user_id)  # the pool and its migration check, before the first request
    print(f"{_REPORT}ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] != "run":
            return
        end, most = time.monotonic() + float(cmd[1]), int(cmd[2])
        admitted = refused = 0
        window = int(time.time()) // 60
        while admitted + refused < most and time.monotonic() < end:
            try:
                auth_service.admit(p)
                admitted += 1
            except RateLimited:
                refused += 1
            time.sleep(0.001)
        report = {"admitted": admitted, "refused": refused, "windows": [window, int(time.time()) // 60]}
        print(_REPORT + json.dumps(report), flush=True)


class _Processes:
    def __init__(self, n: int, env: dict[str, str], logs: Path) -> None:
        self.logs = [logs / f"child-{i}.log" for i in range(n)]
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-c", "from tests.integration.test_redis_faults import _rate_child; _rate_child()"],
                cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
            for log in self.logs]
        self.reports: list[queue.Queue[str]] = [queue.Queue() for _ in self.procs]
        for p, q in zip(self.procs, self.reports, strict=True):
            threading.Thread(target=self._read, args=(p.stdout, q), daemon=True).start()
        for i in range(n):
            assert self._report(i, 60) == "ready"

    @staticmethod
    def _read(out: IO[str], q: queue.Queue[str]) -> None:
        for line in out:
            if line.startswith(_REPORT):
                q.put(line[len(_REPORT):].strip())

    def _report(self, i: int, timeout_s: float) -> str:
        try:
            return self.reports[i].get(timeout=timeout_s)
        except queue.Empty:
            tails = "\n".join(log.read_text()[-2000:] for log in self.logs)
            raise AssertionError(f"process {i} did not answer (exit {self.procs[i].poll()}):\n{tails}") from None

    def run(self, seconds: float, most: int = 10**9) -> list[dict[str, Any]]:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(f"run {seconds} {most}\n")
            p.stdin.flush()
        return [json.loads(self._report(i, seconds + 30)) for i in range(len(self.procs))]

    def close(self) -> None:
        for p in self.procs:
            with contextlib.suppress(OSError):
                assert p.stdin is not None
                p.stdin.close()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.mark.parametrize(("outage", "before"), [("restart", "at the limit"), ("restart", "half the limit"),
                                                ("pause", "at the limit")])
def test_the_rate_limit_stays_within_twice_its_setting_across_a_redis_outage(
        own_redis: FaultableRedis, tmp_path: Path, outage: str, before: str) -> None:
    """Three processes serve one caller (TMUXI_RATE_LIMIT_PROCESSES=3) through an outage of Redis in one
    rate window: killed and restarted empty, or paused and resumed with its data."""
    limit, n = 240, 3
    name = f"rl{uuid.uuid4().hex[:10]}"
    uid = repo.create_user(name, auth.hash_password("pw"), "user")
    env = {**os.environ, "TMUXI_RATE_LIMIT_PER_MINUTE": str(limit), "TMUXI_RATE_LIMIT_PROCESSES": str(n),
           "TMUXI_REDIS_URL": own_redis.url, "RT_USER_ID": str(uid), "RT_USERNAME": name,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "layers"), str(ROOT)])}
    procs = _Processes(n, env, tmp_path)
    paused = False
    try:
        left = 60 - time.time() % 60
        if left < 10:  # the whole test in one rate window
            time.sleep(left + 0.2)
        first = procs.run(2.0, limit if before == "at the limit" else limit // (2 * n))
        assert own_redis.proc is not None
        if outage == "restart":
            own_redis.proc.kill()
            own_redis.proc.wait()
        else:
            os.kill(own_redis.proc.pid, signal.SIGSTOP)
            paused = True
        during = procs.run(1.5)
        if outage == "restart":
            own_redis.start()  # same port, socket and password; empty
        else:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
            paused = False
        after = procs.run(1.5)
    finally:
        procs.close()
        if paused and own_redis.proc is not None:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        if own_redis.proc is None or own_redis.proc.poll() is not None:
            own_redis.start()
    results = first + during + after
    assert len({w for r in results for w in r["windows"]}) == 1, results  # all in one window
    admitted = [sum(r["admitted"] for r in phase) for phase in (first, during, after)]
    print(f"{outage}, {before}: admitted before, during, after the outage: {admitted} (limit {limit})")
    assert sum(r["refused"] for r in during + after) > 0, results  # each process was held back
    if before == "at the limit":
        assert admitted[0] == limit, admitted
    else:
        assert admitted[0] == limit // 2, admitted
        assert admitted[1] > 0, admitted  # a caller under its limit is still served while Redis is down
    assert sum(admitted) <= 2 * limit, (admitted, results)
