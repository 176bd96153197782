"""Session lifecycle and terminal work. Ownership is enforced here for every call: another user's session is
indistinguishable from one that does not exist; an admin sees all."""
from __future__ import annotations

import base64
import binascii
from typing import Any
from uuid import UUID

from tmuxi import cache, host_client, registry
from tmuxi.db import repo
from tmuxi.errors import (
    AppError,
    BadRequest,
    HostUnavailable,
    NotFound,
    PayloadTooLarge,
    SessionNotActive,
)
from tmuxi.models import (
    ExecRequest,
    ExecResult,
    InputRequest,
    Principal,
    ResizeRequest,
    ScreenResponse,
    Session,
    SessionCreate,
    SessionList,
)
from tmuxi.observability import logger
from tmuxi.pagination import MAX_PAGE, Cursor, encode_cursor
from tmuxi.services import auth as auth_service
from tmuxi.settings import get_settings

_PUBLIC = set(Session.model_fields)


def _public(row: dict[str, Any]) -> Session:
    return Session.model_validate({k: v for k, v in row.items() if k in _PUBLIC})


def _may_see(p: Principal, row: dict[str, Any]) -> bool:
    return p.role == "admin" or str(row["owner_id"]) == str(p.user_id)


def _load(p: Principal, session_id: UUID) -> dict[str, Any]:
    """Admit the request and return the session row, if the caller may see it. The cache answers only callers
    who may see the row; anyone else's lookup asks PostgreSQL for the row *of its owner* and gets none, exactly
    the work and the answer of a lookup of an id that does not exist, so another user's session cannot be told
    from a missing one by timing either. Only rows the caller may see are cached."""
    adm = auth_service.admit(p, session_id)
    row = adm.session if adm is not None else None
    if row is None or not _may_see(p, row):
        row = (repo.get_session(session_id) if p.role == "admin"
               else repo.get_own_session(session_id, p.user_id))
        if row is None:
            raise NotFound("session not found")
        if adm is not None:
            cache.put_session(str(session_id), row, adm.gen)
    return row


def _active(p: Principal, session_id: UUID) -> tuple[dict[str, Any], host_client.HostClient]:
    row = _load(p, session_id)
    if row["state"] != "active":
        raise SessionNotActive(f"the session is {row['state']}, not active")
    return row, host_client.HostClient(registry.host_url(row["host_id"]))


def create_session(p: Principal, body: SessionCreate) -> Session:
    auth_service.admit(p)
    s = get_settings()
    cols, rows = body.cols or s.default_cols, body.rows or s.default_rows
    row = repo.reserve_session(p.user_id, body.name, cols, rows, s.session_quota, s.host_dead_after_s)
    sid: UUID = row["id"]
    try:
        created = host_client.HostClient(row["host_url"]).create_session(sid, row["account_no"], cols, rows)
    except AppError as exc:
        detail = f"host {row['host_id']}: {exc.code}: {exc.internal or exc.message}"
        repo.end_session(sid, p.user_id, "failed", detail)
        logger.warning("session creation failed on host", extra={"host_id": row["host_id"], "error": exc.code})
        # whatever the host said (at capacity, a tmux failure, ...), the caller may retry: 503, details logged
        raise HostUnavailable(f"the session could not be created on tmux {detail}") from exc
    return _public(repo.activate_session(sid, p.user_id, created["pane_id"]))


def list_sessions(p: Principal, state: str = "live", limit: int = 100, after: Cursor | None = None) -> SessionList:
    """A page of the caller's sessions (an admin's: everyone's), newest first, after ``after`` (a decoded
    ``next_cursor``). The owner filter applies whatever the cursor says: a cursor only positions."""
    auth_service.admit(p)
    owner = None if p.role == "admin" else p.user_id
    rows, more = repo.list_sessions(owner, state, limit, after)
    last = rows[-1] if more else None
    return SessionList(sessions=[_public(r) for r in rows],
                       next_cursor=encode_cursor(last["created_at"], last["id"]) if last is not None else None)


def get_session(p: Principal, session_id: UUID) -> Session:
    return _public(_load(p, session_id))


