"""Benchmark: authenticated ``GET /sessions/{id}`` through the local API gateway vs a bare FastAPI endpoint.

All servers run under uvicorn with the same options (httptools, uvloop, no access log): the gateway with its
worker processes (one per core by default), bare FastAPI with one process (the target's baseline) and with as
many processes as the gateway (the stricter comparison, also reported). They are measured in alternating
rounds in the same run, on loopback, each for a bounded time at the same concurrency; the ratio is the median
of the rounds' ratios (a shared machine's speed drifts over minutes). The load generator is ``wrk``
(``apt-get install -y wrk``) with a Lua script that sends the requests round-robin over a list of (session,
token) pairs -- one per user -- and reports latency percentiles; without wrk, an asyncio + httpx client in a
separate process does the same. Every server gets the very same requests (bare FastAPI ignores the token).

Modes:
  --url URL --token JWT --session ID   measure an already running gateway (e.g. ``make run``), one user
  --stack                              self-contained: start a LocalStack (embedded PostgreSQL, Redis, one tmux
                                       host, the gateway), create ``--users`` users (default 24), each with its
                                       own token and session, measure, stop. The per-user rate limit is raised
                                       (at the default 1,200 a minute, 24 users could make only 480 requests a
                                       second): spreading the load over users exercises the per-user state
                                       (rate windows, cached user state, authorizer cache entries) as many
                                       clients would, without measuring the limit itself.
  --stack --outage stop|pause          also, in each round, the same load while the stack's embedded PostgreSQL
                                       is stopped (``pg_ctl stop -m fast``: connections refused) or paused
                                       (SIGSTOP on its processes: connections hang), every session read into
                                       the cache just before. Reported: the rate of 200s and the share of other
                                       answers (with a probe of their status codes while it is still down), as
                                       ratios to the same round's gateway (PostgreSQL up) and bare figures, and
                                       how long after PostgreSQL is back the first request that needs it
                                       succeeds.
  --null                               the gateway alone, with trivial Lambda handlers (its own overhead)

Targets (issue 8): ratio (gateway RPS / bare RPS) >= 0.5 and gateway p95 <= 15 ms, no errors; with --outage,
200s per second while PostgreSQL is down >= 0.5 x the gateway's RPS with it up (``--check`` exits 1 if missed).
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
TARGET_OUTAGE_RATIO = 0.5  # 200s per second while PostgreSQL is down / gateway RPS while it is up
DEFAULT_USERS = 24

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

# A request target: (path, bearer token or None). The load goes round-robin over a list of them.
Target = tuple[str, str | None]

_WRK_LUA = """
local reqs, n, i = {}, 0, 0
init = function(args)
  for line in string.gmatch(os.getenv("BENCH_TARGETS") or "", "[^\\n]+") do
    local path, token = string.match(line, "^(%S+)%s*(%S*)$")
    local headers = {}
    if token ~= "" then headers["Authorization"] = "Bearer " .. token end
    n = n + 1
    reqs[n] = wrk.format("GET", path, headers)
  end
end
request = function()
  i = i % n + 1
  return reqs[i]
end
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


def _targets_env(targets: list[Target]) -> str:
    return "\n".join(f"{path} {token or ''}".rstrip() for path, token in targets)


def run_wrk(base_url: str, targets: list[Target], duration_s: float, connections: int,
            threads: int = 1) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_WRK_LUA)
        script = f.name
    try:
        env = dict(os.environ, BENCH_TARGETS=_targets_env(targets))
        cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, int(duration_s))}s",
               "--timeout", "5s", "-s", script, base_url]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=duration_s + 30, check=True)
    finally:
        os.unlink(script)
    line = next(x for x in out.stdout.splitlines() if x.startswith("BENCH_JSON "))
    raw = json.loads(line[len("BENCH_JSON "):])
    seconds = raw["duration_us"] / 1e6
    no_answer = raw["errors_connect"] + raw["errors_read"] + raw["errors_timeout"]
    ok = raw["requests"] - raw["errors_status"]  # wrk counts an answer >= 400 as a status error
    return {"tool": "wrk", "requests": raw["requests"], "seconds": round(seconds, 3),
            "rps": round(raw["requests"] / seconds, 1), "ok_rps": round(ok / seconds, 1),
            "non_2xx": raw["errors_status"], "no_answer": no_answer, "errors": raw["errors_status"] + no_answer,
            "p50_ms": raw["p50_us"] / 1000, "p95_ms": raw["p95_us"] / 1000, "p99_ms": raw["p99_us"] / 1000,
            "mean_ms": round(raw["mean_us"] / 1000, 3), "max_ms": raw["max_us"] / 1000}


