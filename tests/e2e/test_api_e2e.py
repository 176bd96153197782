"""End to end through the local API gateway (real authorizer, real API Lambda, real PostgreSQL/Redis/tmux):
the bad-input list -- wrong ids, other users' sessions, invalid bodies, oversize payloads, bad tokens,
shell/tmux metacharacters, runaway commands, quotas."""
from __future__ import annotations

import base64
import shlex
import subprocess
import time
import uuid
from typing import Any

import httpx
import jwt
import pytest

from tmuxi.settings import env_name

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def user(stack: Any) -> dict[str, str]:
    return stack.new_user()[1]


@pytest.fixture(scope="module")
def session(stack: Any, user: dict[str, str]) -> str:
    r = stack.client.post("/sessions", json={"name": "e2e"}, headers=user)
    assert r.status_code == 201, r.text
    sid: str = r.json()["id"]
    return sid


def _err(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert body["error"]["code"] == code, body
    return body


def _exec(stack: Any, headers: dict[str, str], sid: str, command: str, timeout_s: float = 20,
          **options: Any) -> dict[str, Any]:
    r = stack.client.post(f"/sessions/{sid}/exec", json={"command": command, "timeout_s": timeout_s, **options},
                          headers=headers)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


# --- sessions that are not yours or do not exist ----------------------------------------------------------


def test_unknown_session_is_404(stack: Any, user: dict[str, str]) -> None:
    _err(stack.client.get(f"/sessions/{uuid.uuid4()}", headers=user), 404, "not_found")


def test_other_users_session_is_404_without_data(stack: Any, session: str) -> None:
    _, other = stack.new_user()
    for method, path, body in [("GET", "", None), ("DELETE", "", None), ("GET", "/screen", None),
                               ("POST", "/input", {"text": "echo pwned", "enter": True}),
                               ("POST", "/exec", {"command": "id"}), ("POST", "/resize", {"cols": 80, "rows": 24})]:
        r = stack.client.request(method, f"/sessions/{session}{path}", json=body, headers=other)
        b = _err(r, 404, "not_found")
        assert set(b) == {"error"} and "e2e" not in r.text
    assert session not in stack.client.get("/sessions", headers=other).text


def test_admin_sees_all_user_sees_own(stack: Any, user: dict[str, str], session: str) -> None:
    _, admin = stack.new_user("admin")
    _, other = stack.new_user()
    everyone = stack.client.get("/sessions", params={"limit": 1000}, headers=admin).json()
    assert session in {s["id"] for s in everyone["sessions"]} and everyone["next_cursor"] is None
    assert stack.client.get(f"/sessions/{session}", headers=admin).status_code == 200
    own = {s["id"] for s in stack.client.get("/sessions", headers=user).json()["sessions"]}
    assert session in own
    assert stack.client.get("/sessions", headers=other).json()["sessions"] == []


def test_list_pages_through_the_gateway(stack: Any) -> None:
    """GET /sessions through the gateway: pages of two follow next_cursor to the end, each session once; the
    query string's limit, state and cursor are checked (422 naming the field)."""
    _, h = stack.new_user()
    made = []
    for _ in range(3):
        r = stack.client.post("/sessions", json={}, headers=h)
        assert r.status_code == 201, r.text
        made.append(r.json()["id"])
    walked, cursor, pages = [], None, 0
    while True:
        r = stack.client.get("/sessions", params={"limit": 2, **({"cursor": cursor} if cursor else {})}, headers=h)
        assert r.status_code == 200, r.text
        walked += [s["id"] for s in r.json()["sessions"]]
        pages += 1
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    assert walked == made[::-1] and pages == 2
    r = stack.client.delete(f"/sessions/{made[0]}", headers=h)
    assert r.status_code == 204, r.text
    ended = stack.client.get("/sessions", params={"state": "deleted"}, headers=h).json()
    assert [s["id"] for s in ended["sessions"]] == [made[0]] and ended["next_cursor"] is None
    for params, field in [({"limit": 0}, "query.limit"), ({"limit": 1001}, "query.limit"),
                          ({"state": "gone"}, "query.state"), ({"cursor": "x" + made[1]}, "query.cursor")]:
        body = _err(stack.client.get("/sessions", params=params, headers=h), 422, "validation_error")
        assert [f["field"] for f in body["error"]["fields"]] == [field], body


# --- invalid input ----------------------------------------------------------------------------------------


def test_invalid_json_is_422(stack: Any, user: dict[str, str]) -> None:
    r = stack.client.post("/sessions", content=b'{"name": ', headers={**user, "content-type": "application/json"})
    b = _err(r, 422, "validation_error")
    assert "not valid JSON" in b["error"]["message"]


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/sessions", {"cols": 5}, "body.cols"),
    ("/sessions", {"name": "a\nb"}, "body.name"),
    ("/sessions", {"name": "x", "extra": 1}, "body.extra"),
])
def test_invalid_fields_are_422_naming_the_field(stack: Any, user: dict[str, str], path: str,
                                                 body: dict[str, Any], field: str) -> None:
    b = _err(stack.client.post(path, json=body, headers=user), 422, "validation_error")
    assert field in b["error"]["message"]


