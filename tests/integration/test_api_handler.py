"""The REST API Lambda, invoked in-process through its REAL Mangum handler with the sample API Gateway REST
events (``events/rest``), against the real stack (PostgreSQL, Redis, two tmux hosts). The authorizer context
of each event comes from the REAL authorizer Lambda (``functions.authorizer.handler``) fed a real token, which
is how API Gateway builds it. Nothing of the project is faked."""
from __future__ import annotations

import asyncio
import base64
import json
import shutil
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from functions.api import app as api_app
from functions.api.handler import handler
from functions.authorizer.handler import handler as authorizer_handler
from local.lambda_context import LambdaContext
from tests.hosting import wait_for
from tmuxi.events import authorizer_context, load_event
from tmuxi.settings import get_settings

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")

Ctx = dict[str, Any]


class Result:
    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.status: int = raw["statusCode"]
        self.headers: dict[str, str] = {k.lower(): v for k, v in (raw.get("headers") or {}).items()}
        self.text: str = raw.get("body") or ""
        self.body: Any = json.loads(self.text) if self.text else None

    def __repr__(self) -> str:
        return f"<{self.status} {self.text[:500]}>"


def token_of(headers: dict[str, str]) -> str:
    return headers["authorization"].split(" ", 1)[1]


def authorize(token: str) -> Ctx:
    """``requestContext.authorizer`` as API Gateway builds it from the real authorizer's Allow answer."""
    auth = "Bearer " + token
    out = authorizer_handler(
        load_event("authorizer_request", headers={"authorization": auth},
                   multiValueHeaders={"authorization": [auth]}),
        LambdaContext("authorizer"),
    )
    ctx: Ctx = authorizer_context(out["principalId"], **out["context"])
    return ctx


def invoke(name: str, ctx: Ctx | None, token: str | None = None, **over: Any) -> Result:
    """Invoke the API handler with sample event ``name``; ``ctx`` replaces its authorizer context (None: the
    request did not pass an authorizer). ``token`` (if given) goes into the Authorization header, as it
    would arrive from API Gateway."""
    if token is not None:
        over.setdefault("headers", {})["authorization"] = f"Bearer {token}"
        over.setdefault("multiValueHeaders", {})["authorization"] = [f"Bearer {token}"]
    event = load_event(name, **over)
    event["requestContext"]["authorizer"] = ctx
    # Mangum runs the app on the thread's current event loop, which a Lambda runtime (or a gateway worker
    # thread) has; pytest-asyncio leaves the main thread without one after an async test, so give it one.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return Result(handler(event, LambdaContext("api")))  # type: ignore[arg-type]
    finally:
        asyncio.set_event_loop(None)
        loop.close()


@pytest.fixture(scope="module")
def user(stack: Any) -> tuple[str, str, Ctx]:
    """(username, token, authorizer context) of a fresh user."""
    name, headers = stack.new_user()
    token = token_of(headers)
    return name, token, authorize(token)


@pytest.fixture(scope="module")
def session(user: tuple[str, str, Ctx]) -> str:
    _, token, ctx = user
    r = invoke("create_session", ctx, token, body={"name": "handler", "cols": 120, "rows": 40})
    assert r.status == 201, r
    sid: str = r.body["id"]
    return sid


def _sid(sid: str) -> dict[str, Any]:
    return {"pathParameters": {"id": sid}}


# --- routes: status and response shape --------------------------------------------------------------------


