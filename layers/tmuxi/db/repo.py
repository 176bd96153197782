"""The repository: every SQL statement of the system. Logic calls these; nothing else touches psycopg."""
from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid4

from tmuxi.db.pool import connection
from tmuxi.errors import Conflict, HostUnavailable, NotFound, QuotaExceeded
from tmuxi.pagination import MAX_PAGE
from tmuxi.snapstart import deferred_import

if TYPE_CHECKING:
    import psycopg
    import psycopg.types.json
else:
    psycopg = deferred_import("psycopg")  # on first use, as in db/pool.py (~110 ms off a cold start)

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
        (actor, action, session_id, status, psycopg.types.json.Jsonb(detail or {})),
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
# The state machine of migration 0006: each state and the states it may be entered from. Every update names them
# in its WHERE, so a transition that is not allowed changes no row (the trigger refuses any other write).
FROM_STATES: dict[str, tuple[str, ...]] = {
    "active": ("creating",),
    "failed": ("creating",),
    "deleting": ("creating", "active"),
    "deleted": ("deleting",),
    "exited": ("creating", "active"),
    "lost": ("creating", "active"),
}
ENDED_STATES = ("deleted", "failed", "exited", "lost")
# what holds a tmux session, for the quota and a host's capacity
HOLDING_STATES = ("creating", "active", "deleting")


def reserve_session(owner_id: UUID, name: str | None, cols: int, rows: int, quota: int,
                    dead_after_s: float) -> Row:
    """Check the owner's quota and place a new session on the live host with the most free capacity, in one
    transaction (the owner's row is locked, so concurrent creates cannot overrun the quota). The quota counts
    the owner's sessions that hold a tmux session and the tmux sessions they made from a shell on live hosts.
    The row returned carries the owner's OS account number (``account_no``), allocated here on their first
    session, and its host's URL (``host_url``)."""
    sid = uuid4()
    with connection() as conn, conn.transaction():
        user = conn.execute(
            "UPDATE users SET account_no = coalesce(account_no, nextval('users_account_no_seq'))"
            " WHERE id = %s AND NOT disabled RETURNING account_no", (owner_id,)  # disabled: a request that raced it
        ).fetchone()
        if user is None:
            raise NotFound("user not found")
        row = conn.execute(
            "SELECT (SELECT count(*) FROM sessions WHERE owner_id = %(owner)s AND state = ANY(%(holding)s))"
            " + (SELECT coalesce(sum(e.sessions), 0) FROM host_extra_sessions e JOIN hosts h ON h.id = e.host_id"
            "    WHERE e.account_no = %(acct)s AND h.last_heartbeat > now() - make_interval(secs => %(dead)s))"
            " AS n",
            {"owner": owner_id, "holding": list(HOLDING_STATES), "acct": user["account_no"], "dead": dead_after_s},
        ).fetchone()
        live = int(row["n"]) if row else 0
        out = None
        if live < quota:
            host = _pick_host(conn, dead_after_s, ())
            out = conn.execute(
                f"INSERT INTO sessions (id, owner_id, name, state, host_id, tmux_name, cols, rows)"
                f" VALUES (%s, %s, %s, 'creating', %s, %s, %s, %s) RETURNING {_SESSION_COLS}",
                (sid, owner_id, name, host["id"], "t" + sid.hex, cols, rows),
            ).fetchone()
            assert out is not None
            out["host_url"], out["account_no"] = host["url"], user["account_no"]
    if out is None:  # audited outside the (now finished) transaction so the denial is kept
        audit(owner_id, "session.create", None, "quota_exceeded", {"live": live, "quota": quota})
        raise QuotaExceeded(f"session quota reached ({live} of {quota} live); delete a session first", quota=quota)
    return out


# Each live host's free capacity, counted per host on the (host_id, state) index (migration 0001): the holding
# states are written out so each is one index range; the work is the host's own live sessions, not the table's.
PLACEMENT_SQL = (
    "SELECT h.id, h.url, h.capacity - (SELECT count(*) FROM sessions s WHERE s.host_id = h.id"
    "  AND s.state IN (" + ", ".join(f"'{st}'" for st in HOLDING_STATES) + ")) AS free FROM hosts h"
    " WHERE h.last_heartbeat > now() - make_interval(secs => %s)"
    " AND (h.unreachable_at IS NULL OR h.unreachable_at < h.last_heartbeat) AND h.draining_at IS NULL"
    " AND NOT h.id = ANY(%s)"
    " ORDER BY free DESC, h.id LIMIT 1"
)


