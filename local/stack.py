"""The whole system on one machine: PostgreSQL (embedded unless a URL is given), redis-server on a free port,
N tmux hosts and the local API gateway, each a real process. Used by ``make run`` and by the test fixtures.

Settings: every ``TMUXI_*`` variable in the environment reaches every service. The stack fills in only what is
left unset (database and Redis URLs of the ones it starts, generated secrets, data dir, gateway port...); a given
``TMUXI_DATABASE_URL`` / ``TMUXI_REDIS_URL`` means that dependency is not started. The constructor's explicit
arguments (``database_url``, ``redis``, ``socket_dir``, ``gateway_port``, ``environment``, ``extra_env``) win
over the environment.

What it writes is private: the data dir is 0711 (the embedded PostgreSQL's system user traverses it), the logs
0700 / 0600, ``secrets.json`` 0600."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from local.services import (
    EmbeddedPostgres,
    RedisServer,
    free_port,
    new_password,
    open_private_log,
    private_dir,
    wait_for_port,
    write_private_file,
)
from tmuxi.settings import env_name

ROOT = Path(__file__).resolve().parent.parent

# what secrets.json holds: generated once, kept 0600 under the data dir (never in code, logs or command lines)
_SECRETS = ("jwt_secret", "host_secret", "postgres_password", "redis_password")


def _log(msg: str) -> None:
    print(f"[stack] {msg}", file=sys.stderr, flush=True)


def _secret_file(path: Path) -> dict[str, str]:
    """Development secrets, generated once and kept 0600 under the data dir (never in code or logs); a file
    from an older version gets the ones it lacks."""
    data: dict[str, str] = {}
    if path.exists():
        path.chmod(0o600)
        data = json.loads(path.read_text())
    missing = [k for k in _SECRETS if not data.get(k)]
    if missing:
        for k in missing:
            data[k] = new_password() if k.endswith("_password") else secrets.token_urlsafe(48)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private_file(path, json.dumps(data))
    return data


def stack_secrets(data_dir: Path) -> dict[str, str]:
    """The local stack's secrets (``<data_dir>/secrets.json``), created with the ones missing."""
    return _secret_file(data_dir / "secrets.json")


def _set(env: Mapping[str, str], field_name: str) -> str | None:
    """The value the environment gives a setting (an empty variable counts as unset)."""
    return env.get(env_name(field_name)) or None


