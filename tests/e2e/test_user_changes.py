"""Tokens follow their user, through the local gateway -- which caches the authorizer's Allow for 300 s, like API
Gateway, so an old token is let through by the gateway and must be refused by the API itself: a demoted admin's
token loses admin, a disabled or deleted user's tokens are refused everywhere, "end all tokens" and a new password
end every token of that user and no one else's. Within the documented bound (TMUXI_USER_STATE_TTL_S), with Redis
up and with Redis stopped. And the admin routes that make these changes refuse non-admins."""
from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import StackHandle
from tmuxi.services import users as users_service
from tmuxi.settings import get_settings

pytestmark = pytest.mark.slow

SLACK_S = 3.0  # request latency on a loaded 2-core machine, on top of the bound itself


def _bound() -> float:
    return get_settings().user_state_ttl_s + SLACK_S


def _until(pred: Callable[[], Any], what: str, timeout_s: float | None = None) -> float:
    """Poll ``pred`` until it is true; returns how long that took."""
    t0 = time.monotonic()
    deadline = t0 + (timeout_s if timeout_s is not None else _bound())
    while not pred():
        assert time.monotonic() < deadline, f"not within {deadline - t0:.1f} s: {what}"
        time.sleep(0.05)
    return time.monotonic() - t0


def _password(name: str) -> str:
    return "pw-" + name  # what StackHandle.new_user gives


def _login(stack: StackHandle, name: str, password: str | None = None) -> httpx.Response:
    return stack.client.post("/auth/token", json={"username": name, "password": password or _password(name)})


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def _fresh(stack: StackHandle, name: str, password: str | None = None) -> dict[str, str]:
    r = _login(stack, name, password)
    assert r.status_code == 200, r.text
    return _bearer(r.json()["access_token"])


def _create(stack: StackHandle, h: dict[str, str]) -> str:
    r = stack.client.post("/sessions", json={"name": "uc"}, headers=h)
    assert r.status_code == 201, r.text
    sid: str = r.json()["id"]
    return sid


def _refused(r: httpx.Response) -> bool:
    return r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


def _admin_call(stack: StackHandle, admin: dict[str, str], method: str, name: str, action: str = "",
                body: dict[str, Any] | None = None) -> httpx.Response:
    return stack.client.request(method, f"/users/{name}{action}", json=body, headers=admin)


def test_a_demoted_admins_old_token_loses_admin(stack: StackHandle) -> None:
    victim, old = stack.new_user("admin")
    _, other = stack.new_user()
    theirs = _create(stack, other)
    # the gateway now caches the authorizer's Allow (role admin) for this token
    assert stack.client.get("/validate", headers=old).json()["role"] == "admin"
    assert theirs in {s["id"] for s in stack.client.get("/sessions", headers=old).json()["sessions"]}
    _, admin = stack.new_user("admin")

    r = _admin_call(stack, admin, "PATCH", victim, body={"role": "user"})
    assert r.status_code == 200, r.text
    assert r.json()["role"] == "user" and r.json()["username"] == victim and r.json()["disabled"] is False

    def demoted() -> bool:
        v, listed = stack.client.get("/validate", headers=old), stack.client.get("/sessions", headers=old)
        assert v.status_code in (200, 401) and listed.status_code in (200, 401)
        if v.status_code == 200:
            assert v.json()["role"] in ("admin", "user")
        return _refused(v) and _refused(listed)

    _until(demoted, "the demoted admin's old token refused on /validate and GET /sessions")
    assert _refused(stack.client.get(f"/sessions/{theirs}", headers=old))
    # the way back: sign in again, as what they are now
    new = _fresh(stack, victim)
    assert stack.client.get("/validate", headers=new).json()["role"] == "user"
    assert theirs not in stack.client.get("/sessions", headers=new).text
    assert stack.client.get(f"/sessions/{theirs}", headers=new).status_code == 404
    assert _admin_call(stack, new, "POST", victim, "/enable").status_code == 403


