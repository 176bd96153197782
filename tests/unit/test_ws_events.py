"""The local WebSocket gateway's pure parts: the API Gateway WebSocket events ($connect, MESSAGE, $disconnect) it
builds, its ids and times, the Management API's paths, a function route's reply, and the SigV4 check of
@connections requests against requests signed by botocore's own signer."""
from __future__ import annotations

import base64
import datetime
import hashlib
import json
import time
from collections.abc import Callable

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.utils import parse_timestamp

from local.ws_gateway import (
    ConnectionContext,
    SignatureError,
    SigV4Verifier,
    build_connect_event,
    build_disconnect_event,
    build_message_event,
    close_reason,
    connection_id_of,
    domain_of,
    iso_ms,
    new_id,
    reply_of,
)
from tmuxi.events import EVENTS_DIR

# the keys of API Gateway's own requestContext (a real $connect event, as Powertools keeps it in its test events)
AWS_CONTEXT_KEYS = {"routeKey", "eventType", "extendedRequestId", "requestTime", "messageDirection", "stage",
                    "connectedAt", "requestTimeEpoch", "identity", "requestId", "domainName", "connectionId", "apiId"}
CTX = ConnectionContext("BFHPhfCWIAMCKlQ=", 1731324924553, "10.1.2.3", "Mozilla/5.0", "ws.example", "dev", "abc123")
NOW = 1731324924561


def test_connect_event_has_api_gateways_shape() -> None:
    headers = [("host", "ws.example:8081"), ("sec-websocket-key", "k"), ("x-tag", "a"), ("x-tag", "b")]
    e = build_connect_event(CTX, headers, "ticket=t0k&x=1&x=2", request_id="BFHPhFe3IAMF95g=", now_ms=NOW)
    assert set(e) == {"headers", "multiValueHeaders", "queryStringParameters", "multiValueQueryStringParameters",
                      "requestContext", "isBase64Encoded"}
    rc = e["requestContext"]
    assert set(rc) == AWS_CONTEXT_KEYS
    assert rc["routeKey"] == "$connect" and rc["eventType"] == "CONNECT" and rc["messageDirection"] == "IN"
    assert rc["connectionId"] == "BFHPhfCWIAMCKlQ=" and rc["connectedAt"] == 1731324924553
    assert rc["requestTimeEpoch"] == NOW and rc["requestTime"] == "11/Nov/2024:11:35:24 +0000"
    assert rc["requestId"] == rc["extendedRequestId"] == "BFHPhFe3IAMF95g="
    assert rc["identity"] == {"sourceIp": "10.1.2.3", "userAgent": "Mozilla/5.0"}
    assert rc["stage"] == "dev" and rc["apiId"] == "abc123" and rc["domainName"] == "ws.example"
    assert e["queryStringParameters"] == {"ticket": "t0k", "x": "2"}
    assert e["multiValueQueryStringParameters"] == {"ticket": ["t0k"], "x": ["1", "2"]}
    assert e["headers"]["x-tag"] == "b" and e["multiValueHeaders"]["x-tag"] == ["a", "b"]
    assert e["isBase64Encoded"] is False


def test_connect_event_without_a_query_has_no_query_keys() -> None:
    # as API Gateway sends it: the keys are absent, not null
    e = build_connect_event(CTX, [("host", "h")], "", request_id="r", now_ms=NOW)
    assert "queryStringParameters" not in e and "multiValueQueryStringParameters" not in e


def test_identity_without_a_user_agent_has_only_the_source_ip() -> None:
    ctx = ConnectionContext("c", 1, "127.0.0.1", None, "localhost")
    assert build_connect_event(ctx, [], "", request_id="r", now_ms=2)["requestContext"]["identity"] == {
        "sourceIp": "127.0.0.1"}


def test_message_event_shape() -> None:
    body = json.dumps({"action": "attach", "session_id": "s"})
    e = build_message_event(CTX, "attach", body, request_id="rq=", message_id="msg=", now_ms=NOW)
    assert set(e) == {"requestContext", "body", "isBase64Encoded"}
    rc = e["requestContext"]
    assert set(rc) == AWS_CONTEXT_KEYS | {"messageId"}
    assert rc["routeKey"] == "attach" and rc["eventType"] == "MESSAGE" and rc["messageId"] == "msg="
    assert e["body"] == body and e["isBase64Encoded"] is False


