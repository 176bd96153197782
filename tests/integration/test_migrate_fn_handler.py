"""The deploy-time migration function (functions/migrate/handler.py) against the real PostgreSQL of the test run:
on an empty database it applies every migration the code ships and returns their versions, a second invocation
applies none, a failure raises (so the deploy fails) -- and nothing migrates on first use: before the step ran,
a pooled connection refuses with SchemaBehind and leaves the database empty."""
from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from functions.migrate.handler import handler
from tests.conftest import Deps, reset_process_state
from tmuxi.db import pool
from tmuxi.db.migrate import SchemaBehind, available, latest_version
from tmuxi.errors import DependencyUnavailable
from tmuxi.settings import env_name


@pytest.fixture
def empty_db(deps: Deps, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A new, empty database on the test run's server; the settings point at it."""
    name = "migfn_" + uuid.uuid4().hex[:8]
    with psycopg.connect(deps.database_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    url = make_conninfo(deps.database_url, dbname=name)
    monkeypatch.setenv(env_name("database_url"), url)
    reset_process_state()
    try:
        yield url
    finally:
        monkeypatch.undo()
        reset_process_state()
        with psycopg.connect(deps.database_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


def _tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


def test_a_cold_start_never_migrates(empty_db: str) -> None:
    with pytest.raises(SchemaBehind), pool.connection():
        pass
    assert _tables(empty_db) == set()


def test_the_step_applies_every_migration_once(empty_db: str) -> None:
    every = [version for version, _, _ in available()]
    assert handler({}, None) == {"status": "ok", "applied": every, "schema_version": latest_version()}
    assert {"schema_migrations", "users", "sessions"} <= _tables(empty_db)
    assert handler({"RequestType": "Create"}, None) == {"status": "ok", "applied": [],
                                                        "schema_version": latest_version()}
    with pool.connection() as conn:  # the functions now find the schema current
        assert conn.execute("SELECT count(*) AS n FROM schema_migrations").fetchone() == {"n": len(every)}


def test_a_database_that_cannot_be_reached_fails_the_step(deps: Deps, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(env_name("database_url"), make_conninfo(deps.database_url, password="wrong"))
    reset_process_state()
    try:
        with pytest.raises((psycopg.OperationalError, DependencyUnavailable)):
            handler({}, None)
    finally:
        monkeypatch.undo()
        reset_process_state()