@dataclass
class LocalStack:
    data_dir: Path
    hosts: int = 2
    database_url: str | None = None  # None: TMUXI_DATABASE_URL, else an embedded PostgreSQL
    socket_dir: Path | None = None  # None: TMUXI_SOCKET_DIR, else the hosts' default
    gateway_port: int | None = None  # None: TMUXI_GATEWAY_PORT, else 8080
    environment: str | None = None  # None: TMUXI_ENVIRONMENT, else development
    extra_env: dict[str, str] = field(default_factory=dict)  # given to every service, over everything else
    log_dir: Path | None = None

    pg: EmbeddedPostgres | None = None
    # None: TMUXI_REDIS_URL, else a redis-server started here; a given one is started unless it runs
    redis: RedisServer | None = None
    host_procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    host_ports: dict[str, int] = field(default_factory=dict)
    gateway_proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)  # the TMUXI_* settings the services get
    _inherited: dict[str, str] = field(default_factory=dict, repr=False)
    _saved_environ: dict[str, str | None] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.gateway_port is None:
            self.gateway_port = int(_set(os.environ, "gateway_port") or 8080)

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def host_url(self, host_id: str) -> str:
        return f"http://127.0.0.1:{self.host_ports[host_id]}"

    # -------------------------------------------------------------------------------------------------
    def start(self) -> LocalStack:
        t0 = time.monotonic()
        given = dict(os.environ)  # what the user set: reaches every service
        self._inherited = given
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.data_dir.resolve()
        self.data_dir.chmod(0o711)
        logs = self.log_dir or self.data_dir / "logs"
        logs.parent.mkdir(parents=True, exist_ok=True)
        logs = private_dir(logs)
        self.log_dir = logs
        sec = stack_secrets(self.data_dir)
        if self.socket_dir is None and _set(given, "socket_dir"):
            self.socket_dir = Path(given[env_name("socket_dir")])

        db_url = self.database_url or _set(given, "database_url")
        if db_url is None:
            _log(f"starting embedded PostgreSQL (data in {self.data_dir / 'pg'}) ...")
            self.pg = EmbeddedPostgres(self.data_dir / "pg", password=sec["postgres_password"])
            db_url = self.pg.start()
            self.data_dir.chmod(0o711)  # the wheel opens it up on each start
        elif self.database_url is None:
            _log(f"using the PostgreSQL given by {env_name('database_url')}")
        redis_url = None if self.redis is not None else _set(given, "redis_url")
        if redis_url is None:
            if self.redis is None:
                self.redis = RedisServer(password=sec["redis_password"])
            if self.redis.proc is None:
                _log("starting redis-server ...")
                self.redis.start()
                _log(f"redis-server on 127.0.0.1:{self.redis.port} and {self.redis.socket_path}, password required "
                     f"(redis_password in {self.data_dir / 'secrets.json'}); the services use the socket")
            redis_url = self.redis.url
        else:
            _log(f"using the Redis given by {env_name('redis_url')}")

        # generated values fill only what the user left unset ...
        env: dict[str, str] = {}
        for name, value in (("environment", "development"), ("jwt_secret", sec["jwt_secret"]),
                            ("host_secret", sec["host_secret"])):
            if _set(given, name) is None:
                env[env_name(name)] = value
        # ... what this stack decided or was told explicitly is what it runs with
        env[env_name("database_url")] = db_url
        env[env_name("redis_url")] = redis_url
        env[env_name("data_dir")] = str(self.data_dir)
        env[env_name("gateway_port")] = str(self.gateway_port)
        if self.environment is not None:
            env[env_name("environment")] = self.environment
        if self.socket_dir is not None:
            env[env_name("socket_dir")] = str(self.socket_dir)
        env.update(self.extra_env)
        self.env = env
        # this process creates users and runs migrations through the same settings (until stop())
        for k, v in env.items():
            self._saved_environ.setdefault(k, os.environ.get(k))
            os.environ[k] = v
        from tmuxi.db.migrate import migrate

        applied = migrate(db_url)
        _log(f"database migrated (applied {applied or 'nothing new'})")
        for i in range(1, self.hosts + 1):
            self.start_host(f"host-{i}")
        self.start_gateway()
        self.wait_ready()
        _log(f"stack ready in {time.monotonic() - t0:.1f}s")
        return self

    def _child_env(self, **more: str) -> dict[str, str]:
        env = dict(self._inherited or os.environ)
        env.update(self.env)
        env.update(more)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "layers"), str(ROOT)])
        return env

    def _spawn(self, argv: list[str], log_name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        assert self.log_dir is not None
        out = open_private_log(self.log_dir / log_name)
        try:
            # its own process group: a terminal's Ctrl-C reaches only local.run, which stops everything in order
            return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=ROOT, process_group=0)
        finally:
            os.close(out)

    def start_host(self, host_id: str) -> None:
        port = self.host_ports.get(host_id) or free_port()
        self.host_ports[host_id] = port
        _log(f"starting tmux host {host_id} on 127.0.0.1:{port} ...")
        self.host_procs[host_id] = self._spawn(
            [sys.executable, "-m", "tmux_host"], f"{host_id}.log",
            self._child_env(**{env_name("host_id"): host_id, env_name("host_port"): str(port)}),
        )
        wait_for_port("127.0.0.1", port, timeout_s=30)

    def stop_host(self, host_id: str, sig: int = signal.SIGTERM) -> None:
        proc = self.host_procs.pop(host_id, None)
        if proc is not None:
            _stop_proc(proc, sig)

    def start_gateway(self) -> None:
        from local.gateway import HTTP_PROTOCOL, KEEP_ALIVE_TIMEOUT_S

        _log(f"starting the local API gateway on {self.gateway_url} ...")
        self.gateway_proc = self._spawn(
            # uvicorn's httptools protocol with API Gateway's request limits and read timeouts (local/gateway.py)
            [sys.executable, "-m", "uvicorn", "local.gateway:create_gateway_app", "--factory",
             "--host", "127.0.0.1", "--port", str(self.gateway_port), "--loop", "uvloop", "--http", HTTP_PROTOCOL,
             "--timeout-keep-alive", str(KEEP_ALIVE_TIMEOUT_S),
             "--no-access-log", "--no-proxy-headers", "--log-level", "warning",
             "--workers", str(self._gateway_workers())],
            "gateway.log", self._child_env(),
        )
        assert self.gateway_port is not None
        wait_for_port("127.0.0.1", self.gateway_port, timeout_s=30)

    def _gateway_workers(self) -> int:
        from tmuxi.settings import Settings

        return Settings().resolved_gateway_workers  # this process's environment now holds the stack's

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until every host has heartbeated and the gateway's /health says ok."""
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            try:
                r = httpx.get(self.gateway_url + "/health", timeout=2)
                last = r.text
                body = r.json()
                if body.get("status") == "ok" and body["checks"].get("hosts") == f"{self.hosts} live":
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"stack not healthy after {timeout_s}s: {last}; see logs in {self.log_dir}")

    def ensure_user(self, username: str, password: str, role: str = "user") -> None:
        """Create the user, or give it this password if it has another (which ends its tokens)."""
        from tmuxi.auth import hash_password, verify_password
        from tmuxi.db import repo
        from tmuxi.errors import Conflict
        from tmuxi.services import users

        try:
            repo.create_user(username, hash_password(password), role)
        except Conflict:
            row = repo.get_user_by_username(username)
            if row is None or not verify_password(password, row["password_hash"]):
                users.set_password(username, hash_password(password))

    def stop(self, kill_tmux: bool = True, keep_deps: bool = False) -> None:
        if self.gateway_proc is not None:
            _stop_proc(self.gateway_proc, signal.SIGTERM)
            self.gateway_proc = None
        for host_id in list(self.host_procs):
            self.stop_host(host_id)
        if kill_tmux:
            kill_tmux_servers(self.socket_dir)
        if keep_deps:
            return
        if self.redis is not None:
            self.redis.stop()
        from tmuxi.db.pool import close_pool

        close_pool()
        if self.pg is not None:
            self.pg.stop()
        # this process's settings are the user's again (another stack may start in it)
        for k, v in self._saved_environ.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved_environ.clear()


def _stop_proc(proc: subprocess.Popen[bytes], sig: int, timeout_s: float = 10.0) -> None:
    """Signal a child the stack started; if it has not exited in time, kill its whole process group (the
    gateway's workers, a host's helpers)."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    else:
        with contextlib.suppress(ProcessLookupError):  # workers it may have left behind
            os.killpg(proc.pid, signal.SIGKILL)


def kill_tmux_servers(socket_dir: Path | None) -> None:
    """Kill the tmux servers the hosts started (their sessions end with them)."""
    from tmux_host.control import kill_tmux_servers as kill
    from tmuxi.settings import Settings

    kill(socket_dir or Settings(socket_dir=None).resolved_socket_dir)
