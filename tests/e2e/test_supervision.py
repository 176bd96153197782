"""``python -m local.run`` supervises what it started: a killed gateway is restarted without its old workers
serving on (they die with their master), a killed tmux host is restarted and adopts its sessions again, and a
process that keeps failing is given up on after a few attempts, said loudly and in the exit status."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import httpx
import psutil
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from local.services import RedisServer, free_port
from local.stack import listening_pids
from tests.conftest import Deps
from tests.e2e.test_local_run import ROOT, Run, _gone, _stop_and_check_nothing_remains, _until, local_run

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")


@contextmanager
def _own_database_and_redis(deps: Deps) -> Iterator[dict[str, str]]:
    """Settings giving local.run a database of its own (its hosts must not join the tests' registry) and a
    redis-server of its own, so it starts quickly."""
    db = f"tmuxi_sup_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(deps.database_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {db}")
    given_redis = RedisServer()
    try:
        given_redis.start()
        yield {"TMUXI_DATABASE_URL": make_conninfo(deps.database_url, dbname=db),
               "TMUXI_REDIS_URL": given_redis.url, "TMUXI_GATEWAY_WORKERS": "2"}
    finally:
        given_redis.stop()
        with psycopg.connect(deps.database_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def _child(run: Run, marker: str) -> psutil.Process | None:
    """local.run's live child whose command line holds ``marker``."""
    for p in run.main().children():
        with suppress(psutil.Error):
            if marker in " ".join(p.cmdline()) and not _gone(p):
                return p
    return None


def _new_child(run: Run, marker: str, old_pid: int) -> psutil.Process | None:
    p = _child(run, marker)
    return p if p is not None and p.pid != old_pid else None


GATEWAY = "local.gateway:create_gateway_app"


def _workers(master: psutil.Process) -> list[psutil.Process]:
    """The uvicorn workers among a master's children (multiprocessing's resource tracker is one too)."""
    return [p for p in master.children() if "resource_tracker" not in " ".join(p.cmdline())]


@pytest.mark.slow
def test_a_killed_gateway_and_a_killed_host_are_restarted(deps: Deps) -> None:
    with _own_database_and_redis(deps) as settings, local_run(settings, hosts=1) as run, \
            httpx.Client(base_url=run.url, timeout=30) as client:
        h = run.wait_ready(client, hosts=1)
        r = client.post("/sessions", json={"name": "kept"}, headers=h)
        assert r.status_code == 201, r.text
        sid = r.json()["id"]

        def run_in_session(cmd: str) -> httpx.Response:
            return client.post(f"/sessions/{sid}/exec", json={"command": cmd, "timeout_s": 10}, headers=h)

        assert run_in_session("export KEPT=across-restart; cd /tmp").json()["exit_code"] == 0

        # the gateway's master, SIGKILLed: its workers go with it, a new gateway serves /health
        master = _until(lambda: _child(run, GATEWAY), 10, "the gateway", run.log)
        workers, children = _workers(master), master.children()
        assert len(workers) == 2, workers
        master.kill()
        _until(lambda: all(_gone(c) for c in children), 5, "the killed gateway's workers to exit", run.log)
        new = _until(lambda: _new_child(run, GATEWAY, master.pid), 30, "a new gateway", run.log)
        h = run.wait_ready(client, hosts=1)
        holders = listening_pids(run.port)  # the new gateway is the one listening, nothing else
        assert holders and holders <= {new.pid, *(w.pid for w in new.children())}, holders
        _until(lambda: re.search(rf"\[stack\] supervisor process=gateway status=restarted pid={new.pid} restarts=1 "
                                 r"duration_ms=", run.log.read_text(errors="replace")),
               10, "the gateway's restart to be logged", run.log)
        log = run.log.read_text(errors="replace")
        assert re.search(rf"\[stack\] supervisor process=gateway status=exited pid={master.pid} signal=SIGKILL "
                         r".*failures=1/5 action=restart backoff_s=", log), log[-3000:]

        # a tmux host, SIGKILLed: restarted, and its session (still running in its tmux server) adopted again
        host = _until(lambda: _child(run, "tmux_host"), 10, "the tmux host", run.log)
        host.kill()
        r = _until(lambda: (x := run_in_session('echo "$KEPT $PWD"')).status_code == 200 and x, 30,
                   "the session to answer through a restarted host", run.log)
        assert r.json()["stdout"] == "across-restart /tmp\n"
        new_host = _new_child(run, "tmux_host", host.pid)
        assert new_host is not None
        # (the session may answer a moment before the supervisor has seen the new host listening and said so)
        _until(lambda: re.search(rf"supervisor process=host-1 status=restarted pid={new_host.pid} restarts=1",
                                 run.log.read_text(errors="replace")), 10, "the host's restart to be logged", run.log)
        log = run.log.read_text(errors="replace")
        assert re.search(rf"supervisor process=host-1 status=exited pid={host.pid} signal=SIGKILL .*action=restart",
                         log), log[-3000:]

        _stop_and_check_nothing_remains(run, signal.SIGTERM)


def _squat(port: int, timeout_s: float) -> socket.socket:
    """Listen on ``port`` as soon as it is free (polled every 10 ms: sooner than any restart's backoff)."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
            return s
        except OSError:
            s.close()
        assert time.monotonic() < deadline, f"port {port} not freed within {timeout_s}s"
        time.sleep(0.01)


@pytest.mark.slow
def test_a_gateway_that_cannot_start_again_is_given_up_on_and_reported(deps: Deps) -> None:
    with _own_database_and_redis(deps) as settings, local_run(settings, hosts=1) as run, \
            httpx.Client(base_url=run.url, timeout=30) as client:
        run.wait_ready(client, hosts=1)
        master = _until(lambda: _child(run, GATEWAY), 10, "the gateway", run.log)
        master.kill()
        squatter = _squat(run.port, 5)  # another program takes the port: every restart fails to bind
        try:
            _until(lambda: "action=give_up" in run.log.read_text(errors="replace"), 45, "the supervisor to give up",
                   run.log)
            log = run.log.read_text(errors="replace")
            failed = [line for line in log.splitlines() if "supervisor process=gateway status=restart_failed" in line]
            assert len(failed) == 4, log[-3000:]  # the kill, then 4 restarts: 5 failures within a minute
            for line in failed:  # each says why: the port, and who holds it
                assert re.search(rf"exited \(exit_code=\d+\) before listening on 127\.0\.0\.1:{run.port}\b", line), line
                assert f"the port is held by pid {os.getpid()}" in line, line
            assert "failures=5/5 action=give_up" in failed[-1]
            assert re.search(r"ERROR: gateway failed 5 times within 60s .*not restarting it again", log)
            attempts = log.count("starting the local API gateway")
        finally:
            squatter.close()

        # not retried, though the port is free again; the host is still supervised and running
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            assert _child(run, GATEWAY) is None
            time.sleep(0.1)
        assert run.log.read_text(errors="replace").count("starting the local API gateway") == attempts
        assert _child(run, "tmux_host") is not None

        _stop_and_check_nothing_remains(run, signal.SIGTERM, returncode=1)  # the exit status says it
        assert "ERROR: gateway was given up on (5 failures within 60s" in run.log.read_text(errors="replace")


def test_gateway_workers_die_with_their_master_even_with_no_supervisor(deps: Deps) -> None:
    """``uvicorn --workers 2`` on the gateway, alone: SIGKILL its master and the workers exit (the kernel kills
    them: PR_SET_PDEATHSIG, set as each worker loads the app), so none serves on as an orphan."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "layers"), str(ROOT)]))
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", GATEWAY, "--factory", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "2", "--log-level", "info"],
            env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, process_group=0)

        def output() -> str:
            out.seek(0)
            return out.read().decode(errors="replace")

        try:
            _until(lambda: output().count("Application startup complete") == 2 or proc.poll() is not None, 30,
                   "two gateway workers")
            assert proc.poll() is None, output()
            workers, children = _workers(psutil.Process(proc.pid)), psutil.Process(proc.pid).children()
            assert len(workers) == 2 and listening_pids(port, [w.pid for w in workers]), output()
            proc.kill()
            proc.wait()
            _until(lambda: all(_gone(c) for c in children), 5, f"the orphaned workers to exit\n{output()}")
            assert not listening_pids(port)
        finally:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