def _httpx_load(base_url: str, targets: list[Target], duration_s: float, connections: int) -> dict[str, Any]:
    import itertools

    import httpx

    reqs = [(base_url.rstrip("/") + path, {"authorization": f"Bearer {tok}"} if tok else {}) for path, tok in targets]
    turn = itertools.cycle(reqs)
    latencies: list[float] = []
    non_2xx = no_answer = 0

    async def main() -> float:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(limits=limits, timeout=5) as client:
            deadline = time.perf_counter() + duration_s

            async def worker() -> None:
                nonlocal non_2xx, no_answer
                while time.perf_counter() < deadline:
                    url, headers = next(turn)
                    t0 = time.perf_counter()
                    try:
                        r = await client.get(url, headers=headers)
                        if r.status_code >= 400:
                            non_2xx += 1
                        latencies.append(time.perf_counter() - t0)
                    except httpx.HTTPError:
                        no_answer += 1

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
            "rps": round(len(latencies) / seconds, 1), "ok_rps": round((len(latencies) - non_2xx) / seconds, 1),
            "non_2xx": non_2xx, "no_answer": no_answer, "errors": non_2xx + no_answer,
            "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
            "mean_ms": round(sum(latencies) / len(latencies) * 1000, 3), "max_ms": round(latencies[-1] * 1000, 3)}


def run_httpx(base_url: str, targets: list[Target], duration_s: float, connections: int) -> dict[str, Any]:
    """The fallback client, in a child process (keeps its CPU off this process)."""
    out = subprocess.run(
        [sys.executable, __file__, "--_httpx", base_url, "--_duration", str(duration_s), "--_connections",
         str(connections)],
        capture_output=True, text=True, env=dict(os.environ, BENCH_TARGETS=_targets_env(targets)),
        timeout=duration_s + 60, check=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def load(base_url: str, targets: list[Target], duration_s: float, connections: int, tool: str) -> dict[str, Any]:
    if tool == "wrk":
        return run_wrk(base_url, targets, duration_s, connections)
    return run_httpx(base_url, targets, duration_s, connections)


# --- a PostgreSQL outage under load (stack mode) ------------------------------------------------------------


class PgOutage:
    """Stops (``pg_ctl stop -m fast``) or pauses (SIGSTOP) the stack's embedded PostgreSQL, and brings it back.
    Before each outage every measured session is read into the cache (its entry dropped, then one GET: a miss
    that PostgreSQL answers and the API caches), so the outage starts with every session cached."""

    def __init__(self, stack: Any, how: str, base_url: str, pairs: list[tuple[str, str]]) -> None:
        if stack.pg is None:
            raise SystemExit("--outage needs the stack's embedded PostgreSQL")
        self.stack, self.how, self.base_url, self.pairs = stack, how, base_url.rstrip("/"), pairs
        self.pgdata = Path(stack.pg.data_dir).expanduser().resolve()
        self.recovery_s: list[float] = []
        self.probes: list[dict[str, int]] = []
        self._paused: list[int] = []

    def prime(self) -> None:
        import httpx

        from tmuxi import cache

        for token, sid in self.pairs:
            cache.invalidate_session(sid)
            r = httpx.get(f"{self.base_url}/sessions/{sid}", headers={"authorization": f"Bearer {token}"}, timeout=10)
            if r.status_code != 200:
                raise SystemExit(f"priming the cache: GET /sessions/{sid} answered {r.status_code}: {r.text[:200]}")

    def _pids(self) -> list[int]:
        master = int((self.pgdata / "postmaster.pid").read_text().split()[0])
        out = [master]
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == master:
                        out.append(int(entry))
        return out

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        if self.how == "pause":
            self._paused = self._pids()
            for pid in self._paused:  # the postmaster first: it starts nothing more once stopped
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
        else:
            self.stack.pg.stop()
        try:
            yield
            self.probes.append(self.probe())
        finally:
            t0 = time.monotonic()
            if self.how == "pause":
                for pid in self._paused:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
            else:
                self.stack.pg.start()
            self.recovery_s.append(round(self._wait_recovered() + time.monotonic() - t0, 3))

    def probe(self) -> dict[str, int]:
        """One GET of every measured session, while PostgreSQL is still down: the answers' status codes (and
        error codes), e.g. {"200": 20, "503 dependency_unavailable": 4}."""
        import httpx

        mix: dict[str, int] = {}
        for token, sid in self.pairs:
            try:
                r = httpx.get(f"{self.base_url}/sessions/{sid}", headers={"authorization": f"Bearer {token}"},
                              timeout=5)
                key = str(r.status_code)
                if r.status_code != 200:
                    with contextlib.suppress(ValueError, AttributeError):
                        key += " " + str(r.json().get("error", {}).get("code") or r.json().get("code") or "")
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            mix[key.strip()] = mix.get(key.strip(), 0) + 1
        return mix

    def _wait_recovered(self, timeout_s: float = 60.0) -> float:
        """Seconds from now to the first 200 of a request that needs PostgreSQL (a list of sessions)."""
        import httpx

        token = self.pairs[0][0]
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"{self.base_url}/sessions?limit=1", headers={"authorization": f"Bearer {token}"},
                              timeout=5)
                if r.status_code == 200:
                    return time.monotonic() - t0
            time.sleep(0.02)
        raise SystemExit(f"PostgreSQL back, but GET /sessions still fails after {timeout_s:.0f} s")


