"""Invoke any Lambda function's handler in-process with an event from a file, as AWS would invoke it.

    python -m local.invoke maintenance events/schedule/cleanup.json
    python -m local.invoke maintenance schedule/reconcile            # a name under events/ (".json" optional)
    python -m local.invoke api rest/health

The handler is ``functions.<function>.handler.handler``; it gets the event and a Lambda-like context
(local/lambda_context.py). The result is printed as JSON on stdout, on the last line (after whatever the handler
logs). Settings come from TMUXI_*; with no TMUXI_DATABASE_URL, the local stack's: its embedded PostgreSQL under
the data dir (started if it is not running, and stopped again afterwards) and its secrets (.data/secrets.json), as
``python -m local.users`` does. Redis: TMUXI_REDIS_URL (the stack's redis-server is on a port of its own run; the
stack logs it), else none -- a task then cannot drop cache entries, which expire within TMUXI_CACHE_TTL_S.
Exit status 1 when the handler raised.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EVENTS = ROOT / "events"


def event_path(given: str) -> Path:
    """A path to an event file, or a name under events/ (with or without ".json", with or without "events/")."""
    candidates = [Path(given), EVENTS / given, EVENTS / f"{given}.json", ROOT / given]
    for c in candidates:
        if c.is_file():
            return c
    raise SystemExit(f"no event file {given!r}: give a path, or a name under {EVENTS} "
                     f"(e.g. schedule/reconcile); there are: "
                     f"{', '.join(sorted(str(p.relative_to(EVENTS)) for p in EVENTS.rglob('*.json')))}")


def invoke(function: str, event: Any, request_id: str | None = None) -> Any:
    """Call ``functions.<function>.handler.handler(event, context)``."""
    from local.lambda_context import LambdaContext

    if not (ROOT / "functions" / function / "handler.py").is_file():
        known = sorted(p.parent.name for p in (ROOT / "functions").glob("*/handler.py"))
        raise SystemExit(f"no function {function!r}: the functions are {', '.join(known)}")
    module = importlib.import_module(f"functions.{function}.handler")
    return module.handler(event, LambdaContext(function_name=function, timeout_s=900, request_id=request_id))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m local.invoke", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("function", help="a directory under functions/ (maintenance, api, ws, authorizer, ...)")
    ap.add_argument("event", help="an event file: a path, or a name under events/ (e.g. schedule/cleanup)")
    args = ap.parse_args(argv)
    path = event_path(args.event)
    try:
        event = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{path} is not JSON: {exc}") from None
    from local.users import _ensure_database

    started = _ensure_database()
    try:
        result = invoke(args.function, event)
    except Exception as exc:  # the handler's own log line says what failed; the status says it failed
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}), file=sys.stderr)
        return 1
    finally:
        if started is not None:
            started.stop()
    print(json.dumps(result, default=str))  # one line, the last: the handler's logs come before it
    return 0


if __name__ == "__main__":
    sys.exit(main())
