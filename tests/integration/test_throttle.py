"""Login throttling and the per-source limit of the unauthenticated routes, in-process through the REAL API
handler (Mangum) and the services, against the real stack, with source addresses of our choosing: the gateway
sets ``sourceIp`` from the TCP peer, so through it every test client is 127.0.0.1 (whose limits the test stack
raises, ``tests/conftest.py``)."""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from functions.api.handler import handler
from local.lambda_context import LambdaContext
from tests.integration.test_api_handler import Result, authorize, invoke, token_of
from tmuxi import auth, cache
from tmuxi.db import repo
from tmuxi.errors import RateLimited, Unauthorized
from tmuxi.events import load_event
from tmuxi.models import TokenRequest
from tmuxi.services import auth as auth_service
from tmuxi.settings import get_settings

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")


@contextlib.contextmanager
def changed_settings(**values: object) -> Iterator[None]:
    """This process's settings with some fields changed (the stack's own processes keep theirs)."""
    env = {f"TMUXI_{k.upper()}": str(v) for k, v in values.items()}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    get_settings.cache_clear()
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        get_settings.cache_clear()


def new_ip(v6: bool = False) -> str:
    """A source address no other test uses."""
    if v6:
        return str(ipaddress.IPv6Address((0x20010DB8 << 96) | (uuid.uuid4().int & ((1 << 64) - 1))))
    return str(ipaddress.IPv4Address((10 << 24) | (uuid.uuid4().int & 0xFFFFFF)))


def _from(ip: str) -> dict[str, Any]:
    return {"requestContext": {"identity": {"sourceIp": ip}, "requestId": str(uuid.uuid4())}}


def login(username: str, password: str, ip: str) -> Result:
    return invoke("token", None, body={"username": username, "password": password}, **_from(ip))


