"""The local API gateway with the REAL authorizer and the REAL API Lambda handlers in-process (``LocalGateway``
with its default handlers, driven over ASGI), against the real stack (PostgreSQL, Redis, two tmux hosts);
and the stack's own gateway process over HTTP. Nothing of the project is faked."""
from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest

from local.gateway import LocalGateway
from tmuxi.observability import AUTH_FAILURES
from tmuxi.routes import AuthorizerConfig, gateway_response
from tmuxi.settings import get_settings

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")

UNAUTHORIZED = gateway_response("UNAUTHORIZED").body()


def client(gw: LocalGateway) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=gw)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://localhost:8080", timeout=30)


@pytest.fixture
async def gw(stack: Any) -> AsyncIterator[LocalGateway]:
    gateway = LocalGateway(max_workers=2)  # the real authorizer + API handlers, imported on first use
    yield gateway
    gateway.close()


@pytest.fixture(scope="module")
def user(stack: Any) -> dict[str, str]:
    headers: dict[str, str] = stack.new_user()[1]
    return headers


@pytest.fixture(scope="module")
def session(stack: Any, user: dict[str, str]) -> str:
    r = stack.client.post("/sessions", json={"name": "gw-real"}, headers=user)
    assert r.status_code == 201, r.text
    sid: str = r.json()["id"]
    return sid


def _failures(reason: str) -> float:
    value: float = AUTH_FAILURES.labels(reason=reason)._value.get()
    return value


@pytest.mark.parametrize(
    ("header", "reason"),
    [(None, None), ("", None), ("Bearer", "malformed"), ("bearer", "malformed"),
     ("Basic dXNlcjpwdw==", "malformed"), ("Bearer not-a-jwt", "malformed"),
     ("Bearer a.b.c extra", "malformed"), ("Bearer a.b.c", "malformed")],
)
async def test_real_authorizer_refuses_bad_headers(gw: LocalGateway, header: str | None,
                                                   reason: str | None) -> None:
    headers = {} if header is None else {"authorization": header}
    before = _failures(reason) if reason else None
    async with client(gw) as c:
        r = await c.get(f"/sessions/{uuid.uuid4()}", headers=headers)
    assert r.status_code == 401
    assert r.json() == UNAUTHORIZED
    assert r.headers["x-amzn-errortype"] == "UNAUTHORIZED"
    if reason is not None:  # the authorizer ran (in this process) and refused for that reason
        assert _failures(reason) == before + 1  # type: ignore[operator]


async def test_real_path_end_to_end(gw: LocalGateway, stack: Any, user: dict[str, str], session: str) -> None:
    name = jwt.decode(user["authorization"].split()[1], options={"verify_signature": False})["name"]
    async with client(gw) as c:
        r = await c.get(f"/sessions/{session}", headers={"Authorization": user["authorization"]})
        forged = jwt.encode({"sub": str(uuid.uuid4()), "name": "x", "role": "admin"}, "wrong-key-" + "k" * 40,
                            algorithm="HS256", headers={"typ": "at+jwt"})
        bad = await c.get(f"/sessions/{session}", headers={"Authorization": f"Bearer {forged}"})
        invalid = await c.get("/sessions/not-a-uuid", headers=user)
        missing = await c.get(f"/sessions/{uuid.uuid4()}", headers=user)
        validate = await c.get("/validate", headers=user)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == session and body["name"] == "gw-real" and body["state"] == "active"
    assert body["owner_id"] == validate.json()["user_id"] and validate.json()["username"] == name
    assert r.headers["x-amzn-requestid"] and r.headers["content-type"] == "application/json"
    assert bad.status_code == 401 and bad.json() == UNAUTHORIZED
    assert invalid.status_code == 422 and "path.id" in invalid.json()["error"]["message"]
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


async def test_other_users_session_is_404(gw: LocalGateway, stack: Any, session: str) -> None:
    _, other = stack.new_user()
    async with client(gw) as c:
        r = await c.get(f"/sessions/{session}", headers=other)
        listed = await c.get("/sessions", headers=other)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert listed.status_code == 200 and listed.json() == {"sessions": [], "next_cursor": None}


