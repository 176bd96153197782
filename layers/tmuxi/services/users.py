"""Users: disable, enable, end all their tokens, change the role or password, delete. For operators
(``python -m local.users``, no caller) and for admins (the ``/users`` routes).

Every change is made in PostgreSQL with an audit event in one transaction; a change that must end the user's
tokens adds one to their token epoch there (``repo.change_user``). Then the user's new state goes to Redis and
every process refuses the ended tokens from its next request (``services.auth``); if Redis cannot take it, within
``user_state_ttl_s``. The way back for the user is to sign in again."""
from __future__ import annotations

from typing import Any
from uuid import UUID

from tmuxi import cache
from tmuxi.db import repo
from tmuxi.errors import Conflict, Forbidden, NotFound
from tmuxi.models import Principal, User, UserUpdate
from tmuxi.services import auth as auth_service
from tmuxi.services import sessions as sessions_service


def _changed(username: str, row: dict[str, Any] | None) -> User:
    """Announce a committed change to every process; the user as it now is."""
    if row is None:
        raise NotFound(f"no user {username!r}")
    auth_service.user_changed(row["id"], cache.UserState(row["token_epoch"], row["role"], row["disabled"]))
    return User(id=row["id"], username=row["username"], role=row["role"], disabled=row["disabled"],
                deleted=row["deleted_at"] is not None, created_at=row["created_at"])


# --- what operators and admins do (``actor``: who did it, for the audit trail; None: an operator) ---------


def disable(username: str, actor: UUID | None = None) -> User:
    """No login, and every token of the user refused."""
    return _changed(username, repo.change_user(username, actor, "user.disable", disabled=True))


def enable(username: str, actor: UUID | None = None) -> User:
    """Login allowed again; the tokens ended before stay ended."""
    return _changed(username, repo.change_user(username, actor, "user.enable", disabled=False))


def revoke_tokens(username: str, actor: UUID | None = None) -> User:
    """End every token of the user (signed out everywhere)."""
    return _changed(username, repo.change_user(username, actor, "user.revoke_tokens", end_tokens=True))


def set_role(username: str, role: str, actor: UUID | None = None) -> User:
    """A new role ends the user's tokens: the old ones carry the old role."""
    return _changed(username, repo.change_user(username, actor, "user.role", role=role))


def set_password(username: str, password_hash: str, actor: UUID | None = None) -> User:
    return _changed(username, repo.change_user(username, actor, "user.password", password_hash=password_hash))


def delete(username: str, actor: UUID | None = None) -> tuple[User, int]:
    """Disable the user for good and end their live sessions (tmux sessions killed). The row stays, for the
    audit trail; the name stays taken. Returns the user and how many sessions were ended."""
    user = _changed(username, repo.change_user(username, actor, "user.delete", delete=True))
    return user, sessions_service.end_user_sessions(user.id, actor, "user deleted")


# --- the admin API ----------------------------------------------------------------------------------------


def _admin(p: Principal) -> None:
    auth_service.admit(p)  # the role is the user's current one: a token with an outdated role is refused here
    if p.role != "admin":
        raise Forbidden("only admins manage users")


def _not_self(p: Principal, username: str, what: str) -> None:
    if username == p.username:
        raise Conflict(f"admins cannot {what} themselves; ask another admin")


def disable_user(p: Principal, username: str) -> User:
    _admin(p)
    _not_self(p, username, "disable")
    return disable(username, p.user_id)


def enable_user(p: Principal, username: str) -> User:
    _admin(p)
    return enable(username, p.user_id)


def revoke_user_tokens(p: Principal, username: str) -> User:
    _admin(p)
    return revoke_tokens(username, p.user_id)


def update_user(p: Principal, username: str, body: UserUpdate) -> User:
    _admin(p)
    if body.role != "admin":
        _not_self(p, username, "demote")
    return set_role(username, body.role, p.user_id)


def delete_user(p: Principal, username: str) -> None:
    _admin(p)
    _not_self(p, username, "delete")
    delete(username, p.user_id)
