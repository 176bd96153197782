"""Session creation end to end through the local gateway (token check, PostgreSQL, host placement, tmux
new-session over control mode, shell start), beside libtmux's ``Server.new_session`` on the same machine in the
same run.

    python bench/bench_create.py [--n 100]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "layers", ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import httpx  # noqa: E402
import libtmux  # noqa: E402

from bench.common import local_stack, machine, summary_ms  # noqa: E402


def bench_gateway_create(n: int) -> dict[str, Any]:
    with local_stack() as stack:
        h = {"authorization": f"Bearer {stack.token}"}
        samples = []
        with httpx.Client(base_url=stack.gateway_url, headers=h, timeout=30) as c:
            for i in range(n + 5):
                t0 = time.perf_counter()
                r = c.post("/sessions", json={"name": f"bench {i}"})
                dt = time.perf_counter() - t0
                assert r.status_code == 201, r.text
                if i >= 5:  # warm-up
                    samples.append(dt)
                c.delete(f"/sessions/{r.json()['id']}")
        return summary_ms(samples)


def bench_libtmux_create(n: int) -> dict[str, Any]:
    d = Path(tempfile.mkdtemp(prefix="tl", dir="/tmp"))
    server = libtmux.Server(socket_path=str(d / "s"))
    samples = []
    try:
        server.new_session("keepalive", attach=False)
        for i in range(n + 5):
            t0 = time.perf_counter()
            s = server.new_session(f"b{i}", attach=False, x=120, y=40)
            dt = time.perf_counter() - t0
            if i >= 5:
                samples.append(dt)
            s.kill()
    finally:
        server.kill()
        shutil.rmtree(d, ignore_errors=True)
    return summary_ms(samples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    args = ap.parse_args()
    ours = bench_gateway_create(args.n)
    base = bench_libtmux_create(args.n)
    out = {
        "benchmark": "session creation",
        "machine": machine(),
        "gateway_create": ours,
        "baseline_libtmux_new_session": base,
        "ratio_p50_gateway_over_libtmux": round(ours["p50_ms"] / base["p50_ms"], 3),
        "target": "gateway p95 <= 50 ms",
        "pass": ours["p95_ms"] <= 50,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
