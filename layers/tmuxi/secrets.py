"""Secrets from AWS Secrets Manager, for the settings that name one instead of carrying the value (never in an
environment variable or a template):

    jwt_secret_id       {"jwt_secret": ...}                             Settings.require_jwt_secret
    host_secret_id      {"host_secret": ...}                            Settings.require_host_secret
    database_secret_id  RDS's JSON secret: username, password,          db/pool.py database_url, db/migrate.py
                        and host, port, dbname when it has them
    redis_secret_id     {"auth_token": ...}                             cache.py (each new Redis connection)

Read through Powertools Parameters (its SecretsProvider: one GetSecretValue per secret, JSON-decoded and cached
for ``secrets_max_age_s``), on first use -- never at import, so nothing secret is in a SnapStart snapshot -- and
forgotten after a SnapStart restore (``clear``, from tmuxi/snapstart.py) together with the client, whose
credentials belong to the environment. ``refresh=True`` fetches anew whatever the cache holds: after a rotation
(RDS rotates the database password) the first connection refused makes the next one ask.

A value given directly (TMUXI_JWT_SECRET, TMUXI_DATABASE_URL with its password, TMUXI_REDIS_URL with its password)
works as before when no id is set: the local stack needs no AWS. The function's role needs
``secretsmanager:GetSecretValue`` on each secret named (and ``kms:Decrypt`` on its key if that is a customer key).
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from tmuxi.errors import DependencyUnavailable
from tmuxi.settings import env_name, get_settings
from tmuxi.snapstart import deferred_import

if TYPE_CHECKING:
    import boto3
    from aws_lambda_powertools.utilities import parameters
    from aws_lambda_powertools.utilities.parameters import SecretsProvider
else:
    # boto3 costs a cold start ~150 ms: imported on the first use of a secret (before a SnapStart snapshot, ahead)
    boto3 = deferred_import("boto3")
    parameters = deferred_import("aws_lambda_powertools.utilities.parameters")

_provider: SecretsProvider | None = None
_lock = threading.Lock()


def _secrets() -> SecretsProvider:
    global _provider
    if _provider is None:
        with _lock:
            if _provider is None:
                # on first use, never before a SnapStart snapshot: the client's credentials are the environment's
                # (a restore drops it: clear())
                _provider = parameters.SecretsProvider(
                    boto3_client=boto3.session.Session().client("secretsmanager",
                                                                region_name=get_settings().aws_region))
    return _provider


def get_json(secret_id: str, field: str, *, refresh: bool = False) -> dict[str, Any]:
    """The JSON secret ``secret_id`` (named by the setting ``field``), cached for ``secrets_max_age_s``."""
    try:
        value = _secrets().get(secret_id, transform="json", max_age=get_settings().secrets_max_age_s,
                               force_fetch=refresh)
    except Exception as exc:  # Powertools wraps every failure in GetParameterError / TransformParameterError
        raise DependencyUnavailable(
            "a secret could not be read; retry shortly", retry_after_s=1,
            internal=f"{env_name(field)}={secret_id!r}: {type(exc).__name__}: {str(exc)[:300]} -- check that the "
                     f"secret exists in {get_settings().aws_region}, holds a JSON object, and that this role may "
                     "secretsmanager:GetSecretValue on it") from exc
    if not isinstance(value, dict):
        raise DependencyUnavailable("a secret could not be read; retry shortly", retry_after_s=1,
                                    internal=f"{env_name(field)}={secret_id!r} is not a JSON object")
    return value


def _string(secret: dict[str, Any], key: str, field: str, secret_id: str) -> str:
    value = secret.get(key)
    if not isinstance(value, str) or not value:
        raise RuntimeError(f"the secret {secret_id!r} ({env_name(field)}) has no {key!r}: add it as a non-empty "
                           "string to the secret's JSON")
    return value


def app_value(key: str, *, refresh: bool = False) -> str:
    """``jwt_secret`` or ``host_secret`` from its secret (``jwt_secret_id`` / ``host_secret_id``)."""
    field = f"{key}_id"
    secret_id = getattr(get_settings(), field)
    if not secret_id:
        raise RuntimeError(f"{env_name(field)} is not set")
    return _string(get_json(secret_id, field, refresh=refresh), key, field, secret_id)


def database_url(base_url: str = "", *, refresh: bool = False) -> str:
    """``base_url`` (may be empty, or carry host, port, dbname and options but no password) with what the secret
    ``database_secret_id`` has of user, password, host, port and dbname (the secret's win)."""
    from psycopg.conninfo import make_conninfo

    secret_id = get_settings().database_secret_id
    if not secret_id:
        raise RuntimeError(f"{env_name('database_secret_id')} is not set")
    secret = get_json(secret_id, "database_secret_id", refresh=refresh)
    params = {"user": _string(secret, "username", "database_secret_id", secret_id),
              "password": _string(secret, "password", "database_secret_id", secret_id)}
    params.update({k: str(secret[key]) for k, key in (("host", "host"), ("port", "port"), ("dbname", "dbname"))
                   if secret.get(key) not in (None, "")})
    return make_conninfo(base_url, **params)


def redis_auth_token(*, refresh: bool = False) -> str:
    """The AUTH token of the secret ``redis_secret_id``."""
    secret_id = get_settings().redis_secret_id
    if not secret_id:
        raise RuntimeError(f"{env_name('redis_secret_id')} is not set")
    return _string(get_json(secret_id, "redis_secret_id", refresh=refresh), "auth_token", "redis_secret_id",
                   secret_id)


def clear() -> None:
    """Forget every cached secret and the client (after a SnapStart restore; tests)."""
    global _provider
    with _lock:
        if _provider is not None:
            _provider.clear_cache()  # type: ignore[no-untyped-call]  # Powertools leaves it unannotated
        _provider = None
