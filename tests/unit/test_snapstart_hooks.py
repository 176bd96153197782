"""SnapStart safety (tmuxi/snapstart.py): the handlers register an after-restore hook with the runtime's
``snapshot_restore_py``, and running the registered hooks the way the runtime does after a restore reseeds
``random`` and drops the PostgreSQL pool, the Redis client, the tmux hosts' HTTP clients and the cached secrets
with their client -- whatever of these existed before the snapshot. (That none exists at import is
tests/unit/test_coldstart_imports.py.)"""
from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from snapshot_restore_py import get_after_restore, get_before_snapshot

import functions.authorizer.handler  # noqa: F401 - registers the hooks, as in Lambda
from tmuxi import cache, host_client, secrets, snapstart
from tmuxi.db import pool
from tmuxi.settings import env_name, get_settings


def _restore() -> None:
    """What Lambda's runtime does after restoring a snapshot: call each registered hook with its arguments."""
    for func, args, kwargs in get_after_restore():
        func(*args, **kwargs)


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # addresses nothing listens on: none of what is made below connects before it is used
    monkeypatch.setenv(env_name("database_url"), "postgresql://nobody@127.0.0.1:1/none")
    monkeypatch.setenv(env_name("redis_url"), "redis://127.0.0.1:1/0")
    monkeypatch.setenv(env_name("jwt_secret_id"), "tmuxi/jwt")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    get_settings.cache_clear()
    yield
    pool.close_pool()
    cache.reset()
    secrets.clear()
    host_client.close_all()
    get_settings.cache_clear()


def test_the_handlers_register_both_hooks_once() -> None:
    import functions.api.handler  # noqa: F401 - each handler calls install(); only the first registers
    import functions.ws.handler  # noqa: F401

    assert snapstart.install() is True  # the runtime's module is there (dev extra): registered
    assert [f for f, _, _ in get_after_restore()].count(snapstart.after_restore) == 1
    assert [f for f, _, _ in get_before_snapshot()].count(snapstart.prime) == 1


def test_after_restore_reseeds_random(configured: None) -> None:
    random.seed(1234)  # the state every restored copy of one snapshot would share
    shared = [random.random() for _ in range(4)]
    random.seed(1234)
    _restore()
    assert [random.random() for _ in range(4)] != shared


def test_after_restore_drops_pools_clients_and_cached_secrets(configured: None) -> None:
    made_pool = pool.get_pool()  # no I/O: db_pool_min is 0
    assert cache._gate.client() is not None
    provider = secrets._secrets()
    provider.store["tmuxi/app"] = "cached before the snapshot"  # type: ignore[index,assignment]
    host_client._pool("http://127.0.0.1:1")
    _restore()
    assert pool._pool is None and made_pool.closed
    assert cache._gate._client is None
    assert secrets._provider is None and not provider.store  # the cache and the client with its credentials
    assert host_client._pools == {}
    # and each is made anew on next use
    assert pool.get_pool() is not made_pool
    assert secrets._secrets() is not provider
