"""Benchmark of the tmux host engine.

Each user has a tmux server of their own, run as their own OS account (uid = account_uid_base + account number),
so this needs root to run as it does in production (without it, the engine runs every server as the current user,
with a warning, and the figures are those of that development mode).

1. Input latency: the engine's ``send_input`` through the persistent control-mode client vs libtmux
   ``pane.send_keys(..., enter=False, literal=True)`` (one tmux client process per call) on a session of the same
   user's server (libtmux connects as root to that user's socket), same run. Targets: p50 <= 0.5 ms and >= 20x
   faster than libtmux.
2. Memory per idle session: N sessions assigned round-robin to accounts 1..U (one tmux server per account),
   shells settled (each has answered an exec). Summed: PSS (and RSS) of every account's tmux server, all its
   descendants (the shells in the panes, the hidden _ctl ``sleep``) and the host's control-mode client for it.
   Target: gross PSS per session (total / N) <= 6 MB. Also measured with one session per user, before the others
   are created, to give the fixed cost of a user's server (its tmux server, control client and _ctl pane).

Usage: python bench/bench_host.py [--sessions 500] [--users 25] [--iterations 2000] [--json]
(run from the repo root with PYTHONPATH=layers:. ; CI smoke: --sessions 20 --users 4 --iterations 200).
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


def sum_mem(pids: list[int]) -> dict[str, int]:
    m = [smaps(p) for p in pids]
    return {"count": len(pids), "pss_kb": sum(x["pss_kb"] for x in m), "rss_kb": sum(x["rss_kb"] for x in m)}


def memory_snapshot(engine: Engine) -> dict[str, Any]:
    """PSS/RSS of, for every account with a running server: its tmux server, everything running in its panes (all
    descendants of the server: shells, the hidden _ctl ``sleep``) and the host's control-mode client for it."""
    servers = [s.pid for s in engine.servers.values() if s.pid]
    pane_procs = [c for pid in servers for c in descendants(pid)]
    clients = [s.ctl.pid for s in engine.servers.values() if s.ctl.pid]
    result: dict[str, Any] = {"users": len(engine.servers), "sessions": engine.session_count,
                              "servers": sum_mem(servers), "pane_processes": sum_mem(pane_procs),
                              "control_clients": sum_mem(clients)}
    groups = [result[k] for k in ("servers", "pane_processes", "control_clients")]
    result["total_pss_kb"] = sum(g["pss_kb"] for g in groups)
    result["total_rss_kb"] = sum(g["rss_kb"] for g in groups)
    return result


def user_fixed_parts(engine: Engine) -> dict[str, Any]:
    """Per user, the processes that exist whatever the number of sessions: tmux server, control client, _ctl pane
    (a ``sleep``). The server's PSS here includes what one session costs it."""
    servers = [s.pid for s in engine.servers.values() if s.pid]
    sleeps = [c for pid in servers for c in children(pid) if comm(c) == "sleep"]
    clients = [s.ctl.pid for s in engine.servers.values() if s.ctl.pid]
    return {"servers": sum_mem(servers), "ctl_panes": sum_mem(sleeps), "control_clients": sum_mem(clients)}


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