def test_invalid_session_fields_are_422(stack: Any, user: dict[str, str], session: str) -> None:
    b = _err(stack.client.post(f"/sessions/{session}/resize", json={"cols": 100000, "rows": 30}, headers=user),
             422, "validation_error")
    assert "body.cols" in b["error"]["message"]
    b = _err(stack.client.get(f"/sessions/{session}/screen?history=99999", headers=user), 422,
             "validation_error")
    assert "query.history" in b["error"]["message"]
    _err(stack.client.post(f"/sessions/{session}/input", json={"keys": ["kill-server"]}, headers=user), 422,
         "validation_error")
    # an exec that could outlast API Gateway's 29 s integration timeout is refused up front, not cut off by a 504
    b = _err(stack.client.post(f"/sessions/{session}/exec", json={"command": "sleep 60", "timeout_s": 60},
                               headers=user), 422, "validation_error")
    assert "body.timeout_s" in b["error"]["message"]
    # ... and so is one over this deployment's own maximum (TMUXI_EXEC_TIMEOUT_MAX_S), never silently cut
    from tmuxi.settings import get_settings

    over = get_settings().exec_timeout_max_s + 1
    b = _err(stack.client.post(f"/sessions/{session}/exec", json={"command": "true", "timeout_s": over},
                               headers=user), 422, "validation_error")
    assert b["error"]["fields"] == [{"field": "body.timeout_s", "message": "must be at most 20 (this deployment's "
                                                                          "TMUXI_EXEC_TIMEOUT_MAX_S)"}], b


def test_oversize_input_and_command_are_413(stack: Any, user: dict[str, str], session: str) -> None:
    from tmuxi.settings import get_settings

    s = get_settings()
    _err(stack.client.post(f"/sessions/{session}/input", json={"text": "x" * (s.max_input_bytes + 1)},
                           headers=user), 413, "payload_too_large")
    data = base64.b64encode(b"\x00" * (s.max_input_bytes + 1)).decode()
    _err(stack.client.post(f"/sessions/{session}/input", json={"data_b64": data}, headers=user), 413,
         "payload_too_large")
    _err(stack.client.post(f"/sessions/{session}/exec", json={"command": "x" * (s.max_command_bytes + 1)},
                           headers=user), 413, "payload_too_large")
    _err(stack.client.post(f"/sessions/{session}/input", json={"text": "y" * (s.max_body_bytes + 10)},
                           headers=user), 413, "payload_too_large")


# --- tokens -----------------------------------------------------------------------------------------------


def _claims(stack: Any, headers: dict[str, str]) -> dict[str, Any]:
    token = headers["authorization"].split()[1]
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def _secret(stack: Any) -> str:
    return str(stack.stack.env[env_name("jwt_secret")])


def _forge(claims: dict[str, Any], secret: str, **header: Any) -> str:
    return jwt.encode(claims, secret, algorithm="HS256", headers={"typ": "at+jwt", **header})