def test_a_locked_out_login_is_refused_before_any_lookup_or_hashing(stack: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    name, _ = stack.new_user()
    ip = new_ip()
    s = get_settings()
    for _ in range(s.login_free_failures + 1):  # the last one starts a lockout
        with pytest.raises(Unauthorized):
            auth_service.login(TokenRequest(username=name, password="wrong"), ip)
    hashed: list[int] = []
    looked_up: list[int] = []
    real_verify, real_lookup = auth.verify_password, repo.get_user_by_username
    monkeypatch.setattr(auth, "verify_password", lambda *a: hashed.append(1) or real_verify(*a))
    monkeypatch.setattr(repo, "get_user_by_username", lambda *a: looked_up.append(1) or real_lookup(*a))
    for _ in range(20):  # a locked-out flood costs no hashing and no database query
        with pytest.raises(RateLimited) as info:
            auth_service.login(TokenRequest(username=name, password="pw-" + name), ip)
        assert 0 < info.value.details["retry_after_s"] <= max(1, s.login_lockout_base_s) + 1
    assert hashed == [] and looked_up == []
    # the username is locked from every address; the body and Retry-After say for how long
    r = login(name, "pw-" + name, new_ip(v6=True))
    assert r.status == 429, r
    assert r.body["error"]["code"] == "rate_limited" and "retry" in r.body["error"]["message"], r
    assert 1 <= int(r.headers["retry-after"]) <= max(1, s.login_lockout_base_s) + 1
    assert r.body["error"]["details"]["retry_after_s"] == int(r.headers["retry-after"])
    monkeypatch.undo()
    deadline = time.monotonic() + s.login_lockout_base_s + 10
    while (r := login(name, "pw-" + name, ip)).status == 429:
        assert time.monotonic() < deadline, r
        time.sleep(0.1)
    assert r.status == 200, r


def test_failed_logins_from_one_address_lock_out_every_username_from_it(stack: Any) -> None:
    name, _ = stack.new_user()
    guesser, other = new_ip(), new_ip()
    with changed_settings(login_source_free_failures=3):
        for _ in range(4):  # four usernames, one guess each: under each username's own limit
            r = login(f"nobody-{uuid.uuid4().hex[:8]}", "guess", guesser)
            assert r.status == 401, r
        r = login(name, "pw-" + name, guesser)  # the right password of yet another user, from that address
        assert r.status == 429 and r.body["error"]["code"] == "rate_limited", r
        assert int(r.headers["retry-after"]) >= 1
        assert login(name, "pw-" + name, other).status == 200  # the username itself is fine elsewhere
        deadline = time.monotonic() + get_settings().login_lockout_base_s + 10
        while (r := login(name, "pw-" + name, guesser)).status == 429:
            assert time.monotonic() < deadline, r
            time.sleep(0.1)
        assert r.status == 200, r
        r = login(f"nobody-{uuid.uuid4().hex[:8]}", "guess", guesser)  # the address's count goes on
        assert r.status == 401, r
        assert login(name, "pw-" + name, guesser).status == 429


def _public(kind: str, ip: str, name: str = "") -> Result:
    if kind == "token":
        return login(name, "pw-" + name, ip)
    if kind == "docs":  # an HTML page when it answers
        event = load_event("openapi", path="/docs", resource="/docs", **_from(ip))
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            raw = handler(event, LambdaContext("api"))  # type: ignore[arg-type]
        finally:
            asyncio.set_event_loop(None)
            loop.close()
        if raw["statusCode"] == 200:
            assert "swagger" in raw["body"].lower()
            raw = {**raw, "body": "{}"}
        return Result(raw)
    if kind == "auth_health":
        return invoke("health", None, path="/auth/health", resource="/auth/health", **_from(ip))
    return invoke(kind, None, **_from(ip))


def test_unauthenticated_routes_are_limited_per_source_address(stack: Any) -> None:
    name, headers = stack.new_user()
    token = token_of(headers)
    ctx = authorize(token)
    limit = 6
    kinds = ["health", "auth_health", "openapi", "docs", "token", "health"]
    with changed_settings(public_rate_limit_per_minute=limit):
        for _ in range(3):  # the limit counts per fixed minute: a burst that straddles two is tried again
            ip, other = new_ip(), new_ip()
            window = int(time.time()) // 60
            first = [_public(kind, ip, name) for kind in kinds]
            over = [_public(kind, ip, name) for kind in ("health", "token", "docs")]
            elsewhere = _public("health", other, name)
            authed = invoke("validate", ctx, token, **_from(ip))
            if int(time.time()) // 60 == window:
                break
    assert len(kinds) == limit
    assert [r.status for r in first] == [200] * limit, first
    for r in over:
        assert r.status == 429, r
        assert r.body["error"]["code"] == "rate_limited", r
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert r.body["error"]["details"]["limit_per_minute"] == limit
    assert elsewhere.status == 200, elsewhere
    assert authed.status == 200, authed  # authenticated routes have the per-user limit instead


def test_health_is_answered_from_a_short_cache(stack: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flood of /health costs one PostgreSQL query a second, not one per request."""
    queries: list[int] = []
    from tmuxi.services import health as health_service

    health_service._db_checks = (float("-inf"), {})  # nothing cached from an earlier test: it must ask once
    real = repo.host_counts  # what /health asks PostgreSQL (counted, still asked)
    monkeypatch.setattr(repo, "host_counts", lambda *a: queries.append(1) or real(*a))
    ip = new_ip()
    started = time.monotonic()
    for kind in ["health", "auth_health"] * 20:
        r = _public(kind, ip)
        assert r.status == 200 and r.body["checks"]["postgres"] == "ok", r
    elapsed = time.monotonic() - started
    assert 1 <= len(queries) <= 2 + elapsed, (len(queries), elapsed)


def test_login_throttling_holds_while_redis_is_down(stack: Any) -> None:
    """The counters fall back to this process's memory when Redis cannot be reached."""
    name, _ = stack.new_user()
    ip = new_ip()
    free = get_settings().login_free_failures
    try:
        with changed_settings(redis_url="redis://:nope@127.0.0.1:1/0"):
            cache.reset()
            assert not cache.available()
            for _ in range(free + 1):
                with pytest.raises(Unauthorized):
                    auth_service.login(TokenRequest(username=name, password="wrong"), ip)
            with pytest.raises(RateLimited):
                auth_service.login(TokenRequest(username=name, password="pw-" + name), ip)
    finally:
        cache.reset()
    assert cache.available()
