"""Live terminals over WebSocket (docs/websocket.md): connect tickets, what the ws function does for `$connect`,
`attach`, `detach` and `$disconnect`, read-only shares and recordings. The tmux hosts do the rest (output to the
viewers, `$default` messages).

Who may watch what is decided here, from PostgreSQL, on every attach: a user's connection attaches only that
user's own active sessions (another user's session is answered exactly as a missing one is); a share viewer's
attaches only the shared session, read-only, while the share is live (neither revoked nor expired, its creator
enabled). Every attach, allowed or refused, is audited (``ws.attach``).

Tickets and share tokens are 256-bit random strings (``secrets.token_urlsafe(32)``: 43 characters); only their
SHA-256 is stored, and neither is ever logged."""
from __future__ import annotations

import contextlib
import hashlib
import math
import re
import secrets
from typing import Any, TypeVar
from uuid import UUID

from pydantic import BaseModel, ValidationError

from tmuxi import host_client, registry
from tmuxi.db import repo
from tmuxi.errors import (
    AppError,
    BadRequest,
    Forbidden,
    HostUnavailable,
    InvalidField,
    NotAttached,
    NotFound,
    PayloadTooLarge,
    QuotaExceeded,
    RateLimited,
    SessionGone,
    SessionNotActive,
    Unauthorized,
)
from tmuxi.models import (
    AttachRequest,
    DetachRequest,
    Principal,
    Recording,
    RecordingList,
    Share,
    ShareCreate,
    ShareCreated,
    ShareList,
    ShareTicket,
    WsTicket,
)
from tmuxi.observability import AUTH_FAILURES, logger
from tmuxi.routes import WS_CONNECTION_ID, WS_MAX_CONNECTION_S
from tmuxi.services import auth as auth_service
from tmuxi.services import sessions as sessions_service
from tmuxi.settings import get_settings

M = TypeVar("M", bound=BaseModel)

_SECRET = re.compile(r"[A-Za-z0-9_-]{43}")  # what secrets.token_urlsafe(32) makes
# API Gateway's connection ids are 16 characters of base64 (the local gateway makes them alike); the hosts take
# no others (tmux_host/app.py).
_CONNECTION_ID = re.compile(WS_CONNECTION_ID)
_BAD_TICKET = "missing, unknown, expired or already used ticket: get a new one (POST /ws/tickets)"
_NO_SHARE = "no such share: the token is unknown, expired or revoked, or its session has ended"
_UNKNOWN_CONNECTION = "this connection was not admitted; open a new one with a new ticket"
_SHARE_ENDED = "the share was revoked or has expired"
_DISABLED = "the account is disabled"


def _new_secret() -> tuple[str, bytes]:
    """A new ticket or share token, and the digest stored in its place."""
    value = secrets.token_urlsafe(32)
    return value, _digest(value)


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


# --- tickets ------------------------------------------------------------------------------------------------


def mint_ticket(p: Principal) -> WsTicket:
    """A single-use connect ticket for the caller (POST /ws/tickets)."""
    auth_service.admit(p)
    ttl = get_settings().ws_ticket_ttl_s
    ticket, digest = _new_secret()
    repo.create_ws_ticket(digest, ttl, p.user_id)
    return WsTicket(ticket=ticket, expires_in=ttl)


def redeem_share(share_token: str, source_ip: str | None) -> ShareTicket:
    """A read-only connect ticket for the session of a live share (POST /ws/share-tickets, no account). An unknown,
    expired or revoked token -- or one of an ended session -- is 404 and writes nothing. The route has no token to
    rate-limit by: the API limits it per source address, as every unauthenticated route (services/throttle.py)."""
    ticket, digest = _new_secret()
    row = (repo.redeem_share(_digest(share_token), digest, get_settings().ws_ticket_ttl_s, source_ip)
           if _SECRET.fullmatch(share_token) else None)  # anything else cannot be one of ours: PostgreSQL not asked
    if row is None:
        AUTH_FAILURES.labels(reason="share_token").inc()
        logger.info("share token refused", extra={"source_ip": source_ip})
        raise NotFound(_NO_SHARE)
    # the ticket expires with the share if that is sooner; whole seconds, never promising more than there is
    return ShareTicket(ticket=ticket, expires_in=max(1, math.floor(row["expires_in"])), session_id=row["session_id"])


# --- the ws function: $connect, $disconnect -------------------------------------------------------------------


