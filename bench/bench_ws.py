"""Live terminals over WebSocket, through the local stack (two tmux hosts, the local WebSocket API, real tmux).

1. Keystroke to echo: a client attached to a session running ``cat`` with the terminal's echo on sends one key per
   ``input`` message and waits for its echo in an ``output`` message; beside a bare WebSocket echo server (the
   ``websockets`` library, its own process) answering the same messages in the same run. Half the keys land on
   the host that does not hold the session and are forwarded (two hosts behind one "NLB"), as in AWS.
2. Output throughput to one attached client: ``cat`` of a large file in the session; bytes the client decoded per
   second, beside the same ``cat`` in a plain tmux server nobody watches (what tmux itself manages).
3. One stalled viewer (a client that stops reading) on a session that floods, while another session floods with a
   live viewer, for ``--stall-seconds`` in all (two halves): the streaming session's throughput beside as long
   without the stalled viewer, the two alternating, and the growth of the hosts' memory (RSS).

    python bench/bench_ws.py [--keys 2000] [--mb 100] [--stall-seconds 60] [--quick]
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "layers")]
from bench.common import descendants, local_stack, machine, memory_of, proc_table, summary_ms  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench_ws] {msg}", file=sys.stderr, flush=True)


# --- a client ------------------------------------------------------------------------------------------------


class Client:
    def __init__(self, api: httpx.Client, token: str, ws_url: str) -> None:
        self.api, self.ws_url = api, ws_url
        self.h = {"authorization": f"Bearer {token}"}

    def session(self) -> str:
        r = self.api.post("/sessions", headers=self.h, json={"cols": 120, "rows": 40})
        r.raise_for_status()
        return str(r.json()["id"])

    def type_line(self, sid: str, line: str) -> None:
        self.api.post(f"/sessions/{sid}/input", headers=self.h, json={"text": line, "enter": True}).raise_for_status()

    def exec(self, sid: str, command: str) -> str:
        r = self.api.post(f"/sessions/{sid}/exec", headers=self.h, json={"command": command, "timeout_s": 20})
        r.raise_for_status()
        return str(r.json()["stdout"])

    async def attach(self, sid: str, **connect_kw: Any) -> ClientConnection:
        r = self.api.post("/ws/tickets", headers=self.h)
        r.raise_for_status()
        ws = await connect(f"{self.ws_url}?ticket={r.json()['ticket']}", **connect_kw)
        await ws.send(json.dumps({"action": "attach", "session_id": sid}))
        while json.loads(await ws.recv())["type"] != "snapshot":
            pass
        return ws


# --- 1. keystroke to echo --------------------------------------------------------------------------------------


def _echo_server(port: int, ready: Any) -> None:
    from websockets.asyncio.server import serve

    async def echo(ws: Any) -> None:
        async for message in ws:
            await ws.send(message)

    async def main() -> None:
        async with serve(echo, "127.0.0.1", port):
            ready.set()
            await asyncio.Future()

    asyncio.run(main())


async def _keys_bare(port: int, n: int) -> list[float]:
    out = []
    async with connect(f"ws://127.0.0.1:{port}/") as ws:
        for i in range(n):
            msg = json.dumps({"action": "input", "data": chr(97 + i % 26)})
            t = time.perf_counter()
            await ws.send(msg)
            await ws.recv()
            out.append(time.perf_counter() - t)
    return out


async def _keys_stack(client: Client, sid: str, n: int) -> list[float]:
    ws = await client.attach(sid)
    out = []
    try:
        for i in range(n):
            key = chr(97 + i % 26)
            t = time.perf_counter()
            await ws.send(json.dumps({"action": "input", "data": key}))
            while True:
                m = json.loads(await ws.recv())
                if m["type"] == "output" and key.encode() in base64.b64decode(m["data"]):
                    break
            out.append(time.perf_counter() - t)
    finally:
        await ws.close()
    return out


def bench_keys(client: Client, n: int) -> dict[str, Any]:
    from local.services import free_port

    sid = client.session()
    client.type_line(sid, "stty -icanon; cat > /dev/null")  # the terminal echoes each key; cat reads it
    time.sleep(0.5)
    port = free_port()
    ready = multiprocessing.Event()
    server = multiprocessing.Process(target=_echo_server, args=(port, ready), daemon=True)
    server.start()
    ready.wait(10)
    try:
        rounds: dict[str, list[float]] = {"bare": [], "stack": []}
        for _ in range(2):  # interleaved, so both see the same machine
            rounds["bare"] += asyncio.run(_keys_bare(port, n // 2))
            rounds["stack"] += asyncio.run(_keys_stack(client, sid, n // 2))
    finally:
        server.kill()
    stack, bare = summary_ms(rounds["stack"]), summary_ms(rounds["bare"])
    # The WebSocket API takes the two hosts in turn (as an NLB would): every other key lands on the host that does
    # not hold the session, which forwards it (n is even, so each round starts on the same host)
    halves = sorted([summary_ms(rounds["stack"][0::2]), summary_ms(rounds["stack"][1::2])], key=lambda h: h["p50_ms"])
    return {"stack": stack, "bare_websocket_echo": bare, "direct_keys": halves[0], "forwarded_keys": halves[1],
            "ratio_p50": round(stack["p50_ms"] / bare["p50_ms"], 2),
            "ratio_p99": round(stack["p99_ms"] / bare["p99_ms"], 2)}


# --- 2. throughput ---------------------------------------------------------------------------------------------


async def _receive_until(ws: ClientConnection, marker: bytes, deadline: float) -> tuple[int, int]:
    got = gaps = 0
    tail = b""
    while time.monotonic() < deadline:
        m = json.loads(await asyncio.wait_for(ws.recv(), deadline - time.monotonic()))
        if m["type"] in ("output", "snapshot"):
            data = base64.b64decode(m["data"])
            got += len(data) if m["type"] == "output" else 0
            gaps += 1 if m.get("gap") else 0
            if marker in tail + data:
                return got, gaps
            tail = data[-64:]
    raise TimeoutError("the end marker never came")


def _tmux_alone(path: Path, control_client: bool = False) -> float:
    """Seconds for a plain tmux server to take the same cat: nobody attached, or (``control_client``) one
    control-mode client whose output goes straight to /dev/null -- the most a control-mode reader can get, since
    tmux itself escapes every byte for it."""
    d = Path(tempfile.mkdtemp(prefix="tb", dir="/tmp"))
    sock, done = d / "s", d / "done"
    tmux = ["tmux", "-S", str(sock), "-f", "/dev/null"]
    reader = None
    try:
        subprocess.run([*tmux, "new-session", "-d", "-s", "w", "-x", "120", "-y", "40", "sleep 60"], check=True)
        if control_client:
            reader = subprocess.Popen([*tmux, "-C", "attach", "-t", "w"], stdin=subprocess.PIPE,
                                      stdout=subprocess.DEVNULL)
            time.sleep(0.3)
        t = time.perf_counter()
        subprocess.run([*tmux, "new-window", "-t", "w", f"cat {path}; touch {done}; sleep 5"], check=True)
        while not done.exists():
            time.sleep(0.005)
        return time.perf_counter() - t
    finally:
        if reader is not None:
            reader.kill()
        subprocess.run([*tmux, "kill-server"], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


def bench_throughput(client: Client, mb: int) -> dict[str, Any]:
    sid = client.session()
    home = client.exec(sid, "pwd").strip()
    client.exec(sid, f"head -c {mb * 3 // 4 * 1024 * 1024} /dev/urandom | base64 -w 120 > big.txt; wc -c < big.txt")
    size = int(client.exec(sid, "wc -c < big.txt").strip())

    async def run() -> dict[str, Any]:
        ws = await client.attach(sid, max_size=None)
        try:
            t = time.perf_counter()
            await ws.send(json.dumps({"action": "input", "data": "cat big.txt; echo END-$((40+2))\r"}))
            got, gaps = await _receive_until(ws, b"END-42", time.monotonic() + 300)
            return {"seconds": time.perf_counter() - t, "bytes": got, "gap_snapshots": gaps}
        finally:
            await ws.close()

    ours = asyncio.run(run())
    mbps = ours["bytes"] / ours["seconds"] / 1e6
    out: dict[str, Any] = {"file_bytes": size, "delivered_bytes": ours["bytes"], "seconds": round(ours["seconds"], 3),
                           "client_MBps": round(mbps, 1), "gap_snapshots": ours["gap_snapshots"]}
    big = Path(home) / "big.txt"
    if os.access(big, os.R_OK):  # (the file is the session's user's; this process can read it as root)
        alone, ceiling = _tmux_alone(big), _tmux_alone(big, control_client=True)
        out["tmux_alone_MBps"] = round(size / alone / 1e6, 1)
        out["tmux_control_mode_to_devnull_MBps"] = round(size / ceiling / 1e6, 1)
        out["ratio_to_control_mode_ceiling"] = round(mbps / (size / ceiling / 1e6), 2)
    return out


# --- 3. a stalled viewer -----------------------------------------------------------------------------------------


def _host_pids(stack: Any) -> list[int]:
    table = proc_table()
    return [pid for pid, (_, cmd) in table.items() if "tmux_host" in cmd and "python" in cmd]


async def _stream_for(client: Client, sid: str, seconds: float) -> float:
    """MB/s a live viewer of a flooding session receives over ``seconds``."""
    ws = await client.attach(sid, max_size=None)
    got = 0
    try:
        t0 = time.monotonic()
        while (now := time.monotonic()) - t0 < seconds:
            try:
                m = json.loads(await asyncio.wait_for(ws.recv(), max(0.01, seconds - (now - t0))))
            except TimeoutError:
                break
            if m["type"] == "output":
                got += len(base64.b64decode(m["data"]))
        return got / (time.monotonic() - t0) / 1e6
    finally:
        await ws.close()


def bench_stall(client: Client, stalled_client: Client, seconds: float) -> dict[str, Any]:
    streaming, stalled = client.session(), stalled_client.session()
    for c, sid in ((client, streaming), (stalled_client, stalled)):
        c.exec(sid, "head -c 8000000 /dev/urandom | base64 -w 120 > f.txt")
        c.type_line(sid, "while :; do cat f.txt; done")
    pids = _host_pids(None)

    def rss() -> float:
        return memory_of(set().union(*(descendants(proc_table(), [p]) for p in pids)) if pids else set())["rss_mb"]

    async def phase(with_stall: bool) -> dict[str, Any]:
        stall_ws = None
        if with_stall:
            # a client that stops reading: its socket fills, the gateway refuses more (429), the host's viewer
            # falls behind its buffer
            stall_ws = await stalled_client.attach(stalled, max_queue=1, max_size=None)
        peak = before = rss()

        async def sample() -> None:
            nonlocal peak
            while True:
                await asyncio.sleep(1.0)
                peak = max(peak, await asyncio.to_thread(rss))

        sampler = asyncio.create_task(sample())
        try:
            mbps = await _stream_for(client, streaming, seconds)
        finally:
            sampler.cancel()
            if stall_ws is not None:
                stall_ws.transport.abort()
        return {"streaming_MBps": round(mbps, 1), "hosts_rss_before_mb": round(before, 1),
                "hosts_rss_peak_mb": round(peak, 1), "hosts_rss_growth_mb": round(peak - before, 1)}

    # alternating halves (without, with, without, with): the machine's drift over minutes falls on both alike
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for with_stall in (False, True, False, True):
        runs[with_stall].append(asyncio.run(phase(with_stall)))
    for c, sid in ((client, streaming), (stalled_client, stalled)):
        c.api.post(f"/sessions/{sid}/input", headers=c.h, json={"keys": ["C-c"]})

    def merged(rs: list[dict[str, Any]]) -> dict[str, Any]:
        return {"streaming_MBps": round(sum(r["streaming_MBps"] for r in rs) / len(rs), 2),
                "rounds_MBps": [r["streaming_MBps"] for r in rs],
                "hosts_rss_before_mb": rs[0]["hosts_rss_before_mb"],
                "hosts_rss_peak_mb": max(r["hosts_rss_peak_mb"] for r in rs),
                "hosts_rss_growth_mb": round(max(r["hosts_rss_peak_mb"] for r in rs) - rs[0]["hosts_rss_before_mb"], 1)}

    base, stall = merged(runs[False]), merged(runs[True])
    return {"seconds": 2 * seconds, "without_stalled_viewer": base, "with_stalled_viewer": stall,
            "throughput_ratio": round(stall["streaming_MBps"] / base["streaming_MBps"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=2000)
    ap.add_argument("--mb", type=int, default=100, help="size of the file cat prints (MB)")
    ap.add_argument("--stall-seconds", type=float, default=60.0)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.keys, args.mb, args.stall_seconds = 200, 10, 5.0
    results: dict[str, Any] = {"machine": machine()}
    with local_stack(hosts=2) as stack:
        api = httpx.Client(base_url=stack.gateway_url, timeout=60)
        stack.ensure_user("bench-stalled", "bench-pw-2", "user")
        t2 = api.post("/auth/token", json={"username": "bench-stalled", "password": "bench-pw-2"}).json()
        client = Client(api, stack.token, stack.ws_url)
        other = Client(api, t2["access_token"], stack.ws_url)
        log("keystroke to echo ...")
        results["keystroke_echo"] = bench_keys(client, args.keys)
        log("throughput ...")
        results["throughput"] = bench_throughput(client, args.mb)
        log(f"stalled viewer ({2 * args.stall_seconds:.0f} s: {args.stall_seconds:.0f} s with, as long without) ...")
        results["stalled_viewer"] = bench_stall(client, other, args.stall_seconds / 2)
    k, th, st = results["keystroke_echo"], results["throughput"], results["stalled_viewer"]
    print(json.dumps(results, indent=2))
    print(f"keystroke->echo through the stack p50 {k['stack']['p50_ms']} ms p95 {k['stack']['p95_ms']} p99 "
          f"{k['stack']['p99_ms']}; keys landing on the session's host p50 {k['direct_keys']['p50_ms']}, "
          f"forwarded by the other p50 {k['forwarded_keys']['p50_ms']} (bare WebSocket echo p50 "
          f"{k['bare_websocket_echo']['p50_ms']} p99 "
          f"{k['bare_websocket_echo']['p99_ms']}; ratio p50 {k['ratio_p50']}x)  target p50<=2 p99<=10: "
          f"{'MET' if k['stack']['p50_ms'] <= 2 and k['stack']['p99_ms'] <= 10 else 'MISSED'}")
    print(f"throughput {th['client_MBps']} MB/s to one client ({th.get('ratio_to_control_mode_ceiling')}x of tmux "
          f"control mode into /dev/null, {th.get('tmux_control_mode_to_devnull_MBps')} MB/s; tmux with nobody "
          f"attached {th.get('tmux_alone_MBps')} MB/s)  target >=20: {'MET' if th['client_MBps'] >= 20 else 'MISSED'}")
    grew = st["with_stalled_viewer"]["hosts_rss_growth_mb"]
    print(f"stalled viewer: streaming session {st['with_stalled_viewer']['streaming_MBps']} MB/s vs "
          f"{st['without_stalled_viewer']['streaming_MBps']} without ({st['throughput_ratio']}x), hosts' memory "
          f"+{grew} MB  targets >=0.9x, <=64 MB: {'MET' if st['throughput_ratio'] >= 0.9 and grew <= 64 else 'MISSED'}")


if __name__ == "__main__":
    main()
