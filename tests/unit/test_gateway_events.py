"""The local gateway's pure parts: REST proxy v1 events, authorizer events, route matching, policy
evaluation, proxy-result translation, and the sample events (all without a database)."""
from __future__ import annotations

import base64
import json

import pytest
from mangum.handlers.api_gateway import APIGateway

from local.gateway import (
    AuthorizerConfigurationError,
    MalformedLambdaResponse,
    authorizer_request_context,
    build_authorizer_event,
    build_rest_event,
    evaluate_policy,
    translate_response,
)
from tmuxi.events import EVENTS_DIR, deep_merge, load_event
from tmuxi.routes import GATEWAY_RESPONSES, ROUTES, RouteTable

SID = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b"

REST_KEYS = {"resource", "path", "httpMethod", "headers", "multiValueHeaders", "queryStringParameters",
             "multiValueQueryStringParameters", "pathParameters", "stageVariables", "requestContext", "body",
             "isBase64Encoded"}
CONTEXT_KEYS = {"requestId", "stage", "resourcePath", "httpMethod", "identity", "requestTimeEpoch", "apiId",
                "accountId", "path", "protocol", "requestTime", "domainName", "resourceId"}


def _event(**kw: object) -> dict:
    base: dict = {"method": "GET", "path": f"/sessions/{SID}", "resource": "/sessions/{id}",
                  "path_params": {"id": SID}}
    base.update(kw)
    return build_rest_event(**base)  # type: ignore[arg-type]


def test_rest_event_shape() -> None:
    e = _event(headers=[("host", "localhost:8080"), ("authorization", "Bearer a.b.c")], source_ip="10.1.2.3",
               stage="dev", request_id="rid-1", now_ms=1764158220123)
    assert set(e) == REST_KEYS
    rc = e["requestContext"]
    assert set(rc) >= CONTEXT_KEYS
    assert rc["requestId"] == "rid-1" and rc["stage"] == "dev" and rc["resourcePath"] == "/sessions/{id}"
    assert rc["httpMethod"] == "GET" and rc["identity"]["sourceIp"] == "10.1.2.3"
    assert rc["requestTimeEpoch"] == 1764158220123 and rc["requestTime"] == "26/Nov/2025:11:57:00 +0000"
    assert rc["path"] == f"/dev/sessions/{SID}" and rc["domainName"] == "localhost"
    assert e["pathParameters"] == {"id": SID}
    assert e["body"] is None and e["isBase64Encoded"] is False
    assert e["queryStringParameters"] is None and e["multiValueQueryStringParameters"] is None
    assert e["stageVariables"] is None
    assert "authorizer" not in rc  # added by the gateway only after the authorizer allowed


def test_headers_and_query_single_and_multi_value() -> None:
    e = _event(headers=[("accept", "a/b"), ("x-tag", "one"), ("x-tag", "two")], query="a=1&a=2&b=&c=x%20y")
    assert e["headers"]["x-tag"] == "two"
    assert e["multiValueHeaders"]["x-tag"] == ["one", "two"]
    assert e["queryStringParameters"] == {"a": "2", "b": "", "c": "x y"}
    assert e["multiValueQueryStringParameters"] == {"a": ["1", "2"], "b": [""], "c": ["x y"]}


def test_body_text_and_base64() -> None:
    e = _event(method="POST", body='{"text": "h\u00e9"}'.encode())
    assert e["body"] == '{"text": "h\u00e9"}' and e["isBase64Encoded"] is False
    raw = b"\xff\xfe\x00binary"
    e = _event(method="POST", body=raw)
    assert e["isBase64Encoded"] is True and base64.b64decode(e["body"]) == raw


def test_mangum_reads_the_event_like_api_gateway() -> None:
    e = _event(headers=[("host", "localhost:8080"), ("content-type", "application/json")],
               query="include_ended=true&x=1&x=2", method="POST", body=b"\xff\x00")
    handler = APIGateway(e, None, {"api_gateway_base_path": "/", "text_mime_types": [], "exclude_headers": []})
    scope = handler.scope
    assert scope["path"] == f"/sessions/{SID}" and scope["method"] == "POST"
    assert scope["query_string"] == b"include_ended=true&x=1&x=2"
    assert scope["client"] == ("127.0.0.1", 0)
    assert handler.body == b"\xff\x00"


