"""The repository: every SQL statement of the system. Logic calls these; nothing else touches psycopg."""
from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

import psycopg
from psycopg.types.json import Jsonb

from tmuxi.db.pool import connection
from tmuxi.errors import Conflict, HostUnavailable, NotFound, QuotaExceeded
from tmuxi.pagination import MAX_PAGE

Row = dict[str, Any]
LIVE_STATES = ("creating", "active")

_SESSION_COLS = (
    "id, owner_id, name, state, host_id, tmux_name, pane_id, cols, rows, created_at, last_active_at, "
    "ended_at, end_reason"
)


def _audit(conn: psycopg.Connection[Any], actor: UUID | None, action: str, session_id: UUID | None,
           status: str, detail: dict[str, Any] | None = None) -> None:
    conn.execute(
        "INSERT INTO audit_events (actor_id, action, session_id, status, detail) VALUES (%s, %s, %s, %s, %s)",
        (actor, action, session_id, status, Jsonb(detail or {})),
    )


def audit(actor: UUID | None, action: str, session_id: UUID | None, status: str,
          detail: dict[str, Any] | None = None) -> None:
    with connection() as conn:
        _audit(conn, actor, action, session_id, status, detail)


def audit_events(session_id: UUID | None = None, actor: UUID | None = None, limit: int = 100) -> list[Row]:
    with connection() as conn:
        return conn.execute(
            "SELECT id, at, actor_id, action, session_id, status, detail FROM audit_events"
            " WHERE (%(sid)s::uuid IS NULL OR session_id = %(sid)s)"
            " AND (%(actor)s::uuid IS NULL OR actor_id = %(actor)s)"
            " ORDER BY id DESC LIMIT %(limit)s",
            {"sid": session_id, "actor": actor, "limit": limit},
        ).fetchall()


# --- users -----------------------------------------------------------------------------------------
def create_user(username: str, password_hash: str, role: str) -> UUID:
    uid = uuid4()
    try:
        with connection() as conn, conn.transaction():
            conn.execute(
                "INSERT INTO users (id, username, password_hash, role) VALUES (%s, %s, %s, %s)",
                (uid, username, password_hash, role),
            )
            _audit(conn, None, "user.create", None, "ok", {"user_id": str(uid), "role": role})
    except psycopg.errors.UniqueViolation as exc:
        raise Conflict(f"user {username!r} already exists") from exc
    return uid


_USER_COLS = "id, username, role, disabled, deleted_at, token_epoch, created_at"


def change_user(username: str, actor: UUID | None, action: str, *, disabled: bool | None = None,
                role: str | None = None, password_hash: str | None = None, delete: bool = False,
                end_tokens: bool = False) -> Row | None:
    """Change a user (not deleted) and audit it, in one transaction. A change that must end the user's tokens
    -- disabling, a new role, a new password, deleting, or ``end_tokens`` -- adds one to ``token_epoch``;
    setting what is already set (enabling an enabled user) changes nothing. Returns the row as it now is, or
    None when there is no such user."""
    with connection() as conn, conn.transaction():
        old = conn.execute(
            f"SELECT {_USER_COLS} FROM users WHERE username = %s AND deleted_at IS NULL FOR UPDATE", (username,)
        ).fetchone()
        if old is None:
            return None
        if delete:
            disabled = True
        ends = (end_tokens or delete or password_hash is not None or (disabled is True and not old["disabled"])
                or (role is not None and role != old["role"]))
        row = conn.execute(
            f"UPDATE users SET disabled = coalesce(%s, disabled), role = coalesce(%s, role),"
            f" password_hash = coalesce(%s, password_hash),"
            f" deleted_at = CASE WHEN %s THEN now() ELSE deleted_at END, token_epoch = token_epoch + %s"
            f" WHERE id = %s RETURNING {_USER_COLS}",
            (disabled, role, password_hash, delete, 1 if ends else 0, old["id"]),
        ).fetchone()
        assert row is not None
        detail: dict[str, Any] = {"user_id": str(row["id"]), "username": username, "tokens_ended": ends,
                                  "token_epoch": row["token_epoch"]}
        if role is not None:
            detail["role"] = {"from": old["role"], "to": role}
        if disabled is not None:
            detail["disabled"] = {"from": old["disabled"], "to": disabled}
        _audit(conn, actor, action, None, "ok", detail)
    return row


