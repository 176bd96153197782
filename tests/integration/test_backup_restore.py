"""Backups (tmuxi.services.backup) against the real PostgreSQL of ``deps``: each test makes databases of its own on
that server (CREATE DATABASE), a source migrated and seeded with rows in every table, and empty targets; backups
go to a directory, and through S3 to the moto server of tests/integration/test_recordings_storage.py."""
from __future__ import annotations

import gzip
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.conftest import Deps, reset_process_state
from tests.integration.test_recordings_storage import BUCKET, Moto, moto  # noqa: F401 - the fixture
from tmuxi.db import dump
from tmuxi.db.migrate import migrate
from tmuxi.services import backup

SEEDED = ["users", "hosts", "sessions", "audit_events", "revoked_tokens", "host_extra_sessions", "ws_shares",
          "ws_tickets", "ws_connections", "incidents", "incident_events", "maintenance_runs"]


class Databases:
    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.made: list[str] = []

    def new(self, migrated: bool = False) -> str:
        name = f"bk_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.made.append(name)
        url = make_conninfo(self.admin_url, dbname=name)
        if migrated:
            migrate(url)
        return url

    def drop_all(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            for name in self.made:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def dbs(deps: Deps) -> Iterator[Databases]:
    d = Databases(deps.database_url)
    try:
        yield d
    finally:
        d.drop_all()


def seed(url: str, n: int = 50) -> None:
    """Rows in every table, with NULLs, JSON, bytea, a unicode name, and sequences that moved."""
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        conn.execute("""
            INSERT INTO users (id, username, password_hash, role, account_no, token_epoch)
            SELECT md5('u' || i)::uuid, 'user-' || i || CASE WHEN i = 1 THEN ' é漢' ELSE '' END, 'hash', 'user', i,
                   i % 3 FROM generate_series(1, 10) i;
            SELECT setval('users_account_no_seq', 10);
            INSERT INTO hosts (id, url, capacity, started_at, draining_at)
            VALUES ('h1', 'http://h1', 100, now(), NULL), ('h2', 'http://h2', 50, NULL, now());
            INSERT INTO sessions (id, owner_id, name, state, host_id, tmux_name, pane_id, cols, rows, ended_at)
            SELECT md5('s' || i)::uuid, md5('u' || (i % 10 + 1))::uuid, CASE WHEN i % 4 = 0 THEN NULL ELSE 'n' || i END,
                   'active', 'h' || (i % 2 + 1), 't' || i, '%' || i, 80, 24, NULL FROM generate_series(1, %(n)s) i;
            INSERT INTO audit_events (actor_id, action, session_id, status, detail)
            SELECT md5('u' || (i % 10 + 1))::uuid, 'session.create', md5('s' || (i % %(n)s + 1))::uuid, 'ok',
                   jsonb_build_object('i', i, 'q', E'quote\\' "x"\\ttab')
            FROM generate_series(1, 3 * %(n)s) i;
            INSERT INTO revoked_tokens (jti, user_id, expires_at) VALUES ('j1', md5('u1')::uuid, now());
            INSERT INTO host_extra_sessions (host_id, account_no, sessions) VALUES ('h1', 1, 2);
            INSERT INTO ws_shares (id, session_id, created_by, token_hash, expires_at)
            VALUES (md5('sh')::uuid, md5('s1')::uuid, md5('u1')::uuid, decode(repeat('ab', 32), 'hex'),
                    now() + interval '1 hour');
            INSERT INTO ws_tickets (ticket_hash, share_id, session_id, read_only, expires_at)
            VALUES (decode(repeat('cd', 32), 'hex'), md5('sh')::uuid, md5('s1')::uuid, true, now());
            INSERT INTO ws_connections (id, user_id, session_id, host_id, source_ip)
            VALUES ('c1', md5('u2')::uuid, md5('s2')::uuid, 'h1', '10.0.0.1');
            INSERT INTO incidents (key, priority, rule, title, opened_at, last_state)
            VALUES ('alarm-1', 'P2', 'r', 't', now(), 'ALARM');
            INSERT INTO incident_events (incident_id, kind) SELECT id, 'opened' FROM incidents;
            INSERT INTO maintenance_runs (task, status) VALUES ('backup', 'ok');
        """.replace("%(n)s", str(n)))


def rows_of(url: str) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every backed-up table, in primary-key order."""
    with dump.connect(url) as conn:
        out = {}
        for t in dump.tables(conn):
            q = sql.SQL("SELECT {} FROM {} ORDER BY {}").format(
                sql.SQL(", ").join(map(sql.Identifier, t.columns)), sql.Identifier("public", t.name),
                sql.SQL(", ").join(map(sql.Identifier, t.order_by)))
            out[t.name] = conn.execute(q).fetchall()
    return out


def test_backup_then_restore_reproduces_every_row_and_sequence(dbs: Databases, tmp_path: Path) -> None:
    src = dbs.new(migrated=True)
    seed(src)
    manifest = backup.export(str(tmp_path / "backups"), database_url=src)
    assert manifest.url == f"{tmp_path}/backups/{manifest.id}/manifest.json"
    assert json.loads(Path(manifest.url).read_text())["schema_version"] == manifest.schema_version
    counts = {t.name: t.rows for t in manifest.tables}
    assert all(counts[name] > 0 for name in SEEDED), counts
    # parents before children: COPY FROM checks each row's foreign keys as it goes in
    order = [t.name for t in manifest.tables]
    assert order.index("users") < order.index("sessions") < order.index("ws_shares") < order.index("ws_tickets")

    target = dbs.new()  # empty: not even migrated
    seen: list[tuple[str, str]] = []
    v = backup.restore(manifest.url, target, progress=lambda phase, table, *_: seen.append((phase, table)))
    assert v.ok and {t.name for t in v.tables} == set(counts)
    assert v.rows == sum(counts.values())
    assert ("restore", "audit_events") in seen and ("verify", "audit_events") in seen
    assert rows_of(target) == rows_of(src)
    with psycopg.connect(target) as conn:  # sequences carry on after the restored ids
        assert conn.execute("SELECT nextval('audit_events_id_seq')").fetchone() == (150 + 1,)
        assert conn.execute("SELECT nextval('users_account_no_seq')").fetchone() == (11,)


def test_a_damaged_object_or_a_missing_row_fails_verification_naming_the_table(dbs: Databases,
                                                                               tmp_path: Path) -> None:
    src = dbs.new(migrated=True)
    seed(src)
    manifest = backup.export(str(tmp_path), database_url=src)
    obj = tmp_path / manifest.id / "sessions.copy.gz"
    good = obj.read_bytes()

    # a flipped byte inside the compressed data: gzip's CRC or the manifest's sha256 catches it
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0x01
    obj.write_bytes(bytes(damaged))
    target = dbs.new()
    with pytest.raises(backup.VerificationFailed) as failed:
        backup.restore(manifest.url, target)
    assert list(failed.value.differences) == ["sessions"]
    assert rows_of(target)["users"] == []  # rolled back: the target is as it was, empty

    # an object replaced by other valid rows: it loads, and the sha256 says it is not the one backed up
    rows = gzip.decompress(good)
    obj.write_bytes(gzip.compress(rows, mtime=0, compresslevel=9))
    with pytest.raises(backup.VerificationFailed, match="sessions: object sessions.copy.gz is not the one"):
        backup.restore(manifest.url, target)

    obj.write_bytes(good)
    assert backup.restore(manifest.url, target).ok
    assert backup.verify(manifest.url, target).ok
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute("DELETE FROM audit_events WHERE id = 7")
    with pytest.raises(backup.VerificationFailed) as failed:
        backup.verify(manifest.url, target)
    assert failed.value.differences == {"audit_events": "149 rows, the backup has 150"}
    with psycopg.connect(target, autocommit=True) as conn:  # same count, one value changed
        conn.execute("INSERT INTO audit_events (id, actor_id, action, status) VALUES (7, NULL, 'x', 'ok')")
    with pytest.raises(backup.VerificationFailed) as failed:
        backup.verify(manifest.url, target)
    assert failed.value.differences == {"audit_events": "the rows' checksum differs from the backup's"}


def test_restore_into_a_database_with_rows_is_refused(dbs: Databases, tmp_path: Path) -> None:
    src = dbs.new(migrated=True)
    seed(src, n=5)
    manifest = backup.export(str(tmp_path), database_url=src)
    with pytest.raises(backup.RestoreRefused, match=r"holds rows \(in .*sessions.*CREATE DATABASE"):
        backup.restore(manifest.url, src)
    migrated_but_empty = dbs.new(migrated=True)  # a schema without rows is fine
    assert backup.restore(manifest.url, migrated_but_empty).ok


def test_two_backups_at_once_one_runs_one_is_skipped(dbs: Databases, tmp_path: Path) -> None:
    src = dbs.new(migrated=True)
    seed(src, n=5)
    inside, release = threading.Event(), threading.Event()
    results: list[backup.Manifest] = []

    def hold(phase: str, table: str, done: int, total: int) -> None:
        inside.set()  # the first run is exporting, holding the lock
        assert release.wait(30)

    first = threading.Thread(target=lambda: results.append(backup.export(str(tmp_path), hold, src)))
    first.start()
    try:
        assert inside.wait(30)
        with pytest.raises(backup.BackupSkipped, match="another backup is running"):
            backup.export(str(tmp_path), database_url=src)
    finally:
        release.set()
        first.join(30)
    assert len(results) == 1
    # the skipped run left nothing behind; the next one makes a new, whole backup beside the first
    assert [p.name for p in tmp_path.iterdir()] == [results[0].id]
    second = backup.export(str(tmp_path), database_url=src)
    assert second.id != results[0].id and (tmp_path / second.id / "manifest.json").is_file()


def test_backup_and_restore_through_s3(dbs: Databases, moto: Moto, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv("TMUXI_S3_ENDPOINT_URL", moto.url)
    reset_process_state()
    try:
        src = dbs.new(migrated=True)
        seed(src)
        manifest = backup.export(f"s3://{BUCKET}/env/backups", database_url=src)
        assert manifest.url == f"s3://{BUCKET}/env/backups/{manifest.id}/manifest.json"
        target = dbs.new()
        assert backup.restore(manifest.url, target).ok
        assert rows_of(target) == rows_of(src)
    finally:
        monkeypatch.delenv("TMUXI_S3_ENDPOINT_URL")
        reset_process_state()


def test_the_maintenance_task_backs_up_the_configured_database(deps: Deps, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from functions.maintenance.handler import handler

    monkeypatch.setenv("TMUXI_BACKUPS_URL", str(tmp_path))
    reset_process_state()
    try:
        out = handler({"task": "backup"}, None)
    finally:
        monkeypatch.delenv("TMUXI_BACKUPS_URL")
        reset_process_state()
    assert out["status"] == "ok" and out["result"]["skipped"] == 0
    (made,) = tmp_path.iterdir()
    manifest = json.loads((made / "manifest.json").read_text())
    assert len(manifest["tables"]) == out["result"]["tables"]


def test_a_run_that_fails_midway_names_nothing_and_releases_the_lock(dbs: Databases, tmp_path: Path) -> None:
    src = dbs.new(migrated=True)
    seed(src, n=5)

    def fail_on_sessions(phase: str, table: str, done: int, total: int) -> None:
        if table == "sessions":
            raise RuntimeError("the store went away")

    with pytest.raises(RuntimeError, match="the store went away"):
        backup.export(str(tmp_path), fail_on_sessions, src)
    (partial,) = tmp_path.iterdir()
    assert (partial / "users.copy.gz").is_file() and not (partial / "manifest.json").exists()
    with pytest.raises(backup.RestoreRefused, match="no backup manifest"):
        backup.restore(str(partial), dbs.new())
    done = backup.export(str(tmp_path), database_url=src)  # the lock was let go
    assert (tmp_path / done.id / "manifest.json").is_file()
