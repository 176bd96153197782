"""Benchmark: authenticated ``GET /sessions/{id}`` through the local API gateway vs a bare FastAPI endpoint.

All servers run under uvicorn with the same options (httptools, uvloop, no access log): the gateway with its
worker processes (one per core by default), bare FastAPI with one process (the target's baseline) and with as
many processes as the gateway (the stricter comparison, also reported). They are measured in alternating
rounds in the same run, on loopback, each for a bounded time at the same concurrency; the ratio is the median
of the rounds' ratios (a shared machine's speed drifts over minutes). The load
generator is ``wrk`` (``apt-get install -y wrk``) with a Lua script that sets the Authorization header and
reports latency percentiles; without wrk, an asyncio + httpx client in a separate process is used instead.

Modes:
  --url URL --token JWT --session ID   measure an already running gateway (e.g. ``make run``)
  --stack                              self-contained: start a LocalStack (embedded PostgreSQL, Redis, one tmux
                                       host, the gateway), create a user and a session, measure, stop

Targets: ratio (gateway RPS / bare RPS) >= 0.5 and gateway p95 <= 15 ms (``--check`` exits 1 if missed).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SESSION_ID = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b"
TARGET_RATIO = 0.5
TARGET_P95_MS = 15.0

UVICORN_OPTS: dict[str, Any] = {"loop": "uvloop", "http": "httptools", "workers": 1, "access_log": False,
                                "log_level": "warning", "lifespan": "on"}


# --- servers (run as child processes of this script) -----------------------------------------------------


def _bare_app() -> Any:
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/sessions/{id}")
    async def get_session(id: str) -> dict[str, Any]:  # noqa: A002
        return {"id": id, "name": "bench", "state": "active", "cols": 120, "rows": 40}

    return app


def _serve(app: Any, port: int, workers: int = 1) -> None:
    """Serve an app object (one process) or, with ``workers`` > 1, an app factory given as an import string."""
    import uvicorn

    opts = dict(UVICORN_OPTS)
    opts.pop("workers")
    if workers > 1:
        uvicorn.run(app, host="127.0.0.1", port=port, factory=True, workers=workers, **opts)
    else:
        uvicorn.run(app, host="127.0.0.1", port=port, **opts)


def _child_main(kind: str, port: int) -> None:
    sys.path[:0] = [str(ROOT / "layers"), str(ROOT)]
    if kind == "bare":
        _serve(_bare_app(), port)
    elif kind.startswith("bare-workers-"):  # the same bare endpoint, as many processes as the gateway has
        _serve("bench.bench_gateway:_bare_app", port, workers=int(kind.rsplit("-", 1)[1]))
    elif kind == "null-gateway":  # the gateway's own overhead: trivial Lambda handlers
        from local.gateway import create_gateway_app

        policy = {"principalId": "u", "policyDocument": {"Version": "2012-10-17", "Statement": [
            {"Action": "execute-api:Invoke", "Effect": "Allow", "Resource": "arn:aws:execute-api:*"}]},
            "context": {"user_id": "u"}}
        response = {"statusCode": 200, "headers": {"content-type": "application/json"},
                    "multiValueHeaders": {}, "body": '{"id": "x"}', "isBase64Encoded": False}
        kw = json.loads(os.environ.get("BENCH_GATEWAY_KWARGS") or "{}")
        _serve(create_gateway_app(api_handler=lambda e, c: response, authorizer_handler=lambda e, c: policy,
                                  **kw), port)
    else:
        raise SystemExit(f"unknown child kind {kind}")


@contextlib.contextmanager
def _child_server(kind: str, env: dict[str, str] | None = None) -> Iterator[str]:
    from local.services import free_port, wait_for_port

    port = free_port()
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "layers"), str(ROOT)])
    log = tempfile.TemporaryFile()  # noqa: SIM115 - the child's stdout (request log lines), as in the stack
    proc = subprocess.Popen([sys.executable, __file__, "--_child", kind, "--_port", str(port)], env=child_env,
                            cwd=ROOT, stdout=log)
    try:
        wait_for_port("127.0.0.1", port, timeout_s=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# --- load generators --------------------------------------------------------------------------------------

_WRK_LUA = """
wrk.method = "GET"
local token = os.getenv("BENCH_TOKEN")
if token and token ~= "" then wrk.headers["Authorization"] = "Bearer " .. token end
done = function(summary, latency, requests)
  io.write(string.format(
    "BENCH_JSON {\\"requests\\":%d,\\"duration_us\\":%d,\\"errors_status\\":%d,\\"errors_connect\\":%d," ..
    "\\"errors_read\\":%d,\\"errors_timeout\\":%d,\\"p50_us\\":%d,\\"p95_us\\":%d,\\"p99_us\\":%d," ..
    "\\"mean_us\\":%f,\\"max_us\\":%d}\\n",
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect, summary.errors.read,
    summary.errors.timeout, latency:percentile(50), latency:percentile(95), latency:percentile(99),
    latency.mean, latency.max))