def test_create_get_list_delete(user: tuple[str, str, Ctx]) -> None:
    name, token, ctx = user
    created = invoke("create_session", ctx, token)  # the sample body: {"name": "build", 120x40}
    assert created.status == 201, created
    assert created.headers["content-type"] == "application/json"
    s = created.body
    assert s["name"] == "build" and s["state"] == "active" and (s["cols"], s["rows"]) == (120, 40)
    assert s["owner_id"] == ctx["user_id"] and s["host_id"] in ("host-1", "host-2")
    assert set(s) == {"id", "name", "owner_id", "state", "host_id", "cols", "rows", "created_at",
                      "last_active_at", "ended_at", "end_reason"}
    sid = s["id"]

    got = invoke("get_session", ctx, token, **_sid(sid))
    assert got.status == 200, got
    assert got.body["id"] == sid and got.body["owner_id"] == ctx["user_id"]  # identity from the authorizer

    listed = invoke("list_sessions", ctx, token, queryStringParameters=None, multiValueQueryStringParameters=None)
    assert listed.status == 200, listed
    assert set(listed.body) == {"sessions", "next_cursor"} and sid in {x["id"] for x in listed.body["sessions"]}
    assert listed.body["next_cursor"] is None

    deleted = invoke("delete_session", ctx, token, **_sid(sid))
    assert deleted.status == 204 and deleted.text == "", deleted

    assert invoke("get_session", ctx, token, **_sid(sid)).body["state"] == "deleted"
    active = invoke("list_sessions", ctx, token, queryStringParameters=None, multiValueQueryStringParameters=None)
    assert sid not in {x["id"] for x in active.body["sessions"]}
    # the sample event asks include_ended=true: the query string is parsed
    ended = invoke("list_sessions", ctx, token)
    assert sid in {x["id"] for x in ended.body["sessions"]}
    again = invoke("delete_session", ctx, token, **_sid(sid))  # already ended: gone, saying how
    assert again.status == 410 and again.body["error"]["details"]["state"] == "deleted", again


def test_other_users_session_is_404(stack: Any, session: str) -> None:
    _, headers = stack.new_user()
    other = token_of(headers)
    r = invoke("get_session", authorize(other), other, **_sid(session))
    assert r.status == 404 and r.body["error"]["code"] == "not_found"


def test_input_then_screen(user: tuple[str, str, Ctx], session: str) -> None:
    _, token, ctx = user
    r = invoke("input", ctx, token, body={"text": "echo handler-$((6*7))", "enter": True}, **_sid(session))
    assert r.status == 204 and r.text == "", r

    def screen() -> Result | None:
        got = invoke("screen", ctx, token, **_sid(session))  # sample query: escapes=false, history=100
        assert got.status == 200, got
        return got if "handler-42" in got.body["text"] else None

    shot = wait_for(screen)
    assert set(shot.body) == {"text", "cols", "rows", "cursor_x", "cursor_y", "escapes"}
    assert shot.body["escapes"] is False and (shot.body["cols"], shot.body["rows"]) == (120, 40)


def test_resize(user: tuple[str, str, Ctx], session: str) -> None:
    _, token, ctx = user
    r = invoke("resize", ctx, token, **_sid(session))  # the sample body: 100x30
    assert r.status == 204 and r.text == "", r
    got = invoke("get_session", ctx, token, **_sid(session)).body
    assert (got["cols"], got["rows"]) == (100, 30)
    shot = invoke("screen", ctx, token, **_sid(session)).body
    assert (shot["cols"], shot["rows"]) == (100, 30)
    assert invoke("resize", ctx, token, body={"cols": 120, "rows": 40}, **_sid(session)).status == 204


def test_exec_returns_output_and_exit_code(user: tuple[str, str, Ctx], session: str) -> None:
    _, token, ctx = user
    r = invoke("exec", ctx, token, **_sid(session))  # the sample body: echo hello
    assert r.status == 200, r
    assert set(r.body) == {"exec_id", "running", "exit_code", "timed_out", "stdout", "stderr", "output", "encoding",
                           "lossy", "stdout_bytes", "stderr_bytes", "truncated", "cursor", "duration_ms",
                           "session_ended"}
    assert r.body["exit_code"] == 0 and "hello" in r.body["stdout"] and r.body["timed_out"] is False
    assert r.body["output"] is None and r.body["running"] is False  # split streams (the default); ended
    assert r.body["session_ended"] is False
    failed = invoke("exec", ctx, token, body={"command": "(exit 3)", "timeout_s": 10}, **_sid(session))
    assert failed.status == 200, failed
    assert failed.body["exit_code"] == 3


