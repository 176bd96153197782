"""Data access of incidents (migration 0009): every SQL statement on ``incidents`` and ``incident_events``. The
logic is services/incidents.py; nothing else touches these tables."""
from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from tmuxi.db.pool import connection
from tmuxi.snapstart import deferred_import

if TYPE_CHECKING:
    import psycopg
    import psycopg.types.json
else:
    psycopg = deferred_import("psycopg")  # on first use, as in db/pool.py (~110 ms off a cold start)

Row = dict[str, Any]

# One statement, so that two notifications of one alarm handled at once cannot both open an incident: the partial
# unique index (one unresolved incident per key) turns the second INSERT into an update of the first's row, which
# PostgreSQL does under the row's lock (the second waits for the first to commit). ``xmax = 0`` holds only for a
# row this statement inserted: the way to tell an insert from an update in RETURNING. A repeat never lowers the
# priority (P1 < P2 < ... as text): it escalates when the new notification's is higher.
_RECORD_ALARM = """
INSERT INTO incidents AS i (key, priority, rule, title, opened_at, updated_at, last_state, last_reason)
VALUES (%(key)s, %(priority)s, %(rule)s, %(title)s, COALESCE(%(at)s, now()), now(), %(state)s, %(reason)s)
ON CONFLICT (key) WHERE resolved_at IS NULL DO UPDATE
    SET update_count = i.update_count + 1, updated_at = now(), last_state = EXCLUDED.last_state,
        last_reason = EXCLUDED.last_reason, priority = LEAST(i.priority, EXCLUDED.priority)
RETURNING *, (xmax = 0) AS opened
"""


def _event(conn: psycopg.Connection[Any], incident_id: int, kind: str, detail: dict[str, Any]) -> None:
    conn.execute("INSERT INTO incident_events (incident_id, kind, detail) VALUES (%s, %s, %s)",
                 (incident_id, kind, psycopg.types.json.Jsonb(detail)))


def record_alarm(key: str, priority: str, rule: str, title: str, state: str, reason: str, at: datetime | None,
                 detail: dict[str, Any]) -> Row:
    """Open an incident for ``key``, or update the one open (its row; ``opened`` says which), with its event."""
    with connection() as conn, conn.transaction():
        row = conn.execute(_RECORD_ALARM, {"key": key, "priority": priority, "rule": rule, "title": title,
                                           "at": at, "state": state, "reason": reason}).fetchone()
        assert row is not None  # INSERT ... ON CONFLICT DO UPDATE always returns the row
        _event(conn, row["id"], "opened" if row["opened"] else "updated", detail)
        return row


def update_open(key: str, state: str, reason: str, detail: dict[str, Any]) -> Row | None:
    """Record a notification that neither opens nor resolves (INSUFFICIENT_DATA) on the open incident of
    ``key``; None when there is none."""
    with connection() as conn, conn.transaction():
        row = conn.execute(
            "UPDATE incidents SET update_count = update_count + 1, updated_at = now(), last_state = %s,"
            " last_reason = %s WHERE key = %s AND resolved_at IS NULL RETURNING *",
            (state, reason, key)).fetchone()
        if row is not None:
            _event(conn, row["id"], "updated", detail)
        return row


def resolve(key: str, state: str, reason: str, at: datetime | None, detail: dict[str, Any]) -> Row | None:
    """Resolve the open incident of ``key`` at ``at`` (now if None); None when there is none. A notification
    older than the incident's opening (SNS does not keep order: an OK of an earlier episode delivered late)
    resolves nothing."""
    with connection() as conn, conn.transaction():
        row = conn.execute(
            "UPDATE incidents SET status = 'resolved', resolved_at = COALESCE(%(at)s, now()), updated_at = now(),"
            " last_state = %(state)s, last_reason = %(reason)s"
            " WHERE key = %(key)s AND resolved_at IS NULL AND opened_at <= COALESCE(%(at)s, now())"
            " RETURNING *",
            {"key": key, "state": state, "reason": reason, "at": at}).fetchone()
        if row is not None:
            _event(conn, row["id"], "resolved", detail)
        return row


def add_event(incident_id: int, kind: str, detail: dict[str, Any]) -> None:
    with connection() as conn:
        _event(conn, incident_id, kind, detail)


def events(incident_id: int) -> list[Row]:
    with connection() as conn:
        return conn.execute("SELECT id, incident_id, at, kind, detail FROM incident_events WHERE incident_id = %s"
                            " ORDER BY id", (incident_id,)).fetchall()


def list_incidents(open_only: bool = False, since: datetime | None = None, limit: int = 100) -> list[Row]:
    """Incidents newest first: only the unresolved ones if ``open_only``; only those opened at or after ``since``,
    or still open then, if given."""
    with connection() as conn:
        return conn.execute(
            "SELECT * FROM incidents WHERE (NOT %(open_only)s OR resolved_at IS NULL)"
            " AND (%(since)s::timestamptz IS NULL OR opened_at >= %(since)s OR resolved_at IS NULL"
            " OR resolved_at >= %(since)s) ORDER BY opened_at DESC, id DESC LIMIT %(limit)s",
            {"open_only": open_only, "since": since, "limit": limit}).fetchall()
