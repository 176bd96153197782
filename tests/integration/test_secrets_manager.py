"""Secrets from AWS Secrets Manager (tmuxi/secrets.py), against a moto server holding real secrets and the real
PostgreSQL and redis-server of the test run: the settings name a secret instead of carrying its value, the value
is read on first use and cached, and after a rotation (the password changed in the database and in the secret) a
new connection that is refused fetches the secret anew once and gets in."""
from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import psycopg
import pytest
import redis
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from local.services import RedisServer, new_password
from tests.conftest import Deps, reset_process_state
from tests.hosting import isolated_aws_env, wait_for
from tests.integration.test_recordings_storage import Moto
from tmuxi import auth, cache, secrets
from tmuxi.db import pool
from tmuxi.db.migrate import available, migrate_configured
from tmuxi.settings import env_name, get_settings


@pytest.fixture
def sm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, deps: Deps) -> Iterator[Any]:
    """A moto server for Secrets Manager (boto3 finds it through AWS_ENDPOINT_URL_SECRETS_MANAGER, as the code
    passes no endpoint) and a client to it; the settings and every cache are reset after the test."""
    isolated_aws_env(monkeypatch, tmp_path)
    server = Moto()
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", server.url)
    client = boto3.session.Session().client("secretsmanager", endpoint_url=server.url, region_name="us-east-1")
    secrets.clear()
    try:
        yield client
    finally:
        monkeypatch.undo()  # the environment as the fixtures left it, before the caches are dropped
        secrets.clear()
        reset_process_state()
        with contextlib.suppress(Exception):
            server.stop()


# moto keeps secrets in the process across its servers: names of this run's own
JWT_ID, HOST_ID, DB_ID, MIG_ID, MASTER_ID, REDIS_ID, NONE_ID = (
    f"tmuxi-test/{uuid.uuid4().hex[:8]}/{n}" for n in ("jwt", "host", "db", "mig", "master", "redis", "none"))


def _configure(monkeypatch: pytest.MonkeyPatch, **fields: str | None) -> None:
    for field, value in fields.items():
        if value is None:
            monkeypatch.delenv(env_name(field), raising=False)
        else:
            monkeypatch.setenv(env_name(field), value)
    reset_process_state()
    secrets.clear()


