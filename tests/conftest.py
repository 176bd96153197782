"""Shared fixtures. ``deps``: a real PostgreSQL (embedded) and redis-server for this test run. ``stack``: the
whole local system on top of them (two tmux hosts and the local API gateway), started the way ``make run``
starts it."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from local.services import EmbeddedPostgres, RedisServer, free_port, new_password
from local.stack import LocalStack

# Every tmux host the tests start (in-process or as a child) gives sessions this shell.
os.environ.setdefault("TMUXI_SHELL", str(Path(__file__).parent / "bin" / "bash-norc"))

TEST_ENV = {
    "TMUXI_SHELL": os.environ["TMUXI_SHELL"],
    "TMUXI_ENVIRONMENT": "test",
    "TMUXI_HEARTBEAT_INTERVAL_S": "0.5",
    "TMUXI_HOST_DEAD_AFTER_S": "3",
    "TMUXI_RECONCILE_INTERVAL_S": "1",
    "TMUXI_REDIS_RETRY_AFTER_S": "0.2",
    "TMUXI_JWT_SECRET": "test-jwt-" + uuid.uuid4().hex + uuid.uuid4().hex,
    "TMUXI_HOST_SECRET": "test-host-" + uuid.uuid4().hex + uuid.uuid4().hex,
    # per-user limits small enough for the containment tests to reach them quickly
    "TMUXI_USER_MAX_PROCESSES": "128",
    "TMUXI_USER_MEMORY_MB": "512",
    "TMUXI_USER_MAX_FILE_MB": "64",
    "TMUXI_USER_TMUX_MEMORY_MB": "16",
    # all test traffic comes from 127.0.0.1: the per-source limits are tested with other addresses
    # (tests/integration/test_throttle.py), here they must not throttle the suite
    "TMUXI_PUBLIC_RATE_LIMIT_PER_MINUTE": "1000000",
    "TMUXI_LOGIN_SOURCE_FREE_FAILURES": "1000000",
}


def reset_process_state() -> None:
    """Drop cached settings, pools and clients so this process picks up the environment again."""
    from tmuxi import cache
    from tmuxi.db.pool import close_pool
    from tmuxi.settings import get_settings

    get_settings.cache_clear()
    cache.reset()
    close_pool()


@dataclass
class Deps:
    base: Path
    database_url: str
    redis: RedisServer


@pytest.fixture(scope="session")
def deps() -> Iterator[Deps]:
    """Both ask for a password generated for this run (PostgreSQL: role postgres, SCRAM; Redis: requirepass);
    the URLs carry it."""
    base = Path(tempfile.mkdtemp(prefix="tmuxi-test-", dir="/tmp"))
    base.chmod(0o711)  # others may traverse (the postgres system user, users' accounts to their homes), not list
    pg = None
    url = os.environ.get("TMUXI_TEST_DATABASE_URL")
    if url is None:
        pg = EmbeddedPostgres(base / "pg", password=new_password())
        url = pg.start()  # migrated
    else:
        from tmuxi.db.migrate import migrate

        migrate(url)  # the pool never migrates: a given database is brought up to date here
    redis = RedisServer(password=new_password())
    redis.start()
    os.environ.update(TEST_ENV)
    os.environ["TMUXI_DATABASE_URL"] = url
    os.environ["TMUXI_REDIS_URL"] = redis.url
    os.environ["TMUXI_DATA_DIR"] = str(base)
    reset_process_state()
    try:
        yield Deps(base, url, redis)
    finally:
        reset_process_state()
        redis.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class StackHandle:
    stack: LocalStack
    client: httpx.Client

    @property
    def gateway_url(self) -> str:
        return self.stack.gateway_url

    def create_user(self, username: str, password: str, role: str = "user") -> None:
        self.stack.ensure_user(username, password, role)

    def login(self, username: str, password: str) -> str:
        r = self.client.post("/auth/token", json={"username": username, "password": password})
        assert r.status_code == 200, r.text
        token: str = r.json()["access_token"]
        return token

    def create_session(self, headers: dict[str, str], **body: Any) -> dict[str, Any]:
        """A session created through the API (201 asserted); its JSON."""
        r = self.client.post("/sessions", json=body, headers=headers)
        assert r.status_code == 201, r.text
        out: dict[str, Any] = r.json()
        return out

    def get_session(self, headers: dict[str, str], session_id: str) -> dict[str, Any]:
        r = self.client.get(f"/sessions/{session_id}", headers=headers)
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    def new_user(self, role: str = "user") -> tuple[str, dict[str, str]]:
        """A fresh user; returns (username, auth headers)."""
        name = f"u{uuid.uuid4().hex[:10]}"
        self.create_user(name, "pw-" + name, role)
        return name, {"authorization": f"Bearer {self.login(name, 'pw-' + name)}"}


@pytest.fixture(scope="session")
def stack(deps: Deps) -> Iterator[StackHandle]:
    sockets = Path(tempfile.mkdtemp(prefix="ts", dir="/tmp"))
    s = LocalStack(
        data_dir=deps.base / "stack", hosts=2, socket_dir=sockets, gateway_port=free_port(),
        environment="test", database_url=deps.database_url, redis=deps.redis,
        extra_env={k: v for k, v in os.environ.items() if k in TEST_ENV},
    )
    try:
        s.start()
        reset_process_state()
        with httpx.Client(base_url=s.gateway_url, timeout=30) as client:
            yield StackHandle(s, client)
    finally:
        s.stop(keep_deps=True)
        shutil.rmtree(sockets, ignore_errors=True)
