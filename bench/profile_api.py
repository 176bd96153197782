"""Where the API Lambda's time goes, per invocation, in-process (no HTTP, no gateway): the real handler on a
`GET /sessions/{id}` event beside a bare Mangum + FastAPI route, the service call alone and one request log
line. For whoever works on the gateway throughput target (see README, Benchmarks).

    python bench/profile_api.py [--n 3000] [--cprofile]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "layers", ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import httpx  # noqa: E402

from bench.common import local_stack, machine  # noqa: E402


def per_call_us(fn: Callable[[], Any], n: int) -> float:
    for _ in range(min(300, n)):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return round((time.perf_counter() - t0) / n * 1e6, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--cprofile", action="store_true", help="also print the top functions of the real handler")
    args = ap.parse_args()
    with local_stack(hosts=1) as st:
        with httpx.Client(base_url=st.gateway_url, headers={"authorization": f"Bearer {st.token}"}) as c:
            sid = c.post("/sessions", json={"name": "profile"}).json()["id"]
        from fastapi import FastAPI
        from mangum import Mangum

        from functions.api.handler import handler as api
        from functions.authorizer.handler import handler as authz
        from local.gateway import authorizer_request_context, build_authorizer_event, build_rest_event, evaluate_policy
        from local.lambda_context import LambdaContext
        from tmuxi.observability import logger
        from tmuxi.services import auth as auth_service
        from tmuxi.services import sessions as sessions_service

        for h in logger._logger.handlers:  # keep the terminal readable; the formatting work still happens
            h.stream = open(os.devnull, "w")  # type: ignore[attr-defined]  # noqa: SIM115
        event = build_rest_event(
            method="GET", path=f"/sessions/{sid}", resource="/sessions/{id}",
            headers=[("authorization", f"Bearer {st.token}")], query="", path_params={"id": sid}, body=b"",
            source_ip="127.0.0.1", stage="local", api_id="local", account_id="1", stage_variables=None,
            request_id="profile")
        auth_event = build_authorizer_event(event)
        _, principal_id, context = evaluate_policy(authz(auth_event, LambdaContext("authorizer")),
                                                   auth_event["methodArn"])
        event["requestContext"]["authorizer"] = authorizer_request_context(principal_id, context, 0)
        ctx = LambdaContext("api")
        bare = FastAPI()

        @bare.get("/sessions/{id}")
        async def get(id: str) -> dict[str, Any]:  # noqa: A002
            return {"id": id, "name": "bench", "state": "active", "cols": 120, "rows": 40}

        bare_handler = Mangum(bare, lifespan="off")
        p = auth_service.principal_from_context(event["requestContext"]["authorizer"])
        sid_uuid = uuid.UUID(sid)
        print(f"machine: {machine()}")
        print(f"real API handler, GET /sessions/{{id}}: {per_call_us(lambda: api(event, ctx), args.n)} us")
        print(f"bare Mangum + FastAPI route:          {per_call_us(lambda: bare_handler(event, ctx), args.n)} us")
        print(f"services.sessions.get_session alone:  "
              f"{per_call_us(lambda: sessions_service.get_session(p, sid_uuid), args.n)} us")
        print(f"authorizer handler (uncached path):   "
              f"{per_call_us(lambda: authz(auth_event, LambdaContext('authorizer')), args.n // 3)} us")
        line = {"method": "GET", "route": "/sessions/{id}", "status": 200, "duration": 1.0}
        log_us = per_call_us(lambda: logger.info("request", extra=line), args.n)
        print(f"one request log line (microbench):    {log_us} us")
        if args.cprofile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.n):
                api(event, ctx)
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
            print(out.getvalue())


if __name__ == "__main__":
    main()
