"""EMF from the Lambda functions: invoking a handler prints exactly one CloudWatch embedded-metric document for the
invocation, in the CDK app's namespace, with the guide's request metrics and no high-cardinality dimension; and the
invocation's final log line carries its request id and duration. The invocations here need no PostgreSQL or Redis
(a refused token, a malformed WebSocket event, the API's OpenAPI document)."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cdk.names import METRICS_NAMESPACE
from local.lambda_context import LambdaContext
from tmuxi.events import load_event
from tmuxi.observability import EMF_METRIC_NAMES, logger

ALLOWED_DIMENSIONS = {"service", "environment", "component"}
# CloudWatch's units (MetricDatum.Unit), the values an EMF MetricDefinition's Unit may take
CLOUDWATCH_UNITS = {
    "Seconds", "Microseconds", "Milliseconds", "Bytes", "Kilobytes", "Megabytes", "Gigabytes", "Terabytes", "Bits",
    "Kilobits", "Megabits", "Gigabits", "Terabits", "Percent", "Count", "Bytes/Second", "Kilobytes/Second",
    "Megabytes/Second", "Gigabytes/Second", "Terabytes/Second", "Bits/Second", "Kilobits/Second", "Megabits/Second",
    "Gigabits/Second", "Terabits/Second", "Count/Second", "None"}


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
    """The EMF documents printed on stdout, one a line."""
    out = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    return [d for d in out if "_aws" in d]


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check_emf_shape(doc: dict[str, Any]) -> None:
    """The document as CloudWatch's embedded metric format specification defines it: a root ``_aws`` metadata
    object with a Timestamp in milliseconds since the epoch and an array of MetricDirectives (a Namespace, arrays of
    dimension keys -- at most 30 each, each a root member holding a string -- and at most 100 MetricDefinitions
    with a Name and an optional CloudWatch unit), and for every metric a root member holding a number or an array
    of at most 100 numbers. A document CloudWatch Logs cannot extract is kept as a log line, silently."""
    assert set(doc["_aws"]) == {"Timestamp", "CloudWatchMetrics"}
    timestamp = doc["_aws"]["Timestamp"]
    assert isinstance(timestamp, int) and not isinstance(timestamp, bool)
    assert abs(timestamp - time.time() * 1000) < 60_000, timestamp  # milliseconds, now (not seconds)
    directives = doc["_aws"]["CloudWatchMetrics"]
    assert isinstance(directives, list) and directives
    for directive in directives:
        assert set(directive) <= {"Namespace", "Dimensions", "Metrics"}
        assert isinstance(directive["Namespace"], str) and 0 < len(directive["Namespace"].strip()) <= 1024
        assert isinstance(directive["Dimensions"], list)
        for dimension_set in directive["Dimensions"]:
            assert isinstance(dimension_set, list) and 0 < len(dimension_set) <= 30
            for key in dimension_set:
                assert isinstance(doc.get(key), str) and 0 < len(doc[key]) <= 1024, (key, doc.get(key))
        metrics = directive["Metrics"]
        assert isinstance(metrics, list) and 0 < len(metrics) <= 100
        for metric in metrics:
            assert set(metric) <= {"Name", "Unit", "StorageResolution"}
            assert isinstance(metric["Name"], str) and 0 < len(metric["Name"]) <= 1024
            assert metric.get("Unit", "None") in CLOUDWATCH_UNITS
            assert metric.get("StorageResolution", 60) in (1, 60)
            value = doc[metric["Name"]]
            assert _is_number(value) or (isinstance(value, list) and 0 < len(value) <= 100
                                         and all(_is_number(v) for v in value)), (metric["Name"], value)


def _check_document(doc: dict[str, Any], component: str, request_id: str) -> dict[str, Any]:
    _check_emf_shape(doc)
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
