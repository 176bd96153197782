"""The whole system on one machine: PostgreSQL (embedded unless a URL is given), redis-server on a free port,
N tmux hosts and the local API gateway, each a real process. Used by ``make run`` and by the test fixtures."""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from local.services import EmbeddedPostgres, RedisServer, free_port, wait_for_port
from tmuxi.settings import env_name

ROOT = Path(__file__).resolve().parent.parent


def _log(msg: str) -> None:
    print(f"[stack] {msg}", file=sys.stderr, flush=True)


def _secret_file(path: Path) -> dict[str, str]:
    """Development secrets, generated once and kept 0600 under the data dir (never in code or logs)."""
    if path.exists():
        data: dict[str, str] = json.loads(path.read_text())
        return data
    data = {"jwt_secret": secrets.token_urlsafe(48), "host_secret": secrets.token_urlsafe(48)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    return data


@dataclass
class LocalStack:
    data_dir: Path
    hosts: int = 2
    database_url: str | None = None
    socket_dir: Path | None = None
    gateway_port: int = 8080
    environment: str = "development"
    extra_env: dict[str, str] = field(default_factory=dict)
    log_dir: Path | None = None

    pg: EmbeddedPostgres | None = None
    redis: RedisServer = field(default_factory=RedisServer)
    host_procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    host_ports: dict[str, int] = field(default_factory=dict)
    gateway_proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    def host_url(self, host_id: str) -> str:
        return f"http://127.0.0.1:{self.host_ports[host_id]}"

    # -------------------------------------------------------------------------------------------------
    def start(self) -> LocalStack:
        t0 = time.monotonic()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.data_dir.resolve()
        logs = self.log_dir or self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_dir = logs
        db_url = self.database_url
        if db_url is None:
            _log(f"starting embedded PostgreSQL (data in {self.data_dir / 'pg'}) ...")
            self.pg = EmbeddedPostgres(self.data_dir / "pg")
            db_url = self.pg.start()
        if self.redis.proc is None:
            _log("starting redis-server ...")
            self.redis.start()
            _log(f"redis-server on {self.redis.tcp_url} and {self.redis.socket_path} (the services use the socket)")
        redis_url = self.redis.url
        sec = _secret_file(self.data_dir / "secrets.json")
        env = {
            env_name("environment"): self.environment,
            env_name("database_url"): db_url,
            env_name("redis_url"): redis_url,
            env_name("jwt_secret"): sec["jwt_secret"],
            env_name("host_secret"): sec["host_secret"],
            env_name("data_dir"): str(self.data_dir),
            env_name("gateway_port"): str(self.gateway_port),
        }
        if self.socket_dir is not None:
            env[env_name("socket_dir")] = str(self.socket_dir)
        env.update(self.extra_env)
        self.env = env
        os.environ.update(env)  # this process creates users and runs migrations through the same settings
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
        env = {k: v for k, v in os.environ.items() if not k.startswith("TMUXI_")}
        env.update(self.env)
        env.update(more)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "layers"), str(ROOT)])
        return env

    def start_host(self, host_id: str) -> None:
        port = self.host_ports.get(host_id) or free_port()
        self.host_ports[host_id] = port
        _log(f"starting tmux host {host_id} on 127.0.0.1:{port} ...")
        assert self.log_dir is not None
        out = open(self.log_dir / f"{host_id}.log", "ab")  # noqa: SIM115 - owned by the child
        self.host_procs[host_id] = subprocess.Popen(
            [sys.executable, "-m", "tmux_host"],
            env=self._child_env(**{env_name("host_id"): host_id, env_name("host_port"): str(port)}),
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
        )
        wait_for_port("127.0.0.1", port, timeout_s=30)

    def stop_host(self, host_id: str, sig: int = signal.SIGTERM) -> None:
        proc = self.host_procs.pop(host_id, None)
        if proc is not None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def start_gateway(self) -> None:
        _log(f"starting the local API gateway on {self.gateway_url} ...")
        assert self.log_dir is not None
        out = open(self.log_dir / "gateway.log", "ab")  # noqa: SIM115 - owned by the child
        self.gateway_proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "local.gateway:create_gateway_app", "--factory",
             "--host", "127.0.0.1", "--port", str(self.gateway_port), "--loop", "uvloop", "--http", "httptools",
             "--no-access-log", "--no-proxy-headers", "--log-level", "warning",
             "--workers", str(self._gateway_workers())],
            env=self._child_env(), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
        )
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
        from tmuxi.auth import hash_password
        from tmuxi.db import repo
        from tmuxi.errors import Conflict

        try:
            repo.create_user(username, hash_password(password), role)
        except Conflict:
            repo.set_password(username, hash_password(password))

    def stop(self, kill_tmux: bool = True, keep_deps: bool = False) -> None:
        if self.gateway_proc is not None:
            self.gateway_proc.terminate()
            try:
                self.gateway_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.gateway_proc.kill()
            self.gateway_proc = None
        for host_id in list(self.host_procs):
            self.stop_host(host_id)
        if kill_tmux:
            kill_tmux_servers(self.socket_dir)
        if keep_deps:
            return
        self.redis.stop()
        from tmuxi.db.pool import close_pool

        close_pool()
        if self.pg is not None:
            self.pg.stop()


def kill_tmux_servers(socket_dir: Path | None) -> None:
    """Kill the tmux servers the hosts started (their sessions end with them)."""
    from tmux_host.control import kill_tmux_servers as kill
    from tmuxi.settings import Settings

    kill(socket_dir or Settings(socket_dir=None).resolved_socket_dir)