def connect(ticket: str | None, connection_id: str, source_ip: str | None, user_agent: str | None) -> None:
    """Admit a WebSocket handshake: use its ticket up (whatever happens next, it is spent) and record the
    connection. Raises Unauthorized (401: a missing, unknown, used or expired ticket) or Forbidden (403: the
    ticket's user is disabled or deleted, or its share ended meanwhile)."""
    if not _CONNECTION_ID.fullmatch(connection_id):
        raise BadRequest("invalid connection id")
    grant = repo.consume_ws_ticket(_digest(ticket)) if ticket and _SECRET.fullmatch(ticket) else None
    if grant is None:
        AUTH_FAILURES.labels(reason="ws_ticket").inc()
        logger.info("websocket ticket refused", extra={"connection_id": connection_id, "source_ip": source_ip,
                                                       "reason": "missing" if not ticket else "invalid"})
        raise Unauthorized(_BAD_TICKET)
    user_id: UUID | None = grant["user_id"]
    share_id: UUID | None = grant["share_id"]
    detail: dict[str, Any] = {"connection_id": connection_id, "source_ip": source_ip,
                              "user_agent": (user_agent or "")[:200] or None}
    if share_id is not None:
        detail["share_id"] = str(share_id)
    refusal = (_DISABLED if user_id is not None and grant["user_disabled"]
               else _SHARE_ENDED if share_id is not None and not grant["share_live"] else None)
    if refusal is not None:
        AUTH_FAILURES.labels(reason="ws_user_disabled" if user_id is not None else "ws_share_ended").inc()
        repo.audit(user_id, "ws.connect", grant["session_id"], "forbidden", {**detail, "reason": refusal})
        raise Forbidden(refusal)
    repo.add_ws_connection(connection_id, user_id, share_id, grant["session_id"], source_ip, detail)


def disconnect(connection_id: str) -> None:
    """Forget a closed connection and detach its viewer on its host (the client is gone: not told). Never
    raises: a miss is logged, and the host drops a viewer whose connection is gone when it next sends to it;
    a row left behind is pruned (``prune``)."""
    try:
        row = repo.delete_ws_connection(connection_id)
    except AppError as exc:
        logger.warning("closed connection not forgotten; pruning will", extra={
            "connection_id": connection_id, "error": exc.code})
        return
    if row is not None and row["host_id"] is not None:
        _detach_on_host(row["host_id"], connection_id, "disconnected", notify=False)


def _detach_on_host(host_id: str, connection_id: str, reason: str, *, notify: bool) -> bool:
    """Detach a connection's viewer on a host, best effort. True: it is detached (or its host is dead, and the
    viewer with it); False: the host did not answer (logged)."""
    try:
        host_client.HostClient(registry.host_url(host_id)).detach_viewer(connection_id, reason, notify=notify)
    except AppError as exc:
        if isinstance(exc, HostUnavailable) and not registry.host_alive(host_id):
            return True
        logger.warning("viewer not detached on its host", extra={
            "host_id": host_id, "connection_id": connection_id, "reason": reason, "error": exc.code,
            "cause": (exc.internal or exc.message)[:300]})
        return False
    return True


# --- the ws function: attach, detach ----------------------------------------------------------------------------


def ws_error(exc: AppError) -> tuple[str, str]:
    """The ``code`` and ``message`` of the `error` frame that answers a refused message (docs/websocket.md,
    "Errors"); a 5xx's message is its public one (its own is for the log)."""
    if exc.status >= 500:
        return "unavailable", exc.public_message
    if isinstance(exc, SessionNotActive):  # still being created: retry
        return "unavailable", exc.message
    if isinstance(exc, NotAttached):
        return "not_attached", exc.message
    if isinstance(exc, NotFound | SessionGone):
        return "not_found", exc.message
    if isinstance(exc, Forbidden | Unauthorized):
        return "forbidden", exc.message
    if isinstance(exc, RateLimited | QuotaExceeded):
        return "rate_limited", exc.message
    return "invalid", exc.message


def _parse(model: type[M], body: str | None) -> M:
    """A message's body as ``model``; BadRequest naming each offending field otherwise."""
    if body is None:
        raise BadRequest("the message has no body")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
            if e.get("type") == "json_invalid":
                msg = "the message is not valid JSON"
            where = ".".join(str(part) for part in e.get("loc", ()))
            problems.append(f"{where}: {msg}" if where else msg)
        raise BadRequest("; ".join(problems) or "invalid message") from None


def attach(connection_id: str, body: str | None) -> None:
    """Attach a connection to a session (an `attach` message): checked, audited, then the session's host
    attaches the viewer and itself sends the client `attached` and the output. A connection attached elsewhere is
    detached there first. Raises an AppError for the `error` frame (``ws_error``); a refusal changes nothing."""
    conn: dict[str, Any] | None = None
    req: AttachRequest | None = None
    read_only: bool | None = None
    try:
        conn = repo.get_ws_connection(connection_id)  # first: even a malformed attach is audited as its user's
        if conn is None:
            raise Forbidden(_UNKNOWN_CONNECTION)
        req = _parse(AttachRequest, body)
        row, read_only, expires_at = _admit(conn, req)
        _attach_on_host(connection_id, conn, req, row, read_only, expires_at)
    except AppError as exc:
        _audit_attach(connection_id, conn, req, read_only, ws_error(exc)[0], exc.message)
        raise
    _audit_attach(connection_id, conn, req, read_only, "ok", None)