def _pick_host(conn: psycopg.Connection[Any], dead_after_s: float, exclude: tuple[str, ...] | list[str]) -> Row:
    """The live host with the most free capacity: heartbeating, not found unreachable since its last heartbeat,
    not draining, not in ``exclude``."""
    host = conn.execute(PLACEMENT_SQL, (dead_after_s, list(exclude))).fetchone()
    if host is None or int(host["free"]) <= 0:
        raise HostUnavailable("no tmux host has free capacity; start a host or raise TMUXI_HOST_CAPACITY")
    return dict(host)


def move_session(session_id: UUID, exclude: list[str], dead_after_s: float) -> Row | None:
    """Place a session still ``creating`` on another live host (not in ``exclude``): its create failed where it
    was. None when it is no longer ``creating`` (a delete won). Raises HostUnavailable when no host is left."""
    with connection() as conn, conn.transaction():
        cur = conn.execute("SELECT state FROM sessions WHERE id = %s FOR UPDATE", (session_id,)).fetchone()
        if cur is None or cur["state"] != "creating":
            return None
        host = _pick_host(conn, dead_after_s, exclude)
        row = conn.execute(
            f"UPDATE sessions SET host_id = %s WHERE id = %s RETURNING {_SESSION_COLS}", (host["id"], session_id)
        ).fetchone()
        assert row is not None
        row["host_url"] = host["url"]
        return row


def mark_host_stopped(host_id: str) -> None:
    """The host is stopping on purpose: when its heartbeat goes stale it is not reported dead."""
    with connection() as conn:
        conn.execute("UPDATE hosts SET stopped_at = now() WHERE id = %s", (host_id,))


def mark_host_draining(host_id: str) -> None:
    """The host was told to go and is draining: placement skips it from now on (until a new run of it heartbeats)."""
    with connection() as conn:
        conn.execute("UPDATE hosts SET draining_at = coalesce(draining_at, now()) WHERE id = %s", (host_id,))


def mark_host_unreachable(host_id: str) -> None:
    """The API could not reach this host: placement skips it until it heartbeats again."""
    with connection() as conn:
        conn.execute("UPDATE hosts SET unreachable_at = now() WHERE id = %s", (host_id,))


def transition(session_id: UUID, to: str, actor: UUID | None, reason: str | None = None, *,
               host_id: str | None = None, pane_id: str | None = None) -> Row | None:
    """Move a session to state ``to`` from one of the states it may come from (``FROM_STATES``), and audit it,
    in one transaction. ``host_id``: only if the session is placed on that host (a host reports only its own).
    Returns the row as it now is, or None when the session is not in a state ``to`` may follow."""
    with connection() as conn, conn.transaction():
        row = conn.execute(
            f"UPDATE sessions SET state = %(to)s, end_reason = coalesce(%(reason)s, end_reason),"
            f" pane_id = coalesce(%(pane)s, pane_id),"
            f" last_active_at = CASE WHEN %(to)s = 'active' THEN now() ELSE last_active_at END"
            f" WHERE id = %(id)s AND state = ANY(%(from)s) AND (%(host)s::text IS NULL OR host_id = %(host)s)"
            f" RETURNING {_SESSION_COLS}",
            {"to": to, "reason": reason if to != "active" else None, "pane": pane_id, "id": session_id,
             "from": list(FROM_STATES[to]), "host": host_id},
        ).fetchone()
        if row is not None:
            action = {"active": "create", "deleting": "delete", "deleted": "deleted"}.get(to, to)
            _audit(conn, actor, f"session.{action}", session_id, "ok",
                   {"host_id": row["host_id"]} if to == "active" else {"reason": reason})
        return row


def activate_session(session_id: UUID, actor: UUID, pane_id: str) -> Row | None:
    """``creating`` -> ``active``. None: the session is no longer ``creating`` (a delete won)."""
    return transition(session_id, "active", actor, pane_id=pane_id)


def end_session(session_id: UUID, actor: UUID | None, state: str, reason: str, *,
                host_id: str | None = None) -> Row | None:
    """Mark a session ended (failed / exited / lost, or deleted after deleting). Returns the row, or None if it
    was not in a state that one may follow."""
    return transition(session_id, state, actor, reason, host_id=host_id)


def silent_hosts(dead_after_s: float) -> list[Row]:
    """Hosts whose heartbeat is older than ``dead_after_s`` and that still hold sessions in the record."""
    with connection() as conn:
        return conn.execute(
            "SELECT h.id, h.url FROM hosts h WHERE h.last_heartbeat <= now() - make_interval(secs => %s)"
            " AND EXISTS (SELECT 1 FROM sessions s WHERE s.host_id = h.id AND s.state = ANY(%s))",
            (dead_after_s, list(HOLDING_STATES)),
        ).fetchall()


