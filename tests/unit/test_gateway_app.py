"""The local gateway as an ASGI app: authorizer outcomes, integration, limits, timeouts. The gateway is the unit
under test: stand-in Lambda handler callables are injected into ``LocalGateway`` to drive its translation.
The real authorizer + API handlers behind it are tested in ``tests/integration/test_gateway_real.py``."""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from local.gateway import BackgroundGateway, LocalGateway

SID = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b"
USER = "0b9f8e7d-6c5b-4a39-8281-706f5e4d3c2b"
ALLOW_ALL = "arn:aws:execute-api:us-east-1:123456789012:local/local/*/*"


class Recorder:
    def __init__(self, fn: Callable[[dict[str, Any]], Any]) -> None:
        self.fn = fn
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any], context: Any) -> Any:
        assert context.get_remaining_time_in_millis() > 0 and context.aws_request_id
        self.events.append(event)
        return self.fn(event)


def allow(event: dict[str, Any]) -> dict[str, Any]:
    return {"principalId": USER,
            "policyDocument": {"Version": "2012-10-17", "Statement": [
                {"Action": "execute-api:Invoke", "Effect": "Allow", "Resource": ALLOW_ALL}]},
            "context": {"user_id": USER, "role": "user", "exp": 4102444800, "admin": False}}


def echo(event: dict[str, Any]) -> dict[str, Any]:
    return {"statusCode": 200, "headers": {"content-type": "application/json"},
            "multiValueHeaders": {"x-multi": ["a", "b"]},
            "body": json.dumps({"path": event["path"], "authorizer": event["requestContext"].get("authorizer")}),
            "isBase64Encoded": False}


def client(gw: LocalGateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=gw), base_url="http://localhost:8080")


@pytest.fixture
async def fake() -> AsyncIterator[tuple[LocalGateway, Recorder, Recorder]]:
    authz, api = Recorder(allow), Recorder(echo)
    gw = LocalGateway(api_handler=api, authorizer_handler=authz, max_workers=4)
    yield gw, authz, api
    gw.close()


BEARER = {"authorization": "Bearer a.b.c"}


async def test_allow_puts_principal_and_context_into_the_event(fake: Any) -> None:
    gw, authz, api = fake
    async with client(gw) as c:
        r = await c.get(f"/sessions/{SID}", headers=BEARER, params={"history": "5"})
    assert r.status_code == 200
    assert r.headers.get_list("x-multi") == ["a", "b"] and r.headers["x-amzn-requestid"]
    body = r.json()
    assert body["path"] == f"/sessions/{SID}"
    assert body["authorizer"]["principalId"] == USER
    assert body["authorizer"]["exp"] == "4102444800" and body["authorizer"]["admin"] == "false"
    a_event, event = authz.events[0], api.events[0]
    assert a_event["type"] == "REQUEST" and a_event["headers"]["authorization"] == "Bearer a.b.c"
    assert a_event["methodArn"].endswith(f"/local/GET/sessions/{SID}")
    assert event["resource"] == "/sessions/{id}" and event["pathParameters"] == {"id": SID}
    assert event["queryStringParameters"] == {"history": "5"}
    assert event["requestContext"]["requestId"] == a_event["requestContext"]["requestId"]


async def test_unknown_route_is_404_without_invoking(fake: Any) -> None:
    gw, authz, api = fake
    async with client(gw) as c:
        r = await c.get("/nope", headers=BEARER)
        r2 = await c.put("/sessions", headers=BEARER)
    for resp in (r, r2):
        assert resp.status_code == 404
        assert resp.json() == {"error": {"code": "not_found", "message": "no such route"}}
    assert not authz.events and not api.events


async def test_missing_authorization_is_401_without_invoking(fake: Any) -> None:
    gw, authz, api = fake
    async with client(gw) as c:
        r = await c.get(f"/sessions/{SID}")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert not authz.events and not api.events


async def test_public_route_skips_the_authorizer(fake: Any) -> None:
    gw, authz, api = fake
    async with client(gw) as c:
        r = await c.post("/auth/token", json={"username": "a", "password": "b"})
    assert r.status_code == 200 and r.json()["authorizer"] is None
    assert not authz.events
    assert json.loads(api.events[0]["body"]) == {"username": "a", "password": "b"}


@pytest.mark.parametrize(
    ("authorizer", "status", "code"),
    [
        (lambda e: (_ for _ in ()).throw(Exception("Unauthorized")), 401, "unauthorized"),
        (lambda e: {**allow(e), "policyDocument": {"Version": "2012-10-17", "Statement": [
            {"Action": "execute-api:Invoke", "Effect": "Deny", "Resource": ALLOW_ALL}]}}, 403, "forbidden"),
        # an authorizer that raises (what it reads is unreachable): retry, configured as 503 with Retry-After
        (lambda e: (_ for _ in ()).throw(RuntimeError("boom")), 503, "dependency_unavailable"),
        (lambda e: {"principalId": "x"}, 500, "internal_error"),  # a malformed answer: a configuration error
    ],
)
async def test_authorizer_outcomes(authorizer: Any, status: int, code: str) -> None:
    api = Recorder(echo)
    gw = LocalGateway(api_handler=api, authorizer_handler=Recorder(authorizer), max_workers=2)
    try:
        async with client(gw) as c:
            r = await c.get(f"/sessions/{SID}", headers=BEARER)
    finally:
        gw.close()
    assert r.status_code == status and r.json()["error"]["code"] == code
    assert (r.headers.get("retry-after") == "1") == (status == 503)
    assert not api.events


