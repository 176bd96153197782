"""The whole system on one machine: PostgreSQL (embedded unless a URL is given), redis-server on a free port,
N tmux hosts, the local API gateway (REST) and the local WebSocket API (``local/ws_gateway.py``), each a real
process. Used by ``make run`` and by the test fixtures.

Settings: every ``TMUXI_*`` variable in the environment reaches every service. The stack fills in only what is
left unset (database and Redis URLs of the ones it starts, generated secrets, data dir, gateway port...); a given
``TMUXI_DATABASE_URL`` / ``TMUXI_REDIS_URL`` means that dependency is not started. The constructor's explicit
arguments (``database_url``, ``redis``, ``socket_dir``, ``gateway_port``, ``gateway_ws_port``, ``environment``,
``extra_env``) win over the environment.

The WebSocket API plays API Gateway's: it posts ``$default`` messages to the hosts (TMUXI_GATEWAY_WS_TARGETS) and
the hosts post output to its Management API (TMUXI_WS_MANAGEMENT_ENDPOINT), which takes only requests SigV4-signed
with the stack's own AWS credentials: generated once (``secrets.json``) and given as AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION to the gateways and the hosts (``aws_env``), in place of any the
environment holds.

What it writes is private: the data dir is 0711 (the embedded PostgreSQL's system user traverses it), the logs
0700 / 0600, ``secrets.json`` 0600.

Supervision (``supervise()``, started by ``local.run``): a thread notices a tmux host or a gateway (REST:
``gateway``, WebSocket: ``ws-gateway``) exiting unexpectedly, kills what is left of its process group (each
service is started as a group of its own: the gateway's uvicorn workers, a host's helpers), and starts it again
after a backoff that doubles each time; a restart counts only once the new process itself listens on the
service's port (never a leftover or another program answering there). After ``max_failures`` exits or failed
restarts within ``failure_window_s`` it gives up on that process: said loudly, recorded in ``failed``, never
retried. Every step is one ``[stack] supervisor`` line of ``key=value`` fields (process, pid, exit_code /
signal, status, action, duration_ms)."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
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
    write_private_file,
)
from tmuxi.settings import env_name

ROOT = Path(__file__).resolve().parent.parent

# what secrets.json holds: generated once, kept 0600 under the data dir (never in code, logs or command lines)
_SECRETS = ("jwt_secret", "host_secret", "postgres_password", "redis_password", "aws_access_key_id",
            "aws_secret_access_key")
_KEY_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


def _log(msg: str) -> None:
    print(f"[stack] {msg}", file=sys.stderr, flush=True)


def _field(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    text = str(value)
    return json.dumps(text) if not text or any(c in text for c in ' ="\n') else text


def _event(**fields: object) -> None:
    """One supervisor line: ``[stack] supervisor process=gateway pid=123 signal=SIGKILL status=exited ...``."""
    _log("supervisor " + " ".join(f"{k}={_field(v)}" for k, v in fields.items() if v is not None))


def _exit_fields(code: int) -> dict[str, object]:
    """``exit_code=N`` for an exit, ``signal=NAME`` for a death by signal (Popen's negative return code)."""
    if code >= 0:
        return {"exit_code": code}
    try:
        return {"signal": signal.Signals(-code).name}
    except ValueError:
        return {"signal": -code}


def _exit_text(code: int) -> str:
    return " ".join(f"{k}={v}" for k, v in _exit_fields(code).items())


class ServiceFailed(RuntimeError):
    """A service the stack started exited, or never listened on its port, while it was being started."""


class _Aborted(Exception):
    """The stack is stopping: a restart under way gives up waiting (its process is stopped with the rest)."""


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
            data[k] = _new_secret(k)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private_file(path, json.dumps(data))
    return data


def _new_secret(name: str) -> str:
    if name.endswith("_password"):
        return new_password()
    if name == "aws_access_key_id":  # shaped like AWS's (AKIA + 16), so no client takes it for something else
        return "AKIA" + "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(16))
    if name == "aws_secret_access_key":
        return secrets.token_urlsafe(30)  # 40 characters, as AWS's
    return secrets.token_urlsafe(48)


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
    # None: a free port (`make run` passes TMUXI_GATEWAY_WS_PORT, else the settings' 8081)
    gateway_ws_port: int | None = None
    environment: str | None = None  # None: TMUXI_ENVIRONMENT, else development
    extra_env: dict[str, str] = field(default_factory=dict)  # given to every service, over everything else
    log_dir: Path | None = None

    pg: EmbeddedPostgres | None = None
    # None: TMUXI_REDIS_URL, else a redis-server started here; a given one is started unless it runs
    redis: RedisServer | None = None
    host_procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    host_ports: dict[str, int] = field(default_factory=dict)
    gateway_proc: subprocess.Popen[bytes] | None = None
    ws_gateway_proc: subprocess.Popen[bytes] | None = None  # the local WebSocket API (local/ws_gateway.py)
    scheduler_proc: subprocess.Popen[bytes] | None = None  # the local EventBridge (local/scheduler.py)
    env: dict[str, str] = field(default_factory=dict)  # the TMUXI_* settings the services get
    # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION: the local AWS the gateways and hosts use
    aws_env: dict[str, str] = field(default_factory=dict)
    # supervision (supervise()): the wait before a restart doubles from restart_backoff_s[0] up to
    # restart_backoff_s[1]; max_failures exits or failed restarts within failure_window_s and it gives up
    max_failures: int = 5
    failure_window_s: float = 60.0
    restart_backoff_s: tuple[float, float] = (0.5, 8.0)
    failed: dict[str, str] = field(default_factory=dict)  # process -> why the supervisor gave up on it
    restarts: dict[str, int] = field(default_factory=dict)  # process -> restarts that came up
    _inherited: dict[str, str] = field(default_factory=dict, repr=False)
    _saved_environ: dict[str, str | None] = field(default_factory=dict, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _supervisor: threading.Thread | None = field(default=None, repr=False)
    _supervise_stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _failures: dict[str, list[float]] = field(default_factory=dict, repr=False)  # monotonic times, in window
    _down: dict[str, float] = field(default_factory=dict, repr=False)  # process -> when to try to start it

    def __post_init__(self) -> None:
        if self.gateway_port is None:
            self.gateway_port = int(_set(os.environ, "gateway_port") or 8080)
        if self.gateway_ws_port is None:  # (not from the environment: a stack started earlier in this process
            self.gateway_ws_port = free_port()  # exports its own settings there; `make run` passes the port)

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def ws_gateway_url(self) -> str:
        """The WebSocket API's HTTP side: its Management API endpoint (``@connections``), /health, /metrics."""
        return f"http://127.0.0.1:{self.gateway_ws_port}"

    @property
    def ws_url(self) -> str:
        """Where clients open WebSockets (with ``?ticket=...``)."""
        return f"ws://127.0.0.1:{self.gateway_ws_port}/ws"

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
        # db_pool_max: the settings' default is Lambda's (one request at a time); the gateway's workers and the
        # hosts serve many at once in threads
        for name, value in (("environment", "development"), ("jwt_secret", sec["jwt_secret"]),
                            ("host_secret", sec["host_secret"]), ("db_pool_max", "10")):
            if _set(given, name) is None:
                env[env_name(name)] = value
        # ... what this stack decided or was told explicitly is what it runs with
        env[env_name("database_url")] = db_url
        env[env_name("redis_url")] = redis_url
        env[env_name("data_dir")] = str(self.data_dir)
        env[env_name("gateway_port")] = str(self.gateway_port)
        env[env_name("gateway_ws_port")] = str(self.gateway_ws_port)
        env[env_name("ws_management_endpoint")] = self.ws_gateway_url  # where the hosts post output
        env[env_name("api_url")] = self.gateway_url  # where the mcp function's tools call the REST API
        if self.environment is not None:
            env[env_name("environment")] = self.environment
        if self.socket_dir is not None:
            env[env_name("socket_dir")] = str(self.socket_dir)
        env.update(self.extra_env)
        self.env = env
        from tmuxi.settings import Settings

        self.aws_env = {"AWS_ACCESS_KEY_ID": sec["aws_access_key_id"],
                        "AWS_SECRET_ACCESS_KEY": sec["aws_secret_access_key"],
                        "AWS_DEFAULT_REGION": env.get(env_name("aws_region")) or _set(given, "aws_region")
                        or str(Settings.model_fields["aws_region"].default)}
        # this process creates users and runs migrations through the same settings (until stop())
        for k, v in env.items():
            self._saved_environ.setdefault(k, os.environ.get(k))
            os.environ[k] = v
        from tmuxi.db.migrate import migrate

        applied = migrate(db_url)
        _log(f"database migrated (applied {applied or 'nothing new'})")
        for i in range(1, self.hosts + 1):
            self.start_host(f"host-{i}")
        self.start_ws_gateway()
        self.start_gateway()
        self.wait_ready()
        self.start_scheduler()
        _log(f"stack ready in {time.monotonic() - t0:.1f}s")
        return self

    def _child_env(self, aws: bool = False, **more: str) -> dict[str, str]:
        """The environment of a service; ``aws``: with the stack's AWS credentials (and none of the caller's)."""
        env = dict(self._inherited or os.environ)
        env.update(self.env)
        if aws:
            for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_CREDENTIAL_EXPIRATION"):
                env.pop(name, None)
            env.update(self.aws_env)
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
        """Start (or start again) tmux host ``host_id``; returns once it listens on its port. By hand: the
        supervisor forgets what it knew of this host's failures."""
        with self._lock:
            self._forget(host_id)
            self._launch_host(host_id)

    def stop_host(self, host_id: str, sig: int = signal.SIGTERM) -> None:
        """Stop tmux host ``host_id``; the supervisor leaves it stopped."""
        with self._lock:
            self._forget(host_id)
            proc = self.host_procs.pop(host_id, None)
            if proc is not None:
                _stop_proc(proc, sig)

    def start_gateway(self) -> None:
        with self._lock:
            self._forget("gateway")
            self._launch_gateway()

    def start_ws_gateway(self) -> None:
        """Start (or start again) the WebSocket API; its ``$default`` targets are the hosts known now."""
        with self._lock:
            self._forget("ws-gateway")
            self._launch_ws_gateway()

    def start_scheduler(self) -> None:
        with self._lock:
            self._forget("scheduler")
            self._launch_scheduler()

    def stop_scheduler(self) -> None:
        """Stop the scheduled maintenance; the supervisor leaves it stopped (``start_scheduler`` starts it again)."""
        with self._lock:
            self._forget("scheduler")
            proc = self._unregister("scheduler")
            if proc is not None:
                _stop_proc(proc, signal.SIGTERM)

    def _launch_scheduler(self, abort: threading.Event | None = None) -> None:
        """Scheduled maintenance (every task of tmuxi/schedules.py on its rate), as EventBridge invokes it in AWS."""
        _log("starting the scheduler (maintenance tasks on the schedules of tmuxi/schedules.py) ...")
        self.scheduler_proc = self._spawn([sys.executable, "-m", "local.scheduler"], "scheduler.log",
                                          self._child_env())
        time.sleep(0.05)
        code = self.scheduler_proc.poll()
        if code is not None:
            raise ServiceFailed(f"the scheduler exited ({_exit_text(code)}); see {self.log_dir}/scheduler.log")

    def _forget(self, name: str) -> None:
        self._down.pop(name, None)
        self._failures.pop(name, None)
        self.failed.pop(name, None)

    def _launch_host(self, host_id: str, abort: threading.Event | None = None) -> None:
        port = self.host_ports.get(host_id) or free_port()
        self.host_ports[host_id] = port
        _log(f"starting tmux host {host_id} on 127.0.0.1:{port} ...")
        proc = self.host_procs[host_id] = self._spawn(
            [sys.executable, "-m", "tmux_host"], f"{host_id}.log",
            self._child_env(aws=True, **{env_name("host_id"): host_id, env_name("host_port"): str(port)}),
        )
        self._wait_serving(proc, port, f"tmux host {host_id}", f"{host_id}.log", abort)

    def _launch_gateway(self, abort: threading.Event | None = None) -> None:
        from local.gateway import HTTP_PROTOCOL, KEEP_ALIVE_TIMEOUT_S

        _log(f"starting the local API gateway on {self.gateway_url} ...")
        proc = self.gateway_proc = self._spawn(
            # uvicorn's httptools protocol with API Gateway's request limits and read timeouts (local/gateway.py)
            [sys.executable, "-m", "uvicorn", "local.gateway:create_gateway_app", "--factory",
             "--host", "127.0.0.1", "--port", str(self.gateway_port), "--loop", "uvloop", "--http", HTTP_PROTOCOL,
             "--timeout-keep-alive", str(KEEP_ALIVE_TIMEOUT_S),
             "--no-access-log", "--no-proxy-headers", "--log-level", "warning",
             "--workers", str(self._gateway_workers())],
            "gateway.log", self._child_env(aws=True, PROMETHEUS_MULTIPROC_DIR=str(self._gateway_metrics_dir())),
        )
        assert self.gateway_port is not None
        self._wait_serving(proc, self.gateway_port, "the gateway", "gateway.log", abort)

    def _gateway_metrics_dir(self, clear: bool = True) -> Path:
        """Where the REST gateway's workers keep their metrics (prometheus_client's multiprocess mode): emptied
        before the gateway starts, as that mode requires (files of a previous run would be counted again)."""
        d = self.data_dir / "run" / "gateway-metrics"
        if clear:
            shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        return d

    def _launch_ws_gateway(self, abort: threading.Event | None = None) -> None:
        """The WebSocket API: one process (it holds every connection), ``$default`` to the hosts in turn."""
        assert self.gateway_ws_port is not None
        _log(f"starting the local WebSocket API on {self.ws_url} ...")
        targets = ",".join(self.host_url(h) for h in sorted(self.host_ports))
        proc = self.ws_gateway_proc = self._spawn(
            [sys.executable, "-m", "local.ws_gateway", "--host", "127.0.0.1", "--port", str(self.gateway_ws_port)],
            "ws-gateway.log", self._child_env(aws=True, **{env_name("gateway_ws_targets"): targets,
                                                            env_name("gateway_metrics_dir"): str(
                                                                self._gateway_metrics_dir(clear=False))}),
        )
        self._wait_serving(proc, self.gateway_ws_port, "the WebSocket gateway", "ws-gateway.log", abort)

    def _wait_serving(self, proc: subprocess.Popen[bytes], port: int, what: str, log_name: str,
                      abort: threading.Event | None = None, timeout_s: float = 30.0) -> None:
        """Until ``proc`` itself holds a listening socket on ``port``: something else answering there (the
        workers of a gateway that was killed, another program) is not it, and an exit fails at once."""
        deadline = time.monotonic() + timeout_s
        while True:
            code = proc.poll()
            if code is not None:
                raise ServiceFailed(f"{what} (pid {proc.pid}) exited ({_exit_text(code)}) before listening on "
                                    f"127.0.0.1:{port}{_held_by(port)}; see {self.log_dir}/{log_name}")
            if proc.pid in listening_pids(port, [proc.pid]):
                return
            if abort is not None and abort.is_set():
                raise _Aborted
            if time.monotonic() > deadline:
                raise ServiceFailed(f"{what} (pid {proc.pid}) not listening on 127.0.0.1:{port} after "
                                    f"{timeout_s:.0f}s{_held_by(port)}; see {self.log_dir}/{log_name}")
            time.sleep(0.05)

    def _gateway_workers(self) -> int:
        from tmuxi.settings import Settings

        return int(Settings().resolved_gateway_workers)  # this process's environment now holds the stack's

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until every host has heartbeated and the gateways' /health say ok."""
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            try:
                r = httpx.get(self.gateway_url + "/health", timeout=2)
                last = r.text
                body = r.json()
                if body.get("status") == "ok" and body["checks"].get("hosts") == f"{self.hosts} live":
                    r = httpx.get(self.ws_gateway_url + "/health", timeout=2)
                    last = f"WebSocket gateway: {r.text}"
                    if r.json().get("status") == "ok":
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

    # --- supervision ---------------------------------------------------------------------------------
    def supervise(self, interval_s: float = 0.2) -> threading.Thread:
        """Watch the hosts and the gateway from a thread (until ``stop()``): see the module's docstring."""
        with self._lock:
            if self._supervisor is None or not self._supervisor.is_alive():
                self._supervise_stop.clear()
                self._supervisor = threading.Thread(target=self._supervise, args=(interval_s,),
                                                    name="stack-supervisor", daemon=True)
                self._supervisor.start()
            return self._supervisor

    def _supervise(self, interval_s: float) -> None:
        while not self._supervise_stop.wait(interval_s):
            try:
                self.supervise_once()
            except Exception as exc:  # never die silently: the stack would no longer be supervised
                _event(status="supervisor_error", error=repr(exc), action="retry_next_tick")

    def _running(self) -> dict[str, subprocess.Popen[bytes]]:
        procs = dict(self.host_procs)
        if self.gateway_proc is not None:
            procs["gateway"] = self.gateway_proc
        if self.ws_gateway_proc is not None:
            procs["ws-gateway"] = self.ws_gateway_proc
        if self.scheduler_proc is not None:
            procs["scheduler"] = self.scheduler_proc
        return procs

    def supervise_once(self) -> None:
        """One look: note the processes that exited, start those whose backoff is over."""
        with self._lock:
            for name, proc in self._running().items():
                code = proc.poll()
                if code is not None:
                    self._exited(name, proc, code)
            now = time.monotonic()
            for name, at in list(self._down.items()):
                if at <= now and not self._supervise_stop.is_set():
                    self._restart(name)

    def _unregister(self, name: str) -> subprocess.Popen[bytes] | None:
        if name == "gateway":
            proc, self.gateway_proc = self.gateway_proc, None
            return proc
        if name == "ws-gateway":
            proc, self.ws_gateway_proc = self.ws_gateway_proc, None
            return proc
        if name == "scheduler":
            proc, self.scheduler_proc = self.scheduler_proc, None
            return proc
        return self.host_procs.pop(name, None)

    def _exited(self, name: str, proc: subprocess.Popen[bytes], code: int) -> None:
        self._unregister(name)
        # what it leaves behind (uvicorn workers, helpers) goes too, before anything is started in its place
        killed, left = kill_process_group(proc.pid)
        self._failure(name, "exited", f"pid={proc.pid} {_exit_text(code)}", pid=proc.pid, **_exit_fields(code),
                      leftovers_killed=killed, leftovers_remaining=",".join(map(str, left)) or None)

    def _failure(self, name: str, status: str, detail: str, **fields: object) -> None:
        """Count one failure of ``name``; schedule its restart, or give up on it after too many."""
        now = time.monotonic()
        recent = [t for t in self._failures.get(name, []) if now - t < self.failure_window_s] + [now]
        self._failures[name] = recent
        failures = f"{len(recent)}/{self.max_failures}"
        if len(recent) >= self.max_failures:
            self._down.pop(name, None)
            self.failed[name] = f"{len(recent)} failures within {self.failure_window_s:.0f}s, last: {detail}"
            _event(process=name, status=status, **fields, failures=failures, action="give_up")
            _log(f"ERROR: {name} failed {len(recent)} times within {self.failure_window_s:.0f}s (last: {detail}); "
                 f"not restarting it again, it stays DOWN. See {self.log_dir}/{self._log_name(name)}.")
            return
        backoff = min(self.restart_backoff_s[0] * 2 ** (len(recent) - 1), self.restart_backoff_s[1])
        self._down[name] = now + backoff
        _event(process=name, status=status, **fields, failures=failures, action="restart", backoff_s=backoff)

    @staticmethod
    def _log_name(name: str) -> str:
        return "gateway.log" if name == "gateway" else f"{name}.log"

    def _restart(self, name: str) -> None:
        t0 = time.monotonic()
        try:
            if name == "gateway":
                self._launch_gateway(abort=self._supervise_stop)
            elif name == "ws-gateway":
                self._launch_ws_gateway(abort=self._supervise_stop)
            elif name == "scheduler":
                self._launch_scheduler(abort=self._supervise_stop)
            else:
                self._launch_host(name, abort=self._supervise_stop)
        except _Aborted:
            return  # stop() stops the process with the others
        except Exception as exc:
            proc = self._unregister(name)
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
                kill_process_group(proc.pid)
            self._failure(name, "restart_failed", str(exc), pid=proc.pid if proc else None, error=str(exc),
                          duration_ms=round((time.monotonic() - t0) * 1000))
            return
        self._down.pop(name, None)
        self.restarts[name] = self.restarts.get(name, 0) + 1
        proc = self._running()[name]
        _event(process=name, status="restarted", pid=proc.pid, restarts=self.restarts[name],
               duration_ms=round((time.monotonic() - t0) * 1000))

    def stop(self, kill_tmux: bool = True, keep_deps: bool = False) -> None:
        self._supervise_stop.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=60)
            self._supervisor = None
        if self.scheduler_proc is not None:
            _stop_proc(self.scheduler_proc, signal.SIGTERM)
            self.scheduler_proc = None
        if self.gateway_proc is not None:
            _stop_proc(self.gateway_proc, signal.SIGTERM)
            self.gateway_proc = None
        if self.ws_gateway_proc is not None:
            _stop_proc(self.ws_gateway_proc, signal.SIGTERM)
            self.ws_gateway_proc = None
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


def _proc_pids() -> list[str]:
    return [p for p in os.listdir("/proc") if p.isdigit()]


def process_group_members(pgid: int) -> list[int]:
    """The live processes of process group ``pgid`` (zombies hold nothing and are left out: in a container
    nobody may reap the orphans)."""
    members = []
    for pid in _proc_pids():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            members.append(int(pid))
    return members


def kill_process_group(pgid: int, timeout_s: float = 10.0) -> tuple[int, list[int]]:
    """SIGKILL what is left of process group ``pgid`` and wait until it is gone: how many there were, and
    those still there after ``timeout_s`` (none, unless stuck in the kernel)."""
    members = process_group_members(pgid)
    if members:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while (left := process_group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return len(members), left


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{f[9]}]")
    return inodes


def listening_pids(port: int, among: Iterable[int | str] | None = None) -> set[int]:
    """The processes (of ``among``, else all we may look at) holding a listening TCP socket on ``port``."""
    inodes = _listening_inodes(port)
    found: set[int] = set()
    if not inodes:
        return found
    for pid in _proc_pids() if among is None else among:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    found.add(int(pid))
                    break
    return found


def _held_by(port: int) -> str:
    holders = listening_pids(port)
    return f" (the port is held by pid {', '.join(map(str, sorted(holders)))})" if holders else ""


def kill_tmux_servers(socket_dir: Path | None) -> None:
    """Kill the tmux servers the hosts started (their sessions end with them)."""
    from tmux_host.control import kill_tmux_servers as kill
    from tmuxi.settings import Settings

    kill(socket_dir or Settings(socket_dir=None).resolved_socket_dir)