def end_sessions_of_dead_host(host_id: str, dead_after_s: float) -> list[Row]:
    """A dead host's sessions are over: those that hold a tmux session become ``lost``, those being deleted
    ``deleted`` -- if the host is still silent (a heartbeat that came meanwhile keeps them). Returns the rows
    changed."""
    cols = ", ".join("s." + c.strip() for c in _SESSION_COLS.split(","))
    with connection() as conn, conn.transaction():
        rows = conn.execute(
            f"UPDATE sessions s SET state = CASE WHEN s.state = 'deleting' THEN 'deleted' ELSE 'lost' END,"
            f" end_reason = CASE WHEN s.state = 'deleting' THEN s.end_reason"
            f"  ELSE 'its tmux host stopped answering' END"
            f" FROM hosts h WHERE h.id = s.host_id AND h.id = %s AND s.state = ANY(%s)"
            f" AND h.last_heartbeat <= now() - make_interval(secs => %s) RETURNING {cols}",
            (host_id, list(HOLDING_STATES), dead_after_s),
        ).fetchall()
        for r in rows:
            _audit(conn, None, f"session.{'deleted' if r['state'] == 'deleted' else 'lost'}", r["id"], "ok",
                   {"reason": r["end_reason"], "host_id": r["host_id"]})
        return rows


def sessions_in_between(older_than_s: float, limit: int = 500) -> list[Row]:
    """Sessions stuck ``creating`` or ``deleting`` for longer than ``older_than_s``, oldest first."""
    with connection() as conn:
        return conn.execute(
            f"SELECT {_SESSION_COLS}, state_changed_at FROM sessions WHERE state IN ('creating', 'deleting')"
            f" AND state_changed_at < now() - make_interval(secs => %s) ORDER BY state_changed_at LIMIT %s",
            (older_than_s, limit),
        ).fetchall()


def confirmed_on_host(host_id: str, present: set[tuple[UUID, int]]) -> set[UUID]:
    """Of the ``(session id, account)`` pairs a host found in tmux, those the record has holding a tmux session
    on that host, owned by that account's user."""
    if not present:
        return set()
    with connection() as conn:
        rows = conn.execute(
            "SELECT s.id FROM sessions s JOIN users u ON u.id = s.owner_id"
            " JOIN unnest(%s::uuid[], %s::int[]) AS p(id, acct) ON p.id = s.id AND p.acct = u.account_no"
            " WHERE s.host_id = %s AND s.state = ANY(%s)",
            ([sid for sid, _ in present], [acct for _, acct in present], host_id, list(HOLDING_STATES)),
        ).fetchall()
    return {r["id"] for r in rows}


def get_session(session_id: UUID) -> Row | None:
    with connection() as conn:
        return conn.execute(f"SELECT {_SESSION_COLS} FROM sessions WHERE id = %s", (session_id,)).fetchone()


def get_own_session(session_id: UUID, owner_id: UUID) -> Row | None:
    """A session if ``owner_id`` owns it. Another user's session is answered as one that does not exist is: the
    same statement, no row (so the two cannot be told apart by timing either)."""
    with connection() as conn:
        return conn.execute(f"SELECT {_SESSION_COLS} FROM sessions WHERE id = %s AND owner_id = %s",
                            (session_id, owner_id)).fetchone()


SESSION_STATES = ("creating", "active", "deleting", "deleted", "failed", "lost", "exited")
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


def record_activity(session_id: UUID, actor: UUID, action: str, detail: dict[str, Any]) -> int:
    """Audit a terminal action and bump last_active_at (at most every 10 s, to keep the row cool). Returns the
    event's id (for ``settle_audit``)."""
    with connection() as conn:
        row = conn.execute(
            "WITH a AS (INSERT INTO audit_events (actor_id, action, session_id, status, detail)"
            " VALUES (%s, %s, %s, 'ok', %s) RETURNING id),"
            " u AS (UPDATE sessions SET last_active_at = now()"
            " WHERE id = %s AND last_active_at < now() - interval '10 seconds')"
            " SELECT id FROM a",
            (actor, action, session_id, psycopg.types.json.Jsonb(detail), session_id),
        ).fetchone()
    assert row is not None
    return int(row["id"])


def settle_audit(event_id: int, status: str, detail: dict[str, Any]) -> None:
    """An event written before its action's outcome was known (``record_activity`` beside the action): the
    outcome, when it is not ``ok``; ``detail`` is added to the event's."""
    with connection() as conn:
        conn.execute("UPDATE audit_events SET status = %s, detail = detail || %s WHERE id = %s",
                     (status, psycopg.types.json.Jsonb(detail), event_id))


def resize_session(session_id: UUID, actor: UUID, cols: int, rows: int) -> Row | None:
    with connection() as conn, conn.transaction():
        row = conn.execute(
            f"UPDATE sessions SET cols = %s, rows = %s, last_active_at = now() WHERE id = %s RETURNING {_SESSION_COLS}",
            (cols, rows, session_id),
        ).fetchone()
        _audit(conn, actor, "session.resize", session_id, "ok", {"cols": cols, "rows": rows})
        return row