# --- the benchmark ----------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpus": os.cpu_count(), "cpu_model": model, "mem_gb": round(mem_gb, 1),
            "python": platform.python_version(), "platform": platform.platform(), "loadavg_before": os.getloadavg()}


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-field medians over rounds (RPS, percentiles), errors summed, and each round's RPS kept."""
    out: dict[str, Any] = {"tool": runs[0]["tool"], "rounds_rps": [r["rps"] for r in runs],
                           "rounds_ok_rps": [r["ok_rps"] for r in runs],
                           "requests": sum(r["requests"] for r in runs)}
    for key in ("errors", "non_2xx", "no_answer"):
        out[key] = sum(r[key] for r in runs)
    for key in ("rps", "ok_rps", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "max_ms"):
        out[key] = round(statistics.median(r[key] for r in runs), 3)
    out["non_2xx_share"] = round(out["non_2xx"] / out["requests"], 4) if out["requests"] else 0.0
    return out


def _ratios(num: list[dict[str, Any]], den: list[dict[str, Any]], key: str = "rps") -> list[float]:
    return [round(a[key] / b["rps"], 3) if b["rps"] else 0.0 for a, b in zip(num, den, strict=True)]


def measure(base_url: str, pairs: list[tuple[str, str]], *, duration_s: float = 8.0, connections: int = 32,
            warmup_s: float = 2.0, tool: str | None = None, gateway_workers: int = 1, rounds: int = 3,
            outage: PgOutage | None = None) -> dict[str, Any]:
    """Measure the gateway at ``base_url`` -- requests round-robin over ``pairs`` of (token, session id) -- and
    a bare FastAPI endpoint (started here, sent the very same requests) in alternating rounds (gateway, bare,
    [bare with as many processes], [gateway with PostgreSQL down], gateway, ...): the machine is shared and its
    speed drifts over minutes, so each round's ratio compares measurements taken seconds apart, and the
    reported ratio is the median of the rounds' ratios."""
    import httpx

    tool = tool or ("wrk" if shutil.which("wrk") else "httpx")
    targets: list[Target] = [(f"/sessions/{sid}", token) for token, sid in pairs]
    for path, token in targets:
        r = httpx.get(base_url.rstrip("/") + path, headers={"authorization": f"Bearer {token}"}, timeout=10)
        if r.status_code != 200:
            raise SystemExit(f"GET {path} answered {r.status_code}: {r.text[:300]}")
    info = machine_info()
    results: dict[str, Any] = {"machine": info, "connections": connections, "duration_s": duration_s,
                               "rounds": rounds, "tool": tool, "uvicorn": UVICORN_OPTS, "users": len(pairs),
                               "gateway_workers": gateway_workers}
    urls = {"gateway": base_url}
    with contextlib.ExitStack() as servers:
        urls["bare"] = servers.enter_context(_child_server("bare"))
        if gateway_workers > 1:  # the stricter baseline: bare FastAPI with as many processes as the gateway
            urls[f"bare_x{gateway_workers}"] = servers.enter_context(_child_server(f"bare-workers-{gateway_workers}"))
        if warmup_s:
            for u in urls.values():
                load(u, targets, warmup_s, connections, tool)
        names = [*urls, *(["gateway_pg_down"] if outage is not None else [])]
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for i in range(rounds):
            for name in names:
                if name == "gateway_pg_down":
                    assert outage is not None
                    outage.prime()
                    with outage.down():
                        runs[name].append(load(base_url, targets, duration_s, connections, tool))
                else:
                    runs[name].append(load(urls[name], targets, duration_s, connections, tool))
            print(f"  round {i + 1}/{rounds}: " + ", ".join(
                f"{n} {v[-1]['rps']:.0f} rps" + (f" ({v[-1]['ok_rps']:.0f} 200s/s)" if v[-1]["non_2xx"] else "")
                for n, v in runs.items()), file=sys.stderr, flush=True)
    for name, v in runs.items():
        results[name] = _median_run(v)
    ratios = _ratios(runs["gateway"], runs["bare"])
    results["round_ratios"] = ratios
    results["ratio"] = round(statistics.median(ratios), 3)
    key = f"bare_x{gateway_workers}"
    if key in runs:
        results["ratio_same_workers"] = round(statistics.median(_ratios(runs["gateway"], runs[key])), 3)
    g = results["gateway"]
    met = results["ratio"] >= TARGET_RATIO and g["p95_ms"] <= TARGET_P95_MS and g["errors"] == 0
    targets_out: dict[str, Any] = {"ratio_min": TARGET_RATIO, "gateway_p95_max_ms": TARGET_P95_MS}
    if outage is not None:
        down = runs["gateway_pg_down"]
        # 200s per second while down, against the same round's gateway (PostgreSQL up) and bare FastAPI
        results["outage"] = {
            "how": outage.how,
            "round_ratios_to_gateway": _ratios(down, runs["gateway"], "ok_rps"),
            "round_ratios_to_bare": _ratios(down, runs["bare"], "ok_rps"),
            "status_probe_per_round": outage.probes,
            "recovery_s_per_round": outage.recovery_s,
        }
        o = results["outage"]
        o["ratio_to_gateway"] = round(statistics.median(o["round_ratios_to_gateway"]), 3)
        o["ratio_to_bare"] = round(statistics.median(o["round_ratios_to_bare"]), 3)
        targets_out["outage_ratio_min"] = TARGET_OUTAGE_RATIO
        targets_out["outage_met"] = o["ratio_to_gateway"] >= TARGET_OUTAGE_RATIO
        met = met and targets_out["outage_met"]
    targets_out["met"] = met
    results["targets"] = targets_out
    results["machine"]["loadavg_after"] = os.getloadavg()
    return results