def test_disconnect_event_shape() -> None:
    e = build_disconnect_event(CTX, 1001, "Going away", request_id="rq=", now_ms=NOW)
    rc = e["requestContext"]
    assert set(rc) == AWS_CONTEXT_KEYS | {"disconnectStatusCode", "disconnectReason"}
    assert rc["routeKey"] == "$disconnect" and rc["eventType"] == "DISCONNECT"
    assert rc["disconnectStatusCode"] == 1001 and rc["disconnectReason"] == "Going away"
    assert e["headers"] == {"Host": "ws.example", "x-api-key": "", "X-Forwarded-For": "", "x-restapi": ""}
    assert e["multiValueHeaders"]["Host"] == ["ws.example"]


@pytest.mark.parametrize("name", ["ws_connect", "ws_attach", "ws_disconnect"])
def test_the_sample_events_have_the_shape_the_gateway_builds(name: str) -> None:
    sample = json.loads((EVENTS_DIR / f"{name}.json").read_text())
    built = {
        "ws_connect": build_connect_event(CTX, [("host", "h")], "ticket=t", request_id="r", now_ms=NOW),
        "ws_attach": build_message_event(CTX, "attach", "{}", request_id="r", message_id="m", now_ms=NOW),
        "ws_disconnect": build_disconnect_event(CTX, 1000, "bye", request_id="r", now_ms=NOW),
    }[name]
    assert set(sample) == set(built)
    assert set(sample["requestContext"]) == set(built["requestContext"])
    assert sample["requestContext"]["eventType"] == built["requestContext"]["eventType"]


def test_close_reasons_use_api_gateways_words_unless_the_client_gave_one() -> None:
    assert close_reason(1005) == "Client-side close frame status not set"
    assert close_reason(1000) == "Connection Closed Normally"
    assert close_reason(1000, "bye") == "bye"
    assert close_reason(4321) == ""


def test_ids_look_like_api_gateways() -> None:
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    for i in list(ids)[:50]:
        assert len(i) == 16 and i.endswith("=")
        assert len(base64.urlsafe_b64decode(i)) == 10
        assert "/" not in i and "+" not in i


def test_iso_times_parse_as_botocore_parses_them() -> None:
    ms = 1731324924553
    parsed = parse_timestamp(iso_ms(ms))
    assert parsed == datetime.datetime(2024, 11, 11, 11, 35, 24, 553000, tzinfo=datetime.UTC)


def test_domain_strips_the_port() -> None:
    assert domain_of([("host", "127.0.0.1:8081")]) == "127.0.0.1"
    assert domain_of([("Host", "[::1]")]) == "[::1]"
    assert domain_of([]) == "localhost"


@pytest.mark.parametrize(("path", "expected"), [
    ("/@connections/L0SM9cOFvHcCIhw%3D", "L0SM9cOFvHcCIhw="),
    ("/@connections/abc", "abc"),
    ("/local/@connections/abc", "abc"),
    ("/%40connections/abc", "abc"),
    ("/@connections/", None),
    ("/@connections/a/b", None),
    ("/other/@connections/abc", None),
    ("/connections/abc", None),
])
def test_management_paths(path: str, expected: str | None) -> None:
    assert connection_id_of(path, "local") == expected


def test_a_function_routes_reply_is_its_body() -> None:
    assert reply_of({"statusCode": 200, "body": '{"type":"attached"}'}) == '{"type":"attached"}'
    assert reply_of({"statusCode": 200, "body": base64.b64encode(b"\x00\xff").decode(),
                     "isBase64Encoded": True}) == b"\x00\xff"
    assert reply_of({"statusCode": 200}) is None
    assert reply_of({"statusCode": 200, "body": ""}) is None
    assert reply_of(None) is None


# --- SigV4 ------------------------------------------------------------------------------------------------

AK, SK, REGION = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "us-east-1"
HOST = "127.0.0.1:8081"
PATH = "/@connections/L0SM9cOFvHcCIhw%3D"