def live_sessions_for_host(host_id: str) -> dict[UUID, int | None]:
    """Sessions placed on a host that should have a tmux session there (creating or active) -> their owner's
    account number."""
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
            " active_sessions = EXCLUDED.active_sessions, started_at = EXCLUDED.started_at, last_heartbeat = now(),"
            # draining is one run's state: a new run of the host (another started_at) is placed on again
            " draining_at = CASE WHEN hosts.started_at = EXCLUDED.started_at THEN hosts.draining_at END",
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
            "SELECT id, url, capacity, active_sessions, started_at, last_heartbeat, draining_at FROM hosts"
            " WHERE id = %s",
            (host_id,),
        ).fetchone()


def host_counts(dead_after_s: float, forget_after_s: float) -> tuple[int, int]:
    """(hosts heartbeating, hosts that stopped heartbeating within the last ``forget_after_s`` without having
    said they were stopping: dead)."""
    with connection() as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE last_heartbeat > now() - make_interval(secs => %(dead)s)) AS live,"
            " count(*) FILTER (WHERE last_heartbeat <= now() - make_interval(secs => %(dead)s)"
            "  AND last_heartbeat > now() - make_interval(secs => %(forget)s)"
            "  AND (stopped_at IS NULL OR stopped_at < last_heartbeat)) AS dead FROM hosts",
            {"dead": dead_after_s, "forget": forget_after_s},
        ).fetchone()
    return (int(row["live"]), int(row["dead"])) if row else (0, 0)


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



# --- live terminals: connect tickets, read-only shares, WebSocket connections (migration 0007) ----------------
# A share is live while it is neither revoked nor expired and its creator's account is enabled (``sh``: the share,
# ``cu``: its creator). Every statement that admits a share viewer -- redeeming a token, a ticket's $connect, an
# attach -- asks this same question.
_SHARE_LIVE = "(sh.revoked_at IS NULL AND sh.expires_at > now() AND NOT cu.disabled)"


def create_ws_ticket(ticket_hash: bytes, ttl_s: int, user_id: UUID) -> None:
    """A user's connect ticket (any session of theirs), good for ``ttl_s`` seconds."""
    with connection() as conn:
        conn.execute(
            "INSERT INTO ws_tickets (ticket_hash, user_id, expires_at)"
            " VALUES (%s, %s, now() + make_interval(secs => %s))",
            (ticket_hash, user_id, ttl_s),
        )


def redeem_share(token_hash: bytes, ticket_hash: bytes, ttl_s: int, source_ip: str | None) -> Row | None:
    """Mint a read-only connect ticket for the live share whose token hashes to ``token_hash``, if its session is
    active; it expires in ``ttl_s`` seconds or with the share, whichever is first. Audited. Returns
    ``share_id``, ``session_id``, ``expires_in`` (seconds), or None (no such live share: nothing is written)."""
    with connection() as conn, conn.transaction():
        share = conn.execute(
            f"SELECT sh.id, sh.session_id, sh.created_by FROM ws_shares sh JOIN users cu ON cu.id = sh.created_by"
            f" JOIN sessions s ON s.id = sh.session_id"
            f" WHERE sh.token_hash = %s AND {_SHARE_LIVE} AND s.state = 'active'",
            (token_hash,),
        ).fetchone()
        if share is None:
            return None
        row = conn.execute(
            "INSERT INTO ws_tickets (ticket_hash, share_id, session_id, read_only, expires_at)"
            " SELECT %s, sh.id, sh.session_id, true, least(now() + make_interval(secs => %s), sh.expires_at)"
            " FROM ws_shares sh WHERE sh.id = %s"
            " RETURNING share_id, session_id, extract(epoch FROM expires_at - now())::float8 AS expires_in",
            (ticket_hash, ttl_s, share["id"]),
        ).fetchone()
        assert row is not None
        _audit(conn, None, "share.redeem", share["session_id"], "ok",
               {"share_id": str(share["id"]), "created_by": str(share["created_by"]), "source_ip": source_ip})
        return row