def set_password(username: str, password_hash: str) -> bool:
    """A new password; it ends the user's tokens (``change_user``)."""
    return change_user(username, None, "user.password", password_hash=password_hash) is not None


def get_user_by_username(username: str) -> Row | None:
    with connection() as conn:
        return conn.execute(
            "SELECT id, username, password_hash, role, disabled, token_epoch FROM users WHERE username = %s",
            (username,),
        ).fetchone()


def get_user_state(user_id: UUID) -> Row | None:
    """What a user's tokens depend on: token_epoch, role, disabled (read on a cache miss, by primary key)."""
    with connection() as conn:
        return conn.execute(
            "SELECT token_epoch, role, disabled FROM users WHERE id = %s", (user_id,)
        ).fetchone()


# --- sessions --------------------------------------------------------------------------------------
def reserve_session(owner_id: UUID, name: str | None, cols: int, rows: int, quota: int,
                    dead_after_s: float) -> Row:
    """Check the owner's quota and place a new session on the live host with the most free capacity, in one
    transaction (the owner's row is locked, so concurrent creates cannot overrun the quota). The quota counts
    the owner's live sessions and the tmux sessions they made from a shell on live hosts. The row returned
    carries the owner's OS account number (``account_no``), allocated here on their first session."""
    sid = uuid4()
    with connection() as conn, conn.transaction():
        user = conn.execute(
            "UPDATE users SET account_no = coalesce(account_no, nextval('users_account_no_seq'))"
            " WHERE id = %s AND NOT disabled RETURNING account_no", (owner_id,)  # disabled: a request that raced it
        ).fetchone()
        if user is None:
            raise NotFound("user not found")
        row = conn.execute(
            "SELECT (SELECT count(*) FROM sessions WHERE owner_id = %(owner)s AND state = ANY(%(live)s))"
            " + (SELECT coalesce(sum(e.sessions), 0) FROM host_extra_sessions e JOIN hosts h ON h.id = e.host_id"
            "    WHERE e.account_no = %(acct)s AND h.last_heartbeat > now() - make_interval(secs => %(dead)s))"
            " AS n",
            {"owner": owner_id, "live": list(LIVE_STATES), "acct": user["account_no"], "dead": dead_after_s},
        ).fetchone()
        live = int(row["n"]) if row else 0
        out = None if live >= quota else _place(conn, sid, owner_id, name, cols, rows, dead_after_s)
        if out is not None:
            out["account_no"] = user["account_no"]
    if out is None:  # audited outside the (now finished) transaction so the denial is kept
        audit(owner_id, "session.create", None, "quota_exceeded", {"live": live, "quota": quota})
        raise QuotaExceeded(f"session quota reached ({live} of {quota} live); delete a session first", quota=quota)
    return out


def _place(conn: psycopg.Connection[Any], sid: UUID, owner_id: UUID, name: str | None, cols: int, rows: int,
           dead_after_s: float) -> Row:
    host = conn.execute(
        "SELECT h.id, h.url, h.capacity - count(s.id) AS free FROM hosts h"
        " LEFT JOIN sessions s ON s.host_id = h.id AND s.state = ANY(%s)"
        " WHERE h.last_heartbeat > now() - make_interval(secs => %s)"
        " GROUP BY h.id ORDER BY free DESC, h.id LIMIT 1",
        (list(LIVE_STATES), dead_after_s),
    ).fetchone()
    if host is None or int(host["free"]) <= 0:
        raise HostUnavailable("no tmux host has free capacity; start a host or raise TMUXI_HOST_CAPACITY")
    out: Row | None = conn.execute(
        f"INSERT INTO sessions (id, owner_id, name, state, host_id, tmux_name, cols, rows)"
        f" VALUES (%s, %s, %s, 'creating', %s, %s, %s, %s) RETURNING {_SESSION_COLS}",
        (sid, owner_id, name, host["id"], "t" + sid.hex, cols, rows),
    ).fetchone()
    assert out is not None
    out["host_url"] = host["url"]
    return out


