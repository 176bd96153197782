"""The local redis-server asks for a password on its TCP port and on its Unix socket; the password is in a
0600 config file, not on the command line; it is restarted with the same password and never writes a dump;
the directories it uses under /tmp are refused when someone else could control them."""
from __future__ import annotations

import contextlib
import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from local.services import RedisServer, private_dir
from tests.conftest import Deps


def _raw_ping(family: socket.AddressFamily, address: str | tuple[str, int]) -> bytes:
    """What any local process (a shell) gets: RESP2, no client library, no password."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(address)
        s.sendall(b"PING\r\nGET anything\r\n")
        data = b""
        while data.count(b"\r\n") < 2:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def test_local_redis_refuses_clients_without_the_password(deps: Deps) -> None:
    r = deps.redis
    for reply in (_raw_ping(socket.AF_INET, ("127.0.0.1", r.port)), _raw_ping(socket.AF_UNIX, str(r.socket_path))):
        assert reply.startswith(b"-NOAUTH"), reply
        assert b"+PONG" not in reply
    for kw in ({"host": "127.0.0.1", "port": r.port}, {"unix_socket_path": str(r.socket_path)}):
        for password in (None, "wrong-" + r.password):
            with pytest.raises(redis.AuthenticationError), redis.Redis(
                    password=password, socket_timeout=5, retry=Retry(NoBackoff(), 0), **kw) as c:
                c.ping()
        with redis.Redis(password=r.password, socket_timeout=5, **kw) as c:
            assert c.ping() is True
    for url in (r.url, r.tcp_url):  # the forms the services and people use
        assert r.password in url
        with redis.Redis.from_url(url, socket_timeout=5) as c:
            assert c.ping() is True


def test_local_redis_password_is_in_a_private_config_file_not_the_command_line(deps: Deps) -> None:
    r = deps.redis
    assert r.proc is not None
    cmdline = Path(f"/proc/{r.proc.pid}/cmdline").read_bytes()
    assert r.password.encode() not in cmdline
    assert b"requirepass" not in cmdline
    st = r.config_path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    assert f"requirepass \"{r.password}\"" in r.config_path.read_text()
    d = r.socket_dir.lstat()
    assert stat.S_ISDIR(d.st_mode) and stat.S_IMODE(d.st_mode) == 0o700 and d.st_uid == os.geteuid()


@pytest.fixture()
def own_redis() -> Iterator[RedisServer]:
    r = RedisServer()
    try:
        yield r
    finally:
        r.stop()


def test_local_redis_restarts_with_the_same_password_and_writes_no_dump(own_redis: RedisServer) -> None:
    r = own_redis
    r.start()
    port, url = r.port, r.url
    with redis.Redis.from_url(r.url, socket_timeout=5) as c:
        c.set("k", "v")
        for cmd in ("SAVE", "BGSAVE", "BGREWRITEAOF", "CONFIG"):  # what would write a dump anyway
            with pytest.raises(redis.ResponseError, match="unknown command"):
                c.execute_command(cmd, "GET", "dir") if cmd == "CONFIG" else c.execute_command(cmd)
        with pytest.raises(redis.ResponseError, match="unknown command"):
            c.execute_command("SHUTDOWN", "SAVE")
    r.stop()
    assert not r.config_path.exists()
    for d in (r.socket_dir, Path.cwd()):
        assert not (d / "dump.rdb").exists() and not list(d.glob("appendonly*")), d
    r.start()  # as the fault tests do: same object, same port, socket and password
    assert (r.port, r.url) == (port, url)
    for u in (r.url, r.tcp_url):
        with redis.Redis.from_url(u, socket_timeout=5) as c:
            assert c.get("k") is None  # no persistence
    assert _raw_ping(socket.AF_UNIX, str(r.socket_path)).startswith(b"-NOAUTH")
    r.stop()
    assert not (r.socket_dir / "dump.rdb").exists()


@pytest.fixture()
def tmp_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="tl-", dir="/tmp"))
    try:
        yield d
    finally:
        for p in sorted(d.rglob("*"), reverse=True):
            with contextlib.suppress(OSError):
                p.unlink() if (p.is_symlink() or not p.is_dir()) else p.rmdir()
        d.rmdir()


def test_local_private_dirs_refuse_a_symlink_or_someone_elses_directory(tmp_dir: Path) -> None:
    target = tmp_dir / "elsewhere"
    target.mkdir(mode=0o777)
    link = tmp_dir / "link"
    link.symlink_to(target)
    with pytest.raises(RuntimeError, match=str(link)):
        RedisServer(socket_dir=link).start()
    assert not list(target.iterdir())  # nothing written through the link
    foreign = tmp_dir / "foreign"
    foreign.mkdir(mode=0o777)
    os.chown(foreign, 65534, 65534)  # as another user of the machine would have created it
    with pytest.raises(RuntimeError, match=str(foreign)):
        RedisServer(socket_dir=foreign).start()
    with pytest.raises(RuntimeError, match=str(foreign)):
        private_dir(foreign)
    assert not list(foreign.iterdir())
    afile = tmp_dir / "afile"
    afile.write_text("")
    with pytest.raises(RuntimeError, match=str(afile)):
        private_dir(afile)
    ours = tmp_dir / "ours"
    ours.mkdir(mode=0o777)
    ours.chmod(0o777)
    assert private_dir(ours) == ours and stat.S_IMODE(ours.stat().st_mode) == 0o700
