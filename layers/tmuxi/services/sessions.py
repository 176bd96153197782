"""Session lifecycle and terminal work. Ownership is enforced here for every call: another user's session is
indistinguishable from one that does not exist; an admin sees all."""
from __future__ import annotations

import base64
import binascii
import contextlib
import os
from collections.abc import Callable
from typing import Any, TypeVar
from uuid import UUID

from tmuxi import cache, host_client, registry
from tmuxi.db import repo
from tmuxi.errors import (
    AppError,
    BadRequest,
    HostUnavailable,
    InvalidField,
    NotFound,
    PayloadTooLarge,
    SessionGone,
    SessionNotActive,
)
from tmuxi.models import (
    ExecRequest,
    ExecResult,
    InputRequest,
    InputWaitResult,
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
from tmuxi.settings import Settings, get_settings

T = TypeVar("T")

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


def gone(row: dict[str, Any]) -> SessionGone:
    state, reason = row["state"], row.get("end_reason")
    why = f"the session is {state}" + (f": {reason}" if reason else "")
    return SessionGone(f"{why}; create a new session", state=state, end_reason=reason)


def _active(p: Principal, session_id: UUID) -> tuple[dict[str, Any], host_client.HostClient]:
    row = _load(p, session_id)
    if row["state"] == "creating":
        raise SessionNotActive("the session is still being created; retry in a moment")
    if row["state"] != "active":
        raise gone(row)
    return row, host_client.HostClient(registry.host_url(row["host_id"]))


def on_host(row: dict[str, Any], call: Callable[[], T]) -> T:
    """Run a call to the session's host. The host not having the session means it is over: its shell exited
    (the host says so), or it was lost. Recorded -- the host's own report may still be on its way -- and answered
    410 ``session_gone``. A host that does not answer and has stopped heartbeating is dead: its sessions are lost
    (410 too); one that merely did not answer is a 503, retry."""
    try:
        return call()
    except (SessionGone, NotFound) as exc:
        state = exc.details.get("state") if isinstance(exc, SessionGone) else None
        reason = exc.details.get("end_reason") if isinstance(exc, SessionGone) else None
        if state not in ("exited", "lost"):
            state, reason = "lost", "its tmux host does not have it"
        raise gone(_record_end(row, state, reason or "its tmux host does not have it")) from exc
    except HostUnavailable:
        if not registry.host_alive(row["host_id"]) and not _answers(row["host_id"]):
            raise gone(_record_end(row, "lost", "its tmux host stopped answering")) from None
        raise


def _answers(host_id: str) -> bool:
    """The host answers its /health (within a second): alive, whatever its heartbeat's age says."""
    try:
        url = registry.host_url(host_id)
        host_client.HostClient(url, timeout_s=min(1.0, get_settings().host_timeout_s)).health()
    except AppError:
        return False
    return True


def _record_end(row: dict[str, Any], state: str, reason: str) -> dict[str, Any]:
    """End a session in the record (if nothing else ended it first); the row as it now is."""
    sid: UUID = row["id"]
    ended = repo.end_session(sid, None, state, reason)
    cache.invalidate_session(str(sid))
    return ended or repo.get_session(sid) or {**row, "state": state, "end_reason": reason}


# a create is tried on at most this many hosts before the client hears it failed
PLACEMENT_ATTEMPTS = 3


def create_session(p: Principal, body: SessionCreate) -> Session:
    """Reserve the session (quota, placement) in PostgreSQL, create it on its host, activate it. A host that
    cannot take it (unreachable, full) is skipped -- by every caller until it heartbeats again -- and the create
    is tried on the next. A delete that came in meanwhile wins: the tmux session is killed and the create
    answers 410. Whatever is left half-done (a crash between the host and the record) reconciliation rolls back."""
    auth_service.admit(p)
    s = get_settings()
    cols, rows = body.cols or s.default_cols, body.rows or s.default_rows
    row = repo.reserve_session(p.user_id, body.name, cols, rows, s.session_quota, s.host_dead_after_s)
    sid: UUID = row["id"]
    account: int = row["account_no"]
    tried: list[str] = []
    while True:
        host_id: str = row["host_id"]
        try:
            created = host_client.HostClient(row["host_url"]).create_session(sid, account, cols, rows)
            break
        except HostUnavailable as exc:  # unreachable, timed out, full: another host may take it
            tried.append(host_id)
            if not isinstance(exc, host_client.HostFull):
                repo.mark_host_unreachable(host_id)
            logger.warning("session creation failed on a host; trying another",
                           extra={"host_id": host_id, "error": exc.code, "attempt": len(tried)})
            moved: dict[str, Any] | None = None
            if len(tried) < PLACEMENT_ATTEMPTS:
                with contextlib.suppress(HostUnavailable):  # no other host: fail below
                    moved = repo.move_session(sid, tried, s.host_dead_after_s)
            if moved is None:
                _fail_create(sid, p.user_id, f"no host could take it (tried {len(tried)})", exc)
                raise HostUnavailable(f"session {sid} could not be created on {tried}") from exc
            row = moved
        except AppError as exc:  # tmux refused (4xx/5xx from the host): not something another host fixes
            _fail_create(sid, p.user_id, f"host {host_id}: {exc.code}", exc)
            raise HostUnavailable(f"the session could not be created on tmux host {host_id}: "
                                  f"{exc.internal or exc.message}") from exc
    try:
        active = repo.activate_session(sid, p.user_id, created["pane_id"])
    except AppError:
        # The record could not be written: undo on the host now if it answers; reconciliation fails the row.
        _kill_quietly(row["host_id"], sid)
        raise
    if active is None:  # a delete won while the host was creating it: it must not live on
        _kill_quietly(row["host_id"], sid)
        current = repo.end_session(sid, None, "deleted", "deleted while being created") or repo.get_session(sid)
        cache.invalidate_session(str(sid))
        raise gone(current or {"state": "deleted", "end_reason": "deleted while being created"})
    return _public(active)


def _fail_create(sid: UUID, actor: UUID, reason: str, exc: AppError) -> None:
    logger.warning("session creation failed", extra={"error": exc.code, "reason": reason})
    repo.end_session(sid, actor, "failed", reason)


def _kill_quietly(host_id: str, sid: UUID) -> bool:
    """Kill a tmux session if its host answers. True: it is gone from the host."""
    try:
        host_client.HostClient(registry.host_url(host_id)).kill_session(sid)
    except (NotFound, SessionGone):
        return True
    except AppError as exc:
        logger.warning("could not kill a tmux session; reconciliation will",
                       extra={"host_id": host_id, "error": exc.code})
        return False
    return True


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
    """A delete is recorded first (``deleting``: it wins over a create in flight), then the tmux session is
    killed and the session is ``deleted``. If its host does not answer, the delete stands and reconciliation
    finishes it. A session that has already ended -- or ends on its own before the delete is recorded (its host
    died, its shell exited) -- answers 410 saying how."""
    row = _load(p, session_id)
    if row["state"] not in ("creating", "active", "deleting"):
        raise gone(row)
    reason = "deleted by its owner" if str(row["owner_id"]) == str(p.user_id) else "deleted by an admin"
    if _end(row, p.user_id, reason) is None:
        current = repo.get_session(session_id) or row
        if current["state"] not in ("deleting", "deleted"):  # another delete got there first: that is this one
            raise gone(current)


def _end(row: dict[str, Any], actor: UUID | None, reason: str, kill: bool = True) -> bool | None:
    """Delete a session: ``deleting``, its tmux session killed (unless not ``kill``), ``deleted``. False: its host
    did not answer, and the session stays ``deleting`` for reconciliation to finish. None: it was no longer live
    (it ended meanwhile, or another delete recorded it)."""
    session_id: UUID = row["id"]
    if row["state"] != "deleting" and repo.transition(session_id, "deleting", actor, reason) is None:
        cache.invalidate_session(str(session_id))
        return None
    cache.invalidate_session(str(session_id))
    if not kill or not _kill_quietly(row["host_id"], session_id):
        return False
    # the delete stands once `deleting` is recorded: a failure to write `deleted` now is reconciliation's to finish
    _after(repo.end_session, session_id, actor, "deleted", reason)
    cache.invalidate_session(str(session_id))
    return True


def end_user_sessions(owner_id: UUID, actor: UUID | None, reason: str) -> int:
    """End every live session of a user (their tmux sessions killed; a host that does not answer is not asked
    again, and reconciliation finishes those). Returns how many."""
    unreachable: set[str] = set()
    ended = 0
    after: Cursor | None = None
    more = True
    while more:  # page by page: every live session, however many
        rows, more = repo.list_sessions(owner_id, "live", MAX_PAGE, after)
        for row in rows:
            if _end(row, actor, reason, kill=row["host_id"] not in unreachable) is False:
                unreachable.add(row["host_id"])
        ended += len(rows)
        if rows:
            after = Cursor(rows[-1]["created_at"], rows[-1]["id"])
    return ended


def reconcile(s: Settings | None = None) -> dict[str, int]:
    """Bring the record back to the truth (run on a schedule): sessions on hosts that stopped heartbeating are
    lost; a create or a delete left half-done (a crash, a database error, a host that did not answer) is
    finished: a ``creating`` session older than any create can take is killed on its host and ``failed``; a
    ``deleting`` one is killed and ``deleted``. Returns counts."""
    s = s or get_settings()
    counts = {"lost": 0, "failed": 0, "deleted": 0, "pending": 0}
    for host in repo.silent_hosts(s.host_dead_after_s):
        # A stale heartbeat alone is not death: PostgreSQL itself may have been down (no heartbeat could be
        # written). A host that still answers is left alone; its next heartbeat lands in a moment.
        if _answers(host["id"]):
            continue
        for r in repo.end_sessions_of_dead_host(host["id"], s.host_dead_after_s):
            counts["lost" if r["state"] == "lost" else "deleted"] += 1
            cache.invalidate_session(str(r["id"]))
    # A create takes at most the host's timeout per attempt; after that nothing will activate it.
    stale_after = s.host_timeout_s * PLACEMENT_ATTEMPTS + 5
    for r in repo.sessions_in_between(stale_after):
        if not _kill_quietly(r["host_id"], r["id"]):
            counts["pending"] += 1  # its host is not answering: next time (or it is declared dead)
            continue
        if r["state"] == "creating":
            done = repo.end_session(r["id"], None, "failed", "its creation did not complete")
            counts["failed"] += done is not None
        else:
            done = repo.end_session(r["id"], None, "deleted", r["end_reason"] or "deleted")
            counts["deleted"] += done is not None
        cache.invalidate_session(str(r["id"]))
    if any(counts.values()):
        logger.info("sessions reconciled", extra={"status": "ok", **counts})
    return counts


def send_input(p: Principal, session_id: UUID, body: InputRequest) -> InputWaitResult | None:
    """Type the input; with ``wait``, then wait (for the prompt, for quiet, for a pattern) and answer the screen."""
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
    wait = body.wait
    detail = {"bytes": len(data) if data is not None else 0, "keys": len(keys)}
    if wait is None:
        audited(p, session_id, row, "session.input", detail, host,
                lambda h: h.send_input(session_id, data=data, keys=keys or None))
        return None
    return audited(p, session_id, row, "session.input", detail, host,
                   lambda h: h.send_and_wait(session_id, data, keys or None, wait))


def _after(write: Callable[..., T], *args: Any) -> T | None:
    """A record written after the side effect it records happened (the input was typed, the command ran): if
    the database fails now, the client is still told the truth -- it happened -- and the miss is logged (and
    None returned)."""
    try:
        return write(*args)
    except AppError as exc:
        logger.warning("activity not recorded", extra={"error": exc.code, "write": getattr(write, "__name__", "?")})
        return None


class _Audited:
    """The audit event of a terminal action (``audited``), written once."""

    def __init__(self, p: Principal, session_id: UUID, action: str, detail: dict[str, Any]) -> None:
        self.args = (session_id, p.user_id, action, detail)
        self.written = False
        self.event: int | None = None

    def write(self) -> None:
        if not self.written:
            self.written = True
            self.event = _after(repo.record_activity, *self.args)


def audited(p: Principal, session_id: UUID, row: dict[str, Any], action: str, detail: dict[str, Any],
            host: host_client.HostClient, call: Callable[[host_client.HostClient], T]) -> T:
    """``on_host(row, call)``, a terminal action on the session's host, with its audit event written while the
    host works: once the request is sent, before its answer is read (``HostClient.meanwhile``), so its commit
    -- 0.3 ms on the local stack, a few ms on a Multi-AZ RDS -- overlaps the host's work instead of following it,
    in the request's own thread. Whatever the event says is known before the host answers. A refusal (the
    session busy or gone, the host unreachable) then settles the event as an error, naming it."""
    audit = _Audited(p, session_id, action, detail)
    try:
        result = on_host(row, lambda: call(host.meanwhile(audit.write)))
    except AppError as exc:
        audit.write()  # refused before the request went (no connection): written now
        if audit.event is not None:
            _after(repo.settle_audit, audit.event, "error", {"error": exc.code})
        raise
    audit.write()
    return result


def read_screen(p: Principal, session_id: UUID, escapes: bool = False, history: int = 0) -> ScreenResponse:
    row, host = _active(p, session_id)
    return on_host(row, lambda: host.screen(session_id, escapes=escapes, history=history))


def resize(p: Principal, session_id: UUID, body: ResizeRequest) -> None:
    row, host = _active(p, session_id)
    on_host(row, lambda: host.resize(session_id, body.cols, body.rows))
    _after(repo.resize_session, session_id, p.user_id, body.cols, body.rows)
    cache.invalidate_session(str(session_id))


def exec_command(p: Principal, session_id: UUID, body: ExecRequest) -> ExecResult:
    s = get_settings()
    size = len(body.command.encode())
    if size > s.max_command_bytes:
        raise PayloadTooLarge(f"command is {size} bytes; the limit is {s.max_command_bytes}")
    if body.timeout_s is not None and body.timeout_s > s.exec_timeout_max_s:
        raise InvalidField("body.timeout_s", f"must be at most {s.exec_timeout_max_s:g} (this deployment's "
                                             "TMUXI_EXEC_TIMEOUT_MAX_S)")
    if body.max_output_bytes is not None and body.max_output_bytes > s.exec_max_output_bytes:
        raise InvalidField("body.max_output_bytes", f"must be at most {s.exec_max_output_bytes} (this deployment's "
                                                    "TMUXI_EXEC_MAX_OUTPUT_BYTES)")
    req = body.model_copy(update={"timeout_s": min(body.timeout_s or s.exec_timeout_default_s, s.exec_timeout_max_s)})
    row, host = _active(p, session_id)
    # Audited under the exec's id, which this service gives (the host takes it): the event names it before the
    # host answers.
    exec_id = os.urandom(8).hex()
    detail = {"bytes": size, "exec_id": exec_id, "background": body.background}
    result = audited(p, session_id, row, "session.exec", detail, host,
                     lambda h: h.exec(session_id, req, exec_id=exec_id))
    # A command that ran `exit` (or `exec`, or failed under `set -e`) ended the session. The host reports it
    # too; whichever comes first records it.
    if result.session_ended:
        _after(repo.end_session, session_id, p.user_id, "exited", "its shell exited during an exec")
        cache.invalidate_session(str(session_id))
    return result