def _every_kind_of_route(stack: StackHandle, h: dict[str, str], sid: str) -> list[httpx.Response]:
    """One request of each kind: data routes, routes that call a host, long ones."""
    c = stack.client
    return [
        c.get("/validate", headers=h),
        c.get("/sessions", headers=h),
        c.get(f"/sessions/{sid}", headers=h),
        c.get(f"/sessions/{sid}/screen", headers=h),
        c.post(f"/sessions/{sid}/input", json={"text": "echo hi", "enter": True}, headers=h),
        c.post(f"/sessions/{sid}/resize", json={"cols": 90, "rows": 30}, headers=h),
        c.post(f"/sessions/{sid}/exec", json={"command": "echo still-here", "timeout_s": 5}, headers=h),
        c.post("/sessions", json={"name": "after"}, headers=h),
        c.delete(f"/sessions/{sid}", headers=h),
        c.post("/auth/revoke", headers=h),
        c.post(f"/users/{uuid.uuid4().hex[:8]}/enable", headers=h),
    ]


def test_a_disabled_users_tokens_are_refused_everywhere_and_enable_lets_them_log_in_again(
        stack: StackHandle) -> None:
    name, h = stack.new_user()
    sid = _create(stack, h)
    assert stack.client.get(f"/sessions/{sid}", headers=h).status_code == 200  # Allow cached by the gateway
    _, admin = stack.new_user("admin")

    r = _admin_call(stack, admin, "POST", name, "/disable")
    assert r.status_code == 200 and r.json()["disabled"] is True, r.text
    _until(lambda: _refused(stack.client.get("/validate", headers=h)), "the disabled user's token refused")
    answers = _every_kind_of_route(stack, h, sid)
    assert all(_refused(a) for a in answers), [(a.request.url.path, a.status_code) for a in answers]
    assert _login(stack, name).status_code == 401
    assert stack.client.get(f"/sessions/{sid}", headers=admin).json()["state"] == "active"  # nothing ran

    r = _admin_call(stack, admin, "POST", name, "/enable")
    assert r.status_code == 200 and r.json()["disabled"] is False, r.text
    again = _fresh(stack, name)
    assert stack.client.get(f"/sessions/{sid}", headers=again).json()["state"] == "active"
    assert _refused(stack.client.get("/validate", headers=h))  # the old token stays ended


def test_revoking_all_tokens_ends_every_token_of_that_user_and_no_one_elses(stack: StackHandle) -> None:
    name, first = stack.new_user()
    second = _fresh(stack, name)
    _, bystander = stack.new_user()
    for h in (first, second, bystander):
        assert stack.client.get("/sessions", headers=h).status_code == 200
    _, admin = stack.new_user("admin")

    r = _admin_call(stack, admin, "POST", name, "/revoke-tokens")
    assert r.status_code == 200 and r.json()["disabled"] is False, r.text
    _until(lambda: all(_refused(stack.client.get("/sessions", headers=h)) for h in (first, second)),
           "both of the user's tokens refused")
    assert stack.client.get("/sessions", headers=bystander).status_code == 200
    assert stack.client.get("/validate", headers=admin).status_code == 200
    assert stack.client.get("/sessions", headers=_fresh(stack, name)).status_code == 200


def test_a_new_password_ends_the_old_tokens(stack: StackHandle) -> None:
    name, old = stack.new_user()
    assert stack.client.get("/validate", headers=old).status_code == 200
    stack.create_user(name, "another-" + name)  # the stack's own way of setting a password (services.users)
    _until(lambda: _refused(stack.client.get("/validate", headers=old)), "the token from before the reset refused")
    assert _login(stack, name).status_code == 401
    assert stack.client.get("/validate", headers=_fresh(stack, name, "another-" + name)).status_code == 200


def _tmux_session_exists(stack: StackHandle, sid: str) -> bool:
    assert stack.stack.socket_dir is not None
    sockets = list(stack.stack.socket_dir.glob("host-*/a*/tmux"))
    assert sockets
    return any(subprocess.run(["tmux", "-S", str(s), "has-session", "-t", "=t" + sid.replace("-", "")],
                              capture_output=True, check=False).returncode == 0 for s in sockets)