def delete_session(p: Principal, session_id: UUID) -> None:
    row = _load(p, session_id)
    if row["state"] not in ("creating", "active"):
        raise NotFound("session not found")
    _end(row, p.user_id, "deleted by user")


def _end(row: dict[str, Any], actor: UUID | None, reason: str, kill: bool = True) -> bool:
    """Kill a live session's tmux session (unless not ``kill``) and record it deleted. False: its host was
    unreachable."""
    session_id: UUID = row["id"]
    reached = True
    try:
        if kill:
            host_client.HostClient(registry.host_url(row["host_id"])).kill_session(session_id)
    except NotFound:
        pass  # already gone from tmux
    except HostUnavailable:
        # The record still ends; the host kills the orphan when it reconciles.
        logger.warning("host unreachable on delete; session ended in the database", extra={"host_id": row["host_id"]})
        reached = False
    repo.end_session(session_id, actor, "deleted", reason)
    cache.invalidate_session(str(session_id))
    return reached


def end_user_sessions(owner_id: UUID, actor: UUID | None, reason: str) -> int:
    """End every live session of a user (their tmux sessions killed; a host that does not answer is not asked
    again). Returns how many."""
    unreachable: set[str] = set()
    ended = 0
    after: Cursor | None = None
    more = True
    while more:  # page by page: every live session, however many
        rows, more = repo.list_sessions(owner_id, "live", MAX_PAGE, after)
        for row in rows:
            if not _end(row, actor, reason, kill=row["host_id"] not in unreachable):
                unreachable.add(row["host_id"])
        ended += len(rows)
        if rows:
            after = Cursor(rows[-1]["created_at"], rows[-1]["id"])
    return ended


def send_input(p: Principal, session_id: UUID, body: InputRequest) -> None:
    limit = get_settings().max_input_bytes
    data: bytes | None = None
    if body.text is not None:
        data = body.text.encode()
    elif body.data_b64 is not None:
        if len(body.data_b64) > (limit * 4) // 3 + 4:
            raise PayloadTooLarge(f"input is larger than {limit} bytes")
        try:
            data = base64.b64decode(body.data_b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadRequest("data_b64 is not valid base64") from exc
    if data is not None:
        if body.enter:
            data += b"\r"
        if len(data) > limit:
            raise PayloadTooLarge(f"input is {len(data)} bytes; the limit is {limit}")
    keys = list(body.keys or [])
    if body.keys is not None and body.enter:
        keys.append("Enter")
    row, host = _active(p, session_id)
    host.send_input(session_id, data=data, keys=keys or None)
    repo.record_activity(session_id, p.user_id, "session.input",
                         {"bytes": len(data) if data is not None else 0, "keys": len(keys)})


def read_screen(p: Principal, session_id: UUID, escapes: bool = False, history: int = 0) -> ScreenResponse:
    _, host = _active(p, session_id)
    return host.screen(session_id, escapes=escapes, history=history)


def resize(p: Principal, session_id: UUID, body: ResizeRequest) -> None:
    _, host = _active(p, session_id)
    host.resize(session_id, body.cols, body.rows)
    repo.resize_session(session_id, p.user_id, body.cols, body.rows)
    cache.invalidate_session(str(session_id))


def exec_command(p: Principal, session_id: UUID, body: ExecRequest) -> ExecResult:
    s = get_settings()
    size = len(body.command.encode())
    if size > s.max_command_bytes:
        raise PayloadTooLarge(f"command is {size} bytes; the limit is {s.max_command_bytes}")
    timeout = min(body.timeout_s or s.exec_timeout_default_s, s.exec_timeout_max_s)
    _, host = _active(p, session_id)
    result = host.exec(session_id, body.command, timeout)
    # A command that ran `exit` (or `exec`, or failed under `set -e`) ended the session. The host reports it
    # too; whichever comes first records it.
    ended = result.session_ended and repo.end_session(session_id, p.user_id, "exited",
                                                      "the shell exited during an exec") is not None
    if ended:
        cache.invalidate_session(str(session_id))
    repo.record_activity(session_id, p.user_id, "session.exec",
                         {"bytes": size, "exit_code": result.exit_code, "timed_out": result.timed_out})
    return result