async def bench_latency(engine: Engine, iterations: int, warmup: int, lib_iterations: int) -> dict[str, Any]:
    import libtmux

    account = 1
    sid_engine, sid_lib = uuid.uuid4(), uuid.uuid4()
    await engine.create_session(sid_engine, account, 120, 40)
    b = await engine.create_session(sid_lib, account, 120, 40)  # same user: same tmux server
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

    user_server = engine.servers[account]
    server = libtmux.Server(socket_path=str(user_server.socket_path))  # root may attach to the user's server
    pane = server.panes.get(pane_id=b["pane_id"])
    assert pane is not None
    for _ in range(min(warmup, 50)):
        pane.send_keys("x", enter=False, literal=True)
    lib: list[float] = []
    for _ in range(lib_iterations):
        t = time.perf_counter()
        pane.send_keys("x", enter=False, literal=True)
        lib.append(time.perf_counter() - t)

    # 4 KB pastes through the engine (load-buffer from a file + paste-buffer)
    paste: list[float] = []
    blob = os.urandom(2048).hex().encode()[:4096]
    for _ in range(max(20, iterations // 20)):
        t = time.perf_counter()
        await engine.send_input(sid_engine, blob)
        paste.append(time.perf_counter() - t)

    server_uid = os.stat(f"/proc/{user_server.pid}").st_uid if user_server.pid else None
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
        "account": account,
        "tmux_server_uid": server_uid,
    }


async def _create_and_settle(engine: Engine, plan: list[tuple[uuid.UUID, int]], concurrency: int) -> None:
    for sid, account in plan:
        await engine.create_session(sid, account, 120, 40)
    sem = asyncio.Semaphore(concurrency)

    async def settle(sid: uuid.UUID) -> None:
        async with sem:  # the shell has started, read its rc files and answered a command
            r = await engine.exec(sid, "true", 120)
            assert r.exit_code == 0, r

    await asyncio.gather(*(settle(sid) for sid, _ in plan))


async def bench_memory(engine: Engine, sessions: int, users: int, concurrency: int = 16) -> dict[str, Any]:
    users = max(1, min(users, sessions))
    plan = [(uuid.uuid4(), 1 + i % users) for i in range(sessions)]  # round-robin over accounts 1..users
    t0 = time.monotonic()
    # first one session per user (this starts every user's server), measured before the rest exist
    await _create_and_settle(engine, plan[:users], concurrency)
    first_s = time.monotonic() - t0
    await asyncio.sleep(1.0)
    one_each = memory_snapshot(engine)
    fixed_parts = user_fixed_parts(engine)
    t1 = time.monotonic()
    await _create_and_settle(engine, plan[users:], concurrency)
    rest_s = time.monotonic() - t1
    await asyncio.sleep(1.0)
    loaded = memory_snapshot(engine)
    per_user: dict[int, int] = {}
    for _, account in plan:
        per_user[account] = per_user.get(account, 0) + 1
    uids = sorted({os.stat(f"/proc/{s.pid}").st_uid for s in engine.servers.values() if s.pid})
    pss_total = loaded["total_pss_kb"] / 1024
    res: dict[str, Any] = {
        "sessions": sessions,
        "users": users,
        "sessions_per_user": {"min": min(per_user.values()), "max": max(per_user.values())},
        "tmux_server_uids": [uids[0], uids[-1]] if uids else [],
        "distinct_server_uids": len(uids),
        "create_and_settle_s": {"one_per_user": round(first_s, 2), "the_rest": round(rest_s, 2)},
        "one_session_per_user": one_each,
        "with_sessions": loaded,
        "pss_mb_per_session_gross": round(pss_total / sessions, 3),
        "rss_mb_per_session_gross": round(loaded["total_rss_kb"] / 1024 / sessions, 3),
    }
    if sessions > users:  # what one more session costs, once its user's server runs
        marginal_kb = (loaded["total_pss_kb"] - one_each["total_pss_kb"]) / (sessions - users)
        res["pss_mb_per_session_marginal"] = round(marginal_kb / 1024, 3)
        res["pss_mb_fixed_per_user"] = round((one_each["total_pss_kb"] - users * marginal_kb) / users / 1024, 3)
    res["fixed_parts_per_user_mb"] = {
        k: {"pss": round(v["pss_kb"] / 1024 / max(1, v["count"]), 3),
            "rss": round(v["rss_kb"] / 1024 / max(1, v["count"]), 3)} for k, v in fixed_parts.items()}
    res["target_met"] = res["pss_mb_per_session_gross"] <= 6.0
    for sid, _ in plan:
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
    from tmuxi.observability import logger

    for h in logger._logger.handlers:  # noqa: SLF001 - the engine's log lines go to stderr, the results to stdout
        h.stream = sys.stderr  # type: ignore[attr-defined]
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="tb"))
    d.chmod(0o711)  # the users' accounts reach their own directories below (sockets, homes)
    settings = Settings(socket_dir=d / "s", data_dir=d / "data", host_secret="bench-" + "x" * 32,
                        host_capacity=max(args.sessions + 10, 10), host_id="bench", heartbeat_interval_s=60)
    engine = Engine(settings)
    out: dict[str, Any] = {"machine": machine(), "params": vars(args)}
    try:
        await engine.start(background=False)
        assert engine.isolation is not None
        out["isolation"] = {"accounts": engine.isolation.accounts,
                            "cgroups": engine.isolation.cgroups.version if engine.isolation.cgroups else None}
        if not args.skip_latency:  # first, while the machine is quiet (500 shells starting are not)
            out["input_latency"] = await bench_latency(engine, args.iterations, args.warmup,
                                                       args.libtmux_iterations or args.iterations)
        if not args.skip_memory:
            out["memory"] = await bench_memory(engine, args.sessions, args.users)
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
        one, w = mem["one_session_per_user"], mem["with_sessions"]
        spu = mem["sessions_per_user"]
        lines += [
            f"memory: {mem['sessions']} idle sessions over {mem['users']} users ({spu['min']}-{spu['max']} each), "
            f"one tmux server per user, run as {mem['distinct_server_uids']} distinct uids "
            f"{mem['tmux_server_uids']}; isolation {r.get('isolation')}; created+settled in "
            f"{mem['create_and_settle_s']['one_per_user']} s + {mem['create_and_settle_s']['the_rest']} s\n",
            "| | servers PSS MB | pane procs PSS MB | ctl clients PSS MB | total PSS MB | total RSS MB |",
            "|---|---|---|---|---|---|",
        ]
        for name, snap in ((f"1 session per user ({one['sessions']})", one), (f"{w['sessions']} sessions", w)):
            lines.append(
                f"| {name} | {snap['servers']['pss_kb'] / 1024:.1f} | {snap['pane_processes']['pss_kb'] / 1024:.1f} | "
                f"{snap['control_clients']['pss_kb'] / 1024:.1f} | {snap['total_pss_kb'] / 1024:.1f} | "
                f"{snap['total_rss_kb'] / 1024:.1f} |")
        fp = mem["fixed_parts_per_user_mb"]
        parts = ", ".join(f"{k} {v['pss']}" for k, v in fp.items())
        lines.append(f"\nPSS per session: {mem['pss_mb_per_session_gross']} MB gross (RSS gross "
                     f"{mem['rss_mb_per_session_gross']} MB); target (gross PSS <= 6 MB) met: {mem['target_met']}")
        if "pss_mb_fixed_per_user" in mem:
            lines.append(f"marginal PSS per session once its user's server runs: {mem['pss_mb_per_session_marginal']} "
                         f"MB; fixed PSS per user (1-session-per-user total minus {mem['users']} x marginal): "
                         f"{mem['pss_mb_fixed_per_user']} MB")
        lines.append(f"per user, with 1 session each (PSS MB): {parts}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=500)
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--libtmux-iterations", type=int, default=0, help="default: same as --iterations")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--users", type=int, default=25,
                    help="accounts the sessions are spread over, round-robin (one tmux server each)")
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
