"""Data access for logical backups (services/backup.py): the tables in dependency order, COPY out of and into
them, per-table checksums computed by PostgreSQL, and the sequences.

Every table of the ``public`` schema is exported except ``schema_migrations``: a restore recreates the schema,
and that table with it, by running the migrations up to the backup's version. Connections here are their own
(``connect``), never the request pool's: a COPY of a million rows runs far past the pool's statement timeout.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

SCHEMA = "public"
SKIPPED_TABLES = frozenset({"schema_migrations"})
# Advisory lock of a backup run: a second run while one holds it is skipped (migrate.py uses 0x746D7578).
BACKUP_LOCK_ID = 0x746D7862  # "tmxb"
# Text output of a row (what the checksums hash) depends on these settings: pinned on both ends of a restore so
# the same rows give the same text. No statement timeout: a backup's COPY runs for as long as the table needs.
SESSION_OPTIONS = ("-c statement_timeout=0 -c idle_in_transaction_session_timeout=0 -c TimeZone=UTC "
                   "-c DateStyle=ISO,YMD -c IntervalStyle=postgres -c extra_float_digits=3 -c bytea_output=hex")

Conn = psycopg.Connection[tuple[Any, ...]]
_BATCH = 1 << 20


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    columns: tuple[str, ...]
    order_by: tuple[str, ...]  # the primary key; every column for a table without one


@dataclass(frozen=True, slots=True)
class Checksum:
    rows: int
    checksum: str


def connect(url: str) -> Conn:
    return psycopg.connect(url, autocommit=True, options=SESSION_OPTIONS, row_factory=tuple_row,
                           connect_timeout=10)


def try_lock(conn: Conn) -> bool:
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (BACKUP_LOCK_ID,)).fetchone()
    return bool(row and row[0])


def unlock(conn: Conn) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s)", (BACKUP_LOCK_ID,))


@contextmanager
def snapshot(conn: Conn, shared: str | None = None) -> Iterator[None]:
    """One consistent view of every table for everything run inside (REPEATABLE READ, READ ONLY); with
    ``shared`` (``export_snapshot`` of another connection's open snapshot), that same view."""
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    try:
        with conn.transaction():
            if shared is not None:
                conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(shared)))
            yield
    finally:
        conn.isolation_level = None
        conn.read_only = None


def export_snapshot(conn: Conn) -> str:
    """The id other connections give ``snapshot`` to see what this one's open snapshot sees."""
    row = conn.execute("SELECT pg_export_snapshot()").fetchone()
    assert row is not None
    return str(row[0])


def tables(conn: Conn) -> list[Table]:
    """Every table to back up, parents before the tables whose foreign keys point at them."""
    rows = conn.execute(
        """SELECT c.relname,
                  array(SELECT a.attname::text FROM pg_attribute a
                        WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum),
                  array(SELECT a.attname::text FROM pg_index i
                        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                        WHERE i.indrelid = c.oid AND i.indisprimary
                        ORDER BY array_position(i.indkey::int2[], a.attnum))
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND NOT c.relispartition
           ORDER BY c.relname""", (SCHEMA,)).fetchall()
    found = {name: Table(name, tuple(cols), tuple(pk) or tuple(cols))
             for name, cols, pk in rows if name not in SKIPPED_TABLES}
    edges = conn.execute(
        """SELECT DISTINCT c.relname, p.relname FROM pg_constraint k
           JOIN pg_class c ON c.oid = k.conrelid JOIN pg_class p ON p.oid = k.confrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE k.contype = 'f' AND n.nspname = %s AND k.conrelid <> k.confrelid""", (SCHEMA,)).fetchall()
    return [found[name] for name in dependency_order(sorted(found), [(c, p) for c, p in edges
                                                                       if c in found and p in found])]


def dependency_order(names: list[str], child_parent: Iterable[tuple[str, str]]) -> list[str]:
    """``names`` with each parent before its children (stable otherwise); ValueError on a cycle."""
    parents: dict[str, set[str]] = {n: set() for n in names}
    for child, parent in child_parent:
        parents[child].add(parent)
    out: list[str] = []
    done: set[str] = set()
    while len(out) < len(names):
        ready = [n for n in names if n not in done and parents[n] <= done]
        if not ready:
            raise ValueError(f"foreign keys form a cycle among {sorted(set(names) - done)}: "
                             "a COPY-based restore cannot order them")
        out.extend(ready)
        done.update(ready)
    return out