def test_the_jwt_and_host_secrets_come_from_their_secrets_cached(sm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    jwt_secret, host_secret = "j" * 48, "h" * 48
    sm.create_secret(Name=JWT_ID, SecretString=json.dumps({"jwt_secret": jwt_secret}))
    sm.create_secret(Name=HOST_ID, SecretString=json.dumps({"host_secret": host_secret}))
    _configure(monkeypatch, jwt_secret_id=JWT_ID, host_secret_id=HOST_ID, jwt_secret=None, host_secret=None)
    s = get_settings()
    assert (s.require_jwt_secret(), s.require_host_secret()) == (jwt_secret, host_secret)
    token, _ = auth.issue_token(uuid.uuid4(), "alice", "user", epoch=0)
    assert auth.decode_token(token)["name"] == "alice"  # signed and checked with the secret's value
    # cached for secrets_max_age_s: a new value is not fetched on every use ...
    sm.put_secret_value(SecretId=JWT_ID, SecretString=json.dumps({"jwt_secret": "n" * 48}))
    assert s.require_jwt_secret() == jwt_secret
    # ... but once the cache is dropped (or aged out)
    secrets.clear()
    assert s.require_jwt_secret() == "n" * 48


def test_a_missing_secret_names_the_setting_and_the_permission(sm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _configure(monkeypatch, jwt_secret_id=NONE_ID)
    from tmuxi.errors import DependencyUnavailable

    with pytest.raises(DependencyUnavailable) as caught:
        get_settings().require_jwt_secret()
    assert env_name("jwt_secret_id") in str(caught.value.internal)
    assert "secretsmanager:GetSecretValue" in str(caught.value.internal)


@contextlib.contextmanager
def _role(deps: Deps, password: str) -> Iterator[str]:
    """A login role of its own that may read the schema version (what a pooled connection's first use reads)."""
    name = "rot_" + uuid.uuid4().hex[:8]
    with psycopg.connect(deps.database_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
        admin.execute(f"GRANT SELECT ON schema_migrations TO {name}")
    try:
        yield name
    finally:
        with psycopg.connect(deps.database_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (name,))
            admin.execute(f"REVOKE ALL ON schema_migrations FROM {name}")
            admin.execute(f"DROP OWNED BY {name}")
            admin.execute(f"DROP ROLE {name}")


def _current_user() -> str:
    with pool.connection() as conn:
        row = conn.execute("SELECT current_user AS u").fetchone()
    assert row is not None
    return str(row["u"])


def test_a_new_database_connection_picks_up_a_rotated_password(sm: Any, monkeypatch: pytest.MonkeyPatch,
                                                               deps: Deps) -> None:
    given = conninfo_to_dict(deps.database_url)
    first, second = new_password(), new_password()
    with _role(deps, first) as role:
        # RDS's secret: credentials, host, port and database (here PostgreSQL's Unix socket directory)
        sm.create_secret(Name=DB_ID, SecretString=json.dumps(
            {"username": role, "password": first, "host": given["host"], "port": int(given.get("port") or 5432),
             "dbname": given["dbname"], "engine": "postgres"}))
        _configure(monkeypatch, database_secret_id=DB_ID, database_url=None)
        assert _current_user() == role

        # the rotation: the database takes only the new password, the secret has it
        with psycopg.connect(deps.database_url, autocommit=True) as admin:
            admin.execute(f"ALTER ROLE {role} PASSWORD '{second}'")
        sm.put_secret_value(SecretId=DB_ID, SecretString=json.dumps(
            {"username": role, "password": second, "host": given["host"], "dbname": given["dbname"]}))
        assert secrets.database_url().count(first) == 1  # still cached: secrets_max_age_s is 300 s

        pool.close_pool()  # the next use opens a new connection, with the cached (old) password first
        assert _current_user() == role
        assert first not in secrets.database_url() and second in secrets.database_url()


def test_the_migration_step_picks_up_a_rotated_password(sm: Any, monkeypatch: pytest.MonkeyPatch,
                                                        deps: Deps) -> None:
    given = conninfo_to_dict(deps.database_url)
    first, second = new_password(), new_password()
    with _role(deps, first) as role:
        db = "mig_" + uuid.uuid4().hex[:8]
        with psycopg.connect(deps.database_url, autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {db} OWNER {role}")
        try:
            sm.create_secret(Name=MIG_ID, SecretString=json.dumps(
                {"username": role, "password": first, "host": given["host"], "dbname": db}))
            _configure(monkeypatch, database_secret_id=MIG_ID, database_url=None)
            assert first in secrets.database_url()  # cached before the rotation
            with psycopg.connect(deps.database_url, autocommit=True) as admin:
                admin.execute(f"ALTER ROLE {role} PASSWORD '{second}'")
            sm.put_secret_value(SecretId=MIG_ID, SecretString=json.dumps(
                {"username": role, "password": second, "host": given["host"], "dbname": db}))
            steps: list[str] = []
            assert migrate_configured(steps.append) == [v for v, _, _ in available()]
            assert "fetching the secret anew" in steps[0]
        finally:
            with psycopg.connect(deps.database_url, autocommit=True) as admin:
                admin.execute(f"DROP DATABASE {db} WITH (FORCE)")


def test_a_url_without_credentials_takes_them_from_an_rds_managed_secret(sm: Any, monkeypatch: pytest.MonkeyPatch,
                                                                       deps: Deps) -> None:
    """RDS-managed master user secrets hold only username and password: the URL gives host and database."""
    given = conninfo_to_dict(deps.database_url)
    password = new_password()
    with _role(deps, password) as role:
        sm.create_secret(Name=MASTER_ID, SecretString=json.dumps({"username": role, "password": password}))
        bare = make_conninfo("", host=given["host"], dbname=given["dbname"])
        _configure(monkeypatch, database_secret_id=MASTER_ID, database_url=bare)
        assert _current_user() == role


def test_redis_authenticates_with_the_secret_and_follows_a_rotation(sm: Any, monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    first, second = new_password(), new_password()
    server = RedisServer(password=first, socket_dir=tmp_path / "redis")
    server.start()
    try:
        sm.create_secret(Name=REDIS_ID, SecretString=json.dumps({"auth_token": first}))
        _configure(monkeypatch, redis_secret_id=REDIS_ID,
                   redis_url=f"redis://127.0.0.1:{server.port}/0",  # no password in it
                   redis_retry_after_s="0.1")
        assert cache.available()

        with redis.Redis.from_url(server.tcp_url) as admin:  # the rotation (CONFIG is renamed away: ACL)
            admin.acl_setuser("default", enabled=True, reset_passwords=True, passwords=[f"+{second}"])
        sm.put_secret_value(SecretId=REDIS_ID, SecretString=json.dumps({"auth_token": second}))
        cache._gate.client().connection_pool.disconnect()  # type: ignore[union-attr] - new connections from here
        # the first new connection is refused with the cached token (Redis counts as down for
        # redis_retry_after_s, as for any failure); the next one asks Secrets Manager again and gets in
        wait_for(cache.available, timeout=5, what="Redis reachable with the rotated token")
        assert secrets.redis_auth_token() == second
    finally:
        server.stop()
