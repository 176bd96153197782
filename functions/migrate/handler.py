"""Lambda entry point of the deploy-time migration step. The CDK app invokes it on every deploy (a
``triggers.Trigger`` after the database and before the functions that need the new schema); nothing migrates on a
cold start (``tmuxi/db/pool.py`` only checks the schema and refuses with SchemaBehind while it is behind).

It applies the migrations this code ships (``tmuxi.db.migrate``: each in its own transaction, under an advisory
lock, so two deploys never race) to the database of the settings -- ``database_url``, or the secret
``database_secret_id`` (fetched anew once if its password was rotated) -- logs a line per step, and returns the
versions applied (none when the schema is current). A failure raises: the invocation fails, and with it the
deploy, before anything runs against a schema it does not have.

The event is ignored (a Trigger sends its own).
"""
from __future__ import annotations

import time
from typing import Any

from tmuxi.db.migrate import latest_version, migrate_configured
from tmuxi.observability import logger, request_context


def handler(event: Any, context: Any) -> dict[str, Any]:
    # no API request behind it: the invocation's own id is what its lines are found by (correlation_id)
    rid = getattr(context, "aws_request_id", None)
    with request_context(rid if isinstance(rid, str) else None):
        return _migrate()


def _migrate() -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        applied = migrate_configured(progress=lambda line: logger.info("migration step", extra={"step": line}))
    except Exception as exc:
        logger.error("migration failed", extra={
            "status": "error", "error": f"{type(exc).__name__}: {str(exc)[:500]}",
            "duration": round((time.perf_counter() - t0) * 1000, 3)})
        raise
    duration = round((time.perf_counter() - t0) * 1000, 3)
    logger.info("migrations done", extra={"status": "ok", "applied": applied, "schema_version": latest_version(),
                                          "duration": duration})
    return {"status": "ok", "applied": applied, "schema_version": latest_version()}
