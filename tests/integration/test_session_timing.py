"""Another user's session cannot be told from a session that does not exist, not even by timing: a lookup of
someone else's id does the same work as a lookup of a random id (the row is read from PostgreSQL and never
cached for a caller who may not see it). Measured at the service, where a cache hit against a PostgreSQL
query is a several-fold difference that the request's other work does not blur."""
from __future__ import annotations

import os
import shutil
import statistics
import time
import uuid
from typing import Any
from uuid import UUID

import pytest
import redis

from tests.integration.test_api_handler import authorize, token_of
from tmuxi.errors import NotFound
from tmuxi.models import Principal
from tmuxi.services import auth as auth_service
from tmuxi.services import sessions as sessions_service

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")

ROUNDS = 200


def _principal(headers: dict[str, str]) -> Principal:
    return auth_service.principal_from_context(authorize(token_of(headers)))


def _lookup_ns(p: Principal, sid: UUID) -> int:
    t0 = time.perf_counter_ns()
    try:
        sessions_service.get_session(p, sid)
    except NotFound:
        return time.perf_counter_ns() - t0
    raise AssertionError(f"{sid} was visible to {p.username}")


def test_another_users_session_answers_404_as_fast_as_a_random_id(stack: Any) -> None:
    _, owner = stack.new_user()
    _, other = stack.new_user()
    r = stack.client.post("/sessions", json={"name": "private"}, headers=owner)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert stack.client.get(f"/sessions/{sid}", headers=owner).status_code == 200  # the owner's use caches it
    p = _principal(other)
    foreign, random_id = UUID(sid), uuid.uuid4()
    for _ in range(20):  # warm both paths
        _lookup_ns(p, foreign)
        _lookup_ns(p, random_id)
    times: dict[str, list[int]] = {"foreign": [], "random": []}
    for i in range(ROUNDS):  # interleaved, alternating which goes first
        order = [("foreign", foreign), ("random", random_id)]
        for name, target in order if i % 2 else reversed(order):
            times[name].append(_lookup_ns(p, target))
    f, n = statistics.median(times["foreign"]), statistics.median(times["random"])
    assert max(f, n) / min(f, n) <= 1.3, f"median foreign {f / 1e3:.1f} us, random {n / 1e3:.1f} us"
    assert stack.client.delete(f"/sessions/{sid}", headers=owner).status_code == 204


def test_a_non_owners_lookup_caches_nothing(stack: Any) -> None:
    _, owner = stack.new_user()
    _, other = stack.new_user()
    r = stack.client.post("/sessions", json={"name": "never-read"}, headers=owner)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    client = redis.Redis.from_url(os.environ["TMUXI_REDIS_URL"])
    try:
        assert client.exists(f"session:{sid}") == 0
        with pytest.raises(NotFound):
            sessions_service.get_session(_principal(other), UUID(sid))
        assert client.exists(f"session:{sid}") == 0
        assert stack.client.get(f"/sessions/{sid}", headers=owner).status_code == 200
        assert client.exists(f"session:{sid}") == 1  # the owner's reads are cached as before
    finally:
        client.close()
    assert stack.client.delete(f"/sessions/{sid}", headers=owner).status_code == 204