async def test_work_in_a_session_through_the_gateway(gw: LocalGateway, user: dict[str, str], session: str) -> None:
    async with client(gw) as c:
        r = await c.post(f"/sessions/{session}/exec", json={"command": "echo gw-$((2+3))", "timeout_s": 10},
                         headers=user)
        screen = await c.get(f"/sessions/{session}/screen", params={"history": "50"}, headers=user)
    assert r.status_code == 200, r.text
    assert r.json()["exit_code"] == 0 and "gw-5" in r.json()["stdout"]
    assert screen.status_code == 200 and screen.json()["escapes"] is False


async def test_public_routes(gw: LocalGateway, stack: Any) -> None:
    name, _ = stack.new_user()
    async with client(gw) as c:
        health = await c.get("/health")
        doc = await c.get("/openapi.json")
        login = await c.post("/auth/token", json={"username": name, "password": "pw-" + name})
        wrong = await c.post("/auth/token", json={"username": name, "password": "nope"})
        unknown = await c.get("/nope")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert doc.status_code == 200 and "/sessions/{id}/exec" in doc.json()["paths"]
    assert login.status_code == 200 and login.json()["token_type"] == "bearer"
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
    assert unknown.status_code == 404 and unknown.json() == {"error": {"code": "not_found",
                                                                      "message": "no such route"}}


async def test_body_over_the_api_limit_is_413(gw: LocalGateway, user: dict[str, str], session: str) -> None:
    """Under API Gateway's 10 MB, over the API's max_body_bytes: the API Lambda refuses it."""
    big = b'{"text": "' + b"x" * get_settings().max_body_bytes + b'"}'
    async with client(gw) as c:
        r = await c.post(f"/sessions/{session}/input", content=big,
                         headers={**user, "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert "x-amzn-errortype" not in r.headers  # the API's answer, not a gateway response


async def test_revoked_token_refused_even_with_a_cached_authorizer_answer(stack: Any) -> None:
    """With the gateway caching the authorizer's Allow, the API itself still refuses a revoked token."""
    _, headers = stack.new_user()
    gw = LocalGateway(authorizer=AuthorizerConfig(result_ttl_s=300), max_workers=2)
    try:
        async with client(gw) as c:
            assert (await c.get("/validate", headers=headers)).status_code == 200  # Allow is now cached
            assert (await c.post("/auth/revoke", headers=headers)).status_code == 204
            r = await c.get("/validate", headers=headers)
            listed = await c.get("/sessions", headers=headers)
    finally:
        gw.close()
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert "x-amzn-errortype" not in r.headers  # refused by the API (services.auth.admit), not the gateway
    assert listed.status_code == 401


def test_the_stack_gateway_process(stack: Any) -> None:
    """The same through the stack's own gateway (a separate uvicorn process, as `make run` starts it):
    revocation written by one process is honoured by the other."""
    from tmuxi.auth import issue_token
    from tmuxi.db import repo
    from tmuxi.services import auth as auth_service

    name, headers = stack.new_user()
    with httpx.Client(base_url=stack.gateway_url, timeout=30) as c:
        ok = c.get("/validate", headers=headers)
        assert c.post("/auth/revoke", headers=headers).status_code == 204
        revoked = c.get("/validate", headers=headers)  # refused by the authorizer or, if cached, by the API
        none = c.get("/validate")
        # a token revoked in THIS process, never seen by the gateway: its authorizer refuses it
        user_id = repo.get_user_by_username(name)["id"]
        fresh, _ = issue_token(user_id, name, "user")
        assert c.get("/validate", headers={"authorization": f"Bearer {fresh}"}).status_code == 200
        fresh2, _ = issue_token(user_id, name, "user")
        auth_service.revoke(auth_service.authorize(fresh2))
        refused = c.get("/validate", headers={"authorization": f"Bearer {fresh2}"})
    assert ok.status_code == 200 and ok.json()["valid"] is True
    assert revoked.status_code == 401 and revoked.json()["error"]["code"] == "unauthorized"
    assert none.status_code == 401 and none.headers["x-amzn-errortype"] == "UNAUTHORIZED"
    assert refused.status_code == 401 and refused.json() == UNAUTHORIZED
    assert refused.headers["x-amzn-errortype"] == "UNAUTHORIZED"