def test_authorizer_event_shape() -> None:
    rest = _event(headers=[("authorization", "Bearer a.b.c")], stage="prod", api_id="abc123",
                  account_id="111122223333")
    a = build_authorizer_event(rest, region="eu-west-1")
    assert a["type"] == "REQUEST"
    assert a["methodArn"] == f"arn:aws:execute-api:eu-west-1:111122223333:abc123/prod/GET/sessions/{SID}"
    assert a["headers"]["authorization"] == "Bearer a.b.c"
    assert a["resource"] == "/sessions/{id}" and a["pathParameters"] == {"id": SID}
    assert "body" not in a


@pytest.mark.parametrize(
    ("method", "path", "resource", "params"),
    [
        ("POST", "/auth/token", "/auth/token", {}),
        ("GET", "/sessions", "/sessions", {}),
        ("POST", "/sessions", "/sessions", {}),
        ("GET", f"/sessions/{SID}", "/sessions/{id}", {"id": SID}),
        ("DELETE", f"/sessions/{SID}", "/sessions/{id}", {"id": SID}),
        ("GET", f"/sessions/{SID}/screen", "/sessions/{id}/screen", {"id": SID}),
        ("POST", f"/sessions/{SID}/exec", "/sessions/{id}/exec", {"id": SID}),
        ("GET", "/sessions/a%20b", "/sessions/{id}", {"id": "a b"}),
        ("GET", "/sessions/", "/sessions", {}),
    ],
)
def test_route_matching(method: str, path: str, resource: str, params: dict[str, str]) -> None:
    found = RouteTable().match(method, path)
    assert found is not None
    route, got = found
    assert route.resource == resource and got == params


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/nope"), ("PUT", "/sessions"), ("GET", f"/sessions/{SID}/nope"), ("GET", "/sessions//screen"),
     ("POST", "/health"), ("GET", "/")],
)
def test_unknown_routes(method: str, path: str) -> None:
    assert RouteTable().match(method, path) is None


def test_route_table_protection() -> None:
    public = {(r.method, r.resource) for r in ROUTES if not r.protected}
    assert public == {("POST", "/auth/token"), ("GET", "/auth/health"), ("GET", "/health"),
                      ("GET", "/openapi.json"), ("GET", "/docs"),
                      ("POST", "/ws/share-tickets")}  # a share token in the body is the credential


def test_gateway_responses() -> None:
    u = GATEWAY_RESPONSES["UNAUTHORIZED"]
    assert u.status == 401
    assert json.loads(u.template()) == {"error": {"code": "unauthorized", "message":
                                                  "missing, malformed, expired, revoked or wrongly signed token"}}
    assert GATEWAY_RESPONSES["ACCESS_DENIED"].status == 403
    assert GATEWAY_RESPONSES["MISSING_AUTHENTICATION_TOKEN"].status == 404
    assert GATEWAY_RESPONSES["INTEGRATION_TIMEOUT"].status == 504
    assert GATEWAY_RESPONSES["REQUEST_TOO_LARGE"].status == 413


ARN = f"arn:aws:execute-api:us-east-1:123456789012:api/local/GET/sessions/{SID}"


def _policy(*statements: dict, context: dict | None = None) -> dict:
    return {"principalId": "u1", "policyDocument": {"Version": "2012-10-17", "Statement": list(statements)},
            "context": context or {"role": "user", "n": 3, "ok": True}}


def test_policy_allow_wildcard() -> None:
    st = {"Action": "execute-api:Invoke", "Effect": "Allow",
          "Resource": "arn:aws:execute-api:us-east-1:123456789012:api/local/*/*"}
    allowed, pid, ctx = evaluate_policy(_policy(st), ARN)
    assert allowed and pid == "u1" and ctx["n"] == 3


def test_policy_deny_wins_and_no_match_denies() -> None:
    allow = {"Action": "execute-api:Invoke", "Effect": "Allow", "Resource": "arn:aws:execute-api:*"}
    deny = {"Action": "execute-api:Invoke", "Effect": "Deny", "Resource": [ARN]}
    assert evaluate_policy(_policy(allow, deny), ARN)[0] is False
    other = {"Action": "execute-api:Invoke", "Effect": "Allow",
             "Resource": "arn:aws:execute-api:us-east-1:123456789012:api/prod/*/*"}
    assert evaluate_policy(_policy(other), ARN)[0] is False


