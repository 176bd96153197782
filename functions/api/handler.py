"""Lambda entry point of the REST API: the FastAPI app behind Mangum (API Gateway REST proxy events, v1).

Pools (PostgreSQL, Redis, host clients) are created lazily by the services on first use and then reused by
every invocation the execution environment serves.
"""
from __future__ import annotations

from mangum import Mangum

from functions.api.app import app

handler = Mangum(app, lifespan="off")