async def test_binary_body_is_base64_and_binary_response_decoded() -> None:
    def binary(event: dict[str, Any]) -> dict[str, Any]:
        assert event["isBase64Encoded"] is True
        return {"statusCode": 200, "headers": {"content-type": "application/octet-stream"},
                "body": event["body"], "isBase64Encoded": True}

    gw = LocalGateway(api_handler=Recorder(binary), authorizer_handler=Recorder(allow), max_workers=2)
    try:
        async with client(gw) as c:
            r = await c.post(f"/sessions/{SID}/input", headers=BEARER, content=b"\xff\xfe\x00raw")
    finally:
        gw.close()
    assert r.status_code == 200 and r.content == b"\xff\xfe\x00raw"


async def test_payload_limit_is_413() -> None:
    api = Recorder(echo)
    gw = LocalGateway(api_handler=api, authorizer_handler=Recorder(allow), max_payload_bytes=1000)
    try:
        async with client(gw) as c:
            r = await c.post("/auth/token", content=b"x" * 1001)

            async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while reading
                for _ in range(3):
                    yield b"y" * 400

            r2 = await c.post("/auth/token", content=chunks())
            ok = await c.post("/auth/token", content=b"x" * 1000)
    finally:
        gw.close()
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert r2.status_code == 413
    assert ok.status_code == 200 and len(api.events) == 1


async def test_integration_timeout_is_504() -> None:
    def slow(event: dict[str, Any]) -> dict[str, Any]:
        time.sleep(0.5)
        return echo(event)

    gw = LocalGateway(api_handler=Recorder(slow), authorizer_handler=Recorder(allow),
                      integration_timeout_s=0.1)
    try:
        async with client(gw) as c:
            r = await c.get("/health")
    finally:
        gw.close()
    assert r.status_code == 504 and r.json()["error"]["code"] == "gateway_timeout"


@pytest.mark.parametrize("result", [RuntimeError("crash"), {"statusCode": "x"}, "nope"])
async def test_integration_failures_are_502(result: Any) -> None:
    def bad(event: dict[str, Any]) -> Any:
        if isinstance(result, Exception):
            raise result
        return result

    gw = LocalGateway(api_handler=Recorder(bad), authorizer_handler=Recorder(allow), max_workers=2)
    try:
        async with client(gw) as c:
            r = await c.get("/health")
    finally:
        gw.close()
    assert r.status_code == 502 and r.json()["error"]["code"] == "bad_gateway"


async def test_authorizer_result_cache_when_ttl_set() -> None:
    from tmuxi.routes import AuthorizerConfig

    authz = Recorder(allow)
    gw = LocalGateway(api_handler=Recorder(echo), authorizer_handler=authz,
                      authorizer=AuthorizerConfig(result_ttl_s=60), max_workers=2)
    try:
        async with client(gw) as c:
            for _ in range(3):
                assert (await c.get(f"/sessions/{SID}", headers=BEARER)).status_code == 200
            assert (await c.get(f"/sessions/{SID}", headers={"authorization": "Bearer x.y.z"})).status_code == 200
    finally:
        gw.close()
    assert len(authz.events) == 2


def test_served_by_uvicorn() -> None:
    api = Recorder(echo)
    with BackgroundGateway(api_handler=api, authorizer_handler=Recorder(allow), max_workers=2) as gw:
        r = httpx.get(gw.url + f"/sessions/{SID}/screen?escapes=true",
                      headers={**BEARER, "x-forwarded-for": "6.6.6.6"}, timeout=5)
        r404 = httpx.get(gw.url + "/missing", timeout=5)
    assert r.status_code == 200 and r.json()["path"] == f"/sessions/{SID}/screen"
    assert api.events[0]["headers"]["x-forwarded-proto"] == "http"
    # the gateway is the edge: sourceIp is the TCP peer, whatever X-Forwarded-For a client sends
    assert api.events[0]["requestContext"]["identity"]["sourceIp"] == "127.0.0.1"
    assert r404.status_code == 404


def test_data_routes_run_inline_and_slow_routes_in_the_pool() -> None:
    """GET /sessions/{id} (PostgreSQL + Redis only) runs in the server's own thread, one at a time; a route that
    waits on a tmux host runs in the pool, so a slow one does not hold up the quick ones."""
    threads: dict[str, str] = {}

    def handler(event: dict[str, Any]) -> dict[str, Any]:
        import asyncio
        import threading

        threads[event["resource"]] = threading.current_thread().name
        if event["resource"].endswith("/screen"):
            time.sleep(1.5)
        asyncio.get_event_loop()  # what Mangum calls: there must be a loop, and not the server's running one
        with pytest.raises(RuntimeError):
            asyncio.get_running_loop()
        return {"statusCode": 200, "body": "{}"}

    with BackgroundGateway(api_handler=Recorder(handler), authorizer_handler=Recorder(allow), max_workers=2) as gw:
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            slow = ex.submit(httpx.get, gw.url + f"/sessions/{SID}/screen", headers=BEARER, timeout=10)
            time.sleep(0.3)
            t0 = time.monotonic()
            quick = [httpx.get(gw.url + f"/sessions/{SID}", headers=BEARER, timeout=5) for _ in range(5)]
            quick_s = time.monotonic() - t0
            assert slow.result().status_code == 200
    assert all(r.status_code == 200 for r in quick)
    assert quick_s < 1.0, "quick routes waited for the slow one"
    assert threads["/sessions/{id}"] == "local-gateway"  # BackgroundGateway's server thread
    assert threads["/sessions/{id}/screen"].startswith("lambda")