def signed(body: bytes = b"hello", *, secret: str = SK, region: str = REGION, service: str = "execute-api",
           method: str = "POST", path: str = PATH, extra: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """The headers botocore's signer puts on a request (as the boto3 client sends it)."""
    request = AWSRequest(method=method, url=f"http://{HOST}{path}", data=body, headers=extra or {})
    SigV4Auth(Credentials(AK, secret), service, region).add_auth(request)
    return [("host", HOST), *((k.lower(), v) for k, v in request.headers.items())]


def verifier() -> SigV4Verifier:
    return SigV4Verifier(AK, SK, REGION)


def test_a_request_signed_by_botocore_verifies() -> None:
    verifier().verify("POST", PATH, "", signed(), b"hello")
    verifier().verify("GET", PATH, "", signed(b"", method="GET"), b"")


def test_unsigned_headers_added_later_do_not_matter() -> None:
    headers = [*signed(), ("user-agent", "curl/8"), ("x-forwarded-for", "1.2.3.4")]
    verifier().verify("POST", PATH, "", headers, b"hello")


def test_a_signed_content_hash_must_be_the_bodys() -> None:
    good = {"X-Amz-Content-SHA256": hashlib.sha256(b"hello").hexdigest()}
    verifier().verify("POST", PATH, "", signed(extra=good), b"hello")
    with pytest.raises(SignatureError, match="does not match the body"):
        verifier().verify("POST", PATH, "", signed(b"hello", extra=good), b"other")


# (signed when the test runs, not when it is collected: a signature older than 5 minutes is refused as expired)
@pytest.mark.parametrize(("headers", "body", "method", "path", "why"), [
    (lambda: [("host", HOST)], b"hello", "POST", PATH, "Missing Authentication Token"),
    (lambda: signed(secret="wrong-secret"), b"hello", "POST", PATH, "does not match"),
    (signed, b"hellO", "POST", PATH, "does not match"),  # the body changed
    (signed, b"hello", "POST", "/@connections/other", "does not match"),  # another connection
    (signed, b"hello", "DELETE", PATH, "does not match"),  # another operation
    (lambda: signed(region="eu-west-1"), b"hello", "POST", PATH, "region"),
    (lambda: signed(service="s3"), b"hello", "POST", PATH, "service"),
    (lambda: [("host", HOST), ("x-amz-date", "20240101T000000Z"),
              ("authorization", "Bearer abc")], b"hello", "POST", PATH, "not an AWS4-HMAC-SHA256"),
])
def test_requests_not_signed_with_our_credentials_are_refused(
        headers: Callable[[], list[tuple[str, str]]], body: bytes, method: str, path: str, why: str) -> None:
    with pytest.raises(SignatureError, match=why):
        verifier().verify(method, path, "", headers(), body)


def test_another_access_key_is_refused() -> None:
    with pytest.raises(SignatureError, match="security token"):
        SigV4Verifier("AKIAOTHERKEY00000000", SK, REGION).verify("POST", PATH, "", signed(), b"hello")


def test_an_old_signature_is_refused() -> None:
    headers = signed()
    verifier().verify("POST", PATH, "", headers, b"hello", now=time.time() + 299)
    with pytest.raises(SignatureError, match="expired"):
        verifier().verify("POST", PATH, "", headers, b"hello", now=time.time() + 400)


def test_a_signature_over_a_header_botocore_never_signs_is_refused() -> None:
    # a signed header list must be exactly what botocore signs (here: a User-Agent claimed to be signed)
    headers = signed()
    auth = dict(headers)["authorization"].replace("SignedHeaders=host;x-amz-date",
                                                  "SignedHeaders=host;user-agent;x-amz-date")
    headers = [(k, v) for k, v in headers if k != "authorization"] + [("authorization", auth), ("user-agent", "u")]
    with pytest.raises(SignatureError, match="would not sign"):
        verifier().verify("POST", PATH, "", headers, b"hello")


def test_a_verifier_needs_credentials() -> None:
    with pytest.raises(ValueError, match="access key"):
        SigV4Verifier("", "", REGION)
