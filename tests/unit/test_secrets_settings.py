"""Outside development the settings refuse placeholder secrets (tmuxi/settings.py) -- and take the id of a
secret in AWS Secrets Manager in place of each value (tmuxi/secrets.py), which is how the CDK app configures
the functions and the host: no secret in an environment variable or a template."""
from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from tmuxi.settings import Settings, env_name

# every secret-bearing field given explicitly, so that nothing in this process's environment decides
NONE: dict[str, Any] = {"jwt_secret": None, "host_secret": None, "jwt_secret_id": None, "host_secret_id": None,
                        "database_url": None,
                        "database_secret_id": None, "environment": "production", "isolation": "required"}


def test_production_refuses_missing_secrets_and_names_both_ways_to_give_them() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(**NONE)
    assert env_name("jwt_secret") in str(caught.value) and env_name("jwt_secret_id") in str(caught.value)
    with pytest.raises(ValidationError) as caught:  # the host secret is still missing
        Settings(**{**NONE, "jwt_secret_id": "tmuxi/jwt"})
    assert env_name("host_secret_id") in str(caught.value)
    with pytest.raises(ValidationError) as caught:
        Settings(**{**NONE, "jwt_secret_id": "tmuxi/jwt", "host_secret_id": "tmuxi/host"})
    assert env_name("database_url") in str(caught.value) and env_name("database_secret_id") in str(caught.value)


def test_production_takes_secret_ids_in_place_of_the_values() -> None:
    s = Settings(**{**NONE, "jwt_secret_id": "tmuxi/jwt", "host_secret_id": "tmuxi/host",
                    "database_secret_id": "tmuxi/db", "redis_secret_id": "tmuxi/redis",
                    "redis_url": "rediss://cache.internal:6379/0"})
    assert (s.jwt_secret_id, s.database_secret_id, s.secrets_max_age_s) == ("tmuxi/jwt", "tmuxi/db", 300)


def test_a_placeholder_value_is_still_refused_without_an_id() -> None:
    with pytest.raises(ValidationError):
        Settings(**{**NONE, "jwt_secret": "changeme", "host_secret": "x" * 40, "database_secret_id": "tmuxi/db"})
