"""Live terminals, the control side (docs/websocket.md): connect tickets, the ws function's $connect / attach /
detach / $disconnect, read-only shares and recordings, against the real PostgreSQL and Redis. The ws function is
invoked in-process through its REAL handler with API Gateway WebSocket events built from the samples
(``events/ws_*.json``), the REST routes through the REAL API handler (Mangum) with an authorizer context from
the REAL authorizer.

Most tests need no tmux host: their sessions are placed on a host row whose address answers nothing (capacity 0,
so no real session is ever placed there), which is what an unreachable host is. The last test attaches through a
real tmux host (in this process) whose output goes to a recording stand-in for API Gateway's Management API."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from functions.api.handler import handler as api_handler
from functions.ws.handler import handler as ws_handler
from local.lambda_context import LambdaContext
from local.services import free_port
from tests.conftest import Deps
from tests.hosting import wait_for
from tests.integration.test_api_handler import authorize
from tests.integration.test_throttle import changed_settings, new_ip
from tmuxi import auth, registry
from tmuxi.db import repo
from tmuxi.db.pool import close_pool, connection
from tmuxi.events import load_event
from tmuxi.services import users as users_service
from tmuxi.settings import get_settings

Ctx = dict[str, Any]


# --- the parties -------------------------------------------------------------------------------------------------
@dataclass
class U:
    id: uuid.UUID
    name: str
    ctx: Ctx  # requestContext.authorizer, from the real authorizer


def new_user(role: str = "user") -> U:
    name = f"lv{uuid.uuid4().hex[:10]}"
    uid = repo.create_user(name, auth.hash_password("pw-" + name), role)
    token, _ = auth.issue_token(uid, name, role)
    return U(uid, name, authorize(token))


FAKE_HOST = f"live-{uuid.uuid4().hex[:8]}"
FAKE_URL = "http://127.0.0.1:1"  # nothing listens on port 1: connections are refused at once


@pytest.fixture(autouse=True)
def fake_host(deps: Deps) -> Iterator[str]:
    """A registered host that heartbeats (alive) but does not answer; capacity 0: placement never picks it. Aged
    out afterwards, so nothing counts it as live."""
    repo.upsert_host(FAKE_HOST, FAKE_URL, 0, 0, datetime.now(UTC))
    yield FAKE_HOST
    with connection() as conn:
        conn.execute("UPDATE hosts SET last_heartbeat = 'epoch' WHERE id = %s", (FAKE_HOST,))


def new_session(owner: uuid.UUID, state: str = "active", host_id: str = FAKE_HOST) -> uuid.UUID:
    """A session in the record (as a restore writes one: any state), on ``host_id``."""
    sid = uuid.uuid4()
    with connection() as conn:
        conn.execute(
            "INSERT INTO sessions (id, owner_id, state, host_id, tmux_name, pane_id, cols, rows, end_reason)"
            " VALUES (%s, %s, %s, %s, %s, '%%0', 80, 24, %s)",
            (sid, owner, state, host_id, "t" + sid.hex, "its shell exited" if state == "exited" else None))
    return sid


def one(sql: str, *args: Any) -> Any:
    with connection() as conn:
        row = conn.execute(sql, args).fetchone()
    return None if row is None else next(iter(row.values())) if len(row) == 1 else row


# --- the REST API --------------------------------------------------------------------------------------------------
@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    raw: bytes
    body: Any

    def code(self) -> str:
        return str(self.body["error"]["code"])


def rest(method: str, resource: str, ctx: Ctx | None, params: dict[str, str] | None = None, body: Any = None,
         ip: str = "127.0.0.1") -> Reply:
    """Invoke the API handler as API Gateway does for ``method resource`` (``ctx``: the authorizer's context;
    None: a route without one)."""
    event = load_event("create_session", resource=resource, httpMethod=method, pathParameters=params,
                       queryStringParameters=None, multiValueQueryStringParameters=None,
                       body=body, requestContext={"identity": {"sourceIp": ip}, "requestId": str(uuid.uuid4())})
    event["requestContext"]["authorizer"] = ctx
    loop = asyncio.new_event_loop()  # Mangum runs the app on the thread's event loop, as a Lambda runtime has
    asyncio.set_event_loop(loop)
    try:
        out = api_handler(event, LambdaContext("api"))  # type: ignore[arg-type]
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    raw = base64.b64decode(out["body"]) if out.get("isBase64Encoded") else (out.get("body") or "").encode()
    headers = {k.lower(): v for k, v in (out.get("headers") or {}).items()}
    parsed = json.loads(raw) if raw and headers.get("content-type") == "application/json" else None
    return Reply(out["statusCode"], headers, raw, parsed)


def mint(u: U) -> str:
    r = rest("POST", "/ws/tickets", u.ctx)
    assert r.status == 201, r
    ticket: str = r.body["ticket"]
    return ticket


def share(u: U, sid: uuid.UUID, expires_in_s: int = 600) -> dict[str, Any]:
    r = rest("POST", "/sessions/{id}/shares", u.ctx, {"id": str(sid)}, {"expires_in_s": expires_in_s})
    assert r.status == 201, r
    out: dict[str, Any] = r.body
    return out


def redeem(token: str, ip: str = "127.0.0.1") -> Reply:
    return rest("POST", "/ws/share-tickets", None, body={"share_token": token}, ip=ip)


# --- the ws function -----------------------------------------------------------------------------------------------
def new_cid() -> str:
    """A connection id as API Gateway makes them (16 characters of base64: "+" and "/" included)."""
    return base64.b64encode(os.urandom(12)).decode()


def ws(route: str, cid: str, body: Any = None, **over: Any) -> dict[str, Any]:
    sample = {"$connect": "ws_connect", "$disconnect": "ws_disconnect"}.get(route, "ws_attach")
    rc = {"routeKey": route, "connectionId": cid, "requestId": str(uuid.uuid4()), **over.pop("requestContext", {})}
    if body is not None:
        over["body"] = json.dumps(body)
    out: dict[str, Any] = ws_handler(load_event(sample, requestContext=rc, **over), LambdaContext("ws"))
    return out


def connect(ticket: str | None, ip: str = "127.0.0.1") -> tuple[int, str]:
    cid = new_cid()
    out = ws("$connect", cid, queryStringParameters={"ticket": ticket} if ticket is not None else None,
             multiValueQueryStringParameters={"ticket": [ticket]} if ticket is not None else None,
             requestContext={"identity": {"sourceIp": ip, "userAgent": "pytest"}})
    assert "body" not in out or out["statusCode"] != 200, out
    return out["statusCode"], cid


def connected(u: U) -> str:
    status, cid = connect(mint(u))
    assert status == 200
    return cid


def send(cid: str, action: str, **fields: Any) -> dict[str, Any] | None:
    """A control message; the frame the client gets back from the function, if any."""
    out = ws(action, cid, body={"action": action, **fields})
    assert out["statusCode"] == 200, out
    frame: dict[str, Any] | None = json.loads(out["body"]) if out.get("body") else None
    return frame


def attached_to(cid: str) -> Any:
    return one("SELECT session_id FROM ws_connections WHERE id = %s", cid)


def audits(action: str, **where: Any) -> list[dict[str, Any]]:
    rows = repo.audit_events(where.pop("session_id", None), where.pop("actor", None), 1000)
    return [r for r in rows if r["action"] == action
            and all(r["detail"].get(k) == v for k, v in where.items())]


# --- connect tickets -----------------------------------------------------------------------------------------------
def test_a_ticket_is_single_use_and_only_its_hash_is_stored(deps: Deps) -> None:
    u = new_user()
    r = rest("POST", "/ws/tickets", u.ctx)
    assert r.status == 201 and set(r.body) == {"ticket", "expires_in"}, r
    ticket = r.body["ticket"]
    assert len(ticket) == 43 and r.body["expires_in"] == get_settings().ws_ticket_ttl_s
    stored = one("SELECT ticket_hash FROM ws_tickets WHERE user_id = %s", u.id)
    assert bytes(stored) == hashlib.sha256(ticket.encode()).digest()

    status, cid = connect(ticket)
    assert status == 200
    row = one("SELECT user_id, share_id, session_id, read_only, source_ip FROM ws_connections WHERE id = %s", cid)
    assert row == {"user_id": u.id, "share_id": None, "session_id": None, "read_only": False,
                   "source_ip": "127.0.0.1"}
    assert audits("ws.connect", actor=u.id, connection_id=cid)[0]["status"] == "ok"

    again, cid2 = connect(ticket)  # the same ticket, another handshake
    assert again == 401
    assert one("SELECT count(*) FROM ws_connections WHERE id = %s", cid2) == 0


def test_a_missing_malformed_unknown_or_expired_ticket_is_401_and_spends_nothing(deps: Deps) -> None:
    u = new_user()
    ticket = mint(u)
    with connection() as conn:
        conn.execute("UPDATE ws_tickets SET expires_at = now() - interval '1 second' WHERE user_id = %s", (u.id,))
    for t in (None, "", "short", ticket[:-1] + "!", base64.urlsafe_b64encode(os.urandom(32)).decode()[:43], ticket):
        status, cid = connect(t)
        assert status == 401, t
        assert one("SELECT count(*) FROM ws_connections WHERE id = %s", cid) == 0
    assert one("SELECT used_at FROM ws_tickets WHERE user_id = %s", u.id) is None


def test_a_disabled_users_ticket_is_403_and_their_open_connection_attaches_nothing(deps: Deps) -> None:
    u = new_user()
    ticket, open_ = mint(u), connected(u)
    users_service.disable(u.name)
    status, cid = connect(ticket)
    assert status == 403
    assert one("SELECT count(*) FROM ws_connections WHERE id = %s", cid) == 0
    assert audits("ws.connect", actor=u.id, connection_id=cid)[0]["status"] == "forbidden"
    assert send(open_, "attach", session_id=str(new_session(u.id))) == {
        "type": "error", "code": "forbidden", "message": "the account is disabled"}


def test_no_ticket_or_share_token_is_ever_logged(deps: Deps, caplog: pytest.LogCaptureFixture) -> None:
    owner = new_user()
    sid = new_session(owner.id)
    with caplog.at_level("DEBUG"):
        token = share(owner, sid)["token"]
        shared = redeem(token).body["ticket"]
        tickets = [mint(owner), shared]
        for t in tickets:
            assert connect(t)[0] == 200
            assert connect(t)[0] == 401  # refused: logged, without the ticket
        assert redeem(token[::-1]).status == 404
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "websocket ticket refused" in logged and "share token refused" in logged
    for secret in (token, token[::-1], *tickets):
        assert secret not in logged


def test_connect_is_limited_per_source_address(deps: Deps) -> None:
    ip = new_ip()
    with changed_settings(public_rate_limit_per_minute=3):
        assert [connect("x" * 43, ip)[0] for _ in range(4)] == [401, 401, 401, 429]
        assert connect("x" * 43, new_ip())[0] == 401  # another address is not affected


# --- attach ----------------------------------------------------------------------------------------------------
def test_another_users_session_is_not_found_exactly_as_a_missing_one_and_audited(deps: Deps) -> None:
    a, b = new_user(), new_user()
    theirs = new_session(b.id)
    cid = connected(a)
    refused = send(cid, "attach", session_id=str(theirs))
    missing = send(cid, "attach", session_id=str(uuid.uuid4()))
    assert refused == missing == {"type": "error", "code": "not_found", "message": "session not found"}
    assert attached_to(cid) is None
    tried = audits("ws.attach", session_id=theirs)
    assert [(r["actor_id"], r["status"], r["detail"]["connection_id"]) for r in tried] == [(a.id, "not_found", cid)]
    assert one("SELECT state FROM sessions WHERE id = %s", theirs) == "active"


def test_an_unreachable_host_is_unavailable_and_changes_nothing(deps: Deps) -> None:
    u = new_user()
    sid = new_session(u.id)
    cid = connected(u)
    frame = send(cid, "attach", session_id=str(sid))
    assert frame is not None and frame["type"] == "error" and frame["code"] == "unavailable", frame
    assert attached_to(cid) is None and registry.connection_target(cid) is None
    assert one("SELECT state FROM sessions WHERE id = %s", sid) == "active"
    assert audits("ws.attach", session_id=sid)[0]["status"] == "unavailable"


def test_a_dead_hosts_session_is_not_found_saying_why(deps: Deps) -> None:
    u = new_user()
    sid = new_session(u.id)
    cid = connected(u)
    with connection() as conn:  # its heartbeat stopped long ago, and it does not answer: dead
        conn.execute("UPDATE hosts SET last_heartbeat = 'epoch' WHERE id = %s", (FAKE_HOST,))
    frame = send(cid, "attach", session_id=str(sid))
    assert frame is not None and frame["code"] == "not_found" and "lost" in frame["message"], frame
    assert one("SELECT state FROM sessions WHERE id = %s", sid) == "lost"


def test_only_an_active_session_attaches(deps: Deps) -> None:
    u = new_user()
    cid = connected(u)
    exited = send(cid, "attach", session_id=str(new_session(u.id, "exited")))
    assert exited is not None and exited["code"] == "not_found" and "its shell exited" in exited["message"]
    creating = send(cid, "attach", session_id=str(new_session(u.id, "creating")))
    assert creating is not None and creating["code"] == "unavailable" and "being created" in creating["message"]


@pytest.mark.parametrize(("fields", "named"), [
    ({}, "session_id"),
    ({"session_id": "nope"}, "session_id"),
    ({"session_id": 42}, "session_id"),
    ({"read_only": "yes"}, "read_only"),
    ({"stream": "ab", "last_seq": -1}, "last_seq"),
    ({"stream": "ab", "last_seq": 1.5}, "last_seq"),
    ({"stream": "a" * 33, "last_seq": 0}, "stream"),
    ({"stream": "ab"}, "last_seq"),
    ({"readonly": True}, "readonly"),
])
def test_a_malformed_attach_is_invalid_naming_the_field(deps: Deps, fields: dict[str, Any], named: str) -> None:
    u = new_user()
    cid = connected(u)
    body = fields if named == "session_id" else {"session_id": str(new_session(u.id)), **fields}
    frame = send(cid, "attach", **body)
    assert frame is not None and frame["type"] == "error" and frame["code"] == "invalid", frame
    assert named in frame["message"], frame
    assert attached_to(cid) is None
    assert [r["status"] for r in audits("ws.attach", actor=u.id, connection_id=cid)] == ["invalid"]


def test_detach_needs_an_attached_admitted_connection(deps: Deps) -> None:
    u = new_user()
    cid = connected(u)
    assert send(cid, "detach") == {"type": "error", "code": "not_attached",
                                   "message": "the connection is not attached to a session"}
    sid = new_session(u.id)
    assert repo.set_ws_attachment(cid, sid, FAKE_HOST, False)  # as an attach records it
    # its host is alive but does not answer: the viewer may still be there, so nothing changes; retry
    frame = send(cid, "detach")
    assert frame is not None and frame["code"] == "unavailable" and attached_to(cid) == sid, frame
    with connection() as conn:  # now it is dead, and its viewers with it: the function says `detached` itself
        conn.execute("UPDATE hosts SET last_heartbeat = 'epoch' WHERE id = %s", (FAKE_HOST,))
    assert send(cid, "detach") == {"type": "detached", "session_id": str(sid), "reason": "detached"}
    assert attached_to(cid) is None
    extra = send(cid, "detach", session_id=str(uuid.uuid4()))
    assert extra is not None and extra["code"] == "invalid" and "session_id" in extra["message"]
    stranger = new_cid()  # never admitted by $connect
    for action, fields in (("detach", {}), ("attach", {"session_id": str(new_session(u.id))})):
        frame = send(stranger, action, **fields)
        assert frame is not None and frame["code"] == "forbidden", frame


def test_disconnect_forgets_the_connection_even_when_its_host_does_not_answer(deps: Deps) -> None:
    u = new_user()
    sid = new_session(u.id)
    cid = connected(u)
    assert repo.set_ws_attachment(cid, sid, FAKE_HOST, False)  # as an attach records it
    assert registry.connection_target(cid) == (FAKE_HOST, FAKE_URL)
    assert ws("$disconnect", cid) == {"statusCode": 200}
    assert one("SELECT count(*) FROM ws_connections WHERE id = %s", cid) == 0
    assert registry.connection_target(cid) is None
    assert ws("$disconnect", cid) == {"statusCode": 200}  # again: nothing to forget, no error


def test_an_unknown_route_is_answered_unknown_action(deps: Deps) -> None:
    frame = send(new_cid(), "input", data="x")
    assert frame is not None and frame["code"] == "unknown_action", frame


# --- read-only shares ------------------------------------------------------------------------------------------
def test_a_share_viewer_attaches_only_its_session_read_only(deps: Deps) -> None:
    owner = new_user()
    shared, other = new_session(owner.id), new_session(owner.id)
    created = share(owner, shared)
    assert set(created) == {"id", "token", "expires_at"} and len(created["token"]) == 43
    assert bytes(one("SELECT token_hash FROM ws_shares WHERE id = %s", uuid.UUID(created["id"]))) == \
        hashlib.sha256(created["token"].encode()).digest()
    r = redeem(created["token"])
    assert r.status == 201 and r.body["session_id"] == str(shared) and r.body["read_only"] is True, r
    assert 0 < r.body["expires_in"] <= get_settings().ws_ticket_ttl_s
    status, cid = connect(r.body["ticket"])
    assert status == 200
    row = one("SELECT user_id, share_id, scope_session_id, read_only FROM ws_connections WHERE id = %s", cid)
    assert row == {"user_id": None, "share_id": uuid.UUID(created["id"]), "scope_session_id": shared,
                   "read_only": True}

    frame = send(cid, "attach", session_id=str(other))
    assert frame == {"type": "error", "code": "forbidden",
                     "message": "a share connection can attach only the shared session"}
    [audit] = audits("ws.attach", session_id=other)
    assert audit["actor_id"] is None and audit["status"] == "forbidden" and audit["detail"]["share_id"] == created["id"]
    # its own session passes the checks and reaches the session's host (here: one that does not answer)
    frame = send(cid, "attach", session_id=str(shared), read_only=False)
    assert frame is not None and frame["code"] == "unavailable", frame
    [audit] = audits("ws.attach", session_id=shared)
    assert audit["status"] == "unavailable" and audit["detail"]["read_only"] is True


def test_a_revoked_or_expired_share_refuses_redeem_connect_and_attach(deps: Deps) -> None:
    owner = new_user()
    sid = new_session(owner.id)
    s = share(owner, sid)
    first, second = redeem(s["token"]), redeem(s["token"])
    status, cid = connect(first.body["ticket"])
    assert status == 200
    r = rest("DELETE", "/sessions/{id}/shares/{share_id}", owner.ctx, {"id": str(sid), "share_id": s["id"]})
    assert r.status == 204, r
    assert send(cid, "attach", session_id=str(sid)) == {
        "type": "error", "code": "forbidden", "message": "the share was revoked or has expired"}
    assert connect(second.body["ticket"])[0] == 403  # minted before the revocation, used after it
    gone = redeem(s["token"])
    assert gone.status == 404 and gone.code() == "not_found" and "revoked" in gone.body["error"]["message"]
    again = rest("DELETE", "/sessions/{id}/shares/{share_id}", owner.ctx, {"id": str(sid), "share_id": s["id"]})
    assert again.status == 204  # revoking again changes nothing

    later = share(owner, sid)
    status, cid = connect(redeem(later["token"]).body["ticket"])
    assert status == 200
    with connection() as conn:
        conn.execute("UPDATE ws_shares SET expires_at = created_at + interval '1 millisecond' WHERE id = %s",
                     (uuid.UUID(later["id"]),))
    frame = send(cid, "attach", session_id=str(sid))
    assert frame is not None and frame["code"] == "forbidden", frame
    assert redeem(later["token"]).status == 404

    listed = rest("GET", "/sessions/{id}/shares", owner.ctx, {"id": str(sid)})
    assert listed.status == 200, listed
    assert [x["id"] for x in listed.body["shares"]] == [later["id"], s["id"]]  # newest first
    assert all("token" not in x for x in listed.body["shares"])
    assert listed.body["shares"][1]["revoked_at"] is not None and listed.body["shares"][0]["revoked_at"] is None


def test_revoking_a_share_detaches_its_viewers_or_says_to_retry(deps: Deps) -> None:
    owner = new_user()
    sid = new_session(owner.id)
    s = share(owner, sid)
    status, viewer = connect(redeem(s["token"]).body["ticket"])
    assert status == 200
    assert repo.set_ws_attachment(viewer, sid, FAKE_HOST, True)  # as an attach records it
    path = {"id": str(sid), "share_id": s["id"]}
    # the viewer's host is alive but does not answer: revoked, yet the viewer may still watch: 503, retry
    r = rest("DELETE", "/sessions/{id}/shares/{share_id}", owner.ctx, path)
    assert r.status == 503 and r.headers["retry-after"] == "1", r
    assert one("SELECT revoked_at FROM ws_shares WHERE id = %s", uuid.UUID(s["id"])) is not None
    assert attached_to(viewer) == sid
    with connection() as conn:  # the host died: its viewers are gone with it
        conn.execute("UPDATE hosts SET last_heartbeat = 'epoch' WHERE id = %s", (FAKE_HOST,))
    assert rest("DELETE", "/sessions/{id}/shares/{share_id}", owner.ctx, path).status == 204
    assert attached_to(viewer) is None


def test_a_disabled_creators_share_stops_working(deps: Deps) -> None:
    owner = new_user()
    sid = new_session(owner.id)
    s = share(owner, sid)
    status, cid = connect(redeem(s["token"]).body["ticket"])
    assert status == 200
    users_service.disable(owner.name)
    frame = send(cid, "attach", session_id=str(sid))
    assert frame is not None and frame["code"] == "forbidden", frame
    assert redeem(s["token"]).status == 404


def test_share_routes_refuse_bad_input_and_other_users_and_change_nothing(deps: Deps) -> None:
    owner, other = new_user(), new_user()
    sid = new_session(owner.id)
    most = get_settings().ws_share_max_ttl_s
    p = {"id": str(sid)}
    for body, field in (({"expires_in_s": 59}, "expires_in_s"), ({"expires_in_s": most + 1}, "expires_in_s"),
                        ({"expires_in_s": "soon"}, "expires_in_s"), ({"ttl": 60}, "ttl")):
        r = rest("POST", "/sessions/{id}/shares", owner.ctx, p, body)
        assert r.status == 422 and field in r.body["error"]["message"], (body, r)
    too_long = rest("POST", "/sessions/{id}/shares", owner.ctx, p, {"expires_in_s": most + 1})
    assert "TMUXI_WS_SHARE_MAX_TTL_S" in too_long.body["error"]["message"]
    for who, session in ((other, sid), (owner, uuid.uuid4())):  # someone else's, or no such session: the same 404
        for method, resource, params in (("POST", "/sessions/{id}/shares", {"id": str(session)}),
                                         ("GET", "/sessions/{id}/shares", {"id": str(session)})):
            r = rest(method, resource, who.ctx, params, {"expires_in_s": 60} if method == "POST" else None)
            assert r.status == 404 and r.body["error"]["message"] == "session not found", r
    ended = rest("POST", "/sessions/{id}/shares", owner.ctx, {"id": str(new_session(owner.id, "exited"))})
    assert ended.status == 410, ended
    assert one("SELECT count(*) FROM ws_shares WHERE session_id = %s", sid) == 0

    s = share(owner, sid)
    for who, share_id in ((owner, str(uuid.uuid4())), (other, s["id"])):
        r = rest("DELETE", "/sessions/{id}/shares/{share_id}", who.ctx, {"id": str(sid), "share_id": share_id})
        assert r.status == 404, r
    assert one("SELECT revoked_at FROM ws_shares WHERE id = %s", uuid.UUID(s["id"])) is None
    default = rest("POST", "/sessions/{id}/shares", owner.ctx, p)  # no body: an hour
    assert default.status == 201, default
    left = datetime.fromisoformat(default.body["expires_at"]) - datetime.now(UTC)
    assert 3590 < left.total_seconds() <= 3600


def test_a_bad_share_token_is_404_and_mints_nothing(deps: Deps) -> None:
    before = one("SELECT count(*) FROM ws_tickets")
    for token in ("nope", base64.urlsafe_b64encode(os.urandom(32)).decode()[:43], "x" * 256):
        r = redeem(token)
        assert r.status == 404 and r.code() == "not_found" and "unknown" in r.body["error"]["message"], r
    for body in ({"share_token": ""}, {}, {"share_token": "x" * 257}, {"share_token": 5}):
        r = rest("POST", "/ws/share-tickets", None, body=body)
        assert r.status == 422, r
    assert one("SELECT count(*) FROM ws_tickets") == before


def test_share_redeem_is_limited_per_source_address(deps: Deps) -> None:
    ip = new_ip()
    with changed_settings(public_rate_limit_per_minute=3):
        statuses = [redeem("x" * 43, ip).status for _ in range(4)]
        assert statuses == [404, 404, 404, 429]
        limited = redeem("x" * 43, ip)
        assert limited.code() == "rate_limited" and int(limited.headers["retry-after"]) >= 1


# --- recordings --------------------------------------------------------------------------------------------------
def test_recordings_are_the_owners_and_admins_only(deps: Deps) -> None:
    from tmuxi.services.live import RECORDING_MAX_BYTES
    from tmuxi.storage import get_store

    owner, other, admin = new_user(), new_user(), new_user("admin")
    sid = new_session(owner.id, "exited")
    cast = b'{"version": 2, "width": 80, "height": 24}\n[0.1, "o", "hello\\r\\n"]\n'
    store = get_store()
    store.put_bytes(f"recordings/{sid}/host-1-1.cast", cast)
    store.put_bytes(f"recordings/{sid}/notes.txt", b"not a recording")
    store.put_bytes(f"recordings/{sid}/big.cast", b"x" * (RECORDING_MAX_BYTES + 1))
    p = {"id": str(sid)}

    listed = rest("GET", "/sessions/{id}/recordings", owner.ctx, p)
    assert listed.status == 200, listed
    assert sorted((x["name"], x["size"]) for x in listed.body["recordings"]) == [
        ("big.cast", RECORDING_MAX_BYTES + 1), ("host-1-1.cast", len(cast))]
    got = rest("GET", "/sessions/{id}/recordings/{name}", owner.ctx, {**p, "name": "host-1-1.cast"})
    assert got.status == 200 and got.raw == cast and got.headers["content-type"] == "application/x-asciicast"
    assert rest("GET", "/sessions/{id}/recordings/{name}", admin.ctx, {**p, "name": "host-1-1.cast"}).raw == cast

    for r in (rest("GET", "/sessions/{id}/recordings", other.ctx, p),
              rest("GET", "/sessions/{id}/recordings/{name}", other.ctx, {**p, "name": "host-1-1.cast"})):
        assert r.status == 404 and r.body["error"]["message"] == "session not found", r
    for name in ("notes.txt", ".cast", "x" * 129 + ".cast", "..cast\n"):
        r = rest("GET", "/sessions/{id}/recordings/{name}", owner.ctx, {**p, "name": name})
        assert r.status == 400 and ".cast" in r.body["error"]["message"], (name, r)
    # a "/" in the name (sent as %2F) is not one path segment: the route does not match, nothing is read
    nested = rest("GET", "/sessions/{id}/recordings/{name}", owner.ctx, {**p, "name": "../x.cast"})
    assert nested.status == 404 and nested.body["error"]["message"] == "no such route", nested
    missing = rest("GET", "/sessions/{id}/recordings/{name}", owner.ctx, {**p, "name": "nope.cast"})
    assert missing.status == 404 and missing.body["error"]["message"] == "recording not found"
    big = rest("GET", "/sessions/{id}/recordings/{name}", owner.ctx, {**p, "name": "big.cast"})
    assert big.status == 413 and "5 MB" in big.body["error"]["message"], big


# --- housekeeping ------------------------------------------------------------------------------------------------
def test_prune_deletes_old_tickets_and_connections_only(deps: Deps) -> None:
    from tmuxi.services import live

    u = new_user()
    old, fresh = mint(u), mint(u)
    stale, open_ = connected(u), connected(u)
    with connection() as conn:
        conn.execute("UPDATE ws_tickets SET expires_at = now() - interval '2 hours' WHERE ticket_hash = %s",
                     (hashlib.sha256(old.encode()).digest(),))
        conn.execute("UPDATE ws_connections SET connected_at = now() - interval '3 hours' WHERE id = %s", (stale,))
    counts = live.prune()
    assert counts["tickets"] >= 1 and counts["connections"] >= 1
    assert one("SELECT count(*) FROM ws_tickets WHERE ticket_hash = %s", hashlib.sha256(old.encode()).digest()) == 0
    assert one("SELECT count(*) FROM ws_tickets WHERE ticket_hash = %s",
               hashlib.sha256(fresh.encode()).digest()) == 1
    assert one("SELECT count(*) FROM ws_connections WHERE id = %s", stale) == 0
    assert one("SELECT count(*) FROM ws_connections WHERE id = %s", open_) == 1


# --- through a real tmux host ------------------------------------------------------------------------------------
@dataclass
class LiveHost:
    host_id: str
    url: str
    app: Any

    def viewers(self) -> set[str]:
        return set(self.app.state.engine.live.viewers)


@pytest.fixture(scope="module")
def management() -> Any:
    from tests.integration.test_host_stream import FakeManagementApi

    return FakeManagementApi()


@pytest.fixture(scope="module")
def live_host(deps: Deps, management: Any) -> Iterator[LiveHost]:
    """A tmux host in this process, registered in PostgreSQL (it heartbeats and forwards through the real
    registry), posting to the Management API stand-in. Its capacity draws the sessions this module creates."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux not installed")
    from tmux_host.app import create_app
    from tmux_host.control import kill_tmux_servers
    from tmuxi.host_client import close_all
    from tmuxi.settings import Settings

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test-key")  # boto3 signs; the stand-in does not check
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test-secret")
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="tl"))
    d.chmod(0o711)
    host_id = f"lh-{uuid.uuid4().hex[:6]}"
    settings = Settings(socket_dir=d / "s", data_dir=d / "data", host_port=free_port(), host_id=host_id,
                        host_capacity=1_000_000, ws_management_endpoint=management.url)
    # the host's threads (heartbeats, connection lookups) share this process's pool with the API's requests
    stack = contextlib.ExitStack()
    stack.enter_context(changed_settings(db_pool_max=10))
    stack.callback(close_pool)
    close_pool()
    app = create_app(settings, registry=registry)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.host_port, log_level="warning",
                                           access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True, name="tmux-host")
    thread.start()
    try:
        wait_for(lambda: server.started and repo.get_host(host_id), timeout=15, what="host start")
        yield LiveHost(host_id, settings.advertised_host_url, app)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        close_all()
        kill_tmux_servers(d)
        with connection() as conn:
            conn.execute("UPDATE hosts SET last_heartbeat = 'epoch' WHERE id = %s", (host_id,))
        stack.close()
        shutil.rmtree(d, ignore_errors=True)


