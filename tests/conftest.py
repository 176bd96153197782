"""Shared fixtures: one real local stack per test run (embedded PostgreSQL, redis-server, two tmux hosts,
the local API gateway), started the way ``make run`` starts it."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from local.services import free_port
from local.stack import LocalStack


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

    def new_user(self, role: str = "user") -> tuple[str, dict[str, str]]:
        """A fresh user; returns (username, auth headers)."""
        name = f"u{uuid.uuid4().hex[:10]}"
        self.create_user(name, "pw-" + name, role)
        return name, {"authorization": f"Bearer {self.login(name, 'pw-' + name)}"}


@pytest.fixture(scope="session")
def stack() -> Iterator[StackHandle]:
    base = Path(tempfile.mkdtemp(prefix="tmuxi-test-", dir="/tmp"))
    sockets = Path(tempfile.mkdtemp(prefix="ts", dir="/tmp"))
    s = LocalStack(
        data_dir=base / "data", hosts=2, socket_dir=sockets, gateway_port=free_port(), environment="test",
        database_url=os.environ.get("TMUXI_TEST_DATABASE_URL"),
        extra_env={"TMUXI_HEARTBEAT_INTERVAL_S": "0.5", "TMUXI_HOST_DEAD_AFTER_S": "3",
                   "TMUXI_REDIS_RETRY_AFTER_S": "0.2"},
    )
    try:
        s.start()
        from tmuxi import cache
        from tmuxi.settings import get_settings

        get_settings.cache_clear()
        cache.reset()
        with httpx.Client(base_url=s.gateway_url, timeout=30) as client:
            yield StackHandle(s, client)
    finally:
        s.stop()
        shutil.rmtree(sockets, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