def report(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"machine: {m['cpus']} CPUs ({m['cpu_model'] or 'unknown'}), {m.get('mem_gb', '?')} GB, Python "
        f"{m['python']}, load before {', '.join(f'{x:.2f}' for x in m['loadavg_before'])}"
        + (f", after {', '.join(f'{x:.2f}' for x in m['loadavg_after'])}" if "loadavg_after" in m else ""),
        f"load: {results['tool']}, {results['connections']} connections round-robin over {results['users']} "
        f"user(s) (each its own token and session), {results['rounds']} alternating rounds of "
        f"{results['duration_s']:.0f} s each (medians shown); uvicorn httptools+uvloop; gateway "
        f"{results['gateway_workers']} worker process(es), bare 1"
        + (f" and {results['gateway_workers']}" if "ratio_same_workers" in results else ""),
        f"{'':16} {'RPS':>10} {'200s/s':>10} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'non-2xx':>8} "
        f"{'no answer':>9}",
    ]
    names = ["gateway", "bare", *(k for k in results if k.startswith("bare_x")),
             *(["gateway_pg_down"] if "gateway_pg_down" in results else [])]
    for name in names:
        r = results[name]
        lines.append(f"{name:16} {r['rps']:>10.1f} {r['ok_rps']:>10.1f} {r['p50_ms']:>8.2f} {r['p95_ms']:>8.2f} "
                     f"{r['p99_ms']:>8.2f} {r['non_2xx_share']:>8.2%} {r['no_answer']:>9}")
    t = results["targets"]
    lines.append(f"ratio gateway/bare per round: {', '.join(f'{x:.3f}' for x in results['round_ratios'])}")
    lines.append(f"ratio gateway/bare = {results['ratio']:.3f} (target >= {t['ratio_min']}); gateway p95 "
                 f"{results['gateway']['p95_ms']:.2f} ms (target <= {t['gateway_p95_max_ms']} ms); errors "
                 f"{results['gateway']['errors']}")
    if "ratio_same_workers" in results:
        lines.append(f"ratio gateway/bare with the same number of worker processes = "
                     f"{results['ratio_same_workers']:.3f}")
    if "outage" in results:
        o = results["outage"]
        lines.append(f"PostgreSQL {'stopped' if o['how'] == 'stop' else 'paused (SIGSTOP)'}, every session cached "
                     f"just before: 200s/s ratio to the same round's gateway "
                     f"{', '.join(f'{x:.3f}' for x in o['round_ratios_to_gateway'])} -> median "
                     f"{o['ratio_to_gateway']:.3f} (target >= {t['outage_ratio_min']}); to bare "
                     f"{o['ratio_to_bare']:.3f}")
        lines.append(f"  answers to one GET per session at the end of each outage: {o['status_probe_per_round']}; "
                     f"first request needing PostgreSQL answered 200 after it came back: {o['recovery_s_per_round']} s")
    lines.append("targets " + ("MET" if t["met"] else "MISSED"))
    return "\n".join(lines)


