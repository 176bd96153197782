"""Lambda entry point of the REST API: the FastAPI app behind Mangum (API Gateway REST proxy events, v1).

Pools (PostgreSQL, Redis, host clients) are created lazily by the services on first use and then reused by
every invocation the execution environment serves.
"""
from __future__ import annotations

from mangum import Mangum
from mangum.adapter import DEFAULT_TEXT_MIME_TYPES

from functions.api.app import app
from tmuxi import snapstart

snapstart.install()  # SnapStart: libraries imported before the snapshot, state re-made after restore

# Recordings (asciicast v2) are UTF-8 text: sent as text, not base64 (which would take a 5 MB one past Lambda's 6 MB
# response limit)
handler = Mangum(app, lifespan="off", text_mime_types=[*DEFAULT_TEXT_MIME_TYPES, "application/x-asciicast"])