def activate_session(session_id: UUID, actor: UUID, pane_id: str) -> Row:
    with connection() as conn, conn.transaction():
        row = conn.execute(
            f"UPDATE sessions SET state = 'active', pane_id = %s, last_active_at = now()"
            f" WHERE id = %s RETURNING {_SESSION_COLS}",
            (pane_id, session_id),
        ).fetchone()
        _audit(conn, actor, "session.create", session_id, "ok", {"host_id": row["host_id"] if row else None})
    assert row is not None
    return row


def end_session(session_id: UUID, actor: UUID | None, state: str, reason: str) -> Row | None:
    """Mark a live session ended (deleted / failed / lost / exited). Returns the row, or None if it was not
    live."""
    with connection() as conn, conn.transaction():
        row = conn.execute(
            f"UPDATE sessions SET state = %s, ended_at = now(), end_reason = %s"
            f" WHERE id = %s AND state = ANY(%s) RETURNING {_SESSION_COLS}",
            (state, reason, session_id, list(LIVE_STATES)),
        ).fetchone()
        if row is not None:
            _audit(conn, actor, f"session.{'delete' if state == 'deleted' else state}", session_id, "ok",
                   {"reason": reason})
        return row


def get_session(session_id: UUID) -> Row | None:
    with connection() as conn:
        return conn.execute(f"SELECT {_SESSION_COLS} FROM sessions WHERE id = %s", (session_id,)).fetchone()


def get_own_session(session_id: UUID, owner_id: UUID) -> Row | None:
    """A session if ``owner_id`` owns it. Another user's session is answered as one that does not exist is: the
    same statement, no row (so the two cannot be told apart by timing either)."""
    with connection() as conn:
        return conn.execute(f"SELECT {_SESSION_COLS} FROM sessions WHERE id = %s AND owner_id = %s",
                            (session_id, owner_id)).fetchone()


SESSION_STATES = ("creating", "active", "deleted", "failed", "lost", "exited")
# the live states written out, so the planner matches the partial indexes of migration 0005 in every plan
_LIVE_SQL = "state IN (" + ", ".join(f"'{st}'" for st in LIVE_STATES) + ")"


def list_sessions_query(owner_id: UUID | None, state: str, limit: int,
                        after: tuple[datetime, UUID] | None = None) -> tuple[str, dict[str, Any]]:
    """The statement ``list_sessions`` runs (tests EXPLAIN it). One shape per (owner or all, state filter, a
    cursor or not), each served by an index of migration 0005 in ``(created_at, id)`` order: a page reads its
    rows and one more, however many sessions there are."""
    if state not in ("live", "all", *SESSION_STATES):
        raise ValueError(f"unknown state filter {state!r}")
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit {limit} is outside 1..{MAX_PAGE}")
    where: list[str] = []
    params: dict[str, Any] = {}
    if owner_id is not None:
        where.append("owner_id = %(owner)s")
        params["owner"] = owner_id
    if state == "live":
        where.append(_LIVE_SQL)
    elif state != "all":
        where.append("state = %(state)s")
        params["state"] = state
    if after is not None:
        where.append("(created_at, id) < (%(at)s, %(id)s)")
        params["at"], params["id"] = after
    sql = (f"SELECT {_SESSION_COLS} FROM sessions"
           + (" WHERE " + " AND ".join(where) if where else "")
           + f" ORDER BY created_at DESC, id DESC LIMIT {int(limit) + 1}")  # an int: one plan per page size
    return sql, params


def list_sessions(owner_id: UUID | None, state: str = "live", limit: int = MAX_PAGE,
                  after: tuple[datetime, UUID] | None = None) -> tuple[list[Row], bool]:
    """One page of the sessions of one owner (of everyone when owner_id is None), newest first
    (``created_at``, then ``id``, descending), strictly after ``after`` (the ``(created_at, id)`` of the last
    row of the previous page). ``state``: "live" (creating or active), "all", or one state. Returns the rows
    (at most ``limit``) and whether more follow."""
    sql, params = list_sessions_query(owner_id, state, limit, after)
    with connection() as conn:
        rows = conn.execute(sql, params).fetchall()
    return rows[:limit], len(rows) > limit