@contextlib.contextmanager
def stack_gateway(settings: dict[str, str] | None = None, users: int = DEFAULT_USERS,
                  ) -> Iterator[tuple[Any, list[tuple[str, str]]]]:
    """A full LocalStack (one tmux host) and ``users`` fresh users, each with a token (POST /auth/token) and a
    session; yields (stack, [(token, session id)])."""
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
        from tmuxi.auth import hash_password
        from tmuxi.db import repo

        password = "bench-password-1"
        pw_hash = hash_password(password)
        pairs: list[tuple[str, str]] = []
        with httpx.Client(base_url=stack.gateway_url, timeout=30) as c:
            for i in range(users):
                name = f"bench-{i:02d}"
                repo.create_user(name, pw_hash, "user")
                r = c.post("/auth/token", json={"username": name, "password": password})
                r.raise_for_status()
                token = r.json()["access_token"]
                r = c.post("/sessions", json={"name": "bench"}, headers={"authorization": f"Bearer {token}"})
                r.raise_for_status()
                pairs.append((token, r.json()["id"]))
        yield stack, pairs
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
    ap.add_argument("--users", type=int, default=DEFAULT_USERS,
                    help=f"with --stack: users, each with its own token and session (default {DEFAULT_USERS})")
    ap.add_argument("--outage", choices=["stop", "pause"],
                    help="with --stack: also measure with PostgreSQL stopped or paused (SIGSTOP) in each round")
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
        targets: list[Target] = []
        for line in (os.environ.get("BENCH_TARGETS") or "").splitlines():
            path, _, token = line.partition(" ")
            targets.append((path, token or None))
        print(json.dumps(_httpx_load(args._httpx, targets, args._duration, args._connections)))
        return 0

    sys.path[:0] = [str(ROOT / "layers"), str(ROOT)]
    kw = {"duration_s": args.duration, "connections": args.connections, "warmup_s": args.warmup,
          "tool": args.tool, "rounds": args.rounds}
    if args.outage and not args.stack:
        ap.error("--outage needs --stack")
    if args.url:
        if not (args.token and args.session):
            ap.error("--url needs --token and --session")
        results = measure(args.url, [(args.token, args.session)], gateway_workers=args.gateway_workers, **kw)
        results["mode"] = "external"
    elif args.null:
        with _child_server("null-gateway") as url:
            results = measure(url, [("a.b.c", SESSION_ID)], **kw)
        results["mode"] = "null"
    elif args.stack:
        settings = dict(item.split("=", 1) for item in args.set)
        if any(not k.startswith("TMUXI_") for k in settings):
            ap.error("--set takes TMUXI_NAME=VALUE")
        with stack_gateway(settings, users=args.users) as (stack, pairs):
            from tmuxi.settings import Settings

            outage = PgOutage(stack, args.outage, stack.gateway_url, pairs) if args.outage else None
            results = measure(stack.gateway_url, pairs, gateway_workers=Settings().resolved_gateway_workers,
                              outage=outage, **kw)
        results["mode"] = "stack"
        results["settings"] = settings
    else:
        ap.error("give --url/--token/--session, --stack or --null")
    print(report(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if (results["targets"]["met"] or not args.check) else 1


if __name__ == "__main__":
    sys.exit(main())