def consume_ws_ticket(ticket_hash: bytes) -> Row | None:
    """Use a connect ticket up: one UPDATE that only an unused, unexpired ticket passes, so of two handshakes
    racing with one ticket exactly one gets it. Returns what the ticket grants -- ``user_id`` or ``share_id``
    (and the share's ``session_id``), ``read_only`` -- with what decides whether it still may: ``user_disabled``
    (a disabled or deleted user), ``share_live`` and ``share_expires_at``. None: unknown, used or expired."""
    with connection() as conn:
        return conn.execute(
            f"WITH t AS (UPDATE ws_tickets SET used_at = now()"
            f"  WHERE ticket_hash = %s AND used_at IS NULL AND expires_at > now()"
            f"  RETURNING user_id, share_id, session_id, read_only)"
            f" SELECT t.user_id, t.share_id, t.session_id, t.read_only, coalesce(u.disabled, false) AS user_disabled,"
            f"  sh.expires_at AS share_expires_at, coalesce({_SHARE_LIVE}, false) AS share_live"
            f" FROM t LEFT JOIN users u ON u.id = t.user_id LEFT JOIN ws_shares sh ON sh.id = t.share_id"
            f" LEFT JOIN users cu ON cu.id = sh.created_by",
            (ticket_hash,),
        ).fetchone()


def add_ws_connection(connection_id: str, user_id: UUID | None, share_id: UUID | None,
                      scope_session_id: UUID | None, source_ip: str | None, detail: dict[str, Any]) -> None:
    """Record an open connection (a share viewer's read-only from the start) and audit it (``ws.connect``)."""
    try:
        with connection() as conn, conn.transaction():
            conn.execute(
                "INSERT INTO ws_connections (id, user_id, share_id, scope_session_id, read_only, source_ip)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (connection_id, user_id, share_id, scope_session_id, share_id is not None, source_ip),
            )
            _audit(conn, user_id, "ws.connect", scope_session_id, "ok", detail)
    except psycopg.errors.UniqueViolation as exc:  # API Gateway never reuses an id: someone replays an event
        raise Conflict("this connection is already open") from exc


def get_ws_connection(connection_id: str) -> Row | None:
    """A connection with what decides what it may attach: ``user_disabled`` (its user is disabled or deleted),
    ``share_live`` and ``share_expires_at`` (a share viewer's)."""
    with connection() as conn:
        return conn.execute(
            f"SELECT c.id, c.user_id, c.share_id, c.scope_session_id, c.session_id, c.host_id, c.read_only,"
            f" coalesce(u.disabled, false) AS user_disabled, sh.expires_at AS share_expires_at,"
            f" coalesce({_SHARE_LIVE}, false) AS share_live"
            f" FROM ws_connections c LEFT JOIN users u ON u.id = c.user_id"
            f" LEFT JOIN ws_shares sh ON sh.id = c.share_id LEFT JOIN users cu ON cu.id = sh.created_by"
            f" WHERE c.id = %s",
            (connection_id,),
        ).fetchone()


def set_ws_attachment(connection_id: str, session_id: UUID, host_id: str, read_only: bool) -> bool:
    """Record a connection as attached to a session on a host. False: the connection is gone ($disconnect)."""
    with connection() as conn:
        row = conn.execute(
            "UPDATE ws_connections SET session_id = %s, host_id = %s, read_only = %s, attached_at = now()"
            " WHERE id = %s RETURNING id",
            (session_id, host_id, read_only, connection_id),
        ).fetchone()
    return row is not None


def clear_ws_attachment(connection_id: str, session_id: UUID | None = None) -> None:
    """Record a connection as attached to nothing (if attached to ``session_id``, when given). A share viewer's
    stays read-only."""
    with connection() as conn:
        conn.execute(
            "UPDATE ws_connections SET session_id = NULL, host_id = NULL, attached_at = NULL,"
            " read_only = share_id IS NOT NULL"
            " WHERE id = %s AND (%s::uuid IS NULL OR session_id = %s)",
            (connection_id, session_id, session_id),
        )


def ws_connection_attached(connection_id: str, session_id: UUID) -> bool:
    with connection() as conn:
        return conn.execute("SELECT 1 FROM ws_connections WHERE id = %s AND session_id = %s",
                            (connection_id, session_id)).fetchone() is not None


def delete_ws_connection(connection_id: str) -> Row | None:
    """Forget a closed connection. Returns its row as it was (``session_id``, ``host_id``: where it was
    attached), or None if it was not recorded."""
    with connection() as conn:
        return conn.execute(
            "DELETE FROM ws_connections WHERE id = %s RETURNING id, user_id, share_id, session_id, host_id",
            (connection_id,),
        ).fetchone()


def ws_connection_target(connection_id: str) -> Row | None:
    """The host holding an attached connection's viewer: ``host_id``, ``url``. None: unknown or not attached."""
    with connection() as conn:
        return conn.execute(
            "SELECT h.id AS host_id, h.url FROM ws_connections c JOIN hosts h ON h.id = c.host_id WHERE c.id = %s",
            (connection_id,),
        ).fetchone()


_SHARE_COLS = "id, session_id, created_at, expires_at, revoked_at"


