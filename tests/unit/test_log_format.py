"""The fast JSON log formatter writes exactly what Powertools' own formatter writes."""
from __future__ import annotations

import io
import json
import logging
import sys
import uuid

import pytest
from aws_lambda_powertools.logging.formatter import LambdaPowertoolsFormatter

from tmuxi.observability import JsonFormatter, _dumps


def _record(msg: object, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord("t", logging.INFO, __file__, 42, msg, args or None, exc_info, func="handler")
    rec.created = 1_700_000_000.123
    rec.msecs = 123.0
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


CASES = [
    pytest.param(lambda: _record("request", method="GET", status=200, duration=1.25), id="request line"),
    pytest.param(lambda: _record("plain"), id="no extras"),
    pytest.param(lambda: _record("with none", error=None, route="/x"), id="None extras dropped"),
    pytest.param(lambda: _record('{"a": 1}'), id="JSON object message"),
    pytest.param(lambda: _record("42"), id="JSON number message"),
    pytest.param(lambda: _record("true"), id="JSON literal message"),
    pytest.param(lambda: _record("user %s", "bob"), id="%-args"),
    pytest.param(lambda: _record({"k": "v"}), id="dict message"),
    pytest.param(lambda: _record("failed", exc=True), id="exception"),
    pytest.param(lambda: _record("ids", session_id=uuid.UUID(int=7), service="overridden"), id="extra overrides"),
]


@pytest.mark.parametrize("make", CASES)
def test_same_output_as_powertools(make) -> None:
    keys = {"service": "tmuxi", "sampling_rate": None}
    fast = JsonFormatter(json_serializer=_dumps, **keys)
    reference = LambdaPowertoolsFormatter(json_serializer=_dumps, **keys)
    for f in (fast, reference):
        f.append_keys(host_id="h1")
    got, want = fast.format(make()), reference.format(make())
    assert json.loads(got) == json.loads(want)
    assert list(json.loads(got)) == list(json.loads(want))  # same key order


def test_custom_key_format_falls_back_to_powertools() -> None:
    fast = JsonFormatter(json_serializer=_dumps, service="tmuxi")
    fast.append_keys(logger_name="%(name)s", level="%(levelname)s!")
    out = json.loads(fast.format(_record("hi")))
    assert out["level"] == "INFO!" and out["message"] == "hi"


def test_logger_writes_one_json_line_per_record() -> None:
    from tmuxi.observability import logger

    buf = io.StringIO()
    handler = logger._logger.handlers[0]
    old = handler.stream  # type: ignore[attr-defined]
    handler.stream = buf  # type: ignore[attr-defined]
    try:
        logger.info("request", extra={"status": 201, "duration": 3.5})
    finally:
        handler.stream = old  # type: ignore[attr-defined]
    line = json.loads(buf.getvalue())
    assert (line["message"], line["status"], line["duration"], line["level"]) == ("request", 201, 3.5, "INFO")
