"""Where the API Lambda's time goes, per invocation, in-process (no HTTP, no gateway): the real handler on a
`GET /sessions/{id}` event beside a bare Mangum + FastAPI route, the service call alone and one request log
line. For whoever works on the gateway throughput target (see README, Benchmarks).

    python bench/profile_api.py [--n 3000] [--cprofile] [--exec] [--clients]

``--clients``: the API's host client (tmuxi/host_client.py) beside urllib3 and http.client, the same requests (a
trivial exec, a trivial route) sent to the host by each from this process, interleaved (the order rotating): wall
p50/p95 and CPU per call.
"""
from __future__ import annotations

import argparse
import contextlib
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
    # the handlers' EMF documents go to stdout (CloudWatch reads them there): not to this terminal
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
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
    ap.add_argument("--clients", action="store_true", help="the API's host client beside urllib3 and http.client")
    ap.add_argument("--exec", action="store_true", help="also where a trivial exec's time goes: the host direct, the "
                    "API handler in process, the gateway (interleaved, p50)")
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
        if args.exec:
            exec_breakdown(st, sid, event, api, ctx, args.n // 10)
        if args.clients:
            compare_clients(st, sid, args.n // 10)
        if args.cprofile:
            prof = cProfile.Profile()
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                prof.enable()
                for _ in range(args.n):
                    api(event, ctx)
                prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
            print(out.getvalue())


def exec_breakdown(st: Any, sid: str, get_event: dict[str, Any], api: Callable[..., Any], ctx: Any, n: int) -> None:
    """A trivial exec and a trivial host route (``GET .../execs``), each straight to the host, through the API
    handler in process and through the gateway; interleaved, p50 and p95 in ms, and the engine's own time."""
    from local.gateway import build_rest_event
    from tmuxi import registry
    from tmuxi.settings import get_settings

    def event(method: str, resource: str, body: bytes = b"") -> dict[str, Any]:
        e = build_rest_event(method=method, path=resource.replace("{id}", sid), resource=resource,
                             headers=[("authorization", f"Bearer {st.token}"), ("content-type", "application/json")],
                             query="", path_params={"id": sid}, body=body, source_ip="127.0.0.1", stage="local",
                             api_id="local", account_id="1", stage_variables=None, request_id="profile")
        e["requestContext"]["authorizer"] = get_event["requestContext"]["authorizer"]
        return e

    exec_event, list_event = event("POST", "/sessions/{id}/exec", b'{"command": "true"}'), \
        event("GET", "/sessions/{id}/execs")
    host = httpx.Client(base_url=registry.host_url(next(iter(st.host_ports))),
                        headers={"X-Tmuxi-Host-Secret": get_settings().require_host_secret()})
    gateway = httpx.Client(base_url=st.gateway_url, headers={"authorization": f"Bearer {st.token}"})
    engine_ms: list[float] = []
    ops: dict[str, Callable[[], Any]] = {
        "exec, host direct": lambda: engine_ms.append(host.post(
            f"/v1/sessions/{sid}/exec", json={"command": "true", "timeout_s": 20}).json()["duration_ms"]),
        "exec, API handler": lambda: api(exec_event, ctx),
        "exec, gateway": lambda: gateway.post(f"/sessions/{sid}/exec", json={"command": "true"}),
        "GET /sessions/{id}, gateway": lambda: gateway.get(f"/sessions/{sid}"),
        "GET .../execs, host direct": lambda: host.get(f"/v1/sessions/{sid}/execs"),
        "GET .../execs, API handler": lambda: api(list_event, ctx),
    }
    times: dict[str, list[float]] = {k: [] for k in ops}
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        for i in range(n + 20):
            for name, op in ops.items():
                t = time.perf_counter()
                op()
                if i >= 20:
                    times[name].append((time.perf_counter() - t) * 1000)
    for name, xs in times.items():
        xs.sort()
        print(f"{name:30s} p50 {xs[len(xs) // 2]:.3f} ms  p95 {xs[int(len(xs) * 0.95)]:.3f} ms")
    engine_ms.sort()
    print(f"{'the engine, of the host exec':30s} p50 {engine_ms[len(engine_ms) // 2]:.3f} ms")
    host.close()
    gateway.close()


def compare_clients(st: Any, sid: str, n: int) -> None:
    """An exec of ``true`` and a trivial route (``GET .../execs``) sent to the host by this project's client, by
    urllib3 (pooled, as the API used before) and by http.client (one kept connection): the same requests,
    interleaved, the order rotating."""
    import http.client
    import json
    import statistics

    import urllib3

    from tmuxi import registry
    from tmuxi.host_client import HostClient
    from tmuxi.settings import get_settings

    url = registry.host_url(next(iter(st.host_ports)))
    secret = get_settings().require_host_secret()
    headers = {"X-Tmuxi-Host-Secret": secret, "Content-Type": "application/json"}

    def body() -> bytes:
        return json.dumps({"command": "true", "timeout_s": 20, "exec_id": os.urandom(8).hex()}).encode()

    ours = HostClient(url)
    pool = urllib3.connection_from_url(url, maxsize=8, block=False, retries=False)
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    kept = http.client.HTTPConnection(host, int(port), timeout=25)

    def via_urllib3(method: str, target: str, data: bytes | None) -> bytes:
        r = pool.request(method, target, body=data, headers=headers, timeout=urllib3.Timeout(connect=25, read=25),
                         redirect=False, preload_content=True)
        return bytes(r.data)

    def via_http_client(method: str, target: str, data: bytes | None) -> bytes:
        kept.request(method, target, body=data, headers=headers)
        return kept.getresponse().read()

    def via_ours(method: str, target: str, data: bytes | None) -> bytes:
        return ours._send(method, target, data, headers, 25).content

    clients = {"tmuxi.host_client": via_ours, "urllib3": via_urllib3, "http.client": via_http_client}
    routes = {"exec `true`": ("POST", f"/v1/sessions/{sid}/exec", True, b'"exit_code":0'),
              "GET .../execs": ("GET", f"/v1/sessions/{sid}/execs", False, b'"execs"')}
    print(f"the host's answer by client (n = {n}, interleaved, the order rotating): wall p50 / p95 ms, CPU per call")
    for route, (method, target, with_body, expect) in routes.items():
        walls: dict[str, list[float]] = {k: [] for k in clients}
        cpus: dict[str, list[float]] = {k: [] for k in clients}
        names = list(clients)
        for i in range(n + 20):
            names = names[1:] + names[:1]
            for name in names:
                data = body() if with_body else None
                c, t = time.process_time(), time.perf_counter()
                out = clients[name](method, target, data)
                wall, cpu = (time.perf_counter() - t) * 1000, (time.process_time() - c) * 1000
                if expect not in out:
                    raise SystemExit(f"{name}: {method} {target} answered {out[:200]!r}")
                if i >= 20:
                    walls[name].append(wall)
                    cpus[name].append(cpu)
        for name, xs in walls.items():
            xs.sort()
            print(f"  {route:14s} {name:18s} p50 {xs[len(xs) // 2]:.3f}  p95 {xs[int(len(xs) * 0.95)]:.3f}  "
                  f"cpu {statistics.mean(cpus[name]):.3f}")


if __name__ == "__main__":
    main()
