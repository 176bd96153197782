"""Sample API Gateway events (``events/``) for tests and local invocation.

``load_event("get_session", pathParameters={"id": sid}, requestContext={"authorizer": ctx})`` loads
``events/rest/get_session.json`` and deep-merges the overrides. Conveniences that keep an event coherent:

* a ``pathParameters`` override re-renders ``path`` (and ``requestContext.path``, ``methodArn``) from the
  ``resource`` template unless ``path`` is overridden too -- Mangum routes on ``path``;
* a ``body`` given as a dict/list is JSON-encoded; ``body`` given as bytes becomes text, or base64 with
  ``isBase64Encoded: true`` when it is not UTF-8;
* an override value of ``None`` sets the key to ``None`` (API Gateway uses nulls, not missing keys).
"""
from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

EVENTS_DIR = Path(__file__).resolve().parents[2] / "events"


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A new dict: ``overrides`` merged into ``base`` recursively (dicts merge, everything else replaces)."""
    out = dict(base)
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def event_path(name: str, events_dir: Path | None = None) -> Path:
    """``"get_session"`` / ``"rest/get_session"`` / ``"rest/get_session.json"`` / a file path -> the file."""
    p = Path(name)
    if p.suffix == ".json" and p.is_file():
        return p
    base = events_dir or EVENTS_DIR
    stem = name[:-5] if name.endswith(".json") else name
    for candidate in (base / f"{stem}.json", base / "rest" / f"{stem}.json"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no sample event {name!r} under {base}")


def _render_path(resource: str, params: dict[str, Any]) -> str:
    path = resource
    for k, v in params.items():
        path = path.replace("{" + k + "}", quote(str(v), safe=""))
    return path


def load_event(name: str, events_dir: Path | None = None, **overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(event_path(name, events_dir).read_text())
    body = overrides.pop("body", ...)
    if body is not ...:
        if isinstance(body, dict | list):
            event["body"], event["isBase64Encoded"] = json.dumps(body), False
        elif isinstance(body, bytes):
            try:
                event["body"], event["isBase64Encoded"] = body.decode("utf-8"), False
            except UnicodeDecodeError:
                event["body"], event["isBase64Encoded"] = base64.b64encode(body).decode(), True
        else:
            event["body"] = body
    event = deep_merge(event, overrides)
    if "pathParameters" in overrides and "path" not in overrides and event.get("resource"):
        event["path"] = _render_path(event["resource"], event.get("pathParameters") or {})
        rc = event.get("requestContext")
        if isinstance(rc, dict) and rc.get("stage") and "path" not in (overrides.get("requestContext") or {}):
            rc["path"] = f"/{rc['stage']}{event['path']}"
        arn = event.get("methodArn")
        if isinstance(arn, str) and "methodArn" not in overrides:
            prefix = arn.split("/", 2)[:2]  # arn:...:apiId, stage
            event["methodArn"] = "/".join([*prefix, event.get("httpMethod", "GET")]) + event["path"]
    return event


def authorizer_context(principal_id: str, **context: Any) -> dict[str, Any]:
    """``requestContext.authorizer`` as API Gateway REST puts it into a proxy event (values as strings)."""
    ctx: dict[str, Any] = {k: ("true" if v is True else "false" if v is False else str(v))
                           for k, v in context.items()}
    ctx["principalId"] = principal_id
    ctx["integrationLatency"] = 0
    return ctx