def _admit(conn: dict[str, Any], req: AttachRequest) -> tuple[dict[str, Any], bool, float | None]:
    """May this connection attach this session? The session's row, whether the attach is read-only, and when it
    must end (a share viewer's: when the share expires)."""
    sid = req.session_id
    expires_at: float | None = None
    if conn["share_id"] is not None:
        if sid != conn["scope_session_id"]:
            raise Forbidden("a share connection can attach only the shared session")
        if not conn["share_live"]:
            raise Forbidden(_SHARE_ENDED)
        row = repo.get_session(sid)
        read_only, expires_at = True, conn["share_expires_at"].timestamp()
    else:
        if conn["user_disabled"]:
            raise Forbidden(_DISABLED)
        # another user's session: the same statement and the same answer as a session that does not exist
        row = repo.get_own_session(sid, conn["user_id"])
        read_only = req.read_only
    if row is None:
        raise NotFound("session not found")
    if row["state"] == "creating":
        raise SessionNotActive("the session is still being created; retry in a moment")
    if row["state"] != "active":
        raise sessions_service.gone(row)
    return row, read_only, expires_at


def _attach_on_host(connection_id: str, conn: dict[str, Any], req: AttachRequest, row: dict[str, Any],
                    read_only: bool, expires_at: float | None) -> None:
    sid, share_id = req.session_id, conn["share_id"]
    if conn["host_id"] is not None:  # switching: one session per connection
        _detach_on_host(conn["host_id"], connection_id, "switched", notify=False)
    host_id: str = row["host_id"]
    # Recorded before the host is asked: the host sends `attached` as it attaches, and the client's next message
    # (a resize, say) may reach another host, which finds where to forward it here (registry.connection_target).
    if not repo.set_ws_attachment(connection_id, sid, host_id, read_only):
        raise Forbidden(_UNKNOWN_CONNECTION)  # closed meanwhile
    try:
        host = host_client.HostClient(registry.host_url(host_id))
        sessions_service.on_host(row, lambda: host.attach_viewer(
            sid, connection_id, read_only=read_only, stream=req.stream, last_seq=req.last_seq, share_id=share_id,
            expires_at=expires_at))
    except AppError:
        with contextlib.suppress(AppError):  # the refusal is what the client must hear
            repo.clear_ws_attachment(connection_id, sid)
        raise
    if repo.get_ws_connection(connection_id) is None:  # $disconnect came while the host attached: undo there
        _detach_on_host(host_id, connection_id, "disconnected", notify=False)


def _audit_attach(connection_id: str, conn: dict[str, Any] | None, req: AttachRequest | None,
                  read_only: bool | None, status: str, reason: str | None) -> None:
    detail: dict[str, Any] = {"connection_id": connection_id}
    if conn is not None and conn["share_id"] is not None:
        detail["share_id"] = str(conn["share_id"])
    if read_only is not None:
        detail["read_only"] = read_only
    if reason is not None:
        detail["reason"] = reason[:200]
    try:
        repo.audit(conn["user_id"] if conn is not None else None, "ws.attach",
                   req.session_id if req is not None else None, status, detail)
    except AppError as exc:  # the outcome stands; the miss is logged
        logger.warning("attach not audited", extra={"connection_id": connection_id, "status": status,
                                                    "error": exc.code})


def detach(connection_id: str, body: str | None) -> dict[str, Any] | None:
    """Detach a connection from its session (a `detach` message): its host detaches the viewer and sends the
    client `detached`. If that host is dead, its viewer is gone with it and the `detached` message is returned
    for the ws function to send itself. Raises an AppError for the `error` frame (``ws_error``)."""
    conn = repo.get_ws_connection(connection_id)
    if conn is None:
        raise Forbidden(_UNKNOWN_CONNECTION)
    _parse(DetachRequest, body)
    host_id: str | None = conn["host_id"]
    sid: UUID | None = conn["session_id"]
    if host_id is None or sid is None:
        raise NotAttached("the connection is not attached to a session")
    told = True
    try:
        host_client.HostClient(registry.host_url(host_id)).detach_viewer(connection_id, "detached", notify=True)
    except HostUnavailable:
        if registry.host_alive(host_id):
            raise  # the viewer may still be there: the client retries
        told = False
    repo.clear_ws_attachment(connection_id, sid)
    return None if told else {"type": "detached", "session_id": str(sid), "reason": "detached"}


