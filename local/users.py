"""Manage users of the local stack (or of any database the settings point at).

    python -m local.users add NAME [--role admin]      # prints a generated password once
    python -m local.users passwd NAME                  # sets and prints a new generated password (ends their tokens)
    python -m local.users disable NAME                 # no login, every token refused
    python -m local.users enable NAME                  # login allowed again (ended tokens stay ended)
    python -m local.users revoke NAME                  # ends every token of NAME: they sign in again
    python -m local.users role NAME user|admin         # a new role (ends their tokens)
    python -m local.users delete NAME                  # disable for good, end their sessions; the row stays

Every change but `add` and `enable` ends the user's tokens: the API refuses them from the next request when this
command reaches Redis (TMUXI_REDIS_URL), else within TMUXI_USER_STATE_TTL_S (2 s).

With no TMUXI_DATABASE_URL it uses the embedded PostgreSQL under the data dir (started if it is not running), and
the local stack's secrets.
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
    for name in ("jwt_secret", "host_secret"):  # signed cache entries; ending sessions on the stack's hosts
        os.environ.setdefault(env_name(name), stack_secrets(data_dir)[name])
    get_settings.cache_clear()
    return None if was_running else pg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m local.users", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    add = sub.add_parser("add", help="create a user")
    add.add_argument("name")
    add.add_argument("--role", choices=["user", "admin"], default="user")
    pw = sub.add_parser("passwd", help="give a user a new password (ends their tokens)")
    pw.add_argument("name")
    for cmd, text in (("disable", "refuse the user's logins and tokens"),
                      ("enable", "allow the user to log in again"),
                      ("revoke", "end every token of the user"),
                      ("delete", "disable the user for good and end their sessions (the row stays)")):
        sub.add_parser(cmd, help=text).add_argument("name")
    role = sub.add_parser("role", help="give the user a new role (ends their tokens)")
    role.add_argument("name")
    role.add_argument("role", choices=["user", "admin"])
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
    from tmuxi.errors import Conflict, NotFound
    from tmuxi.services import users

    password = secrets.token_urlsafe(15)
    if args.cmd == "add":
        try:
            repo.create_user(args.name, hash_password(password), args.role)
        except Conflict as exc:
            print(f"error: {exc.message}; use `passwd` to give it a new password", file=sys.stderr)
            return 1
        print(password)
        return 0
    try:
        if args.cmd == "passwd":
            users.set_password(args.name, hash_password(password))
            print(password)
            return 0
        if args.cmd == "delete":
            user, ended = users.delete(args.name)
            print(f"{user.username}: deleted; {ended} live session(s) ended, every token ended")
            return 0
        if args.cmd == "role":
            user = users.set_role(args.name, args.role)
        else:
            user = {"disable": users.disable, "enable": users.enable, "revoke": users.revoke_tokens}[args.cmd](
                args.name)
    except NotFound:
        print(f"error: no user {args.name!r}", file=sys.stderr)
        return 1
    done = {"revoke": "; every token ended"}.get(args.cmd, "")
    print(f"{user.username}: {user.role}, {'disabled' if user.disabled else 'enabled'}{done}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