@pytest.mark.parametrize(
    "bad",
    [None, {"principalId": "x"}, {"policyDocument": {}},
     {"principalId": "x", "policyDocument": {"Statement": []}, "context": {"nested": {"a": 1}}}],
)
def test_policy_configuration_errors(bad: object) -> None:
    with pytest.raises(AuthorizerConfigurationError):
        evaluate_policy(bad, ARN)


def test_authorizer_context_values_become_strings() -> None:
    ctx = authorizer_request_context("u1", {"exp": 12, "ok": True, "name": "a"}, 4)
    assert ctx == {"exp": "12", "ok": "true", "name": "a", "principalId": "u1", "integrationLatency": 4}


def test_translate_response() -> None:
    status, headers, body = translate_response({
        "statusCode": 201, "headers": {"Content-Type": "application/json", "content-length": "999", "x-a": "1"},
        "multiValueHeaders": {"set-cookie": ["a=1", "b=2"], "x-a": ["2", "3"]},
        "body": '{"ok":true}', "isBase64Encoded": False,
    })
    assert status == 201 and body == b'{"ok":true}'
    assert (b"content-type", b"application/json") in headers
    assert [v for k, v in headers if k == b"set-cookie"] == [b"a=1", b"b=2"]
    assert [v for k, v in headers if k == b"x-a"] == [b"2", b"3"]  # multi-value wins
    assert not any(k == b"content-length" for k, _ in headers)  # recomputed by the gateway
    status, _, body = translate_response({"statusCode": 200, "body": base64.b64encode(b"\xff").decode(),
                                          "isBase64Encoded": True})
    assert body == b"\xff"
    assert translate_response({"statusCode": 204, "body": ""})[2] == b""


@pytest.mark.parametrize("bad", [None, {}, {"statusCode": "200"}, {"statusCode": 200, "body": {"a": 1}},
                                 {"statusCode": 200, "body": "!!", "isBase64Encoded": True}])
def test_translate_malformed(bad: object) -> None:
    with pytest.raises(MalformedLambdaResponse):
        translate_response(bad)


# --- sample events ----------------------------------------------------------------------------------------


def test_sample_events_are_valid_rest_events() -> None:
    files = sorted((EVENTS_DIR / "rest").glob("*.json"))
    names = {f.stem for f in files}
    assert {"token", "create_session", "get_session", "exec", "authorizer_request"} <= names
    table = RouteTable()
    for f in files:
        e = json.loads(f.read_text())
        if f.stem == "authorizer_request":
            assert e["type"] == "REQUEST" and e["methodArn"].startswith("arn:aws:execute-api:")
            continue
        assert set(e) == REST_KEYS, f
        found = table.match(e["httpMethod"], e["path"])
        assert found is not None and found[0].resource == e["resource"], f
        assert ("authorizer" in e["requestContext"]) == found[0].protected, f


def test_load_event_overrides() -> None:
    e = load_event("get_session", pathParameters={"id": "abc"},
                   requestContext={"authorizer": {"role": "admin"}})
    assert e["path"] == "/sessions/abc" and e["requestContext"]["path"].endswith("/sessions/abc")
    assert e["requestContext"]["authorizer"]["role"] == "admin"
    assert e["requestContext"]["authorizer"]["principalId"]  # merged, not replaced
    e = load_event("exec", body={"command": "ls"})
    assert json.loads(e["body"]) == {"command": "ls"} and e["isBase64Encoded"] is False
    e = load_event("input", body=b"\xff")
    assert e["isBase64Encoded"] is True
    a = load_event("authorizer_request", pathParameters={"id": "xyz"})
    assert a["methodArn"].endswith("/local/GET/sessions/xyz")
    assert load_event("rest/token.json")["resource"] == "/auth/token"
    with pytest.raises(FileNotFoundError):
        load_event("nope")


def test_deep_merge_does_not_mutate() -> None:
    base = {"a": {"b": 1, "c": 2}}
    out = deep_merge(base, {"a": {"b": 3}})
    assert out == {"a": {"b": 3, "c": 2}} and base == {"a": {"b": 1, "c": 2}}