# --- read-only shares ---------------------------------------------------------------------------------------------


def _own(p: Principal, session_id: UUID) -> dict[str, Any]:
    """The caller's own session: shares are its owner's business (anyone else, admins too, gets 404, as for a
    session that does not exist)."""
    auth_service.admit(p)
    row = repo.get_own_session(session_id, p.user_id)
    if row is None:
        raise NotFound("session not found")
    return row


def create_share(p: Principal, session_id: UUID, body: ShareCreate) -> ShareCreated:
    """A read-only share of an active session of the caller's. The token is in this answer only."""
    most = get_settings().ws_share_max_ttl_s
    if body.expires_in_s > most:
        raise InvalidField("body.expires_in_s", f"must be at most {most} (this deployment's TMUXI_WS_SHARE_MAX_TTL_S)")
    row = _own(p, session_id)
    if row["state"] == "creating":
        raise SessionNotActive("the session is still being created; retry in a moment")
    if row["state"] != "active":
        raise sessions_service.gone(row)
    token, digest = _new_secret()
    share = repo.create_share(session_id, p.user_id, digest, body.expires_in_s)
    return ShareCreated(id=share["id"], token=token, expires_at=share["expires_at"])


def list_shares(p: Principal, session_id: UUID) -> ShareList:
    _own(p, session_id)
    return ShareList(shares=[Share.model_validate(r) for r in repo.list_shares(session_id)])


def revoke_share(p: Principal, session_id: UUID, share_id: UUID) -> None:
    """Revoke a share and detach its viewers at once (they are told: `detached`, reason ``share_revoked``).
    Revoking again is allowed: it detaches any viewer a host did not answer for the first time (503 then)."""
    _own(p, session_id)
    if repo.revoke_share(session_id, share_id, p.user_id) is None:
        raise NotFound("share not found")
    missed = 0
    for c in repo.attached_share_connections(share_id):
        if _detach_on_host(c["host_id"], c["id"], "share_revoked", notify=True):
            repo.clear_ws_attachment(c["id"], c["session_id"])
        else:
            missed += 1
    if missed:
        raise HostUnavailable(f"share {share_id} revoked, but {missed} of its viewers' hosts did not answer")


# --- recordings -----------------------------------------------------------------------------------------------

RECORDING_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}\.cast")
# A Lambda response is at most 6 MB (API Gateway REST: 10 MB): 5 MB of recording leaves room for the encoding.
RECORDING_MAX_BYTES = 5 * 1024 * 1024


def _recordings_prefix(session_id: UUID) -> str:
    return f"recordings/{session_id}/"


def list_recordings(p: Principal, session_id: UUID) -> RecordingList:
    """The recordings of a session (its owner's or any, for an admin), oldest first."""
    sessions_service.get_session(p, session_id)  # the owner or an admin; anyone else: 404
    from tmuxi import storage  # S3 (boto3) or a directory: only these two routes need it

    prefix = _recordings_prefix(session_id)
    found = [Recording(name=o.key[len(prefix):], size=o.size, modified=o.modified)
             for o in storage.get_store().list(prefix)
             if o.key.startswith(prefix) and RECORDING_NAME.fullmatch(o.key[len(prefix):])]
    return RecordingList(recordings=sorted(found, key=lambda r: (r.modified, r.name)))


def get_recording(p: Principal, session_id: UUID, name: str) -> bytes:
    """One recording (asciicast v2) of a session, as stored."""
    if not RECORDING_NAME.fullmatch(name):
        raise BadRequest("a recording's name is 1 to 128 letters, digits, '.', '_' or '-' followed by '.cast'")
    sessions_service.get_session(p, session_id)
    from tmuxi import storage

    try:
        data: bytes = storage.get_store().get(_recordings_prefix(session_id) + name, RECORDING_MAX_BYTES)
    except PayloadTooLarge:
        raise PayloadTooLarge(f"the recording is larger than {RECORDING_MAX_BYTES // (1024 * 1024)} MB, the most "
                              "the API returns") from None
    except NotFound:
        raise NotFound("recording not found") from None
    return data


# --- maintenance ------------------------------------------------------------------------------------------------

TICKET_KEEP_S = 3600.0  # used and expired tickets are kept this long (for an investigation), then deleted


def prune() -> dict[str, int]:
    """Delete old tickets, and connections open longer than API Gateway keeps any (their $disconnect was lost)."""
    tickets, connections = repo.prune_live(TICKET_KEEP_S, WS_MAX_CONNECTION_S + 300)
    return {"tickets": tickets, "connections": connections}