def create_share(session_id: UUID, created_by: UUID, token_hash: bytes, expires_in_s: int) -> Row:
    """A read-only share of a session, expiring in ``expires_in_s`` seconds; audited (``share.create``)."""
    with connection() as conn, conn.transaction():
        row = conn.execute(
            f"INSERT INTO ws_shares (id, session_id, created_by, token_hash, expires_at)"
            f" VALUES (%s, %s, %s, %s, now() + make_interval(secs => %s)) RETURNING {_SHARE_COLS}",
            (uuid4(), session_id, created_by, token_hash, expires_in_s),
        ).fetchone()
        assert row is not None
        _audit(conn, created_by, "share.create", session_id, "ok",
               {"share_id": str(row["id"]), "expires_in_s": expires_in_s})
        return row


def list_shares(session_id: UUID, limit: int = MAX_PAGE) -> list[Row]:
    """A session's shares, newest first (at most ``limit``)."""
    with connection() as conn:
        return conn.execute(
            f"SELECT {_SHARE_COLS} FROM ws_shares WHERE session_id = %s ORDER BY created_at DESC, id LIMIT %s",
            (session_id, limit),
        ).fetchall()


def revoke_share(session_id: UUID, share_id: UUID, actor: UUID) -> Row | None:
    """Revoke a share of a session (revoking it again changes nothing) and audit it (``share.revoke``). Returns
    the share, or None when the session has no such share."""
    with connection() as conn, conn.transaction():
        row = conn.execute(
            f"UPDATE ws_shares SET revoked_at = coalesce(revoked_at, now()) WHERE id = %s AND session_id = %s"
            f" RETURNING {_SHARE_COLS}",
            (share_id, session_id),
        ).fetchone()
        if row is not None:
            _audit(conn, actor, "share.revoke", session_id, "ok", {"share_id": str(share_id)})
        return row


def attached_share_connections(share_id: UUID) -> list[Row]:
    """The connections of a share's viewers that are attached: ``id``, ``session_id``, ``host_id``."""
    with connection() as conn:
        return conn.execute(
            "SELECT id, session_id, host_id FROM ws_connections WHERE share_id = %s AND session_id IS NOT NULL",
            (share_id,),
        ).fetchall()


def prune_live(ticket_grace_s: float, connection_max_s: float) -> tuple[int, int]:
    """Delete tickets expired more than ``ticket_grace_s`` ago and connections open longer than
    ``connection_max_s`` (whose $disconnect never came). Returns how many of each."""
    with connection() as conn:
        tickets = conn.execute(
            "DELETE FROM ws_tickets WHERE expires_at < now() - make_interval(secs => %s)", (ticket_grace_s,)
        ).rowcount
        connections = conn.execute(
            "DELETE FROM ws_connections WHERE connected_at < now() - make_interval(secs => %s)", (connection_max_s,)
        ).rowcount
    return tickets, connections


# --- scheduled maintenance (services/maintenance.py; migration 0010) ----------------------------------------
# Advisory lock keys: (this class, hashtext(task)): one per task, apart from any other use of advisory locks.
MAINTENANCE_LOCK_CLASS = 0x746D78  # "tmx"


def maintenance_lock_connection() -> psycopg.Connection[Any]:
    """A connection of its own (not the pool's) for a maintenance run: it holds the task's advisory lock for the
    whole run, however long, where a pooled connection is cut after one statement's bound; VACUUM runs on it too
    (outside a transaction, no statement timeout). The caller closes it (closing releases the lock)."""
    from tmuxi.db.pool import _conninfo
    from tmuxi.settings import get_settings

    conn = psycopg.connect(_conninfo(get_settings()), autocommit=True, row_factory=psycopg.rows.dict_row)
    conn.execute("SET statement_timeout = 0")
    return conn


def try_maintenance_lock(conn: psycopg.Connection[Any], task: str) -> bool:
    row = conn.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s)) AS got",
                       (MAINTENANCE_LOCK_CLASS, task)).fetchone()
    return bool(row and row["got"])


def start_maintenance_run(task: str, status: str = "running", result: dict[str, Any] | None = None) -> int:
    with connection() as conn:
        row = conn.execute(
            "INSERT INTO maintenance_runs (task, status, result, finished_at)"
            " VALUES (%s, %s, %s, CASE WHEN %s = 'running' THEN NULL ELSE now() END) RETURNING id",
            (task, status, psycopg.types.json.Jsonb(result or {}), status),
        ).fetchone()
    assert row is not None
    return int(row["id"])


def finish_maintenance_run(run_id: int, status: str, result: dict[str, Any], error: str | None = None) -> None:
    with connection() as conn:
        conn.execute(
            "UPDATE maintenance_runs SET status = %s, result = %s, error = %s, finished_at = now() WHERE id = %s",
            (status, psycopg.types.json.Jsonb(result), error, run_id),
        )