def test_attach_switch_share_revoke_detach_and_disconnect_through_a_real_host(live_host: LiveHost,
                                                                                 management: Any) -> None:
    owner = new_user()
    created = rest("POST", "/sessions", owner.ctx, body={"name": "live", "cols": 90, "rows": 30})
    assert created.status == 201 and created.body["host_id"] == live_host.host_id, created
    sid = created.body["id"]

    def got(cid: str, kind: str) -> list[dict[str, Any]]:
        return management.messages(cid, kind)  # type: ignore[no-any-return]

    cid = connected(owner)
    assert send(cid, "attach", session_id=sid) is None  # the host answers the client itself
    [att] = wait_for(lambda: got(cid, "attached"), what="attached")
    assert att["session_id"] == sid and att["read_only"] is False and (att["cols"], att["rows"]) == (90, 30)
    assert registry.connection_target(cid) == (live_host.host_id, live_host.url)
    assert cid in live_host.viewers()

    # attach again, read-only: it switches (one viewer per connection)
    assert send(cid, "attach", session_id=sid, read_only=True) is None
    wait_for(lambda: len(got(cid, "attached")) == 2, what="second attached")
    assert got(cid, "attached")[1]["read_only"] is True and live_host.viewers() >= {cid}

    # a share viewer: read-only whatever it asks, until the share is revoked
    s = share(owner, uuid.UUID(sid))
    status, viewer = connect(redeem(s["token"]).body["ticket"])
    assert status == 200
    assert send(viewer, "attach", session_id=sid, read_only=False) is None
    [vatt] = wait_for(lambda: got(viewer, "attached"), what="viewer attached")
    assert vatt["read_only"] is True and one("SELECT read_only FROM ws_connections WHERE id = %s", viewer) is True
    r = rest("DELETE", "/sessions/{id}/shares/{share_id}", owner.ctx, {"id": sid, "share_id": s["id"]})
    assert r.status == 204, r
    [gone] = wait_for(lambda: got(viewer, "detached"), what="viewer detached")
    assert gone["reason"] == "share_revoked" and attached_to(viewer) is None
    wait_for(lambda: viewer not in live_host.viewers(), what="the viewer gone from its host")

    # detach: the host says so; then nothing is attached
    assert send(cid, "detach") is None
    [det] = wait_for(lambda: got(cid, "detached"), what="detached")
    assert det["reason"] == "detached" and registry.connection_target(cid) is None
    wait_for(lambda: cid not in live_host.viewers(), what="the viewer gone from its host")

    # attached again, then the client goes away: the host drops the viewer, untold
    assert send(cid, "attach", session_id=sid) is None
    wait_for(lambda: cid in live_host.viewers(), what="re-attached")
    assert ws("$disconnect", cid) == {"statusCode": 200}
    wait_for(lambda: cid not in live_host.viewers(), what="viewer dropped")
    assert len(got(cid, "detached")) == 1
    with contextlib.suppress(Exception):
        rest("DELETE", "/sessions/{id}", owner.ctx, {"id": sid})
