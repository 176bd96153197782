"""Versioned migrations: ``migrations/NNNN_name.sql`` applied in order, each in its own transaction, under an
advisory lock so two runs never race.

Migrating is a step of its own, never part of a cold start (a Lambda environment would otherwise take the lock
and read the schema on every start, and a failing migration would fail every request):

    python -m tmuxi.db.migrate        # or `make migrate`; the database of TMUXI_DATABASE_URL

prints a line per step and exits 0 when the schema is current (migrations applied, or nothing to do), 1 with a
message saying what to fix otherwise. The local stack migrates before it starts anything, and its embedded
PostgreSQL comes up migrated (``local/services.py``). The code only checks: the first use of a pooled connection
in a process (``db/pool.py``) compares the schema's version with the newest migration the code ships and refuses
with ``SchemaBehind`` while the schema is behind. A schema ahead of the code (new code migrated it while old code
still runs) is fine: migrations only add what old code ignores."""
from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from functools import lru_cache
from importlib import resources
from typing import Any

import psycopg
from psycopg.rows import tuple_row

from tmuxi.errors import DependencyUnavailable

_LOCK_ID = 0x746D7578  # "tmux"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql\Z")
FIX = "run `python -m tmuxi.db.migrate` (`make migrate`) against this database"


class SchemaBehind(DependencyUnavailable):
    """The database's schema is older than this code: migrations have not been run."""


def _files() -> list[tuple[int, str, Any]]:
    out = []
    for entry in resources.files("tmuxi.db").joinpath("migrations").iterdir():
        m = _NAME.match(entry.name)
        if m:
            out.append((int(m.group(1)), m.group(2), entry))
    return sorted(out, key=lambda f: f[0])


def available() -> list[tuple[int, str, str]]:
    """Every migration the code ships: (version, name, SQL), oldest first."""
    return [(version, name, entry.read_text()) for version, name, entry in _files()]


@lru_cache(maxsize=1)
def latest_version() -> int:
    """The version of the newest migration the code ships (what it needs)."""
    files = _files()
    return files[-1][0] if files else 0


def current_version(conn: psycopg.Connection[Any]) -> int:
    """The schema's version (0: never migrated)."""
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
        if not (row and row[0]):
            return 0
        row = cur.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    return int(row[0]) if row else 0


def require_current(conn: psycopg.Connection[Any]) -> None:
    """Raise SchemaBehind unless the schema is at least at the code's newest migration."""
    have, need = current_version(conn), latest_version()
    if have < need:
        raise SchemaBehind(f"the database schema is at version {have}, this code needs {need}: {FIX}")


class MigrationFailed(Exception):
    def __init__(self, version: int, name: str, at: int, cause: psycopg.Error) -> None:
        super().__init__(
            f"migration {version:04d}_{name} failed and was rolled back: {str(cause).strip()}; the schema stays at "
            f"version {at}. Fix what the error names (the migration, or data it cannot convert) and run again"
        )


def migrate(url: str, progress: Callable[[str], None] | None = None, *, upto: int | None = None) -> list[int]:
    """Apply pending migrations (those up to version ``upto`` only, when given: a restore recreates the schema of
    its backup); return the versions applied. ``progress`` gets a line per step."""
    say = progress or (lambda _line: None)
    applied: list[int] = []
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (_LOCK_ID,)).fetchone()
        if not (row and row[0]):
            say("another migration run holds the migration lock; waiting for it to finish")
            conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_ID,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            current = current_version(conn)
            pending = [m for m in available() if m[0] > current and (upto is None or m[0] <= upto)]
            say(f"schema at version {current}; this code's newest migration is {latest_version()}"
                + (f"; {len(pending)} to apply" if pending else ""))
            for version, name, sql in pending:
                t0 = time.monotonic()
                say(f"applying {version:04d}_{name} ...")
                try:
                    with conn.transaction():
                        conn.execute(sql)  # trusted file shipped with the package
                        conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                                     (version, name))
                except psycopg.Error as exc:
                    raise MigrationFailed(version, name, current if not applied else applied[-1], exc) from exc
                applied.append(version)
                say(f"applied {version:04d}_{name} in {(time.monotonic() - t0) * 1000:.0f} ms")
        finally:
            if not conn.broken:
                conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
    return applied


def password_refused(exc: psycopg.Error) -> bool:
    """Did the server refuse the password (a rotated one)? libpq gives a failed connect no SQLSTATE (psycopg's
    ``sqlstate`` is None), only the server's message, in its lc_messages (English on RDS)."""
    return exc.sqlstate == "28P01" or "password authentication failed" in str(exc)


def migrate_configured(progress: Callable[[str], None] | None = None) -> list[int]:
    """``migrate`` the database of the settings: ``database_url``, or the secret ``database_secret_id`` (fetched
    anew once if PostgreSQL refuses its password: it was rotated since it was cached)."""
    from tmuxi.db.pool import database_url
    from tmuxi.settings import get_settings

    try:
        return migrate(database_url(), progress)
    except psycopg.OperationalError as exc:
        if not password_refused(exc) or not get_settings().database_secret_id:
            raise
    if progress is not None:
        progress("PostgreSQL refused the database secret's password; fetching the secret anew")
    return migrate(database_url(refresh=True), progress)


def _where(url: str) -> str:
    """The database, for people: never the password."""
    from psycopg.conninfo import conninfo_to_dict

    info = conninfo_to_dict(url)
    return (f"database {info.get('dbname', '?')} on {info.get('host') or info.get('hostaddr') or 'localhost'}"
            f"{':' + str(info['port']) if info.get('port') else ''} as {info.get('user', '?')}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    argparse.ArgumentParser(
        prog="python -m tmuxi.db.migrate",
        description="Apply the schema migrations this code ships to the database of TMUXI_DATABASE_URL "
                    "(exit 0: the schema is current; 1: it is not, and the message says what to fix).",
    ).parse_args(argv)
    from pydantic import ValidationError

    from tmuxi.db.pool import database_url
    from tmuxi.settings import env_name, get_settings

    try:
        s = get_settings()
    except ValidationError as exc:
        print(f"error: the settings do not validate: {exc}", file=sys.stderr)
        return 1
    if s.database_url is None and not s.database_secret_id:
        print(f"error: {env_name('database_url')} is not set: set it to the database to migrate (the local stack, "
              "`make run`, migrates its embedded PostgreSQL by itself)", file=sys.stderr)
        return 1
    url = database_url()
    print(f"migrating {_where(url)}", flush=True)
    try:
        applied = migrate_configured(progress=lambda line: print(line, flush=True))
    except MigrationFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except psycopg.OperationalError as exc:
        print(f"error: cannot reach PostgreSQL ({_where(url)}): {str(exc).strip()}\n"
              "check TMUXI_DATABASE_URL and that the server is up and accepts this user, then run again",
              file=sys.stderr)
        return 1
    print(f"done: applied {', '.join(f'{v:04d}' for v in applied)}" if applied else "done: nothing to apply")
    return 0


if __name__ == "__main__":
    sys.exit(main())
