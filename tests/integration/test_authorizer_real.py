"""The Lambda REQUEST authorizer (``functions.authorizer.handler``) invoked in-process with the sample event
``events/rest/authorizer_request.json`` and REAL tokens: issued by ``tmuxi.auth.issue_token`` / the login
endpoint for users in the real database, or forged with ``jwt.encode`` (wrong audience, issuer, key, type,
algorithm ``none``, expired, ...). Revocation is checked against the real Redis/PostgreSQL. Nothing of the
project is faked."""
from __future__ import annotations

import os
import shutil
import time
import uuid
from typing import Any

import jwt
import pytest

from functions.authorizer.handler import handler, stage_resource
from local.lambda_context import LambdaContext
from tmuxi.auth import issue_token
from tmuxi.db import repo
from tmuxi.events import load_event
from tmuxi.observability import AUTH_FAILURES, logger
from tmuxi.services import auth as auth_service
from tmuxi.settings import get_settings

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")

ALLOW_ALL_LOCAL = "arn:aws:execute-api:us-east-1:123456789012:local/local/*/*"


def _event(headers: dict[str, str] | None, multi: dict[str, list[str]] | None = None,
           **over: Any) -> dict[str, Any]:
    """The sample authorizer event with exactly these headers (the sample's own are dropped)."""
    event: dict[str, Any] = load_event("authorizer_request", **over)
    event["headers"], event["multiValueHeaders"] = headers, multi
    return event


def _bearer(token: str, name: str = "authorization") -> dict[str, Any]:
    return _event({name: f"Bearer {token}"}, {name: [f"Bearer {token}"]})


def _invoke(event: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = handler(event, LambdaContext("authorizer"))
    return out


def _failures(reason: str) -> float:
    value: float = AUTH_FAILURES.labels(reason=reason)._value.get()
    return value


def _all_failures() -> float:
    return float(sum(s.value for m in AUTH_FAILURES.collect() for s in m.samples if s.name.endswith("_total")))


@pytest.fixture(scope="module")
def user(stack: Any) -> dict[str, Any]:
    name, headers = stack.new_user()
    row = repo.get_user_by_username(name)
    assert row is not None
    return {"name": name, "id": row["id"], "login_token": headers["authorization"].split(" ", 1)[1]}


def _claims(user: dict[str, Any], **over: Any) -> dict[str, Any]:
    s = get_settings()
    now = int(time.time())
    claims: dict[str, Any] = {"sub": str(user["id"]), "name": user["name"], "role": "user",
                              "jti": uuid.uuid4().hex, "iat": now, "nbf": now, "exp": now + 600,
                              "iss": s.jwt_issuer, "aud": s.jwt_audience}
    for k, v in over.items():
        if v is None:
            claims.pop(k, None)
        else:
            claims[k] = v
    return claims


def _forge(claims: dict[str, Any], key: str | None = None, algorithm: str = "HS256",
           typ: str | None = "at+jwt") -> str:
    secret = os.environ["TMUXI_JWT_SECRET"] if key is None else key
    headers = {"typ": typ} if typ is not None else {}
    return jwt.encode(claims, secret, algorithm=algorithm, headers=headers)


def _refused(event: dict[str, Any], caplog: pytest.LogCaptureFixture) -> str:
    """Assert the handler refuses the way API Gateway understands (a bare ``Exception("Unauthorized")``);
    return the refusal reason it logged."""
    caplog.clear()
    with caplog.at_level("INFO"), pytest.raises(Exception, match="^Unauthorized$") as info:
        _invoke(event)
    assert type(info.value) is Exception
    reasons = [getattr(r, "reason", None) for r in caplog.records if r.getMessage() == "authorization refused"]
    assert len(reasons) == 1, caplog.records
    return str(reasons[0])


# --- allow ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Authorization", "authorization", "AUTHORIZATION"])
def test_allow_policy_for_an_issued_token(user: dict[str, Any], name: str) -> None:
    token, _ = issue_token(user["id"], user["name"], "user")
    out = _invoke(_bearer(token, name))
    assert set(out) == {"principalId", "policyDocument", "context"}
    assert out["principalId"] == str(user["id"])
    assert out["policyDocument"] == {"Version": "2012-10-17", "Statement": [{
        "Action": "execute-api:Invoke", "Effect": "Allow", "Resource": ALLOW_ALL_LOCAL}]}
    ctx = out["context"]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert ctx == {"user_id": str(user["id"]), "username": user["name"], "role": "user",
                   "jti": claims["jti"], "exp": str(claims["exp"]), "epoch": "0"}
    assert all(isinstance(v, str | int | float | bool) for v in ctx.values())  # what API Gateway accepts


def test_login_token_and_admin_role(stack: Any, user: dict[str, Any]) -> None:
    out = _invoke(_bearer(user["login_token"]))  # a token from the real /auth/token through the gateway
    assert out["principalId"] == str(user["id"]) and out["context"]["username"] == user["name"]
    name, headers = stack.new_user("admin")
    out = _invoke(_event(dict(headers)))
    assert out["context"]["role"] == "admin" and out["context"]["username"] == name


def test_multi_value_header_and_scheme_case(user: dict[str, Any]) -> None:
    token, _ = issue_token(user["id"], user["name"], "user")
    out = _invoke(_event(None, {"Authorization": [f"bearer {token}"]}))
    assert out["principalId"] == str(user["id"])
    out = _invoke(_event({"authorization": f"BEARER   {token}  "}))
    assert out["principalId"] == str(user["id"])


@pytest.mark.parametrize(
    ("arn", "resource"),
    [("arn:aws:execute-api:eu-west-1:111122223333:abc123/prod/GET/sessions/x",
      "arn:aws:execute-api:eu-west-1:111122223333:abc123/prod/*/*"),
     ("arn:aws:execute-api:eu-west-1:111122223333:abc123/prod/POST/",
      "arn:aws:execute-api:eu-west-1:111122223333:abc123/prod/*/*"),
     ("arn:aws:execute-api:us-east-1:123456789012:local/local/DELETE/sessions/6f1c2a3b",
      ALLOW_ALL_LOCAL)],
)
def test_policy_resource_is_the_whole_stage(user: dict[str, Any], arn: str, resource: str) -> None:
    """Every method of the stage, so a cached policy serves all routes."""
    assert stage_resource(arn) == resource
    token, _ = issue_token(user["id"], user["name"], "user")
    event = _bearer(token)
    event["methodArn"] = arn
    assert _invoke(event)["policyDocument"]["Statement"][0]["Resource"] == resource


# --- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "multi", "reason"),
    [(None, None, "missing"), ({}, {}, "missing"), ({"authorization": ""}, None, "missing"),
     ({"authorization": "  "}, None, "missing"), (None, {"authorization": []}, "missing"),
     ({"x-authorization": "Bearer a.b.c"}, None, "missing"),
     ({"authorization": "Basic dXNlcjpwdw=="}, None, "malformed"), ({"authorization": "Bearer"}, None, "malformed"),
     ({"authorization": "Bearer "}, None, "malformed"), ({"authorization": "Token a.b.c"}, None, "malformed"),
     ({"authorization": "Bearer onlyonepart"}, None, "malformed"),
     ({"authorization": "Bearer a.b.c d"}, None, "malformed")],
)
def test_bad_headers_refused(stack: Any, caplog: pytest.LogCaptureFixture, headers: dict[str, str] | None,
                             multi: dict[str, list[str]] | None, reason: str) -> None:
    before, total = _failures(reason), _all_failures()
    assert _refused(_event(headers, multi), caplog) == reason
    assert _failures(reason) == before + 1 and _all_failures() == total + 1  # counted once


