"""Logical backups of the database to the object store, and restores verified row for row.

``export()`` (the maintenance function's ``backup`` task, and ``python -m ops.backup_cmds backup``) writes, from
one REPEATABLE READ, READ ONLY snapshot, every table as ``COPY (SELECT ... ORDER BY <primary key>) TO STDOUT``
gzipped into ``<backups_url>/<UTC timestamp>-<schema version>/<table>.copy.gz``, then ``manifest.json``: the schema
version, and per table its columns, row count, a checksum of its rows computed by PostgreSQL in the same snapshot,
and the object's byte size and sha256. The manifest is written last: a run that fails leaves objects no manifest
names, never a backup that looks whole. Runs are serialized by a PostgreSQL advisory lock: a second run while
one is under way is skipped (``BackupSkipped``); every run that goes ahead makes a new backup.

``restore()`` refuses a database that holds rows, migrates it up to the backup's schema version, loads the tables
parents first in ONE transaction, sets the sequences, recomputes every checksum inside that transaction and
commits only if all of them equal the manifest's: a restore that fails leaves the database as it found it.

Memory does not grow with a table: each table goes through a gzip file spooled on local disk (Lambda: /tmp) on
its way to the store, and comes back from the store as a stream.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import queue
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from tmuxi.observability import logger

if TYPE_CHECKING:
    from tmuxi.db.dump import Conn, Table
    from tmuxi.settings import Settings
    from tmuxi.storage import Store

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "tmuxi-backup/1"
# Measured on 1,000,000 audit events (bench/bench_backup.py "choices", 2 shared cores, best of 2): COPY out +
# gzip 1 took 3.9 s in binary (180 MB -> 76 MB) against 4.3 s in CSV (225 MB -> 82 MB). Binary it is: the same
# schema (the migrations up to the backup's version) reads it back, so its ties to the column types cost nothing.
COPY_FORMAT = "binary"
# gzip level 6 took 8.8 s for 71 MB (7% smaller than level 1's 76 MB, in 2.3x the time): level 1.
GZIP_LEVEL = 1
_CHUNK = 1 << 20
_QUEUED = 4
_MAX_MANIFEST_BYTES = 16 << 20

# (phase, table, done, total): phase "export" counts raw COPY bytes (total: 0, not known ahead), "restore" counts
# the object's bytes read (total: its size), "verify" rows (done == total once checked).
Progress = Callable[[str, str, int, int], None]


class BackupSkipped(Exception):
    """Another backup run holds the lock: this one did nothing."""


class RestoreRefused(Exception):
    """The target cannot take this backup; the message names the fix."""


class VerificationFailed(Exception):
    """The restored rows are not the backed-up ones; ``differences`` maps each table to what differs."""

    def __init__(self, differences: dict[str, str]) -> None:
        self.differences = differences
        super().__init__("verification failed: " + "; ".join(f"{t}: {d}" for t, d in differences.items()))


@dataclass(frozen=True, slots=True)
class TableEntry:
    name: str
    columns: list[str]
    order_by: list[str]
    rows: int
    checksum: str
    object: str
    bytes: int
    sha256: str
    raw_bytes: int


@dataclass(frozen=True, slots=True)
class Manifest:
    id: str
    url: str  # where manifest.json is
    schema_version: int
    created_at: str
    postgres_version: str
    copy_format: str
    tables: list[TableEntry]
    sequences: dict[str, int | None]
    duration_s: float
    format: str = MANIFEST_FORMAT

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("url")
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any], url: str) -> Manifest:
        if data.get("format") != MANIFEST_FORMAT:
            raise RestoreRefused(f"{url} is not a tmuxi backup manifest ({MANIFEST_FORMAT}); "
                                 "pass the manifest.json of a backup made by `backup`")
        tables = [TableEntry(**t) for t in data["tables"]]
        return cls(**{**data, "tables": tables, "url": url})


@dataclass(frozen=True, slots=True)
class TableCheck:
    name: str
    rows_expected: int
    rows_found: int
    checksum_ok: bool

    @property
    def ok(self) -> bool:
        return self.checksum_ok and self.rows_expected == self.rows_found


@dataclass(frozen=True, slots=True)
class Verification:
    manifest: str
    tables: list[TableCheck] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tables)

    @property
    def rows(self) -> int:
        return sum(t.rows_found for t in self.tables)


# --- where backups go ------------------------------------------------------------------------------------------
def backups_url(settings: Settings | None = None) -> str:
    if settings is None:
        from tmuxi.settings import get_settings

        settings = get_settings()
    return settings.backups_url or str((settings.data_dir / "backups").absolute())


def _store(url: str, settings: Settings | None = None) -> Store:
    """The store rooted at ``url`` (s3://bucket/prefix or a directory)."""
    from tmuxi.storage import LocalStore, S3Store, parse_s3_url

    if settings is None:
        from tmuxi.settings import get_settings

        settings = get_settings()
    if url.startswith("s3://"):
        bucket, prefix = parse_s3_url(url)
        return S3Store(bucket, prefix, settings.s3_endpoint_url, settings.aws_region)
    return LocalStore(url)


def _join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def _open(store: Store, key: str) -> BinaryIO:
    """A stream of the object (the Store interface only returns whole objects: a table can be larger than memory
    should hold)."""
    from tmuxi.errors import NotFound
    from tmuxi.storage import LocalStore, S3Store, check_key

    if isinstance(store, LocalStore):
        try:
            return open(store.root.joinpath(*check_key(key).split("/")), "rb")  # noqa: SIM115 - the caller closes
        except FileNotFoundError as exc:
            raise NotFound(f"no object {key!r} under {store.root}") from exc
    if isinstance(store, S3Store):
        from botocore.exceptions import ClientError

        try:
            body: BinaryIO = store._client.get_object(Bucket=store.bucket, Key=store.prefix + check_key(key))["Body"]
        except ClientError as exc:
            raise NotFound(f"no object {key!r} in s3://{store.bucket}/{store.prefix}") from exc
        return body
    raise TypeError(f"cannot stream from {type(store).__name__}")


# --- export ----------------------------------------------------------------------------------------------------
def export(store_url: str | None = None, progress: Progress | None = None,
           database_url: str | None = None) -> Manifest:
    """One backup of the database (default: the settings') into ``store_url`` (default: ``backups_url``).
    Raises BackupSkipped if another run holds the lock."""
    from tmuxi.db import dump
    from tmuxi.db.migrate import current_version
    from tmuxi.db.pool import database_url as configured_url

    say = progress or (lambda *_a: None)
    root = store_url or backups_url()
    store = _store(root)
    t0 = time.perf_counter()
    url = database_url or configured_url()
    with dump.connect(url) as conn:
        if not dump.try_lock(conn):
            logger.info("backup skipped: another run holds the lock", extra={"status": "skipped"})
            raise BackupSkipped("another backup is running; this run did nothing (the next one makes a new backup)")
        try:
            with dump.snapshot(conn):
                version = current_version(conn)
                backup_id = f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S.%fZ')}-{version:04d}"
                tables = dump.tables(conn)
                # the checksums run on a second connection in the same snapshot (exported), beside the COPYs:
                # they are a good part of the work (1.5 s of md5 against 3.9 s of COPY + gzip for 1,000,000
                # audit events), and PostgreSQL computes them in a backend of its own
                shared = dump.export_snapshot(conn)
                with dump.connect(url) as side, dump.snapshot(side, shared), \
                        ThreadPoolExecutor(1, thread_name_prefix="backup-checksums") as pool:
                    sums = pool.submit(lambda: {t.name: dump.checksum(side, t) for t in tables})
                    files = [_export_table(conn, store, backup_id, table, say) for table in tables]
                    checksums = sums.result()
                entries = [TableEntry(name=t.name, columns=list(t.columns), order_by=list(t.order_by),
                                      rows=checksums[t.name].rows, checksum=checksums[t.name].checksum, **f)
                           for t, f in zip(tables, files, strict=True)]
                seqs = dump.sequences(conn)
                pg_version = dump.server_version(conn)
            manifest = Manifest(
                id=backup_id, url=_join(root, backup_id, MANIFEST), schema_version=version,
                created_at=datetime.now(UTC).isoformat(), postgres_version=pg_version, copy_format=COPY_FORMAT,
                tables=entries, sequences=seqs, duration_s=round(time.perf_counter() - t0, 3))
            # last: only a backup whose every object is in place is named by a manifest
            store.put_bytes(f"{backup_id}/{MANIFEST}", json.dumps(manifest.to_json(), indent=1).encode())
        finally:
            if not conn.broken:
                dump.unlock(conn)
    logger.info("backup done", extra={"status": "ok", "backup": manifest.url, "tables": len(entries),
                                      "rows": sum(e.rows for e in entries),
                                      "bytes": sum(e.bytes for e in entries),
                                      "duration": round(manifest.duration_s * 1000, 3)})
    return manifest


def _export_table(conn: Conn, store: Store, backup_id: str, table: Table, say: Progress) -> dict[str, Any]:
    """COPY the table into a gzip file spooled on disk and put it in the store: the object's fields of its
    TableEntry. gzip runs in a thread of its own (zlib lets go of the GIL) while this one reads the COPY."""
    from tmuxi.db import dump

    t0 = time.perf_counter()
    name = f"{table.name}.copy.gz"
    fd, spool = tempfile.mkstemp(prefix=f".{table.name}.", suffix=".gz")
    try:
        with os.fdopen(fd, "wb") as raw:
            hashing = _HashingWriter(raw)
            with gzip.GzipFile(fileobj=hashing, mode="wb", compresslevel=GZIP_LEVEL, mtime=0) as gz:
                raw_bytes = _copy_through(lambda write: dump.copy_out(conn, table, COPY_FORMAT, write), gz.write,
                                          lambda n: say("export", table.name, n, 0))
        say("export", table.name, raw_bytes, raw_bytes)
        store.put_file(f"{backup_id}/{name}", Path(spool))
    finally:
        os.unlink(spool)
    logger.info("backup table exported", extra={"status": "ok", "table": table.name, "bytes": hashing.size,
                                                "raw_bytes": raw_bytes,
                                                "duration": round((time.perf_counter() - t0) * 1000, 3)})
    return {"object": name, "bytes": hashing.size, "sha256": hashing.sha.hexdigest(), "raw_bytes": raw_bytes}


def _copy_through(produce: Callable[[Callable[[bytearray], None]], None], consume: Callable[[bytearray], object],
                  progress: Callable[[int], None]) -> int:
    """``produce`` hands batches to a bounded queue that a second thread feeds to ``consume``: at most
    _QUEUED batches (1 MB each) are in memory, whatever the table's size. Returns the bytes produced."""
    q: queue.Queue[bytearray | None] = queue.Queue(_QUEUED)
    failed: list[BaseException] = []

    def worker() -> None:
        while (batch := q.get()) is not None:
            if not failed:
                try:
                    consume(batch)
                except BaseException as exc:  # raised in the caller's thread below; keep draining meanwhile
                    failed.append(exc)

    thread = threading.Thread(target=worker, name="backup-gzip", daemon=True)
    thread.start()
    produced = 0

    def put(batch: bytearray) -> None:
        nonlocal produced
        if failed:
            raise failed[0]
        q.put(batch)
        produced += len(batch)
        if produced % (8 * _CHUNK) < len(batch):
            progress(produced)

    try:
        produce(put)
    finally:
        q.put(None)
        thread.join()
    if failed:
        raise failed[0]
    return produced


class _HashingWriter:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


class _HashingReader:
    def __init__(self, src: BinaryIO, on_read: Callable[[int], None]) -> None:
        self.src = src
        self.sha = hashlib.sha256()
        self.size = 0
        self.on_read = on_read

    def read(self, n: int = -1, /) -> bytes:
        data = self.src.read(n)
        self.sha.update(data)
        self.size += len(data)
        self.on_read(self.size)
        return data

    def seek(self, n: int, /) -> int:  # a stream: gzip only seeks when asked to rewind, which a restore never does
        raise OSError("a backup object is read once, from its start")


# --- restore ---------------------------------------------------------------------------------------------------
def read_manifest(manifest_url: str) -> tuple[Manifest, Store]:
    """The manifest at ``manifest_url`` (its manifest.json, or the backup's directory) and a store rooted at the
    backup's directory."""
    from tmuxi.errors import NotFound

    directory = manifest_url[: -len(MANIFEST)].rstrip("/") if manifest_url.endswith(MANIFEST) else manifest_url
    store = _store(directory)
    try:
        data = json.loads(store.get(MANIFEST, _MAX_MANIFEST_BYTES))
    except NotFound:
        raise RestoreRefused(f"no backup manifest at {_join(directory, MANIFEST)}: pass the manifest.json of a "
                             "backup (`backup` prints it; a backup without one was never finished)") from None
    return Manifest.from_json(data, _join(directory, MANIFEST)), store


def restore(manifest_url: str, database_url: str, progress: Progress | None = None) -> Verification:
    """Restore the backup into ``database_url``, which holds no rows; returns the verification (every table's
    rows and checksum equal the manifest's), or raises RestoreRefused / VerificationFailed."""
    from tmuxi.db import dump
    from tmuxi.db.migrate import current_version, latest_version, migrate

    say = progress or (lambda *_a: None)
    manifest, store = read_manifest(manifest_url)
    t0 = time.perf_counter()
    if manifest.schema_version > latest_version():
        raise RestoreRefused(f"the backup's schema is at version {manifest.schema_version}, this code ships "
                             f"migrations up to {latest_version()}: restore with the code that made the backup")
    with dump.connect(database_url) as conn:
        have = current_version(conn)
        if have > manifest.schema_version:
            raise RestoreRefused(f"the target's schema is at version {have}, newer than the backup's "
                                 f"{manifest.schema_version}: restore into a new empty database (CREATE DATABASE)")
        full = dump.non_empty_tables(conn)
        if full:
            raise RestoreRefused(f"the target database holds rows (in {', '.join(full)}): a restore goes into an "
                                 "empty database only; create one (CREATE DATABASE ...) and pass its URL")
    migrate(database_url, upto=manifest.schema_version)
    with dump.connect(database_url) as conn:
        by_name = {t.name: t for t in dump.tables(conn)}
        missing = [e.name for e in manifest.tables if e.name not in by_name]
        if missing:
            raise RestoreRefused(f"tables {missing} of the backup are not in the migrated schema: the backup and "
                                 "this code's migrations disagree; restore with the code that made the backup")
        try:
            with conn.transaction():
                for entry in manifest.tables:
                    _load_table(conn, store, entry, manifest.copy_format, say)
                for name, value in manifest.sequences.items():
                    if value is not None:
                        dump.set_sequence(conn, name, value)
                # inside the transaction: a restore that does not verify is rolled back, the target stays empty
                verification = _verify(conn, manifest, say)
                if not verification.ok:
                    raise VerificationFailed(_differences(verification))
        except VerificationFailed as exc:
            logger.warning("restore failed verification; rolled back",
                           extra={"status": "error", "backup": manifest.url, "error": str(exc)[:500]})
            raise
    verification = Verification(manifest.url, verification.tables, round(time.perf_counter() - t0, 3))
    logger.info("restore done and verified", extra={"status": "ok", "backup": manifest.url,
                                                    "rows": verification.rows,
                                                    "duration": round(verification.duration_s * 1000, 3)})
    return verification


def _load_table(conn: Conn, store: Store, entry: TableEntry, fmt: str, say: Progress) -> None:
    import psycopg

    from tmuxi.db import dump

    t0 = time.perf_counter()
    table = dump.Table(entry.name, tuple(entry.columns), tuple(entry.order_by))
    src = _open(store, entry.object)
    say("restore", entry.name, 0, entry.bytes)
    reader = _HashingReader(src, lambda n: say("restore", entry.name, n, entry.bytes))
    indexes = dump.secondary_indexes(conn, entry.name)
    for name, _ in indexes:
        dump.drop_index(conn, name)
    try:
        gz = gzip.GzipFile(fileobj=reader, mode="rb")

        def chunks() -> Iterator[bytes]:
            while data := gz.read(_CHUNK):
                yield data
            while reader.read(_CHUNK):  # whatever gzip left unread still counts for the sha256
                pass

        try:
            dump.copy_in(conn, table, fmt, chunks())
        except (OSError, EOFError, zlib.error) as exc:
            raise VerificationFailed({entry.name: f"object {entry.object} is damaged ({exc})"}) from exc
        except psycopg.Error as exc:
            if isinstance(exc, psycopg.OperationalError):
                raise  # the server, not the object
            raise VerificationFailed({entry.name: f"object {entry.object} does not load "
                                                  f"({str(exc).strip()[:200]})"}) from exc
    finally:
        src.close()
    if reader.sha.hexdigest() != entry.sha256 or reader.size != entry.bytes:
        raise VerificationFailed({entry.name: f"object {entry.object} is not the one backed up (sha256 or size "
                                              "differs from the manifest's)"})
    for _, definition in indexes:
        dump.create_index(conn, definition)
    logger.info("restore table loaded", extra={"status": "ok", "table": entry.name, "rows": entry.rows,
                                               "duration": round((time.perf_counter() - t0) * 1000, 3)})


def _verify(conn: Conn, manifest: Manifest, say: Progress) -> Verification:
    from tmuxi.db import dump

    checks = []
    for entry in manifest.tables:
        got = dump.checksum(conn, dump.Table(entry.name, tuple(entry.columns), tuple(entry.order_by)))
        checks.append(TableCheck(entry.name, entry.rows, got.rows, got.checksum == entry.checksum))
        say("verify", entry.name, got.rows, entry.rows)
    return Verification(manifest.url, checks)


def _differences(v: Verification) -> dict[str, str]:
    return {t.name: (f"{t.rows_found} rows, the backup has {t.rows_expected}" if t.rows_found != t.rows_expected
                     else "the rows' checksum differs from the backup's")
            for t in v.tables if not t.ok}


def verify(manifest_url: str, database_url: str, progress: Progress | None = None) -> Verification:
    """Compare a database with a backup (row counts and checksums, in one snapshot); raises VerificationFailed
    naming each table that differs."""
    from tmuxi.db import dump

    manifest, _ = read_manifest(manifest_url)
    t0 = time.perf_counter()
    with dump.connect(database_url) as conn, dump.snapshot(conn):
        v = _verify(conn, manifest, progress or (lambda *_a: None))
    if not v.ok:
        raise VerificationFailed(_differences(v))
    return Verification(v.manifest, v.tables, round(time.perf_counter() - t0, 3))


# --- the maintenance task --------------------------------------------------------------------------------------
def run_task() -> dict[str, int]:
    """The maintenance function's ``backup`` task: a backup into ``backups_url`` (skipped: 0 tables)."""
    try:
        m = export()
    except BackupSkipped:
        return {"skipped": 1, "tables": 0, "rows": 0, "bytes": 0}
    return {"skipped": 0, "tables": len(m.tables), "rows": sum(t.rows for t in m.tables),
            "bytes": sum(t.bytes for t in m.tables)}
