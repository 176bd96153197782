"""``python -m local.run`` (``make run``) as people start it: the ``TMUXI_*`` settings in its environment reach
every service; a given ``TMUXI_DATABASE_URL`` / ``TMUXI_REDIS_URL`` is used instead of starting one; what it
writes is private and no secret is on any command line; it stops cleanly on SIGINT even as a background job of a
script (which inherits SIGINT *ignored*) and on SIGTERM, leaving no process behind."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import pytest
import redis
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from local.services import EmbeddedPostgres, RedisServer, free_port
from local.stack import kill_tmux_servers
from tests.conftest import Deps

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")


def _until(pred: Callable[[], Any], timeout_s: float, what: str, log: Path | None = None) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        out = pred()
        if out:
            return out
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{tail}")
        time.sleep(0.1)


def _gone(p: psutil.Process) -> bool:
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


@dataclass
class Run:
    bash: subprocess.Popen[bytes]
    base: Path
    data: Path
    sockets: Path
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def main(self) -> psutil.Process:
        """local.run itself: the background job of the bash script."""
        def find() -> psutil.Process | None:
            assert self.bash.poll() is None, self.log.read_text(errors="replace")[-3000:]
            kids = [p for p in psutil.Process(self.bash.pid).children() if "local.run" in " ".join(p.cmdline())]
            return kids[0] if kids else None

        found: psutil.Process = _until(find, 10, "local.run to start", self.log)
        return found

    def wait_ready(self, client: httpx.Client, hosts: int) -> dict[str, str]:
        """Until the gateway is healthy with every host live and the dev user can log in; its auth header."""
        creds = self.data / "dev-credentials.json"

        def ready() -> dict[str, str] | None:
            assert self.bash.poll() is None, f"local.run exited: {self.log.read_text(errors='replace')[-3000:]}"
            try:
                health = client.get("/health").json()
                if health.get("status") != "ok" or health["checks"].get("hosts") != f"{hosts} live":
                    return None
                if not creds.exists():
                    return None
                r = client.post("/auth/token", json=json.loads(creds.read_text()))
                if r.status_code != 200:
                    return None
            except (httpx.HTTPError, ValueError):
                return None
            return {"authorization": f"Bearer {r.json()['access_token']}"}

        headers: dict[str, str] = _until(ready, 60, "local.run ready", self.log)
        return headers

    def processes(self) -> list[psutil.Process]:
        """Everything it started: its descendants, the postmaster (pg_ctl detaches it) with its children, and
        the tmux servers (they daemonize) on its socket dir."""
        main = self.main()
        procs = [main, *main.children(recursive=True)]
        pid_file = self.data / "pg" / "postmaster.pid"
        if pid_file.exists():
            postmaster = psutil.Process(int(pid_file.read_text().split()[0]))
            procs += [postmaster, *postmaster.children(recursive=True)]
        for p in psutil.process_iter(["cmdline"]):
            if str(self.sockets) in " ".join(p.info["cmdline"] or []) and p not in procs:
                procs.append(p)
        return procs


def _child_env(settings: dict[str, str]) -> dict[str, str]:
    """The test process's environment without its own stack's settings, plus ``settings``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TMUXI_", "PG")) and k not in ("XDG_RUNTIME_DIR", "PYTHONPATH")}
    env.update({"TMUXI_SHELL": os.environ["TMUXI_SHELL"], "TMUXI_GATEWAY_WORKERS": "1",
                "TMUXI_HEARTBEAT_INTERVAL_S": "0.5"})
    env.update(settings)
    return env