def _ident_list(names: Iterable[str]) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(n) for n in names)


def checksum(conn: Conn, table: Table) -> Checksum:
    """Row count and an order-independent checksum of the rows' text: the sum of the first 64 bits of each row's
    md5. md5 is the same on every server and platform (hashtextextended's value is not promised to be); it
    costs 1.5 s against hashtextextended's 1.1 s for 1,000,000 audit events (bench/bench_backup.py "choices")."""
    row = conn.execute(sql.SQL(
        "SELECT count(*), coalesce(sum(('x' || left(md5(({cols})::text), 16))::bit(64)::bigint), 0)::text "
        "FROM {table}").format(cols=sql.SQL("ROW({})").format(_ident_list(table.columns)),
                               table=sql.Identifier(SCHEMA, table.name))).fetchone()
    assert row is not None
    return Checksum(int(row[0]), str(row[1]))


def copy_out(conn: Conn, table: Table, fmt: str, write: Callable[[bytearray], object]) -> None:
    """The table's rows in primary-key order, as COPY ``fmt`` chunks handed to ``write`` as they come."""
    stmt = sql.SQL("COPY (SELECT {cols} FROM {table} ORDER BY {order}) TO STDOUT (FORMAT {fmt})").format(
        cols=_ident_list(table.columns), table=sql.Identifier(SCHEMA, table.name),
        order=_ident_list(table.order_by), fmt=sql.SQL(fmt))
    batch = bytearray()
    with conn.cursor() as cur, cur.copy(stmt) as copy:
        # libpq hands COPY out a row at a time: batched, the consumer (gzip) is called ~1,000x less often
        for chunk in copy:
            batch += chunk
            if len(batch) >= _BATCH:
                write(batch)
                batch = bytearray()
    if batch:
        write(batch)


def copy_in(conn: Conn, table: Table, fmt: str, chunks: Iterable[bytes]) -> None:
    stmt = sql.SQL("COPY {table} ({cols}) FROM STDIN (FORMAT {fmt})").format(
        table=sql.Identifier(SCHEMA, table.name), cols=_ident_list(table.columns), fmt=sql.SQL(fmt))
    with conn.cursor() as cur, cur.copy(stmt) as copy:
        for chunk in chunks:
            copy.write(chunk)


def secondary_indexes(conn: Conn, table: str) -> list[tuple[str, str]]:
    """(name, CREATE INDEX statement) of the table's indexes that back no constraint (primary key, unique,
    exclusion): a restore drops them before its COPY and builds each once after, as pg_restore does."""
    rows = conn.execute(
        """SELECT ic.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i
           JOIN pg_class ic ON ic.oid = i.indexrelid
           JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = %s AND c.relname = %s
             AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)
           ORDER BY ic.relname""", (SCHEMA, table)).fetchall()
    return [(str(name), str(definition)) for name, definition in rows]


def drop_index(conn: Conn, name: str) -> None:
    conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(SCHEMA, name)))


def create_index(conn: Conn, definition: str) -> None:
    conn.execute(definition)  # pg_get_indexdef's own text, read from this schema a moment before


def sequences(conn: Conn) -> dict[str, int | None]:
    """Each sequence's last value (None: never used). Sequences are not transactional: read inside the snapshot,
    a value is at least what any row of the snapshot took from it."""
    rows = conn.execute("SELECT sequencename, last_value FROM pg_sequences WHERE schemaname = %s "
                        "ORDER BY sequencename", (SCHEMA,)).fetchall()
    return {str(name): (int(value) if value is not None else None) for name, value in rows}


def set_sequence(conn: Conn, name: str, value: int) -> None:
    conn.execute("SELECT setval(%s, %s, true)", (sql.Identifier(SCHEMA, name).as_string(conn), value))


def non_empty_tables(conn: Conn) -> list[str]:
    """The backed-up kind of tables that hold at least one row."""
    out = []
    for table in tables(conn):
        row = conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(
            sql.Identifier(SCHEMA, table.name))).fetchone()
        if row and row[0]:
            out.append(table.name)
    return out


def server_version(conn: Conn) -> str:
    row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"
