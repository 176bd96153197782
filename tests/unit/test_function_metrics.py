"""EMF from the Lambda functions: invoking a handler prints exactly one CloudWatch embedded-metric document for the
invocation, in the CDK app's namespace, with the guide's request metrics and no high-cardinality dimension; and the
invocation's final log line carries its request id and duration. The invocations here need no PostgreSQL or Redis
(a refused token, a malformed WebSocket event, the API's OpenAPI document)."""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from cdk.names import METRICS_NAMESPACE
from local.lambda_context import LambdaContext
from tmuxi.events import load_event
from tmuxi.observability import EMF_METRIC_NAMES, logger

ALLOWED_DIMENSIONS = {"service", "environment", "component"}


class _Lines(logging.Handler):
    """The log lines as the functions' logger formats them (its stream is bound to the stdout it started with)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    handler = _Lines()
    handler.setFormatter(logger.registered_formatter)
    logger._logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger._logger.removeHandler(handler)


def _documents(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    """The EMF documents printed on stdout (Powertools prints them)."""
    out = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    return [d for d in out if "_aws" in d]


def _check_document(doc: dict[str, Any], component: str, request_id: str) -> dict[str, Any]:
    (directive,) = doc["_aws"]["CloudWatchMetrics"]
    assert directive["Namespace"] == METRICS_NAMESPACE == "Tmuxi"
    assert [m["Name"] for m in directive["Metrics"]] == list(EMF_METRIC_NAMES)
    assert {m["Name"]: m["Unit"] for m in directive["Metrics"]}["tmux_request_duration_seconds"] == "Seconds"
    (dimensions,) = directive["Dimensions"]
    assert set(dimensions) == ALLOWED_DIMENSIONS  # never a user, session or connection id, nor the route
    assert doc["component"] == component
    assert doc["request_id"] == request_id  # metadata, not a dimension: found with Logs Insights
    assert doc["tmux_requests"] == [1.0]
    assert 0 < doc["tmux_request_duration_seconds"][0] < 5
    return doc


def test_a_refused_token_prints_one_document_counting_an_authentication_failure(
        capsys: pytest.CaptureFixture[str], logged: list[dict[str, Any]]) -> None:
    from functions.authorizer.handler import handler

    event = load_event("authorizer_request")
    event["headers"] = {"authorization": "Bearer not-a-jwt"}
    event["multiValueHeaders"] = {}
    rid = event["requestContext"]["requestId"]
    capsys.readouterr()
    with pytest.raises(Exception, match="^Unauthorized$"):
        handler(event, LambdaContext("authorizer"))
    docs, lines = _documents(capsys), logged
    assert len(docs) == 1, docs
    doc = _check_document(docs[0], "authorizer", rid)
    assert (doc["tmux_authentication_failures"], doc["tmux_errors"], doc["status"]) == ([1.0], [0.0], "refused")
    assert lines[-1]["message"] == "authorization refused"
    assert lines[-1]["correlation_id"] == rid and lines[-1]["duration"] > 0


def test_a_websocket_invocation_prints_one_document(capsys: pytest.CaptureFixture[str],
                                                     logged: list[dict[str, Any]]) -> None:
    from functions.ws.handler import handler

    rid = "ws-metrics-test-request"
    capsys.readouterr()
    response = handler({"requestContext": {"requestId": rid}}, LambdaContext("ws"))  # not a WebSocket event
    assert response["statusCode"] == 400
    docs, lines = _documents(capsys), logged
    assert len(docs) == 1, docs
    doc = _check_document(docs[0], "ws", rid)
    assert (doc["tmux_authentication_failures"], doc["tmux_errors"], doc["status"]) == ([0.0], [0.0], "bad_event")
    assert lines[-1]["message"] == "websocket request"
    assert lines[-1]["correlation_id"] == rid and lines[-1]["duration"] > 0


def test_an_api_request_prints_one_document(capsys: pytest.CaptureFixture[str], logged: list[dict[str, Any]]) -> None:
    from functions.api.handler import handler

    event = load_event("openapi")
    rid = event["requestContext"]["requestId"]
    loop = asyncio.new_event_loop()  # Mangum runs the app on the thread's event loop, as a Lambda runtime has one
    asyncio.set_event_loop(loop)
    try:
        capsys.readouterr()
        response = handler(event, LambdaContext("api"))  # type: ignore[arg-type]
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    assert response["statusCode"] == 200
    docs, lines = _documents(capsys), logged
    assert len(docs) == 1, docs
    doc = _check_document(docs[0], "api", rid)
    assert (doc["tmux_authentication_failures"], doc["tmux_errors"], doc["status"]) == ([0.0], [0.0], "200")
    assert lines[-1]["message"] == "request"
    assert lines[-1]["correlation_id"] == rid and lines[-1]["duration"] > 0
