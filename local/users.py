"""Manage users of the local stack (or of any database the settings point at).

    python -m local.users add NAME [--role admin]      # prints a generated password once
    python -m local.users passwd NAME                  # sets and prints a new generated password

With no TMUXI_DATABASE_URL it uses the embedded PostgreSQL under the data dir (started if it is not running).
"""
from __future__ import annotations

import argparse
import os
import secrets
import sys
from typing import TYPE_CHECKING

from tmuxi.settings import env_name, get_settings

if TYPE_CHECKING:
    from local.services import EmbeddedPostgres


def _ensure_database() -> EmbeddedPostgres | None:
    """Point the settings at the embedded PostgreSQL when no URL is set; returns it if this command started it."""
    s = get_settings()
    if s.database_url is not None:
        return None
    from local.services import EmbeddedPostgres
    from local.stack import stack_secrets

    data_dir = s.data_dir.resolve()
    pg = EmbeddedPostgres(data_dir / "pg", password=stack_secrets(data_dir)["postgres_password"])
    was_running = (pg.data_dir / "postmaster.pid").exists()
    os.environ[env_name("database_url")] = pg.start()
    get_settings.cache_clear()
    return None if was_running else pg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m local.users", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    add = sub.add_parser("add", help="create a user")
    add.add_argument("name")
    add.add_argument("--role", choices=["user", "admin"], default="user")
    pw = sub.add_parser("passwd", help="give a user a new password")
    pw.add_argument("name")
    args = ap.parse_args(argv)

    started = _ensure_database()
    try:
        return _run(args)
    finally:
        if started is not None:
            from tmuxi.db.pool import close_pool

            close_pool()
            started.stop()


def _run(args: argparse.Namespace) -> int:
    from tmuxi.auth import hash_password
    from tmuxi.db import repo
    from tmuxi.errors import Conflict

    password = secrets.token_urlsafe(15)
    if args.cmd == "add":
        try:
            repo.create_user(args.name, hash_password(password), args.role)
        except Conflict as exc:
            print(f"error: {exc.message}; use `passwd` to give it a new password", file=sys.stderr)
            return 1
    elif not repo.set_password(args.name, hash_password(password)):
        print(f"error: no user {args.name!r}; create it with `add`", file=sys.stderr)
        return 1
    print(password)
    return 0


if __name__ == "__main__":
    sys.exit(main())