def maintenance_runs(task: str | None = None, limit: int = 100) -> list[Row]:
    with connection() as conn:
        return conn.execute(
            "SELECT id, task, started_at, finished_at, status, result, error FROM maintenance_runs"
            " WHERE %(task)s::text IS NULL OR task = %(task)s ORDER BY id DESC LIMIT %(limit)s",
            {"task": task, "limit": limit},
        ).fetchall()


IDLE_REASON = "idle for longer than the idle timeout"
LIFETIME_REASON = "reached its maximum lifetime"


def begin_cleanup_batch(idle_s: float, max_life_s: float, limit: int) -> list[Row]:
    """Up to ``limit`` active sessions idle for longer than ``idle_s`` (or older than ``max_life_s``, when > 0)
    become ``deleting`` with the reason, audited as a delete, in one transaction: the first step of a delete
    (sessions.delete_session). The conditions are checked again on each row as it is updated, so a session with
    activity meanwhile is not taken; rows another run holds are skipped (SKIP LOCKED). Returns id, host_id,
    end_reason of the rows taken."""
    cond = ("(last_active_at < now() - make_interval(secs => %(idle)s)"
            " OR (%(life)s > 0 AND created_at < now() - make_interval(secs => %(life)s)))")
    with connection() as conn, conn.transaction():
        rows = conn.execute(
            f"UPDATE sessions SET state = 'deleting', end_reason = CASE WHEN %(life)s > 0 AND"
            f"  created_at < now() - make_interval(secs => %(life)s) THEN %(life_reason)s ELSE %(idle_reason)s END"
            f" WHERE id IN (SELECT id FROM sessions WHERE state = 'active' AND {cond}"
            f"  ORDER BY last_active_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
            f" AND state = 'active' AND {cond} RETURNING id, host_id, end_reason",
            {"idle": idle_s, "life": max_life_s, "limit": limit, "idle_reason": IDLE_REASON,
             "life_reason": LIFETIME_REASON},
        ).fetchall()
        _audit_many(conn, "session.delete", rows)
        return rows


def finish_deletes(session_ids: list[UUID]) -> list[Row]:
    """``deleting`` -> ``deleted`` for these sessions (their tmux sessions are gone), audited, in one
    transaction. Returns id, end_reason of the rows changed."""
    if not session_ids:
        return []
    with connection() as conn, conn.transaction():
        rows = conn.execute(
            "UPDATE sessions SET state = 'deleted' WHERE id = ANY(%s) AND state = 'deleting'"
            " RETURNING id, host_id, end_reason", (session_ids,),
        ).fetchall()
        _audit_many(conn, "session.deleted", rows)
        return rows


def _audit_many(conn: psycopg.Connection[Any], action: str, rows: list[Row]) -> None:
    """One audit event per row (actor: the system), in one statement."""
    if rows:
        conn.execute(
            "INSERT INTO audit_events (actor_id, action, session_id, status, detail)"
            " SELECT NULL, %s, r.id, 'ok', jsonb_build_object('reason', r.reason)"
            " FROM unnest(%s::uuid[], %s::text[]) AS r(id, reason)",
            (action, [r["id"] for r in rows], [r["end_reason"] for r in rows]),
        )


def touch_sessions(host_id: str, session_ids: list[UUID]) -> int:
    """A host reports activity the API does not see (WebSocket keystrokes, viewers attached): these sessions'
    last_active_at becomes now, in one statement (only sessions placed on that host, active)."""
    if not session_ids:
        return 0
    with connection() as conn:
        return conn.execute(
            # at most every 30 s per session: a watched session is reported every beat, its row stays cool
            "UPDATE sessions SET last_active_at = now() WHERE id = ANY(%s) AND host_id = %s AND state = 'active'"
            " AND last_active_at < now() - interval '30 seconds'",
            (session_ids, host_id),
        ).rowcount


def live_hosts(dead_after_s: float) -> list[Row]:
    """Hosts heartbeating, with how long their current run has been up."""
    with connection() as conn:
        return conn.execute(
            "SELECT id, url, capacity, active_sessions, started_at, last_heartbeat,"
            " extract(epoch FROM now() - started_at) AS up_s FROM hosts"
            " WHERE last_heartbeat > now() - make_interval(secs => %s) ORDER BY id", (dead_after_s,),
        ).fetchall()


def active_sessions_on_host(host_id: str, settled_s: float) -> set[UUID]:
    """Sessions active on a host since at least ``settled_s`` ago."""
    with connection() as conn:
        rows = conn.execute(
            "SELECT id FROM sessions WHERE host_id = %s AND state = 'active'"
            " AND state_changed_at < now() - make_interval(secs => %s)", (host_id, settled_s),
        ).fetchall()
    return {r["id"] for r in rows}


