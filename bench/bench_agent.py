"""Benchmark of what an agent's loop costs (issue 12, speed): a trivial command, and input followed by a wait for
the prompt, each beside a baseline measured in the same run.

(a) Through the local stack's gateway (API Gateway emulation, authorizer, API function, tmux host), on one
    session: ``POST /sessions/{id}/exec {"command": "true"}`` beside the bare ``GET /sessions/{id}`` of the same
    session, interleaved (the order rotates every iteration, so a drift of the shared machine's speed falls on
    both). Target: exec p50 at most 3 ms above the GET's p50. Also beside ``GET /sessions/{id}/execs``, a route
    that calls the host as exec does, without tmux (the GET does not call it, and the local gateway runs it inline,
    where a host-calling route is handed to a thread): what an exec costs beyond a host round trip.
(b) The host's own exec: ``Engine.exec(sid, "true")`` on a tmux host engine in this process (no HTTP), beside the
    engine's ``send_input`` of one byte to another session of the same user's tmux server (whose pane runs
    ``cat >/dev/null``, so the byte is consumed and nothing redraws), interleaved. Target: exec p50 <= 2 ms.
(c) Send-and-wait through the gateway: ``POST /sessions/{id}/input {"text": "echo x", "enter": true,
    "wait": {"until": "prompt"}}``, interleaved with (a) on the same session. Target: p50 at most 5 ms above (a)'s
    exec p50. Reported as not available (not a failure) when the API answers 4xx for the ``wait`` field.

Every answer is checked (status, exit code 0, the prompt matched); a wrong one stops the benchmark rather than
being timed. Output: a markdown report (machine, p50/p95/p99, differences and ratios to the baselines, targets);
``--json PATH`` also writes the results. ``--quick``: CI-smoke counts.

    python bench/bench_agent.py [--n 300] [--quick] [--skip-host] [--skip-gateway] [--json PATH] [--check]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
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

from bench.common import local_stack, machine, summary_ms  # noqa: E402

TARGET_EXEC_OVER_GET_MS = 3.0  # (a): gateway exec p50 - GET p50
TARGET_HOST_EXEC_P50_MS = 2.0  # (b)
TARGET_WAIT_OVER_EXEC_MS = 5.0  # (c): send-and-wait p50 - (a)'s exec p50
WAIT_BODY = {"text": "echo x", "enter": True, "wait": {"until": "prompt"}}


def _ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    return round(a["p50_ms"] / b["p50_ms"], 2) if b["p50_ms"] else float("nan")


# --- (b) the host's own exec, in process ------------------------------------------------------------------


async def bench_host(n: int, warmup: int) -> dict[str, Any]:
    from tmux_host.control import kill_tmux_servers
    from tmux_host.engine import Engine
    from tmuxi.observability import logger
    from tmuxi.settings import Settings

    for h in logger._logger.handlers:  # noqa: SLF001 - the engine's log lines go to stderr, the report to stdout
        if isinstance(h, logging.StreamHandler):
            h.setStream(sys.stderr)
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="tb"))
    d.chmod(0o711)  # the users' accounts reach their own directories below (sockets, homes)
    settings = Settings(socket_dir=d / "s", data_dir=d / "data", host_secret="bench-" + "x" * 32, host_capacity=10,
                        host_id="bench-agent", heartbeat_interval_s=60)
    engine = Engine(settings)
    try:
        await engine.start(background=False)
        sid, sink = uuid.uuid4(), uuid.uuid4()
        for s in (sid, sink):  # one user: one tmux server for both
            await engine.create_session(s, 1, 120, 40)
            r = await engine.exec(s, "true", 30)  # the shell has started and answers
            if r.exit_code != 0:
                raise SystemExit(f"settling a session: exec 'true' answered {r}")
        await engine.send_input(sink, b"exec cat >/dev/null\n")

        async def one_exec() -> float:
            t = time.perf_counter()
            r = await engine.exec(sid, "true", 30)
            elapsed = time.perf_counter() - t
            if r.exit_code != 0 or r.running:
                raise SystemExit(f"Engine.exec(sid, 'true') answered {r}")
            durations.append(r.duration_ms / 1000)
            return elapsed

        async def one_input() -> float:
            t = time.perf_counter()
            await engine.send_input(sink, b"x")
            return time.perf_counter() - t

        durations: list[float] = []
        for _ in range(warmup):
            await one_exec()
            await one_input()
        durations.clear()
        walls: list[float] = []
        inputs: list[float] = []
        for i in range(n):  # interleaved, the order alternating
            if i % 2:
                inputs.append(await one_input())
                walls.append(await one_exec())
            else:
                walls.append(await one_exec())
                inputs.append(await one_input())
        for s in (sid, sink):
            await engine.kill_session(s)
    finally:
        await engine.stop(kill_servers=True)
        kill_tmux_servers(d)
        shutil.rmtree(d, ignore_errors=True)
    ex, inp = summary_ms(walls), summary_ms(inputs)
    return {"exec": ex, "exec_duration_ms_reported": summary_ms(durations), "send_input_1_byte": inp,
            "exec_over_send_input_p50_ms": round(ex["p50_ms"] - inp["p50_ms"], 3),
            "exec_to_send_input_p50_ratio": _ratio(ex, inp),
            "target_met": ex["p50_ms"] <= TARGET_HOST_EXEC_P50_MS}


def run_host(n: int, warmup: int) -> dict[str, Any]:
    try:  # what `python -m tmux_host` runs on (uvicorn picks uvloop when installed)
        import uvloop
    except ImportError:
        return asyncio.run(bench_host(n, warmup))
    return uvloop.run(bench_host(n, warmup))


# --- (a) and (c) through the gateway ----------------------------------------------------------------------


def _fail(what: str, r: httpx.Response) -> SystemExit:
    return SystemExit(f"{what} answered {r.status_code}: {r.text[:300]}")


def bench_gateway(n: int, warmup: int) -> dict[str, Any]:
    with local_stack(hosts=1) as st, httpx.Client(base_url=st.gateway_url, timeout=60,
                                                  headers={"authorization": f"Bearer {st.token}"}) as c:
        r = c.post("/sessions", json={"name": "bench-agent"})
        if r.status_code != 201 and r.status_code != 200:
            raise _fail("POST /sessions", r)
        sid = r.json()["id"]
        path = f"/sessions/{sid}"

        def get() -> float:
            t = time.perf_counter()
            r = c.get(path)
            elapsed = time.perf_counter() - t
            if r.status_code != 200:
                raise _fail(f"GET {path}", r)
            return elapsed

        def list_execs() -> float:
            t = time.perf_counter()
            r = c.get(f"{path}/execs")
            elapsed = time.perf_counter() - t
            if r.status_code != 200:
                raise _fail(f"GET {path}/execs", r)
            return elapsed

        def exec_true() -> float:
            t = time.perf_counter()
            r = c.post(f"{path}/exec", json={"command": "true"})
            elapsed = time.perf_counter() - t
            if r.status_code != 200 or r.json().get("exit_code") != 0:
                raise _fail(f"POST {path}/exec true", r)
            return elapsed

        waited: list[float] = []

        def send_and_wait() -> float:
            t = time.perf_counter()
            r = c.post(f"{path}/input", json=WAIT_BODY)
            elapsed = time.perf_counter() - t
            if r.status_code != 200 or r.json().get("matched") is not True:
                raise _fail(f"POST {path}/input (echo x, wait for the prompt)", r)
            waited.append(float(r.json().get("waited_ms", 0.0)) / 1000)
            return elapsed

        exec_true()  # the first exec waits for the new shell's prompt
        probe = c.post(f"{path}/input", json=WAIT_BODY)
        wait_note = None
        if 400 <= probe.status_code < 500:
            wait_note = f"not available (the API answered {probe.status_code}: {probe.text[:200]})"
        elif probe.status_code != 200:
            raise _fail(f"POST {path}/input (echo x, wait for the prompt)", probe)
        ops: dict[str, Callable[[], float]] = {"get": get, "execs": list_execs, "exec": exec_true}
        if wait_note is None:
            ops["send_and_wait"] = send_and_wait
        names = list(ops)
        for _ in range(warmup):
            for name in names:
                ops[name]()
        waited.clear()
        samples: dict[str, list[float]] = {name: [] for name in names}
        for i in range(n):  # interleaved, the order rotating
            k = i % len(names)
            for name in names[k:] + names[:k]:
                samples[name].append(ops[name]())
    g, e, lx = summary_ms(samples["get"]), summary_ms(samples["exec"]), summary_ms(samples["execs"])
    out: dict[str, Any] = {
        "get": g, "exec": e, "list_execs": lx, "exec_over_list_execs_p50_ms": round(e["p50_ms"] - lx["p50_ms"], 3),
        "exec_over_get_p50_ms": round(e["p50_ms"] - g["p50_ms"], 3), "exec_to_get_p50_ratio": _ratio(e, g),
        "exec_target_met": e["p50_ms"] - g["p50_ms"] <= TARGET_EXEC_OVER_GET_MS,
    }
    if wait_note is None:
        w = summary_ms(samples["send_and_wait"])
        out.update({"send_and_wait": w, "send_and_wait_waited_ms_reported": summary_ms(waited),
                    "send_and_wait_over_exec_p50_ms": round(w["p50_ms"] - e["p50_ms"], 3),
                    "send_and_wait_to_exec_p50_ratio": _ratio(w, e),
                    "send_and_wait_target_met": w["p50_ms"] - e["p50_ms"] <= TARGET_WAIT_OVER_EXEC_MS})
    else:
        out["send_and_wait"] = wait_note
        out["send_and_wait_target_met"] = None
    return out


# --- report -----------------------------------------------------------------------------------------------


def _row(name: str, s: dict[str, Any]) -> str:
    return f"| {name} | {s['n']} | {s['p50_ms']:.3f} | {s['p95_ms']:.3f} | {s['p99_ms']:.3f} |"


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [f"## agent benchmark\n\n{m['cpu']}, {m['cores']} cores, {m['mem_gb']} GB, Python {m['python']}, "
             f"kernel {m['kernel']}, load1 before {m['load1']}, after {r['load1_after']}; n = {r['params']['n']} "
             f"per operation after {r['params']['warmup']} warm-up\n",
             "| operation | n | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|---|"]
    gw, host = r.get("gateway"), r.get("host")
    if gw:
        lines.append(_row("(a) baseline: GET /sessions/{id} through the gateway", gw["get"]))
        lines.append(_row("(a) reference: GET /sessions/{id}/execs (a host round trip, no tmux) through the gateway",
                          gw["list_execs"]))
        lines.append(_row("(a) POST /sessions/{id}/exec `true` through the gateway", gw["exec"]))
        if isinstance(gw["send_and_wait"], dict):
            lines.append(_row("(c) POST /sessions/{id}/input `echo x` + wait for the prompt", gw["send_and_wait"]))
            lines.append(_row("(c) its waited_ms as the API reports it", gw["send_and_wait_waited_ms_reported"]))
    if host:
        lines.append(_row("(b) baseline: Engine.send_input, 1 byte", host["send_input_1_byte"]))
        lines.append(_row("(b) Engine.exec(sid, `true`), wall time", host["exec"]))
        lines.append(_row("(b) its duration_ms as the engine reports it", host["exec_duration_ms_reported"]))
    lines.append("")
    if gw:
        lines.append(f"(a) exec p50 - GET p50 = {gw['exec_over_get_p50_ms']:.3f} ms (ratio "
                     f"{gw['exec_to_get_p50_ratio']}x; target <= {TARGET_EXEC_OVER_GET_MS} ms): "
                     f"{'met' if gw['exec_target_met'] else 'MISSED'}; exec p50 - execs p50 = "
                     f"{gw['exec_over_list_execs_p50_ms']:.3f} ms (what an exec costs beyond a route that calls the "
                     "host)")
        if isinstance(gw["send_and_wait"], dict):
            lines.append(f"(c) send-and-wait p50 - exec p50 = {gw['send_and_wait_over_exec_p50_ms']:.3f} ms (ratio "
                         f"{gw['send_and_wait_to_exec_p50_ratio']}x; target <= {TARGET_WAIT_OVER_EXEC_MS} ms): "
                         f"{'met' if gw['send_and_wait_target_met'] else 'MISSED'}")
        else:
            lines.append(f"(c) send-and-wait: {gw['send_and_wait']}")
    if host:
        lines.append(f"(b) host exec p50 = {host['exec']['p50_ms']:.3f} ms (target <= {TARGET_HOST_EXEC_P50_MS} ms): "
                     f"{'met' if host['target_met'] else 'MISSED'}; {host['exec_over_send_input_p50_ms']:.3f} ms "
                     f"above send_input ({host['exec_to_send_input_p50_ratio']}x)")
    return "\n".join(lines)


def targets_met(r: dict[str, Any]) -> bool:
    checks = []
    if "gateway" in r:
        checks.append(r["gateway"]["exec_target_met"])
        if r["gateway"]["send_and_wait_target_met"] is not None:
            checks.append(r["gateway"]["send_and_wait_target_met"])
    if "host" in r:
        checks.append(r["host"]["target_met"])
    return all(checks)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="samples per operation (default 300)")
    ap.add_argument("--warmup", type=int, default=20, help="warm-up rounds per operation (default 20)")
    ap.add_argument("--quick", action="store_true", help="CI-smoke counts (--n 30 --warmup 5)")
    ap.add_argument("--skip-host", action="store_true", help="leave out (b), the in-process host engine")
    ap.add_argument("--skip-gateway", action="store_true", help="leave out (a) and (c), the local stack")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.warmup = 30, 5
    result: dict[str, Any] = {"machine": machine(), "params": {"n": args.n, "warmup": args.warmup}}
    if not args.skip_host:  # first: the stack's processes are not running yet
        result["host"] = run_host(args.n, args.warmup)
    if not args.skip_gateway:
        result["gateway"] = bench_gateway(args.n, args.warmup)
    result["load1_after"] = round(os.getloadavg()[0], 2)
    result["targets_met"] = targets_met(result)
    print(markdown(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["targets_met"] or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
