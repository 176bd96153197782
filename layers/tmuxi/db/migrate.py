"""Versioned migrations: ``migrations/NNNN_name.sql`` applied in order, each in its own transaction, under an
advisory lock so concurrent cold starts do not race."""
from __future__ import annotations

import re
from importlib import resources

import psycopg

_LOCK_ID = 0x746D7578  # "tmux"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql\Z")


def available() -> list[tuple[int, str, str]]:
    out = []
    for entry in resources.files("tmuxi.db").joinpath("migrations").iterdir():
        m = _NAME.match(entry.name)
        if m:
            out.append((int(m.group(1)), m.group(2), entry.read_text()))
    return sorted(out)


def migrate(url: str) -> list[int]:
    """Apply pending migrations; return the versions applied."""
    applied: list[int] = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_ID,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
            current = int(row[0]) if row else 0
            for version, name, sql in available():
                if version <= current:
                    continue
                with conn.transaction():
                    conn.execute(sql)  # trusted file shipped with the package
                    conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name))
                applied.append(version)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
    return applied
