"""Session creation end to end through the local gateway (token check, PostgreSQL, host placement, tmux
new-session over control mode, shell start), beside libtmux's ``Server.new_session`` on the same machine in the
same run. Two cases, each with p50/p95/p99:

- first: a user's first session on a host, which starts that user's tmux server (as their own OS account, in its
  cgroup): a fresh user per sample. Baseline: libtmux ``new_session`` on a new socket (it starts a server too).
- later: a user who already has a session on every host creates another (their server runs). Baseline: libtmux
  ``new_session`` on a server that already has a session.

The stack runs with TMUXI_SESSION_QUOTA raised (``bench.common.local_stack``), though no user here holds more than
a few sessions at once. Target: p95 <= 50 ms through the gateway.

    python bench/bench_create.py [--n 100] [--first 50]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "layers", ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import httpx  # noqa: E402
import libtmux  # noqa: E402

from bench.common import local_stack, machine, summary_ms  # noqa: E402

TARGET_P95_MS = 50.0
WARMUP = 5


def _token(c: httpx.Client, username: str, password: str) -> str:
    r = c.post("/auth/token", json={"username": username, "password": password})
    r.raise_for_status()
    return str(r.json()["access_token"])


def bench_gateway_create(n_later: int, n_first: int) -> dict[str, Any]:
    from tmuxi.auth import hash_password
    from tmuxi.db import repo

    with local_stack() as stack, httpx.Client(base_url=stack.gateway_url, timeout=30) as c:
        hosts = len(stack.host_procs)
        # --- first sessions: fresh users (set up, tokens fetched, before any timing)
        pw = "bench-pw"
        pw_hash = hash_password(pw)
        tokens = []
        for _ in range(n_first + WARMUP):
            name = "bench-first-" + uuid.uuid4().hex[:8]
            repo.create_user(name, pw_hash, "user")
            tokens.append(_token(c, name, pw))
        first: list[float] = []
        made: list[tuple[str, str]] = []
        for i, tok in enumerate(tokens):
            h = {"authorization": f"Bearer {tok}"}
            t0 = time.perf_counter()
            r = c.post("/sessions", json={"name": f"first {i}"}, headers=h)
            dt = time.perf_counter() - t0
            assert r.status_code == 201, r.text
            made.append((tok, r.json()["id"]))
            if i >= WARMUP:
                first.append(dt)
        # ended after the loop, so no server's shutdown (kill-server, cgroup reaped) overlaps a timed create
        for tok, sid in made:
            c.delete(f"/sessions/{sid}", headers={"authorization": f"Bearer {tok}"})
        time.sleep(1.0)

        # --- later sessions: one user with a session on every host (placement picks the freest host)
        h = {"authorization": f"Bearer {stack.token}"}
        keep: dict[str, str] = {}  # host id -> a session kept open there
        for i in range(hosts * 4):
            if len(keep) == hosts:
                break
            r = c.post("/sessions", json={"name": f"keepalive {i}"}, headers=h)
            assert r.status_code == 201, r.text
            body = r.json()
            if body["host_id"] in keep:
                c.delete(f"/sessions/{body['id']}", headers=h)
            else:
                keep[body["host_id"]] = body["id"]
        later: list[float] = []
        not_warm = 0
        for i in range(n_later + WARMUP):
            t0 = time.perf_counter()
            r = c.post("/sessions", json={"name": f"bench {i}"}, headers=h)
            dt = time.perf_counter() - t0
            assert r.status_code == 201, r.text
            body = r.json()
            if i >= WARMUP:
                if body["host_id"] in keep:
                    later.append(dt)
                else:
                    not_warm += 1
            c.delete(f"/sessions/{body['id']}", headers=h)
        for sid in keep.values():
            c.delete(f"/sessions/{sid}", headers=h)
        return {"hosts": hosts, "first": summary_ms(first), "later": summary_ms(later),
                "later_on_a_host_without_the_users_server": not_warm}


def bench_libtmux_create(n_later: int, n_first: int) -> dict[str, Any]:
    d = Path(tempfile.mkdtemp(prefix="tl", dir="/tmp"))
    first: list[float] = []
    later: list[float] = []
    try:
        for i in range(n_first + WARMUP):  # a new server each time: new_session starts it
            server = libtmux.Server(socket_path=str(d / f"f{i}"))
            try:
                t0 = time.perf_counter()
                server.new_session(f"b{i}", attach=False, x=120, y=40)
                dt = time.perf_counter() - t0
            finally:
                server.kill()
            if i >= WARMUP:
                first.append(dt)
        server = libtmux.Server(socket_path=str(d / "s"))
        try:
            server.new_session("keepalive", attach=False)
            for i in range(n_later + WARMUP):
                t0 = time.perf_counter()
                s = server.new_session(f"b{i}", attach=False, x=120, y=40)
                dt = time.perf_counter() - t0
                if i >= WARMUP:
                    later.append(dt)
                s.kill()
        finally:
            server.kill()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return {"first": summary_ms(first), "later": summary_ms(later)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="later sessions (a user's server already runs)")
    ap.add_argument("--first", type=int, default=50, help="first sessions (fresh users: each starts a server)")
    args = ap.parse_args()
    ours = bench_gateway_create(args.n, args.first)
    base = bench_libtmux_create(args.n, args.first)
    out: dict[str, Any] = {
        "benchmark": "session creation",
        "machine": machine(),
        "gateway_create_first_session": ours["first"],
        "gateway_create_later_session": ours["later"],
        "baseline_libtmux_new_session_new_server": base["first"],
        "baseline_libtmux_new_session": base["later"],
        "hosts": ours["hosts"],
        "later_on_a_host_without_the_users_server": ours["later_on_a_host_without_the_users_server"],
        "ratio_p50_first_gateway_over_libtmux": round(ours["first"]["p50_ms"] / base["first"]["p50_ms"], 3),
        "ratio_p50_later_gateway_over_libtmux": round(ours["later"]["p50_ms"] / base["later"]["p50_ms"], 3),
        "target": f"gateway p95 <= {TARGET_P95_MS:g} ms",
        "pass_first": ours["first"]["p95_ms"] <= TARGET_P95_MS,
        "pass_later": ours["later"]["p95_ms"] <= TARGET_P95_MS,
    }
    out["pass"] = out["pass_first"] and out["pass_later"]
    rows = [("gateway, user's first session on the host (starts their server)", ours["first"]),
            ("libtmux new_session on a new server", base["first"]),
            ("gateway, later session (user's server running)", ours["later"]),
            ("libtmux new_session on a running server", base["later"])]
    print("| session creation | n | p50 ms | p95 ms | p99 ms |\n|---|---|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s['n']} | {s['p50_ms']:.2f} | {s['p95_ms']:.2f} | {s['p99_ms']:.2f} |")
    print(f"\ntarget p95 <= {TARGET_P95_MS:g} ms: first {'met' if out['pass_first'] else 'MISSED'}, "
          f"later {'met' if out['pass_later'] else 'MISSED'}\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