end
"""


def run_wrk(url: str, token: str | None, duration_s: float, connections: int, threads: int = 1) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_WRK_LUA)
        script = f.name
    try:
        env = dict(os.environ, BENCH_TOKEN=token or "")
        cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, int(duration_s))}s",
               "--timeout", "5s", "-s", script, url]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=duration_s + 30, check=True)
    finally:
        os.unlink(script)
    line = next(x for x in out.stdout.splitlines() if x.startswith("BENCH_JSON "))
    raw = json.loads(line[len("BENCH_JSON "):])
    seconds = raw["duration_us"] / 1e6
    errors = raw["errors_status"] + raw["errors_connect"] + raw["errors_read"] + raw["errors_timeout"]
    return {"tool": "wrk", "requests": raw["requests"], "seconds": round(seconds, 3),
            "rps": round(raw["requests"] / seconds, 1), "errors": errors,
            "p50_ms": raw["p50_us"] / 1000, "p95_ms": raw["p95_us"] / 1000, "p99_ms": raw["p99_us"] / 1000,
            "mean_ms": round(raw["mean_us"] / 1000, 3), "max_ms": raw["max_us"] / 1000}


def _httpx_load(url: str, token: str | None, duration_s: float, connections: int) -> dict[str, Any]:
    import httpx

    headers = {"authorization": f"Bearer {token}"} if token else {}
    latencies: list[float] = []
    errors = 0

    async def main() -> float:
        nonlocal errors
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(limits=limits, timeout=5) as client:
            deadline = time.perf_counter() + duration_s

            async def worker() -> None:
                nonlocal errors
                while time.perf_counter() < deadline:
                    t0 = time.perf_counter()
                    try:
                        r = await client.get(url, headers=headers)
                        if r.status_code >= 400:
                            errors += 1
                    except httpx.HTTPError:
                        errors += 1
                    latencies.append(time.perf_counter() - t0)

            t_start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(connections)))
            return time.perf_counter() - t_start

    try:
        import uvloop

        seconds = uvloop.run(main())
    except ImportError:
        seconds = asyncio.run(main())
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(len(latencies) * p / 100))] * 1000, 3)

    return {"tool": "httpx", "requests": len(latencies), "seconds": round(seconds, 3),
            "rps": round(len(latencies) / seconds, 1), "errors": errors, "p50_ms": pct(50), "p95_ms": pct(95),
            "p99_ms": pct(99), "mean_ms": round(sum(latencies) / len(latencies) * 1000, 3),
            "max_ms": round(latencies[-1] * 1000, 3)}


def run_httpx(url: str, token: str | None, duration_s: float, connections: int) -> dict[str, Any]:
    """The fallback client, in a child process (keeps its CPU off this process)."""
    out = subprocess.run(
        [sys.executable, __file__, "--_httpx", url, "--_duration", str(duration_s), "--_connections",
         str(connections)],
        capture_output=True, text=True, env=dict(os.environ, BENCH_TOKEN=token or ""), timeout=duration_s + 60,
        check=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def load(url: str, token: str | None, duration_s: float, connections: int, tool: str) -> dict[str, Any]:
    if tool == "wrk":
        return run_wrk(url, token, duration_s, connections)
    return run_httpx(url, token, duration_s, connections)


# --- the benchmark ----------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_before": os.getloadavg()}


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-field medians over rounds (RPS, percentiles), errors summed, and each round's RPS kept."""
    out: dict[str, Any] = {"tool": runs[0]["tool"], "rounds_rps": [r["rps"] for r in runs],
                           "errors": sum(r["errors"] for r in runs), "requests": sum(r["requests"] for r in runs)}
    for key in ("rps", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "max_ms"):
        out[key] = round(statistics.median(r[key] for r in runs), 3)
    return out


