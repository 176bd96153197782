"""A user's token state (epoch, role, disabled) as the per-request checks see it, against the real PostgreSQL and
Redis: changes end tokens in the authorizer and in ``admit``; the state is read from PostgreSQL about once per
user and interval, not per request; a stale reader, a forged or stale entry, a write that never reached Redis
cannot keep an ended token alive beyond the bound."""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis as redis_lib

from tests.conftest import Deps
from tests.hosting import wait_for
from tmuxi import auth, cache
from tmuxi.db import repo
from tmuxi.errors import Unauthorized
from tmuxi.models import Principal
from tmuxi.services import auth as auth_service
from tmuxi.services import users as users_service
from tmuxi.settings import get_settings


def _user(role: str = "user") -> tuple[uuid.UUID, str]:
    name = f"us{uuid.uuid4().hex[:12]}"
    return repo.create_user(name, auth.hash_password("pw"), role), name


def _redis(deps: Deps) -> redis_lib.Redis:
    return redis_lib.Redis.from_url(deps.redis.url, decode_responses=True)


def _refused(fn: Callable[[], Any]) -> str | None:
    """The refusal reason, or None when admitted."""
    try:
        fn()
    except Unauthorized as exc:
        return str(exc.details.get("reason"))
    return None


def _until(pred: Callable[[], Any], bound_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < bound_s, f"not within {bound_s} s: {what}"
        time.sleep(0.02)
    return time.monotonic() - t0


def _wait_redis_up() -> None:
    _until(cache.available, 5, "redis back")


def test_a_change_ends_the_token_in_the_authorizer_and_in_admit_at_once(deps: Deps) -> None:
    uid, name = _user()
    token, _ = auth.issue_token(uid, name, "user")
    p = auth_service.authorize(token)
    assert p.epoch == 0 and auth_service.admit(p) is not None
    users_service.revoke_tokens(name)
    assert _refused(lambda: auth_service.authorize(token)) == "user_changed"
    assert _refused(lambda: auth_service.admit(p)) == "user_changed"
    again, _ = auth.issue_token(uid, name, "user")
    assert auth_service.authorize(again).epoch == 1
    users_service.disable(name)
    assert _refused(lambda: auth_service.authorize(again)) == "user_disabled"
    users_service.enable(name)
    for ended in (token, again):  # ended tokens stay ended
        assert _refused(lambda t=ended: auth_service.authorize(t)) == "user_changed"
    after, _ = auth.issue_token(uid, name, "user")
    users_service.enable(name)  # already enabled: ends nothing
    assert auth_service.authorize(after).epoch == 2


def test_a_token_is_refused_with_a_role_its_user_does_not_have(deps: Deps) -> None:
    uid, name = _user()
    forged_role, _ = auth.issue_token(uid, name, "admin", epoch=0)  # right epoch, role the user never had
    assert _refused(lambda: auth_service.authorize(forged_role)) == "user_changed"
    p = Principal(user_id=uid, username=name, role="admin", jti=uuid.uuid4().hex, exp=int(time.time()) + 60)
    assert _refused(lambda: auth_service.admit(p)) == "user_changed"  # as from a cached authorizer answer
    ghost, _ = auth.issue_token(uuid.uuid4(), "ghost", "user", epoch=0)  # no such user
    assert _refused(lambda: auth_service.authorize(ghost)) == "user_disabled"


def test_the_user_state_is_not_a_postgresql_round_trip_per_request(deps: Deps,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _wait_redis_up()
    uid, name = _user()
    p = auth_service.authorize(auth.issue_token(uid, name, "user")[0])
    reads: list[uuid.UUID] = []
    real = repo.get_user_state

    def counted(user_id: uuid.UUID) -> Any:
        reads.append(user_id)
        return real(user_id)

    monkeypatch.setattr(repo, "get_user_state", counted)
    t0 = time.monotonic()
    for _ in range(300):
        assert auth_service.admit(p) is not None
    ttl = get_settings().user_state_ttl_s
    assert len(reads) <= 1 + (time.monotonic() - t0) / ttl, reads  # at most once per interval

    deps.redis.stop()
    try:
        reads.clear()
        t0 = time.monotonic()
        for _ in range(300):
            assert auth_service.admit(p) is None  # Redis down: answered without it
        assert 1 <= len(reads) <= 1 + (time.monotonic() - t0) / ttl, reads
    finally:
        deps.redis.start()
    _wait_redis_up()


def test_a_stale_reader_never_puts_an_older_state_back(deps: Deps) -> None:
    _wait_redis_up()
    uid = str(uuid.uuid4())
    newer = cache.UserState(5, "user", True)
    assert cache.user_changed(uid, newer)
    first = cache.admit("user:stale-reader", "jti-sr", None, user_id=uid)
    assert isinstance(first, cache.Admission) and first.user == newer
    # a request that read PostgreSQL before that change puts what it read, after the writer
    cache.put_user(uid, cache.UserState(4, "admin", False), first.gen)
    again = cache.admit("user:stale-reader", "jti-sr", None, user_id=uid)
    assert isinstance(again, cache.Admission) and again.user == newer
    assert cache.user_changed(uid, cache.UserState(6, "user", False))  # a later change does replace it
    last = cache.admit("user:stale-reader", "jti-sr", None, user_id=uid)
    assert isinstance(last, cache.Admission) and last.user == cache.UserState(6, "user", False)


def test_a_forged_or_old_generation_entry_is_not_believed_and_is_replaced(deps: Deps) -> None:
    _wait_redis_up()
    uid, name = _user()
    p = auth_service.authorize(auth.issue_token(uid, name, "user")[0])
    users_service.set_role(name, "user")  # no change: nothing ends
    adm = cache.admit("user:forged", "jti-f", None, user_id=str(uid))
    assert isinstance(adm, cache.Admission)
    forged = json.dumps({"epoch": 10**9, "role": "admin", "disabled": False, "_g": adm.gen, "exp": time.time() + 600})
    r = _redis(deps)
    r.set(f"user:{uid}", "0" * 64 + "." + forged)  # whoever can write Redis but lacks the secret
    got = cache.admit("user:forged", "jti-f", None, user_id=str(uid))
    assert isinstance(got, cache.Admission) and got.user is None  # not believed

    def replaced() -> bool:
        # Changes reach this process's memory asynchronously (CLIENT TRACKING pushes): until the forged write's
        # invalidation lands, admit answers from memory and writes nothing; a write made just before a new
        # generation lands carries the old one and is itself read as a miss. Then PostgreSQL's answer replaces it.
        assert auth_service.admit(p) is not None
        got = cache.admit("user:forged", "jti-f", None, user_id=str(uid))
        return isinstance(got, cache.Admission) and got.user == cache.UserState(0, "user", False)

    wait_for(replaced, timeout=5, what="the forged entry replaced by PostgreSQL's answer")

    r.incr("cache:gen")  # what a process does when Redis returns after it missed a write
    got = cache.admit("user:forged", "jti-f", None, user_id=str(uid))
    assert isinstance(got, cache.Admission) and got.user is None  # an entry of an old generation is a miss
    wait_for(replaced, timeout=5, what="the entry replaced in the new generation")


def test_a_change_that_never_reached_redis_takes_effect_within_the_bound(deps: Deps) -> None:
    _wait_redis_up()
    uid, name = _user()
    p = auth_service.authorize(auth.issue_token(uid, name, "user")[0])
    assert auth_service.admit(p) is not None  # its state is now in Redis and in this process's memory
    repo.change_user(name, None, "user.disable", disabled=True)  # PostgreSQL only, like a writer without Redis
    took = _until(lambda: _refused(lambda: auth_service.admit(p)) == "user_disabled",
                  get_settings().user_state_ttl_s + 1, "a disable that Redis never heard of")
    assert took > 0.2  # it was the bound that ended it, not a write to Redis