def holding_sessions_on_host(host_id: str, session_ids: list[UUID]) -> set[UUID]:
    """Of these ids, the sessions the record has holding a tmux session on that host."""
    if not session_ids:
        return set()
    with connection() as conn:
        rows = conn.execute(
            "SELECT id FROM sessions WHERE id = ANY(%s) AND host_id = %s AND state = ANY(%s)",
            (session_ids, host_id, list(HOLDING_STATES)),
        ).fetchall()
    return {r["id"] for r in rows}


def not_live_sessions(session_ids: list[UUID]) -> set[UUID]:
    """Of these ids, those of sessions recorded as ended. (Not those the record does not have: a Redis shared
    with another database -- another environment, the tests' own databases -- holds entries of sessions this one
    never knew, which are not this reconcile's to delete; the cache TTL bounds them.)"""
    if not session_ids:
        return set()
    with connection() as conn:
        rows = conn.execute(
            "SELECT s.id FROM sessions s WHERE s.id = ANY(%s::uuid[]) AND s.state = ANY(%s)",
            (session_ids, list(ENDED_STATES)),
        ).fetchall()
    return {r["id"] for r in rows}


def delete_expired_revocations(limit: int) -> int:
    """One batch of revoked tokens past their expiry (an expired token is refused anyway)."""
    with connection() as conn:
        return conn.execute(
            "DELETE FROM revoked_tokens WHERE jti IN (SELECT jti FROM revoked_tokens WHERE expires_at < now()"
            " LIMIT %s)", (limit,),
        ).rowcount


def delete_old_audit_events(days: int, limit: int) -> int:
    """One batch of audit events older than ``days`` (oldest first)."""
    with connection() as conn:
        return conn.execute(
            "DELETE FROM audit_events WHERE id IN (SELECT id FROM audit_events"
            " WHERE at < now() - make_interval(days => %s) ORDER BY at LIMIT %s)", (days, limit),
        ).rowcount


def delete_old_maintenance_runs(days: int) -> int:
    with connection() as conn:
        return conn.execute("DELETE FROM maintenance_runs WHERE started_at < now() - make_interval(days => %s)",
                            (days,)).rowcount


def delete_old_ended_sessions(days: int, limit: int) -> int:
    """One batch of sessions that ended more than ``days`` ago, with what refers to them (their shares, and the
    tickets and connection records of those shares or of them), in one transaction."""
    with connection() as conn, conn.transaction():
        ids = [r["id"] for r in conn.execute(
            "SELECT id FROM sessions WHERE ended_at < now() - make_interval(days => %s) AND state = ANY(%s)"
            " ORDER BY ended_at LIMIT %s FOR UPDATE SKIP LOCKED", (days, list(ENDED_STATES), limit),
        ).fetchall()]
        if not ids:
            return 0
        shares = "SELECT id FROM ws_shares WHERE session_id = ANY(%(ids)s)"
        conn.execute(f"DELETE FROM ws_tickets WHERE session_id = ANY(%(ids)s) OR share_id IN ({shares})",
                     {"ids": ids})
        conn.execute(f"DELETE FROM ws_connections WHERE scope_session_id = ANY(%(ids)s) OR session_id = ANY(%(ids)s)"
                     f" OR share_id IN ({shares})", {"ids": ids})
        conn.execute("DELETE FROM ws_shares WHERE session_id = ANY(%s)", (ids,))
        return conn.execute("DELETE FROM sessions WHERE id = ANY(%s)", (ids,)).rowcount


MAINTAINED_TABLES = ("sessions", "audit_events", "users", "hosts", "host_extra_sessions", "revoked_tokens",
                     "ws_shares", "ws_tickets", "ws_connections", "maintenance_runs")


def vacuum_analyze(conn: psycopg.Connection[Any], table: str) -> None:
    """VACUUM ANALYZE one table, on a connection outside any transaction (VACUUM cannot run in one)."""
    conn.execute(psycopg.sql.SQL("VACUUM (ANALYZE) {}").format(psycopg.sql.Identifier(table)))


def capacity_counts(window_s: float) -> Row:
    """Active sessions in all and per host, and the terminal/API actions recorded (audit events) in the last
    ``window_s`` seconds."""
    with connection() as conn:
        per_host = conn.execute(
            "SELECT host_id, count(*) AS n FROM sessions WHERE state = 'active' GROUP BY host_id ORDER BY host_id"
        ).fetchall()
        recent = conn.execute(
            "SELECT count(*) AS n FROM audit_events WHERE at > now() - make_interval(secs => %s)", (window_s,)
        ).fetchone()
    return {"per_host": {str(r["host_id"]): int(r["n"]) for r in per_host},
            "actions": int(recent["n"]) if recent else 0}