def test_deleting_a_user_ends_their_tokens_and_sessions_and_keeps_the_record(stack: StackHandle) -> None:
    name, h = stack.new_user()
    sids = [_create(stack, h), _create(stack, h)]
    assert all(_tmux_session_exists(stack, sid) for sid in sids)
    _, admin = stack.new_user("admin")

    r = _admin_call(stack, admin, "DELETE", name)
    assert r.status_code == 204, r.text
    _until(lambda: _refused(stack.client.get("/sessions", headers=h)), "the deleted user's token refused")
    assert _login(stack, name).status_code == 401
    for sid in sids:
        got = stack.client.get(f"/sessions/{sid}", headers=admin).json()
        assert got["state"] == "deleted" and got["ended_at"] is not None
        assert not _tmux_session_exists(stack, sid)
    # gone for the admin routes, for good; the name stays taken
    for method, action, body in (("POST", "/enable", None), ("POST", "/disable", None),
                                 ("PATCH", "", {"role": "admin"}), ("DELETE", "", None)):
        assert _admin_call(stack, admin, method, name, action, body).status_code == 404


def test_admin_routes_refuse_non_admins_unknown_users_and_locking_oneself_out(stack: StackHandle) -> None:
    target, target_h = stack.new_user()
    me, user = stack.new_user()
    admin_name, admin = stack.new_user("admin")
    calls: list[tuple[str, str, dict[str, Any] | None]] = [
        ("POST", "/disable", None), ("POST", "/enable", None), ("POST", "/revoke-tokens", None),
        ("PATCH", "", {"role": "admin"}), ("DELETE", "", None)]
    for method, action, body in calls:
        for name in (target, me, "nobody-" + target):
            r = _admin_call(stack, user, method, name, action, body)
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (method, action, r.text)
        r = _admin_call(stack, admin, method, "nobody-" + target, action, body)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (method, action, r.text)
    assert stack.client.get("/validate", headers=target_h).json()["role"] == "user"  # nothing happened to it
    assert stack.client.get("/validate", headers=user).json()["role"] == "user"
    for method, action, body in (("POST", "/disable", None), ("PATCH", "", {"role": "user"}), ("DELETE", "", None)):
        r = _admin_call(stack, admin, method, admin_name, action, body)
        assert r.status_code == 409, (method, action, r.text)
    assert _admin_call(stack, admin, "PATCH", target, body={"role": "root"}).status_code == 422
    assert _admin_call(stack, admin, "PATCH", target, body={"role": "admin", "disabled": True}).status_code == 422
    assert stack.client.get("/validate", headers=admin).json()["role"] == "admin"
    assert _refused(stack.client.post(f"/users/{target}/disable"))  # no token at all


def test_a_disable_takes_effect_within_the_bound_with_redis_stopped(stack: StackHandle) -> None:
    name, h = stack.new_user()
    _, admin = stack.new_user("admin")
    _, bystander = stack.new_user()
    redis = stack.stack.redis
    assert redis is not None
    redis.stop()
    try:
        for _ in range(6):  # the gateway's workers now hold the user's state, read from PostgreSQL
            assert stack.client.get("/validate", headers=h).status_code == 200
        # disabled by another process (an operator's), which cannot tell the gateway's workers either
        assert users_service.disable(name).disabled
        took = _until(lambda: _refused(stack.client.get("/validate", headers=h)),
                      "the disabled user's token refused with Redis stopped")
        assert took <= _bound()
        for _ in range(4):
            assert _refused(stack.client.get("/sessions", headers=h))
        assert stack.client.get("/validate", headers=bystander).status_code == 200
    finally:
        redis.start()
    _until(lambda: stack.client.get("/health").json()["status"] == "ok", "health ok after Redis returns", 20)
    for _ in range(4):  # and not brought back by a stale cache entry
        assert _refused(stack.client.get("/validate", headers=h))
    assert _admin_call(stack, admin, "POST", name, "/enable").status_code == 200
    assert stack.client.get("/validate", headers=_fresh(stack, name)).status_code == 200