def measure(gateway_url: str, token: str, session_id: str, *, duration_s: float = 10.0,
            connections: int = 32, warmup_s: float = 2.0, tool: str | None = None,
            gateway_workers: int = 1, rounds: int = 3) -> dict[str, Any]:
    """Measure the gateway at ``gateway_url`` and a bare FastAPI endpoint (started here) in alternating rounds
    (gateway, bare, [bare with as many processes], gateway, ...): the machine is shared and its speed drifts
    over minutes, so each round's ratio compares measurements taken seconds apart, and the reported ratio is
    the median of the rounds' ratios."""
    import httpx

    tool = tool or ("wrk" if shutil.which("wrk") else "httpx")
    url = f"{gateway_url.rstrip('/')}/sessions/{session_id}"
    r = httpx.get(url, headers={"authorization": f"Bearer {token}"}, timeout=10)
    if r.status_code != 200:
        raise SystemExit(f"GET {url} answered {r.status_code}: {r.text[:300]}")
    info = machine_info()
    results: dict[str, Any] = {"machine": info, "connections": connections, "duration_s": duration_s,
                               "rounds": rounds, "tool": tool, "uvicorn": UVICORN_OPTS,
                               "gateway_workers": gateway_workers}
    targets = {"gateway": (url, token)}
    with contextlib.ExitStack() as servers:
        targets["bare"] = (f"{servers.enter_context(_child_server('bare'))}/sessions/{session_id}", None)
        if gateway_workers > 1:  # the stricter baseline: bare FastAPI with as many processes as the gateway
            bare_n = servers.enter_context(_child_server(f"bare-workers-{gateway_workers}"))
            targets[f"bare_x{gateway_workers}"] = (f"{bare_n}/sessions/{session_id}", None)
        if warmup_s:
            for u, t in targets.values():
                load(u, t, warmup_s, connections, tool)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        for i in range(rounds):
            for name, (u, t) in targets.items():
                runs[name].append(load(u, t, duration_s, connections, tool))
            print(f"  round {i + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]['rps']:.0f} rps" for n, v in runs.items()),
                  file=sys.stderr, flush=True)
    for name, v in runs.items():
        results[name] = _median_run(v)
    ratios = [g["rps"] / b["rps"] if b["rps"] else 0.0 for g, b in zip(runs["gateway"], runs["bare"], strict=True)]
    results["round_ratios"] = [round(x, 3) for x in ratios]
    results["ratio"] = round(statistics.median(ratios), 3)
    key = f"bare_x{gateway_workers}"
    if key in runs:
        same = [g["rps"] / b["rps"] if b["rps"] else 0.0 for g, b in zip(runs["gateway"], runs[key], strict=True)]
        results["ratio_same_workers"] = round(statistics.median(same), 3)
    g = results["gateway"]
    results["targets"] = {"ratio_min": TARGET_RATIO, "gateway_p95_max_ms": TARGET_P95_MS,
                          "met": results["ratio"] >= TARGET_RATIO and g["p95_ms"] <= TARGET_P95_MS
                          and g["errors"] == 0}
    return results


def report(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"machine: {m['cpus']} CPUs ({m['cpu_model'] or 'unknown'}), Python {m['python']}, "
        f"load before {', '.join(f'{x:.2f}' for x in m['loadavg_before'])}",
        f"load: {results['tool']}, {results['connections']} connections, {results['rounds']} alternating rounds of "
        f"{results['duration_s']:.0f} s each (medians shown); "
        f"uvicorn httptools+uvloop; gateway {results['gateway_workers']} worker process(es), bare 1"
        + (f" and {results['gateway_workers']}" if "ratio_same_workers" in results else ""),
        f"{'':10} {'RPS':>10} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>7}",
    ]
    for name in ("gateway", "bare", *(k for k in results if k.startswith("bare_x"))):
        r = results[name]
        lines.append(f"{name:10} {r['rps']:>10.1f} {r['p50_ms']:>8.2f} {r['p95_ms']:>8.2f} {r['p99_ms']:>8.2f} "
                     f"{r['errors']:>7}")
    t = results["targets"]
    lines.append(f"ratio gateway/bare per round: {', '.join(f'{x:.3f}' for x in results['round_ratios'])}")
    lines.append(f"ratio gateway/bare = {results['ratio']:.3f} (target >= {t['ratio_min']}); gateway p95 "
                 f"{results['gateway']['p95_ms']:.2f} ms (target <= {t['gateway_p95_max_ms']} ms) -> "
                 f"{'MET' if t['met'] else 'MISSED'}")
    if "ratio_same_workers" in results:
        lines.append(f"ratio gateway/bare with the same number of worker processes = "
                     f"{results['ratio_same_workers']:.3f}")
    return "\n".join(lines)