def test_bad_tokens_are_401(stack: Any, user: dict[str, str]) -> None:
    secret = _secret(stack)
    good = _claims(stack, user)
    now = int(time.time())
    b64 = lambda d: base64.urlsafe_b64encode(__import__("json").dumps(d).encode()).rstrip(b"=").decode()  # noqa: E731
    tokens = {
        "garbage": "not-a-token",
        "malformed": "a.b.c",
        "expired": _forge({**good, "exp": now - 60, "iat": now - 120, "nbf": now - 120}, secret),
        "wrong signature": _forge(good, "another-secret-" + "z" * 40),
        "alg none": f"{b64({'alg': 'none', 'typ': 'at+jwt'})}.{b64(good)}.",
        "wrong audience": _forge({**good, "aud": "someone-else"}, secret),
        "wrong issuer": _forge({**good, "iss": "evil"}, secret),
        "wrong typ": jwt.encode(good, secret, algorithm="HS256", headers={"typ": "JWT"}),
        "HS512": jwt.encode(good, secret, algorithm="HS512", headers={"typ": "at+jwt"}),
    }
    for name, token in tokens.items():
        r = stack.client.get("/sessions", headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 401, (name, r.text)
        assert r.json()["error"]["code"] == "unauthorized"
    assert stack.client.get("/sessions").status_code == 401
    assert stack.client.get("/sessions", headers={"authorization": "Basic dTpw"}).status_code == 401


def test_revoked_token_is_401(stack: Any) -> None:
    _, headers = stack.new_user()
    assert stack.client.get("/validate", headers=headers).status_code == 200
    assert stack.client.post("/auth/revoke", headers=headers).status_code == 204
    _err(stack.client.get("/validate", headers=headers), 401, "unauthorized")


# --- metacharacters reach the shell literally -------------------------------------------------------------

NASTY = "; tmux kill-server #{session_name} -t $TMUX 'single' \"double\" `id` $(id) \\ %1 ~ & | > <"


def test_session_name_with_metacharacters_is_literal(stack: Any, user: dict[str, str]) -> None:
    name = "x; kill-server #{session_name} -t 'q' \"q\""
    r = stack.client.post("/sessions", json={"name": name}, headers=user)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert r.json()["name"] == name
    assert stack.client.get(f"/sessions/{sid}", headers=user).json()["name"] == name
    out = _exec(stack, user, sid, "echo alive")
    assert out["exit_code"] == 0 and "alive" in out["stdout"]
    stack.client.delete(f"/sessions/{sid}", headers=user)


def test_command_metacharacters_reach_the_shell_literally(stack: Any, user: dict[str, str], session: str) -> None:
    out = _exec(stack, user, session, f"printf %s {shlex.quote(NASTY)}")
    assert out["exit_code"] == 0 and out["stdout"].strip() == NASTY
    assert stack.client.get(f"/sessions/{session}", headers=user).json()["state"] == "active"


def _pane_command(stack: Any, sid: str) -> str:
    for sock in stack.stack.socket_dir.glob("*/a*/tmux"):
        r = subprocess.run(["tmux", "-S", str(sock), "display-message", "-p", "-t", "=t" + sid.replace("-", "") + ":",
                            "#{pane_current_command}"], capture_output=True, text=True, check=False)
        if r.returncode == 0 and r.stdout.strip():  # tmux answers "" for a target it does not have
            return r.stdout.strip()
    return ""


def test_input_text_and_binary_reach_the_shell_literally(stack: Any, user: dict[str, str], session: str) -> None:
    path = f"/tmp/tmuxi-e2e-{uuid.uuid4().hex}"  # noqa: S108 - test scratch file
    raw = b"\xff\xfe\x80 " + NASTY.encode() + b" #{pane_id}\n"

    def send(body: dict[str, Any]) -> None:
        assert stack.client.post(f"/sessions/{session}/input", json=body, headers=user).status_code == 204

    send({"text": f"cat > {path}", "enter": True})
    # Bytes typed before `cat` owns the terminal would be read by the shell: wait until tmux itself says the
    # pane runs cat (asked over the host's socket; an exec probe would type into cat).
    deadline = time.monotonic() + 10
    while _pane_command(stack, session) != "cat":
        assert time.monotonic() < deadline, stack.client.get(f"/sessions/{session}/screen", headers=user).text
        time.sleep(0.05)
    send({"data_b64": base64.b64encode(raw).decode()})
    send({"keys": ["C-d"]})
    deadline = time.monotonic() + 10
    while True:
        r = stack.client.post(f"/sessions/{session}/exec", json={"command": f"od -An -v -tx1 {path} | tr -d ' \\n'"},
                              headers=user)
        if (r.status_code == 200 and r.json()["stdout"].strip() == raw.hex()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.status_code == 200 and r.json()["stdout"].strip() == raw.hex(), r.text
    _exec(stack, user, session, f"rm -f {path}")


# --- runaway commands -------------------------------------------------------------------------------------


def test_exec_timeout_then_session_still_works(stack: Any, user: dict[str, str], session: str) -> None:
    t0 = time.monotonic()
    out = _exec(stack, user, session, "sleep 1000", timeout_s=1, on_timeout="kill")
    assert out["timed_out"] is True and out["running"] is False and time.monotonic() - t0 < 15
    out = _exec(stack, user, session, "echo ok")
    assert out["exit_code"] == 0 and out["stdout"].strip() == "ok" and out["timed_out"] is False


def _new_session(stack: Any, headers: dict[str, str]) -> str:
    r = stack.client.post("/sessions", json={}, headers=headers)
    assert r.status_code == 201, r.text
    sid: str = r.json()["id"]
    assert _exec(stack, headers, sid, "true")["exit_code"] == 0  # the shell is up
    return sid


def test_exec_that_exits_the_shell_ends_the_session(stack: Any) -> None:
    """`exit` in a command ends the session's shell: the exec answers at once (not after its timeout) with the
    command's output and exit status and says the session ended; the session is recorded as exited."""
    _, headers = stack.new_user()
    sid = _new_session(stack, headers)
    t0 = time.monotonic()
    r = stack.client.post(f"/sessions/{sid}/exec", json={"command": "echo bye; exit 3", "timeout_s": 20},
                          headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["stdout"], body["exit_code"], body["session_ended"], body["timed_out"]) == ("bye\n", 3, True, False)
    assert time.monotonic() - t0 < 10, "waited for the timeout instead of noticing the shell exit"
    assert stack.client.get(f"/sessions/{sid}", headers=headers).json()["state"] == "exited"
    gone = _err(stack.client.post(f"/sessions/{sid}/input", json={"text": "x"}, headers=headers), 410,
                "session_gone")
    assert gone["error"]["details"]["state"] == "exited"
    assert gone["error"]["details"]["end_reason"].startswith("its shell exited")  # the host's word or the API's


def test_exec_after_unfinished_input_runs_alone(stack: Any) -> None:
    """Input left at the prompt -- a half-typed line, an open quote -- is cleared, never glued to an exec's
    command: the exec answers its own output and status at once, and the shell is usable after."""
    _, headers = stack.new_user()
    sid = _new_session(stack, headers)
    for pending in ("echo half-typed", 'echo "an open quote', "echo a trailing backslash \\"):
        enter = not pending.startswith("echo half")
        r = stack.client.post(f"/sessions/{sid}/input", json={"text": pending, "enter": enter}, headers=headers)
        assert r.status_code == 204, r.text
        time.sleep(0.2)  # the shell has read it
        t0 = time.monotonic()
        body = _exec(stack, headers, sid, "echo ran; false")
        assert (body["stdout"], body["exit_code"], body["timed_out"]) == ("ran\n", 1, False), (pending, body)
        assert time.monotonic() - t0 < 5, f"waited for the timeout after {pending!r}"
    assert _exec(stack, headers, sid, "echo after")["stdout"] == "after\n"


def test_typing_exit_ends_the_session(stack: Any) -> None:
    """A shell that exits by itself (here: `exit` typed as input) is recorded as exited by its host."""
    _, headers = stack.new_user()
    sid = _new_session(stack, headers)
    r = stack.client.post(f"/sessions/{sid}/input", json={"text": "exit", "enter": True}, headers=headers)
    assert r.status_code == 204, r.text
    deadline = time.monotonic() + 10
    while (state := stack.client.get(f"/sessions/{sid}", headers=headers).json()["state"]) != "exited":
        assert state == "active" and time.monotonic() < deadline, state
        time.sleep(0.05)


# --- quota and docs ---------------------------------------------------------------------------------------


def test_quota_exceeded_is_429(stack: Any) -> None:
    from tmuxi.settings import get_settings

    _, headers = stack.new_user()
    created: list[str] = []
    try:
        for _ in range(get_settings().session_quota):
            r = stack.client.post("/sessions", json={}, headers=headers)
            assert r.status_code == 201, r.text
            created.append(r.json()["id"])
        _err(stack.client.post("/sessions", json={}, headers=headers), 429, "quota_exceeded")
    finally:
        for sid in created:
            stack.client.delete(f"/sessions/{sid}", headers=headers)


def test_openapi_document_served(stack: Any) -> None:
    r = stack.client.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.") and "/sessions/{id}/exec" in doc["paths"]


def test_unknown_route_is_404_json(stack: Any) -> None:
    _err(stack.client.get("/definitely/not/here"), 404, "not_found")