@contextmanager
def local_run(settings: dict[str, str], hosts: int = 2) -> Iterator[Run]:
    """``python -m local.run ... & wait`` in a non-interactive bash: as a background job it starts with SIGINT
    ignored, like anything started from a script with ``&``."""
    base = Path(tempfile.mkdtemp(prefix="tmuxi-run-", dir="/tmp"))
    base.chmod(0o711)  # users' homes are under the data dir: their accounts must traverse to them
    sockets = Path(tempfile.mkdtemp(prefix="tr", dir="/tmp"))
    port = free_port()
    data = base / "data"
    log = base / "run.log"
    argv = [sys.executable, "-m", "local.run", "--port", str(port), "--ws-port", str(free_port()), "--data-dir",
            str(data), "--hosts", str(hosts)]
    env = _child_env({"TMUXI_SOCKET_DIR": str(sockets), **settings})
    with open(log, "wb") as out:
        bash = subprocess.Popen(["bash", "-c", f"{shlex.join(argv)} & wait $!"], env=env, cwd=ROOT,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    run = Run(bash, base, data, sockets, port, log)
    try:
        yield run
    finally:  # when the test failed before stopping it: leave nothing behind
        with suppress(Exception):
            if bash.poll() is None:
                with suppress(psutil.Error):
                    for p in psutil.Process(bash.pid).children(recursive=True):
                        with suppress(psutil.Error):
                            p.kill()
                bash.kill()
                bash.wait()
        with suppress(Exception):
            if (data / "pg" / "postmaster.pid").exists():
                EmbeddedPostgres(data / "pg", password="unused-password")._pg_ctl_stop(data / "pg")
        with suppress(Exception):
            kill_tmux_servers(sockets)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(sockets, ignore_errors=True)


def _stop_and_check_nothing_remains(run: Run, sig: int, returncode: int = 0) -> None:
    procs = run.processes()
    main = procs[0]
    main.send_signal(sig)
    try:
        run.bash.wait(timeout=40)
    except subprocess.TimeoutExpired:
        pytest.fail(f"local.run did not stop within 40 s of {sig!r}: {run.log.read_text(errors='replace')[-3000:]}")
    assert run.bash.returncode == returncode, run.log.read_text(errors="replace")[-3000:]
    assert "stopped." in run.log.read_text(errors="replace")
    try:
        _until(lambda: all(_gone(p) for p in procs), 15, "every process it started to exit")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {[p.cmdline() for p in procs if not _gone(p)]}") from None
    left = [p for p in psutil.process_iter(["cmdline"]) if not _gone(p)
            and any(str(d) in " ".join(p.info["cmdline"] or []) for d in (run.data, run.sockets))]
    assert not left, [p.info["cmdline"] for p in left]


def _as_another_user(script: str, stdin: str = "") -> str:
    """``script`` run by bash as ``nobody``: what a user's shell on this machine could do."""
    proc = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "bash", "-c", script],
                          input=stdin, capture_output=True, text=True, timeout=30, cwd="/", check=False,
                          env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "PGPASSFILE": "/nonexistent"})
    return proc.stdout + proc.stderr


def _all_cmdlines() -> list[bytes]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with suppress(OSError):
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes())
    return out


