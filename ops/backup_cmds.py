"""Backup and restore for operators (tmuxi.services.backup): the functions ``ops/cli.py`` registers as
``python -m ops backup`` / ``restore``, and a command line of their own:

    python -m ops.backup_cmds backup [--store-url s3://bucket/backups | DIR] [--json]
    python -m ops.backup_cmds restore MANIFEST --database-url URL [--json]

``backup`` prints the manifest's URL (``--json``: the manifest); ``restore`` prints each table's verification.
Progress bars (one per table) go to stderr, so ``--json`` keeps stdout to one document. Exit codes: 0 done,
1 refused, skipped or failed (the message says why and what to do), 2 the command could not run at all.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

out = Console()
err = Console(stderr=True)

ProgressFn = Callable[[str, str, int, int], None]


def _unreachable_errors() -> tuple[type[Exception], ...]:
    import psycopg

    from tmuxi.errors import DependencyUnavailable

    return (psycopg.OperationalError, DependencyUnavailable)


_UNREACHABLE = _unreachable_errors()


@contextmanager
def _bars() -> Iterator[ProgressFn]:
    """A bar per (phase, table): bytes for export and restore, rows for verify."""
    bars = Progress(TextColumn("{task.description:<32}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeElapsedColumn(), console=err, transient=False, disable=not err.is_terminal)
    tasks: dict[tuple[str, str], TaskID] = {}

    def update(phase: str, table: str, done: int, total: int) -> None:
        key = (phase, table)
        if key not in tasks:
            tasks[key] = bars.add_task(f"{phase} {table}", total=total or None)
        bars.update(tasks[key], completed=done, total=total or None)

    with bars:
        yield update


def _database_url() -> str:
    from tmuxi.db.pool import database_url

    return database_url()


def backup(store_url: str | None, json_out: bool) -> int:
    """One backup of the configured database into ``store_url`` (default: TMUXI_BACKUPS_URL, else
    <data_dir>/backups)."""
    from tmuxi.services import backup as svc

    try:
        url = _database_url()
    except RuntimeError as exc:
        err.print(f"[red]error:[/] no database: {exc}", highlight=False)
        return 2
    try:
        with _bars() as progress:
            manifest = svc.export(store_url, progress, database_url=url)
    except svc.BackupSkipped as exc:
        err.print(f"[yellow]skipped:[/] {exc}", highlight=False)
        _maybe_json(json_out, {"status": "skipped", "detail": str(exc)})
        return 1
    except _UNREACHABLE as exc:
        return _unreachable(exc, json_out)
    if json_out:
        sys.stdout.write(json.dumps({"status": "ok", "manifest": manifest.url, **manifest.to_json()},
                                    indent=2) + "\n")
        return 0
    table = Table(title=f"backup {manifest.id} (schema version {manifest.schema_version})")
    for col in ("table", "rows", "bytes (gzip)", "sha256"):
        table.add_column(col, justify="right" if col in ("rows", "bytes (gzip)") else "left")
    for t in manifest.tables:
        table.add_row(t.name, f"{t.rows:,}", f"{t.bytes:,}", t.sha256[:16])
    out.print(table)
    out.print(f"manifest: {manifest.url}  ({manifest.duration_s:.1f}s)", highlight=False)
    return 0


def restore(manifest: str, database_url: str, json_out: bool) -> int:
    """Restore the backup ``manifest`` into the EMPTY database ``database_url`` and verify every table."""
    from tmuxi.services import backup as svc

    try:
        with _bars() as progress:
            v = svc.restore(manifest, database_url, progress)
    except svc.RestoreRefused as exc:
        err.print(f"[red]refused:[/] {exc}", highlight=False)
        _maybe_json(json_out, {"status": "refused", "detail": str(exc)})
        return 1
    except svc.VerificationFailed as exc:
        err.print(f"[red]verification failed (rolled back, the target is as it was):[/] {exc}", highlight=False)
        _maybe_json(json_out, {"status": "failed", "differences": exc.differences})
        return 1
    except _UNREACHABLE as exc:
        return _unreachable(exc, json_out)
    if json_out:
        sys.stdout.write(json.dumps({"status": "ok", "manifest": v.manifest, "rows": v.rows,
                                     "duration_s": v.duration_s,
                                     "tables": [{**asdict(t), "ok": t.ok} for t in v.tables]}, indent=2) + "\n")
        return 0
    table = Table(title=f"restored and verified: {v.manifest}")
    for col in ("table", "rows (backup)", "rows (restored)", "checksum"):
        table.add_column(col, justify="left" if col in ("table", "checksum") else "right")
    for t in v.tables:
        table.add_row(t.name, f"{t.rows_expected:,}", f"{t.rows_found:,}",
                      "[green]equal[/]" if t.checksum_ok else "[red]differs[/]")
    out.print(table)
    out.print(f"{v.rows:,} rows in {v.duration_s:.1f}s", highlight=False)
    return 0


def _unreachable(exc: Exception, json_out: bool) -> int:
    err.print(f"[red]error:[/] {str(exc).strip()[:300]} -- check the database URL (TMUXI_DATABASE_URL or "
              "--database-url) and the store URL, and that both are reachable, then run again", highlight=False)
    _maybe_json(json_out, {"status": "error", "detail": str(exc).strip()[:300]})
    return 2


def _maybe_json(json_out: bool, doc: dict[str, Any]) -> None:
    if json_out:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ops.backup_cmds",
                                 description="Back up the database to the object store, or restore a backup.")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("backup", help="back up the configured database (TMUXI_DATABASE_URL or the local stack's)")
    b.add_argument("--store-url", default=None, help="s3://bucket/prefix or a directory (default: backups_url)")
    b.add_argument("--json", action="store_true", dest="json_out")
    r = sub.add_parser("restore", help="restore a backup into an empty database and verify it")
    r.add_argument("manifest", help="the backup's manifest.json (as `backup` printed it)")
    r.add_argument("--database-url", required=True, help="an EMPTY database to restore into")
    r.add_argument("--json", action="store_true", dest="json_out")
    args = ap.parse_args(argv)
    from ops.reports import use_local_stack_if_unset

    use_local_stack_if_unset()
    if args.command == "backup":
        return backup(args.store_url, args.json_out)
    return restore(args.manifest, args.database_url, args.json_out)


if __name__ == "__main__":
    sys.exit(main())