def record_activity(session_id: UUID, actor: UUID, action: str, detail: dict[str, Any]) -> None:
    """Audit a terminal action and bump last_active_at (at most every 10 s, to keep the row cool)."""
    with connection() as conn:
        conn.execute(
            "WITH a AS (INSERT INTO audit_events (actor_id, action, session_id, status, detail)"
            " VALUES (%s, %s, %s, 'ok', %s))"
            " UPDATE sessions SET last_active_at = now()"
            " WHERE id = %s AND last_active_at < now() - interval '10 seconds'",
            (actor, action, session_id, Jsonb(detail), session_id),
        )


def resize_session(session_id: UUID, actor: UUID, cols: int, rows: int) -> Row | None:
    with connection() as conn, conn.transaction():
        row = conn.execute(
            f"UPDATE sessions SET cols = %s, rows = %s, last_active_at = now() WHERE id = %s RETURNING {_SESSION_COLS}",
            (cols, rows, session_id),
        ).fetchone()
        _audit(conn, actor, "session.resize", session_id, "ok", {"cols": cols, "rows": rows})
        return row


def live_sessions_for_host(host_id: str) -> dict[UUID, int | None]:
    """Live sessions placed on a host -> their owner's account number."""
    with connection() as conn:
        rows = conn.execute(
            "SELECT s.id, u.account_no FROM sessions s JOIN users u ON u.id = s.owner_id"
            " WHERE s.host_id = %s AND s.state = ANY(%s)", (host_id, list(LIVE_STATES))
        ).fetchall()
    return {r["id"]: r["account_no"] for r in rows}


# --- hosts -----------------------------------------------------------------------------------------
def upsert_host(host_id: str, url: str, capacity: int, active: int, started_at: datetime) -> None:
    with connection() as conn:
        conn.execute(
            "INSERT INTO hosts (id, url, capacity, active_sessions, started_at, last_heartbeat)"
            " VALUES (%s, %s, %s, %s, %s, now())"
            " ON CONFLICT (id) DO UPDATE SET url = EXCLUDED.url, capacity = EXCLUDED.capacity,"
            " active_sessions = EXCLUDED.active_sessions, started_at = EXCLUDED.started_at, last_heartbeat = now()",
            (host_id, url, capacity, active, started_at),
        )


def set_extra_sessions(host_id: str, extra: dict[int, int]) -> None:
    """Replace a host's report of sessions its users made from a shell."""
    with connection() as conn, conn.transaction():
        conn.execute("DELETE FROM host_extra_sessions WHERE host_id = %s", (host_id,))
        if extra:
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO host_extra_sessions (host_id, account_no, sessions) VALUES (%s, %s, %s)",
                    [(host_id, a, n) for a, n in extra.items() if n > 0],
                )


def get_host(host_id: str) -> Row | None:
    with connection() as conn:
        return conn.execute(
            "SELECT id, url, capacity, active_sessions, started_at, last_heartbeat FROM hosts WHERE id = %s",
            (host_id,),
        ).fetchone()


def live_hosts(dead_after_s: float) -> list[Row]:
    with connection() as conn:
        return conn.execute(
            "SELECT id, url, capacity, active_sessions, last_heartbeat FROM hosts"
            " WHERE last_heartbeat > now() - make_interval(secs => %s) ORDER BY id",
            (dead_after_s,),
        ).fetchall()


# --- token revocation ------------------------------------------------------------------------------
def revoke_token(jti: str, user_id: UUID, expires_at: datetime) -> None:
    with connection() as conn, conn.transaction():
        conn.execute(
            "INSERT INTO revoked_tokens (jti, user_id, expires_at) VALUES (%s, %s, %s) ON CONFLICT (jti) DO NOTHING",
            (jti, user_id, expires_at),
        )
        _audit(conn, user_id, "auth.revoke", None, "ok", {"jti": jti})


def is_token_revoked(jti: str) -> bool:
    with connection() as conn:
        return conn.execute("SELECT 1 FROM revoked_tokens WHERE jti = %s", (jti,)).fetchone() is not None


def unexpired_revocations() -> list[Row]:
    with connection() as conn:
        return conn.execute(
            "SELECT jti, expires_at FROM revoked_tokens WHERE expires_at > now()"
        ).fetchall()

