"""Access tokens per RFC 8725: pinned algorithm, explicit type, exp/aud/iss required and checked."""
from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator

import jwt
import pytest

from tmuxi import auth
from tmuxi.errors import Unauthorized
from tmuxi.settings import get_settings

SECRET = "unit-test-secret-" + "x" * 40


@pytest.fixture(autouse=True)
def _jwt_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TMUXI_JWT_SECRET", SECRET)
    monkeypatch.setenv("TMUXI_JWT_ISSUER", "tmuxi-test")
    monkeypatch.setenv("TMUXI_JWT_AUDIENCE", "tmuxi-api-test")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _claims(**over: object) -> dict[str, object]:
    now = int(time.time())
    c: dict[str, object] = {"sub": str(uuid.uuid4()), "name": "alice", "role": "user", "jti": uuid.uuid4().hex,
                            "iat": now, "nbf": now, "exp": now + 600, "iss": "tmuxi-test", "aud": "tmuxi-api-test"}
    c.update(over)
    return c


def _sign(claims: dict[str, object], key: str = SECRET, alg: str = "HS256", typ: str | None = "at+jwt") -> str:
    headers = {"typ": typ} if typ else {}
    return jwt.encode(claims, key, algorithm=alg, headers=headers)


def _reason(token: str) -> str:
    with pytest.raises(Unauthorized) as ei:
        auth.decode_token(token)
    return str(ei.value.details.get("reason"))


def test_issued_token_round_trips() -> None:
    uid = uuid.uuid4()
    token, ttl = auth.issue_token(uid, "alice", "admin", epoch=7)
    claims = auth.decode_token(token)
    assert claims["sub"] == str(uid) and claims["role"] == "admin" and ttl == get_settings().jwt_ttl_s
    assert claims["epoch"] == 7
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


def test_expired_token_refused() -> None:
    past = int(time.time()) - 3600
    assert _reason(_sign(_claims(iat=past, nbf=past, exp=past + 60))) == "expired"


def test_wrong_signature_refused() -> None:
    assert _reason(_sign(_claims(), key="another-secret-" + "y" * 40)) == "signature"


def test_alg_none_refused() -> None:
    header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "typ": "at+jwt"}).encode()).rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps(_claims()).encode()).rstrip(b"=")
    token = (header + b"." + body + b".").decode()
    assert _reason(token) in ("algorithm", "malformed")


def test_other_hmac_algorithm_refused() -> None:
    assert _reason(_sign(_claims(), alg="HS512")) == "algorithm"


def test_wrong_audience_and_issuer_refused() -> None:
    assert _reason(_sign(_claims(aud="someone-else"))) == "audience"
    assert _reason(_sign(_claims(iss="evil"))) == "issuer"


@pytest.mark.parametrize("missing", ["exp", "aud", "iss", "jti", "sub"])
def test_required_claims(missing: str) -> None:
    c = _claims()
    del c[missing]
    with pytest.raises(Unauthorized):
        auth.decode_token(_sign(c))


def test_type_header_required() -> None:
    assert _reason(_sign(_claims(), typ=None)) == "typ"
    assert _reason(_sign(_claims(), typ="JWT")) == "typ"


def test_malformed_refused() -> None:
    for junk in ["", "abc", "a.b.c", "Bearer x", "\x00\xff"]:
        with pytest.raises(Unauthorized):
            auth.decode_token(junk)


def test_bad_role_refused() -> None:
    assert _reason(_sign(_claims(role="root"))) == "claims"


def test_password_hash_verifies_only_the_right_password() -> None:
    h = auth.hash_password("correct horse")
    assert auth.verify_password("correct horse", h)
    assert not auth.verify_password("wrong horse", h)
    assert not auth.verify_password("correct horse", None)
    assert h != auth.hash_password("correct horse")  # salted


def test_not_yet_valid_refused() -> None:
    future = int(time.time()) + 600
    assert _reason(_sign(_claims(nbf=future, iat=future, exp=future + 600))) == "not_yet_valid"


def test_epoch_claim_defaults_to_zero_and_must_be_a_natural_number() -> None:
    assert auth.decode_token(_sign(_claims()))["epoch"] == 0  # issued before epochs: every user's first one
    assert auth.decode_token(_sign(_claims(epoch=3)))["epoch"] == 3
    for bad in (-1, "1", 1.5, True, None, [1]):
        assert _reason(_sign(_claims(epoch=bad))) == "claims", bad