@pytest.mark.slow
def test_local_run_passes_settings_on_keeps_secrets_private_and_stops_on_sigint_as_a_background_job() -> None:
    with local_run({"TMUXI_SESSION_QUOTA": "2"}) as run, httpx.Client(base_url=run.url, timeout=30) as client:
        h = run.wait_ready(client, hosts=2)

        # TMUXI_SESSION_QUOTA=2 reached the services (the default is 20)
        for i in range(2):
            r = client.post("/sessions", json={"name": f"q{i}"}, headers=h)
            assert r.status_code == 201, r.text
        r = client.post("/sessions", json={"name": "one-too-many"}, headers=h)
        assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded", r.text

        # what it wrote is private
        data = run.data
        assert _mode(data) == 0o711
        assert _mode(data / "logs") == 0o700
        logs = list((data / "logs").iterdir())
        assert {"gateway.log", "host-1.log", "host-2.log"} <= {p.name for p in logs}
        assert {p.name: _mode(p) for p in logs} == {p.name: 0o600 for p in logs}
        assert _mode(data / "secrets.json") == 0o600 and _mode(data / "dev-credentials.json") == 0o600
        assert _mode(data / "run") == 0o700 and _mode(data / "pg") == 0o700
        assert "trust" not in (data / "pg" / "pg_hba.conf").read_text()

        # its data stores ask for the passwords kept in secrets.json, which are on no command line
        sec = json.loads((data / "secrets.json").read_text())
        dev_password = json.loads((data / "dev-credentials.json").read_text())["password"]
        secrets = [v.encode() for v in (*sec.values(), dev_password)]
        assert not [c.split(b"\0")[:2] for c in _all_cmdlines() if any(s in c for s in secrets)]
        with pytest.raises(psycopg.OperationalError, match="no password supplied"):
            psycopg.connect(host=str(data / "pg"), user="postgres", dbname="postgres",
                            passfile="/nonexistent/.pgpass", connect_timeout=5).close()
        with psycopg.connect(host=str(data / "pg"), user="postgres", dbname="postgres",
                             password=sec["postgres_password"], connect_timeout=5) as conn:
            assert conn.execute("SELECT count(*) FROM pg_hba_file_rules WHERE auth_method <> 'scram-sha-256'"
                                ).fetchone() == (0,)

        # another user of the machine (a shell) reaches none of it
        redis_proc = next(p for p in run.processes() if p.name() == "redis-server")
        redis_port = next(c.laddr.port for c in redis_proc.net_connections("tcp") if c.status == "LISTEN")
        redis_sock = Path(tempfile.gettempdir()) / f"tmuxi-redis-{os.geteuid()}" / f"{redis_port}.sock"
        assert redis_sock.is_socket()
        q = shlex.quote
        pg_conn = q(f"host={data / 'pg'} user=postgres dbname=postgres")
        private = " ".join(q(str(p)) for p in (data / "logs", data / "pg", data / "run", redis_sock.parent))
        files = " ".join(q(str(data / f)) for f in ("secrets.json", "dev-credentials.json"))
        out = _as_another_user(
            f"redis-cli -p {redis_port} ping; redis-cli -p {redis_port} keys '*';"
            f" redis-cli -s {q(str(redis_sock))} ping; psql -w {pg_conn} -c 'select 1'; cat {files}; ls {private};"
            f" echo matches: $(grep -rlsF -f - {q(str(data))} {q(str(redis_sock.parent))} /tmp/tmuxi-* | wc -l)",
            stdin="\n".join(v.decode() for v in secrets) + "\n")
        assert "NOAUTH" in out and "PONG" not in out and "(1 row)" not in out, out
        assert out.count("Permission denied") >= 6 and "matches: 0" in out, out

        procs = run.processes()
        names = [" ".join(p.cmdline()) for p in procs]
        assert any(p.name() == "redis-server" for p in procs), names
        assert sum("tmux_host" in n for n in names) == 2, names
        assert any(p.name() == "postgres" for p in procs), names

        _stop_and_check_nothing_remains(run, signal.SIGINT)


@pytest.mark.slow
def test_local_run_uses_the_database_and_redis_given_in_its_environment_and_stops_on_sigterm(deps: Deps) -> None:
    db = f"tmuxi_run_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(deps.database_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {db}")  # its own database: its hosts must not join the tests' registry
    given_redis = RedisServer()
    given_redis.start()
    db_url = make_conninfo(deps.database_url, dbname=db)
    try:
        settings = {"TMUXI_DATABASE_URL": db_url, "TMUXI_REDIS_URL": given_redis.url, "TMUXI_SESSION_QUOTA": "1"}
        with local_run(settings, hosts=1) as run, httpx.Client(base_url=run.url, timeout=30) as client:
            h = run.wait_ready(client, hosts=1)
            assert client.get("/health").json()["checks"]["redis"] == "ok"
            assert client.post("/sessions", json={"name": "one"}, headers=h).status_code == 201
            r = client.post("/sessions", json={"name": "two"}, headers=h)
            assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded", r.text

            procs = run.processes()
            assert not (run.data / "pg").exists()  # no embedded PostgreSQL ...
            assert not [p for p in procs if p.name() in ("postgres", "redis-server")]  # ... nor redis-server
            with psycopg.connect(db_url) as conn:  # ... it used the given ones
                assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() != (0,)
            with redis.Redis.from_url(given_redis.url) as r_given:
                assert r_given.dbsize() > 0
            _stop_and_check_nothing_remains(run, signal.SIGTERM)
    finally:
        given_redis.stop()
        with psycopg.connect(deps.database_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    assert conninfo_to_dict(db_url)["dbname"] == db