def test_validate(user: tuple[str, str, Ctx]) -> None:
    name, token, ctx = user
    r = invoke("validate", ctx, token)
    assert r.status == 200, r
    assert r.body["valid"] is True and r.body["username"] == name and r.body["user_id"] == ctx["user_id"]
    assert r.body["role"] == "user" and r.body["expires_at"]


def test_login(stack: Any) -> None:
    name, _ = stack.new_user()
    r = invoke("token", None, body={"username": name, "password": "pw-" + name})
    assert r.status == 200, r
    assert r.body["token_type"] == "bearer" and r.body["expires_in"] > 0
    assert invoke("validate", authorize(r.body["access_token"]), r.body["access_token"]).status == 200
    bad = invoke("token", None, body={"username": name, "password": "wrong"})
    assert bad.status == 401 and bad.body["error"]["code"] == "unauthorized"


def test_revoke_then_the_token_is_refused(stack: Any) -> None:
    _, headers = stack.new_user()
    token = token_of(headers)
    ctx = authorize(token)
    r = invoke("revoke", ctx, token)
    assert r.status == 204 and r.text == "", r
    # the authorizer refuses it now ...
    with pytest.raises(Exception, match="^Unauthorized$"):
        authorize(token)
    # ... and so does the API for a context the gateway may have cached from before the revocation
    again = invoke("validate", ctx, token)
    assert again.status == 401 and again.body["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("name", ["health", "auth_health"])
def test_health(stack: Any, name: str) -> None:
    over = {"path": "/auth/health", "resource": "/auth/health"} if name == "auth_health" else {}
    r = invoke("health", None, **over)
    assert r.status == 200, r
    assert r.body["status"] == "ok" and r.body["version"] and isinstance(r.body["checks"], dict)
    assert r.body["checks"].get("hosts") == "2 live"


# --- identity ---------------------------------------------------------------------------------------------


def test_no_authorizer_context_is_401(user: tuple[str, str, Ctx], session: str) -> None:
    _, token, _ = user
    ctxs: list[Ctx | None] = [None, {}]
    for ctx in ctxs:
        r = invoke("get_session", ctx, token, **_sid(session))  # a valid token, but no authorizer ran
        assert r.status == 401 and r.body["error"]["code"] == "unauthorized", r


@pytest.mark.parametrize(
    "ctx",
    [{"principalId": "x"},
     {"user_id": "not-a-uuid", "username": "a", "role": "user", "jti": "j", "exp": "4102444800"},
     {"user_id": str(uuid.uuid4()), "username": "a", "role": "root", "jti": "j", "exp": "4102444800"},
     {"user_id": str(uuid.uuid4()), "username": "a", "role": "user", "jti": "j", "exp": "soon"},
     {"user_id": str(uuid.uuid4()), "username": "a", "role": "user", "exp": "4102444800"}],
)
def test_malformed_authorizer_context_is_401(stack: Any, ctx: Ctx) -> None:
    r = invoke("validate", ctx)
    assert r.status == 401 and r.body["error"]["code"] == "unauthorized", r


def test_expired_context_is_401(user: tuple[str, str, Ctx]) -> None:
    _, token, ctx = user
    r = invoke("validate", {**ctx, "exp": str(int(time.time()) - 60)}, token)
    assert r.status == 401 and r.body["error"]["code"] == "unauthorized", r


# --- validation: 422 naming the field ---------------------------------------------------------------------


def test_history_out_of_range_is_422_naming_the_field(user: tuple[str, str, Ctx], session: str) -> None:
    _, token, ctx = user
    r = invoke("screen", ctx, token, queryStringParameters={"history": "10001"},
               multiValueQueryStringParameters={"history": ["10001"]}, **_sid(session))
    assert r.status == 422, r
    assert r.body["error"]["code"] == "validation_error" and "query.history" in r.body["error"]["message"]


def test_invalid_field_is_422_naming_the_field(user: tuple[str, str, Ctx], session: str) -> None:
    _, token, ctx = user
    r = invoke("resize", ctx, token, body={"cols": 5, "rows": 30}, **_sid(session))
    assert r.status == 422, r
    assert "body.cols" in r.body["error"]["message"]
    assert r.body["error"]["fields"][0]["field"] == "body.cols"
    assert invoke("get_session", ctx, token, **_sid(session)).body["cols"] != 5  # nothing happened


def test_unknown_field_is_422(user: tuple[str, str, Ctx]) -> None:
    _, token, ctx = user
    r = invoke("create_session", ctx, token, body={"name": "x", "bogus": 1})
    assert r.status == 422 and "body.bogus" in r.body["error"]["message"], r


def test_invalid_json_is_422(user: tuple[str, str, Ctx]) -> None:
    _, token, ctx = user
    r = invoke("create_session", ctx, token, body='{"name": ')
    assert r.status == 422, r
    assert r.body["error"]["code"] == "validation_error" and "not valid JSON" in r.body["error"]["message"]


def test_bad_uuid_is_422_naming_path_id(user: tuple[str, str, Ctx]) -> None:
    _, token, ctx = user
    r = invoke("get_session", ctx, token, pathParameters={"id": "not-a-uuid"})
    assert r.status == 422 and "path.id" in r.body["error"]["message"], r


# --- lists: pages with a cursor, filters by state ---------------------------------------------------------


def _list(ctx: Ctx, token: str, **query: Any) -> Result:
    q = {k: str(v) for k, v in query.items()}
    return invoke("list_sessions", ctx, token, queryStringParameters=q or None,
                  multiValueQueryStringParameters={k: [v] for k, v in q.items()} or None)


def _walk(ctx: Ctx, token: str, **query: Any) -> list[list[dict[str, Any]]]:
    """Every page of a listing, following next_cursor until it is null."""
    pages: list[list[dict[str, Any]]] = []
    cursor: str | None = None
    while True:
        r = _list(ctx, token, **query, **({"cursor": cursor} if cursor is not None else {}))
        assert r.status == 200, r
        assert set(r.body) == {"sessions", "next_cursor"}, r
        pages.append(r.body["sessions"])
        cursor = r.body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 100, "the cursor does not advance"


def _newest_first(sessions: list[dict[str, Any]]) -> list[str]:
    ordered = sorted(sessions, key=lambda s: (datetime.fromisoformat(s["created_at"]), uuid.UUID(s["id"])),
                     reverse=True)
    return [s["id"] for s in ordered]


@pytest.fixture(scope="module")
def lister(stack: Any) -> tuple[str, Ctx, list[dict[str, Any]]]:
    """(token, context, sessions) of a fresh user with seven live sessions, more than two pages of three."""
    _, headers = stack.new_user()
    token = token_of(headers)
    ctx = authorize(token)
    made = []
    for i in range(7):
        r = invoke("create_session", ctx, token, body={"name": f"page{i}", "cols": 80, "rows": 24})
        assert r.status == 201, r
        made.append(r.body)
    return token, ctx, made


def test_list_pages_with_a_cursor_through_every_session_once(lister: tuple[str, Ctx, list[dict[str, Any]]]) -> None:
    token, ctx, made = lister
    pages = _walk(ctx, token, limit=3)
    assert [len(p) for p in pages] == [3, 3, 1]
    walked = [s["id"] for p in pages for s in p]
    assert walked == _newest_first(made)  # every session exactly once, newest first (created_at, then id)
    assert walked == _newest_first([s for p in pages for s in p])
    # a page exactly as long as what is left says so: no empty page after it
    assert [len(p) for p in _walk(ctx, token, limit=7)] == [7]
    whole = _list(ctx, token)  # the default page (100) holds them all
    assert [s["id"] for s in whole.body["sessions"]] == walked and whole.body["next_cursor"] is None


def test_list_filters_by_state(stack: Any) -> None:
    _, headers = stack.new_user()
    token = token_of(headers)
    ctx = authorize(token)
    ids = []
    for _ in range(4):
        r = invoke("create_session", ctx, token, body={"cols": 80, "rows": 24})
        assert r.status == 201, r
        ids.append(r.body["id"])
    for sid in ids[:2]:
        assert invoke("delete_session", ctx, token, **_sid(sid)).status == 204
    newest = ids[::-1]  # created one after another
    live, deleted = [i for i in newest if i in ids[2:]], [i for i in newest if i in ids[:2]]

    def listed(**query: Any) -> list[str]:
        return [s["id"] for p in _walk(ctx, token, **query) for s in p]

    assert listed() == listed(state="live") == listed(state="active") == live  # live is the default
    assert listed(state="deleted") == listed(state="deleted", limit=1) == deleted
    assert listed(state="all") == listed(state="all", limit=3) == newest
    assert listed(include_ended="true") == newest  # the older spelling of state=all
    assert listed(state="live", include_ended="true") == live  # an explicit state wins
    assert listed(state="exited") == listed(state="lost") == listed(state="creating") == []
    for s in _list(ctx, token, state="deleted").body["sessions"]:
        assert s["state"] == "deleted" and s["ended_at"]


@pytest.mark.parametrize(("query", "field"), [
    ({"limit": "0"}, "query.limit"), ({"limit": "1001"}, "query.limit"), ({"limit": "-5"}, "query.limit"),
    ({"limit": "ten"}, "query.limit"), ({"state": "bogus"}, "query.state"), ({"state": "LIVE"}, "query.state"),
    ({"state": ""}, "query.state"),
])
def test_list_bad_limit_or_state_is_422_naming_the_field(user: tuple[str, str, Ctx], query: dict[str, str],
                                                         field: str) -> None:
    _, token, ctx = user
    r = _list(ctx, token, **query)
    assert r.status == 422, r
    assert r.body["error"]["code"] == "validation_error" and [f["field"] for f in r.body["error"]["fields"]] == [field]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_list_tampered_cursor_is_422_invalid_cursor(lister: tuple[str, Ctx, list[dict[str, Any]]]) -> None:
    token, ctx, _ = lister
    good = _list(ctx, token, limit=3).body["next_cursor"]
    assert good
    hexid = uuid.uuid4().hex
    for bad in ["", "not a cursor", "!!!!", good + "A", good[:-2], good[1:], good + "==", "A" * 2000,
                _b64(b"hello"), _b64(b"\xff\xfe\x00"), _b64(f"-1.{hexid}".encode()),
                _b64(f"{10**18 - 1}.{hexid}".encode()), _b64(f"99999999999999999999.{hexid}".encode()),
                _b64(f"1700000000000000.{hexid[:-1]}".encode()), _b64(f"1700000000000000.{hexid.upper()}".encode()),
                _b64(f"1700000000000000.{hexid}.x".encode()), _b64(f"017.{hexid}".encode()),
                _b64(f"1.5.{hexid}".encode())]:
        r = _list(ctx, token, cursor=bad)
        assert r.status == 422, (bad, r)
        assert r.body["error"]["fields"] == [{"field": "query.cursor", "message": "invalid cursor"}], (bad, r)
        assert r.body["error"]["message"] == "query.cursor: invalid cursor"


def test_list_cursor_never_shows_another_users_sessions(stack: Any,
                                                        lister: tuple[str, Ctx, list[dict[str, Any]]]) -> None:
    token, ctx, made = lister
    first = _list(ctx, token, limit=3).body
    _, headers = stack.new_user()
    other = token_of(headers)
    octx = authorize(other)
    mine = invoke("create_session", octx, other, body={"cols": 80, "rows": 24}).body["id"]
    # the first user's cursor positions the other user's walk: it shows none of the first user's sessions
    assert _list(octx, other, cursor=first["next_cursor"]).body == {"sessions": [], "next_cursor": None}
    # a well-formed cursor anyone can make (far in the future, any id) lists the caller's own sessions only
    from tmuxi.pagination import encode_cursor
    forged = encode_cursor(datetime.now(UTC) + timedelta(days=1), uuid.uuid4())
    for state in ("live", "all", "active"):
        assert [s["id"] for s in _list(octx, other, cursor=forged, state=state).body["sessions"]] == [mine]
    assert {s["id"] for s in _list(ctx, token, cursor=forged).body["sessions"]} == {s["id"] for s in made}
    # an admin pages everyone's sessions the same way: after the first user's third session come their next
    _, aheaders = stack.new_user("admin")
    admin = token_of(aheaders)
    actx = authorize(admin)
    after = _list(actx, admin, cursor=first["next_cursor"], limit=4).body
    assert [s["id"] for s in after["sessions"]] == _newest_first(made)[3:7] and after["next_cursor"]
    top = _list(actx, admin, limit=2, state="all").body
    assert top["sessions"][0]["id"] == mine and len(top["sessions"]) == 2 and top["next_cursor"]
    nxt = _list(actx, admin, limit=2, state="all", cursor=top["next_cursor"]).body["sessions"]
    assert len(nxt) == 2 and not {s["id"] for s in nxt} & {s["id"] for s in top["sessions"]}
    assert _newest_first(top["sessions"] + nxt) == [s["id"] for s in top["sessions"] + nxt]


# --- limits -----------------------------------------------------------------------------------------------


def test_body_over_max_body_bytes_is_413_before_parsing(user: tuple[str, str, Ctx], session: str) -> None:
    _, token, ctx = user
    limit = get_settings().max_body_bytes
    big = '{"text": "' + "x" * limit  # not even valid JSON: parsing it would give 422
    r = invoke("input", ctx, token, body=big, headers={"content-length": str(len(big))}, **_sid(session))
    assert r.status == 413 and r.body["error"]["code"] == "payload_too_large", r
    # no (or a lying) Content-Length: the body length itself is checked
    r = invoke("input", ctx, token, body=big, headers={"content-length": "10"}, **_sid(session))
    assert r.status == 413, r
    r = invoke("input", ctx, token, body=big, headers={"content-length": None},
               multiValueHeaders={"content-length": None}, **_sid(session))
    assert r.status == 413, r


def test_oversize_input_is_413(user: tuple[str, str, Ctx], session: str) -> None:
    _, token, ctx = user
    limit = get_settings().max_input_bytes
    r = invoke("input", ctx, token, body={"text": "y" * (limit + 1)}, **_sid(session))
    assert r.status == 413, r
    assert r.body["error"] == {"code": "payload_too_large",
                               "message": f"input is {limit + 1} bytes; the limit is {limit}"}


def test_input_that_is_not_unicode_is_422(user: tuple[str, str, Ctx], session: str) -> None:
    _, token, ctx = user
    r = invoke("input", ctx, token, body={"text": "echo \ud800"}, **_sid(session))  # JSON's "\ud800": no UTF-8
    assert r.status == 422, r
    assert "data_b64" in r.body["error"]["message"], r.body


def test_unknown_session_is_404(user: tuple[str, str, Ctx]) -> None:
    _, token, ctx = user
    r = invoke("get_session", ctx, token, **_sid(str(uuid.uuid4())))
    assert r.status == 404 and r.body["error"]["code"] == "not_found", r


def test_unexpected_error_is_500_without_details(user: tuple[str, str, Ctx],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A real unexpected error: an authorizer context whose ``exp`` is beyond what a datetime can hold passes
    the checks (it is "in the future") and then overflows when /validate formats it."""
    _, token, ctx = user
    with caplog.at_level("INFO"):
        r = invoke("validate", {**ctx, "exp": str(10**17)}, token)
    assert r.status == 500, r
    assert r.body == {"error": {"code": "internal_error", "message": "internal error"}}
    assert any(rec.getMessage() == "unhandled error" and rec.exc_info for rec in caplog.records)


# --- the API surface --------------------------------------------------------------------------------------


def test_unknown_route_is_404_json(stack: Any) -> None:
    r = invoke("health", None, path="/nope", resource="/nope")
    assert r.status == 404, r
    assert r.body == {"error": {"code": "not_found", "message": "no such route"}}


def test_openapi_document(stack: Any) -> None:
    r = invoke("openapi", None)
    assert r.status == 200, r
    doc = r.body
    assert doc["info"]["title"] == "tmuxi"
    paths = doc["paths"]
    for p in ("/auth/token", "/auth/revoke", "/validate", "/sessions", "/sessions/{id}",
              "/sessions/{id}/input", "/sessions/{id}/screen", "/sessions/{id}/resize",
              "/sessions/{id}/exec", "/health"):
        assert p in paths, p
    responses = paths["/sessions/{id}"]["get"]["responses"]
    assert {"200", "401", "404", "422", "429"} <= set(responses)
    assert paths["/sessions"]["post"]["responses"].get("201")


def test_route_table_matches_the_app() -> None:
    from tmuxi.routes import ROUTES

    app_routes = {(m, getattr(r, "path", None)) for r in api_app.app.routes for m in getattr(r, "methods", ()) or ()
                  if m != "HEAD"}
    table = {(r.method, r.resource) for r in ROUTES if r.function == "api"}  # (/mcp: the mcp function's)
    assert app_routes == table


def test_request_log_line_has_status_duration_route_and_no_secrets(
    user: tuple[str, str, Ctx], session: str, caplog: pytest.LogCaptureFixture
) -> None:
    from tmuxi.observability import logger

    _, token, ctx = user
    with caplog.at_level("INFO"):
        r = invoke("input", ctx, token, body={"text": "s3cr3t-input", "enter": False}, **_sid(session))
    assert r.status == 204, r
    req = [rec for rec in caplog.records if rec.getMessage() == "request"]
    assert req
    line = req[-1].__dict__
    assert line["status"] == 204 and line["route"] == "/sessions/{id}/input" and line["method"] == "POST"
    assert isinstance(line["duration"], float | int) and line["request_id"] and line["lambda_request_id"]
    # the structured JSON lines exactly as the Lambda writes them to stdout (CloudWatch)
    printed = [logger.registered_formatter.format(rec) for rec in caplog.records]
    out = json.loads(printed[caplog.records.index(req[-1])])
    assert out["message"] == "request" and out["status"] == 204 and out["route"] == "/sessions/{id}/input"
    assert isinstance(out["duration"], float | int)
    raw = " ".join(str(rec.__dict__) for rec in caplog.records) + "\n".join(printed)
    for secret in ("s3cr3t-input", token, token.split(".")[2], "Bearer"):
        assert secret not in raw
    assert get_settings().require_jwt_secret() not in raw
    assert get_settings().require_host_secret() not in raw


def test_rate_limited_is_429(stack: Any) -> None:
    """Over the per-user limit the services refuse with 429 (a fresh user, so nobody else is throttled)."""
    _, headers = stack.new_user()
    token = token_of(headers)
    ctx = authorize(token)
    limit = get_settings().rate_limit_per_minute
    if time.time() % 60 > 50:  # the limit counts per fixed minute: do not straddle a window boundary
        time.sleep(60 - time.time() % 60 + 0.1)
    statuses = [invoke("validate", ctx, token).status for _ in range(limit + 1)]
    assert statuses[:limit] == [200] * limit
    r = invoke("validate", ctx, token)
    assert statuses[-1] == 429 and r.status == 429, r
    assert r.body["error"]["code"] == "rate_limited"
    assert 1 <= int(r.headers["retry-after"]) <= 60  # when the window resets