def test_the_sample_events_placeholder_token_is_refused(stack: Any, caplog: pytest.LogCaptureFixture) -> None:
    assert _refused(load_event("authorizer_request"), caplog) == "signature"


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        (lambda u: _forge(_claims(u, aud="someone-else")), "audience"),
        (lambda u: _forge(_claims(u, iss="https://evil.example")), "issuer"),
        (lambda u: _forge(_claims(u, iat=int(time.time()) - 7200, nbf=int(time.time()) - 7200,
                                  exp=int(time.time()) - 3600)), "expired"),
        (lambda u: _forge(_claims(u), key="not-the-secret-" + "k" * 40), "signature"),
        (lambda u: _forge(_claims(u), key="", algorithm="none"), "algorithm"),
        (lambda u: _forge(_claims(u), algorithm="HS512"), "algorithm"),
        (lambda u: _forge(_claims(u), typ="JWT"), "typ"),
        (lambda u: _forge(_claims(u), typ=None), "typ"),
        (lambda u: _forge(_claims(u, jti=None)), "malformed"),
        (lambda u: _forge(_claims(u, aud=None)), "malformed"),
        (lambda u: _forge(_claims(u, nbf=int(time.time()) + 3600)), "not_yet_valid"),
        (lambda u: _forge(_claims(u, role="root")), "claims"),
        (lambda u: _forge(_claims(u, sub="not-a-uuid")), "sub"),
    ],
    ids=["wrong-aud", "wrong-iss", "expired", "wrong-key", "alg-none", "alg-hs512", "typ-jwt", "no-typ",
         "no-jti", "no-aud", "not-yet-valid", "bad-role", "bad-sub"],
)
def test_forged_tokens_refused(user: dict[str, Any], caplog: pytest.LogCaptureFixture, forge: Any,
                               reason: str) -> None:
    token = forge(user)
    before, total = _failures(reason), _all_failures()
    got = _refused(_bearer(token), caplog)
    assert got == reason
    assert _failures(reason) == before + 1 and _all_failures() == total + 1
    assert token not in caplog.text


def test_revoked_token_refused(user: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    token, _ = issue_token(user["id"], user["name"], "user")
    other, _ = issue_token(user["id"], user["name"], "user")
    assert _invoke(_bearer(token))["principalId"] == str(user["id"])
    auth_service.revoke(auth_service.authorize(token))
    before = _failures("revoked")
    assert _refused(_bearer(token), caplog) == "revoked"
    assert _failures("revoked") == before + 1
    assert _invoke(_bearer(other))["principalId"] == str(user["id"])  # only that token


def test_token_never_logged(user: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    good, _ = issue_token(user["id"], user["name"], "user")
    bad = _forge(_claims(user), key="wrong-" + "k" * 40)
    with caplog.at_level("DEBUG"):
        _invoke(_bearer(good))
        with pytest.raises(Exception, match="^Unauthorized$"):
            _invoke(_bearer(bad))
        with pytest.raises(Exception, match="^Unauthorized$"):
            _invoke(_event({"authorization": f"Bearer {bad} extra"}))
    # as written to stdout by the Powertools formatter, and every attribute of every record
    printed = "\n".join(logger.registered_formatter.format(r) for r in caplog.records)
    raw = printed + " ".join(str(r.__dict__) for r in caplog.records)
    assert any(getattr(r, "reason", None) == "signature" for r in caplog.records)
    for secret in (good, bad, good.split(".")[2], bad.split(".")[2], os.environ["TMUXI_JWT_SECRET"]):
        assert secret not in raw
