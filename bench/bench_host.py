"""Benchmark of the tmux host engine.

1. Input latency: the engine's ``send_input`` through the persistent control-mode client vs libtmux
   ``pane.send_keys(..., enter=False, literal=True)`` (one tmux process per call), same kind of session,
   same run. Targets: p50 <= 0.5 ms and >= 20x faster than libtmux.
2. Memory per idle session: N sessions spread over the shards as the host would, shells settled (each
   has answered an exec), PSS of every tmux server + pane process (+ the control clients), per session.
   Target <= 6 MB/session. Baseline with 0 sessions = per-shard fixed overhead.

Usage: python bench/bench_host.py [--sessions 500] [--iterations 2000] [--shards 4] [--json]
(run from the repo root with PYTHONPATH=layers:. ; CI smoke: --sessions 20 --iterations 200).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "layers", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench.common import summary_ms  # noqa: E402
from tmux_host.control import kill_tmux_servers, tmux_binary  # noqa: E402
from tmux_host.engine import Engine  # noqa: E402
from tmuxi.settings import Settings  # noqa: E402


def smaps(pid: int) -> dict[str, int]:
    out = {"pss_kb": 0, "rss_kb": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    out["pss_kb"] = int(line.split()[1])
                elif line.startswith("Rss:"):
                    out["rss_kb"] = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def descendants(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        for c in children(stack.pop()):
            out.append(c)
            stack.append(c)
    return out


async def memory_snapshot(engine: Engine) -> dict[str, Any]:
    """PSS/RSS of: tmux servers, everything running in panes (all descendants of the servers: shells,
    the hidden _ctl `sleep`), and the control-mode client processes."""
    servers: list[int] = []
    for shard in engine.shards:
        (line,) = await shard.ctl.command("display-message -p 'P#{pid}'")
        servers.append(int(line[1:]))
    pane_procs = [c for s in servers for c in descendants(s)]
    clients = [s.ctl.pid for s in engine.shards if s.ctl.pid]
    groups = {"servers": servers, "pane_processes": pane_procs, "control_clients": clients}
    result: dict[str, Any] = {}
    for name, pids in groups.items():
        m = [smaps(p) for p in pids]
        result[name] = {"count": len(pids), "pss_kb": sum(x["pss_kb"] for x in m),
                        "rss_kb": sum(x["rss_kb"] for x in m)}
    result["total_pss_kb"] = sum(v["pss_kb"] for v in result.values() if isinstance(v, dict))
    result["total_rss_kb"] = sum(v["rss_kb"] for v in list(result.values()) if isinstance(v, dict))
    return result


async def bench_latency(engine: Engine, iterations: int, warmup: int, lib_iterations: int) -> dict[str, Any]:
    import libtmux

    sid_engine, sid_lib = uuid.uuid4(), uuid.uuid4()
    a = await engine.create_session(sid_engine, "bench-owner", 120, 40)
    b = await engine.create_session(sid_lib, "bench-owner", 120, 40)
    for sid in (sid_engine, sid_lib):  # both panes run `cat >/dev/null`: input is consumed, no redraws
        await engine.exec(sid, "true", 30)
        await engine.send_input(sid, b"exec cat >/dev/null\n")
    await asyncio.sleep(0.3)

    for _ in range(warmup):
        await engine.send_input(sid_engine, b"x")
    eng: list[float] = []
    for _ in range(iterations):
        t = time.perf_counter()
        await engine.send_input(sid_engine, b"x")
        eng.append(time.perf_counter() - t)

    server = libtmux.Server(socket_path=str(engine.socket_path(b["shard"])))
    pane = server.panes.get(pane_id=b["pane_id"])
    assert pane is not None
    for _ in range(min(warmup, 50)):
        pane.send_keys("x", enter=False, literal=True)
    lib: list[float] = []
    for _ in range(lib_iterations):
        t = time.perf_counter()
        pane.send_keys("x", enter=False, literal=True)
        lib.append(time.perf_counter() - t)

    # 4 KB pastes through the engine (one send-keys -H line each)
    paste: list[float] = []
    blob = os.urandom(2048).hex().encode()[:4096]
    for _ in range(max(20, iterations // 20)):
        t = time.perf_counter()
        await engine.send_input(sid_engine, blob)
        paste.append(time.perf_counter() - t)

    await engine.kill_session(sid_engine)
    await engine.kill_session(sid_lib)
    e, lb = summary_ms(eng), summary_ms(lib)
    return {
        "engine_send_input": e,
        "libtmux_send_keys": lb,
        "engine_send_input_4kb": summary_ms(paste),
        "speedup_p50": round(lb["p50_ms"] / e["p50_ms"], 1),
        "speedup_p99": round(lb["p99_ms"] / e["p99_ms"], 1),
        "target_met": e["p50_ms"] <= 0.5 and lb["p50_ms"] / e["p50_ms"] >= 20,
        "shard_of_session": a["shard"],
    }


async def bench_memory(engine: Engine, sessions: int, concurrency: int = 16) -> dict[str, Any]:
    await asyncio.sleep(0.5)
    baseline = await memory_snapshot(engine)
    ids = [uuid.uuid4() for _ in range(sessions)]
    t0 = time.monotonic()
    for i, sid in enumerate(ids):
        await engine.create_session(sid, f"user-{i}", 120, 40)
    created_s = time.monotonic() - t0
    sem = asyncio.Semaphore(concurrency)

    async def settle(sid: uuid.UUID) -> None:
        async with sem:  # the shell has started, read its rc files and answered a command
            r = await engine.exec(sid, "true", 120)
            assert r.exit_code == 0, r

    await asyncio.gather(*(settle(s) for s in ids))
    settled_s = time.monotonic() - t0
    await asyncio.sleep(1.0)
    loaded = await memory_snapshot(engine)
    per_shard = {s.index: 0 for s in engine.shards}
    for rec in engine._sessions.values():  # noqa: SLF001 - benchmark introspection
        per_shard[rec.shard] += 1
    pss_total = loaded["total_pss_kb"] / 1024
    pss_marginal = (loaded["total_pss_kb"] - baseline["total_pss_kb"]) / 1024
    res = {
        "sessions": sessions,
        "sessions_per_shard": per_shard,
        "create_s": round(created_s, 2),
        "create_and_settle_s": round(settled_s, 2),
        "baseline_0_sessions": baseline,
        "with_sessions": loaded,
        "pss_mb_per_session_gross": round(pss_total / sessions, 3),
        "pss_mb_per_session_marginal": round(pss_marginal / sessions, 3),
        "rss_mb_per_session_gross": round(loaded["total_rss_kb"] / 1024 / sessions, 3),
        "baseline_pss_mb_per_shard": round(baseline["total_pss_kb"] / 1024 / len(engine.shards), 3),
    }
    res["target_met"] = res["pss_mb_per_session_gross"] <= 6.0
    for sid in ids:
        await engine.kill_session(sid)
    return res


def machine() -> dict[str, Any]:
    try:
        tmux_v = subprocess.run([tmux_binary(), "-V"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        tmux_v = "?"
    mem_total = None
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_total = round(int(line.split()[1]) / 1024 / 1024, 2)
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "mem_gb": mem_total, "tmux": tmux_v, "loadavg": os.getloadavg()}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="tb"))
    settings = Settings(socket_dir=d / "s", host_secret="bench-" + "x" * 32, host_shards=args.shards,
                        host_capacity=max(args.sessions + 10, 10), host_id="bench")
    engine = Engine(settings)
    out: dict[str, Any] = {"machine": machine(), "params": vars(args)}
    try:
        await engine.start(background=False)
        if not args.skip_latency:  # first, while the machine is quiet (500 shells starting are not)
            out["input_latency"] = await bench_latency(engine, args.iterations, args.warmup,
                                                       args.libtmux_iterations or args.iterations)
        if not args.skip_memory:
            out["memory"] = await bench_memory(engine, args.sessions)
    finally:
        await engine.stop(kill_servers=True)
        kill_tmux_servers(d)
        shutil.rmtree(d, ignore_errors=True)
    return out


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [f"## tmux host benchmark\n\n{m['platform']}, {m['cpus']} CPUs, {m['mem_gb']} GB, {m['tmux']}, "
             f"Python {m['python']}, load {tuple(round(x, 2) for x in m['loadavg'])}\n"]
    if "input_latency" in r:
        lat = r["input_latency"]
        lines += ["| input path | n | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|---|"]
        for name, key in (("engine send_input (control client, 1 byte)", "engine_send_input"),
                          ("engine send_input (4 KB paste)", "engine_send_input_4kb"),
                          ("libtmux pane.send_keys(literal)", "libtmux_send_keys")):
            s = lat[key]
            lines.append(f"| {name} | {s['n']} | {s['p50_ms']} | {s['p95_ms']} | {s['p99_ms']} |")
        lines.append(f"\nspeedup p50 {lat['speedup_p50']}x, p99 {lat['speedup_p99']}x; "
                     f"target (p50 <= 0.5 ms, >= 20x) met: {lat['target_met']}\n")
    if "memory" in r:
        mem = r["memory"]
        b, w = mem["baseline_0_sessions"], mem["with_sessions"]
        lines += [
            f"memory: {mem['sessions']} idle sessions over {len(mem['sessions_per_shard'])} shards "
            f"{mem['sessions_per_shard']} (created+settled in {mem['create_and_settle_s']} s)\n",
            "| | servers PSS MB | pane procs PSS MB | ctl clients PSS MB | total PSS MB | total RSS MB |",
            "|---|---|---|---|---|---|",
        ]
        for name, snap in (("0 sessions (baseline)", b), (f"{mem['sessions']} sessions", w)):
            lines.append(
                f"| {name} | {snap['servers']['pss_kb'] / 1024:.1f} | {snap['pane_processes']['pss_kb'] / 1024:.1f} | "
                f"{snap['control_clients']['pss_kb'] / 1024:.1f} | {snap['total_pss_kb'] / 1024:.1f} | "
                f"{snap['total_rss_kb'] / 1024:.1f} |")
        lines.append(f"\nPSS per session: {mem['pss_mb_per_session_gross']} MB gross, "
                     f"{mem['pss_mb_per_session_marginal']} MB marginal (RSS gross "
                     f"{mem['rss_mb_per_session_gross']} MB); baseline {mem['baseline_pss_mb_per_shard']} MB/shard; "
                     f"target (<= 6 MB) met: {mem['target_met']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=500)
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--libtmux-iterations", type=int, default=0, help="default: same as --iterations")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    try:
        import uvloop  # noqa: F401

        default_loop = "uvloop"
    except ImportError:
        default_loop = "asyncio"
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default=default_loop)
    args = ap.parse_args()
    if args.loop == "uvloop":  # what `python -m tmux_host` runs on (uvicorn picks uvloop when installed)
        import uvloop

        result = uvloop.run(run(args))
    else:
        result = asyncio.run(run(args))
    if not args.json:
        print(markdown(result))
        print()
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