@contextlib.contextmanager
def stack_gateway(settings: dict[str, str] | None = None) -> Iterator[tuple[str, str, str]]:
    """A full LocalStack (one tmux host); yields (url, token, session_id) of a fresh user's session."""
    import httpx

    from local.services import free_port
    from local.stack import LocalStack

    base = Path(tempfile.mkdtemp(prefix="tmuxi-bench-", dir="/tmp"))
    sockets = Path(tempfile.mkdtemp(prefix="tb", dir="/tmp"))
    base.chmod(0o711)  # the users' accounts reach their homes (under data/) and sockets through these
    sockets.chmod(0o711)
    stack = LocalStack(data_dir=base / "data", hosts=1, socket_dir=sockets, gateway_port=free_port(),
                       environment="test",
                       extra_env={"TMUXI_RATE_LIMIT_PER_MINUTE": "100000000", **(settings or {})})
    try:
        stack.start()
        stack.ensure_user("bench", "bench-password-1", "user")
        with httpx.Client(base_url=stack.gateway_url, timeout=30) as c:
            r = c.post("/auth/token", json={"username": "bench", "password": "bench-password-1"})
            r.raise_for_status()
            token = r.json()["access_token"]
            r = c.post("/sessions", json={"name": "bench"}, headers={"authorization": f"Bearer {token}"})
            r.raise_for_status()
            yield stack.gateway_url, token, r.json()["id"]
    finally:
        stack.stop()
        shutil.rmtree(sockets, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="gateway base URL (with --token and --session)")
    ap.add_argument("--token", help="a valid access token (JWT)")
    ap.add_argument("--session", help="a session id the token's user owns")
    ap.add_argument("--stack", action="store_true", help="self-contained: start a LocalStack")
    ap.add_argument("--null", action="store_true",
                    help="the gateway alone, with trivial Lambda handlers (its own overhead)")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per measurement (default 8)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds before each (default 2)")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--gateway-workers", type=int, default=1,
                    help="with --url: the gateway's worker processes (bare FastAPI is also measured with as many)")
    ap.add_argument("--tool", choices=["wrk", "httpx"], default=None, help="default: wrk if installed")
    ap.add_argument("--set", action="append", default=[], metavar="TMUXI_NAME=VALUE",
                    help="with --stack: a setting for the stack's processes (repeatable)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_httpx", help=argparse.SUPPRESS)
    ap.add_argument("--_duration", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--_connections", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._child:
        _child_main(args._child, args._port)
        return 0
    if args._httpx:
        print(json.dumps(_httpx_load(args._httpx, os.environ.get("BENCH_TOKEN") or None, args._duration,
                                     args._connections)))
        return 0

    sys.path[:0] = [str(ROOT / "layers"), str(ROOT)]
    kw = {"duration_s": args.duration, "connections": args.connections, "warmup_s": args.warmup,
          "tool": args.tool, "rounds": args.rounds}
    if args.url:
        if not (args.token and args.session):
            ap.error("--url needs --token and --session")
        results = measure(args.url, args.token, args.session, gateway_workers=args.gateway_workers, **kw)
        results["mode"] = "external"
    elif args.null:
        with _child_server("null-gateway") as url:
            results = measure(url, "a.b.c", SESSION_ID, **kw)
        results["mode"] = "null"
    elif args.stack:
        settings = dict(item.split("=", 1) for item in args.set)
        if any(not k.startswith("TMUXI_") for k in settings):
            ap.error("--set takes TMUXI_NAME=VALUE")
        with stack_gateway(settings) as (url, token, sid):
            from tmuxi.settings import Settings

            results = measure(url, token, sid, gateway_workers=Settings().resolved_gateway_workers, **kw)
        results["mode"] = "stack"
    else:
        ap.error("give --url/--token/--session, --stack or --null")
    print(report(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if (results["targets"]["met"] or not args.check) else 1


if __name__ == "__main__":
    sys.exit(main())
