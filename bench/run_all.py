"""Run every benchmark in one go and keep the results (``make bench``).

Each benchmark reports its figures beside a baseline measured in the same run, with p50/p95/p99 and the
machine it ran on. Output: bench/results/<UTC timestamp>.txt (everything printed, headed by the commit and
whether the work tree had changes) and the last lines here.

    python bench/run_all.py [--quick] [--only gateway,scale]
"""
from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small counts (a smoke run, not for reporting)")
    ap.add_argument("--only", default="",
                    help="comma-separated names: host, create, gateway, scale, ws, coldstart, cdk, cleanup "
                         "(default: all)")
    args = ap.parse_args()
    q = args.quick
    runs = [
        ("host", "host input latency + memory per session (sessions over users, one tmux server per user)",
         ["bench/bench_host.py", "--sessions", "50" if q else "500", "--users", "10" if q else "25",
          "--iterations", "300" if q else "2000"]),
        ("create", "session creation through the gateway (a user's first session on a host, and later ones)",
         ["bench/bench_create.py", "--n", "20" if q else "100", "--first", "10" if q else "50"]),
        ("gateway", "GET /sessions/{id} through the gateway vs bare FastAPI, 24 users; and with PostgreSQL stopped",
         ["bench/bench_gateway.py", "--stack", "--outage", "stop",
          *(["--duration", "3", "--rounds", "1"] if q else [])]),
        ("scale", "2,000 live sessions over two hosts vs 10: create, exec, input, screen",
         ["bench/bench_scale.py", *(["--quick"] if q else [])]),
        ("ws", "live terminals over WebSocket: keystroke to echo vs a bare echo server, throughput, a stalled viewer",
         ["bench/bench_ws.py", *(["--quick"] if q else [])]),
        ("coldstart", "Lambda cold start: a fresh process importing each handler vs python, boto3, fastapi, and a bare "
         "FastAPI + Mangum app; the authorizer's first request",
         ["bench/bench_coldstart.py", "--n", "3" if q else "10", "--first-request"]),
        ("cdk", "cdk synth of all three environments (cdk-nag on) vs an empty CDK app",
         ["bench/bench_cdk.py", "--rounds", "1" if q else "3"]),
        ("backup", "backup + verified restore of 100,000 sessions and 1,000,000 audit events vs pg_dump + pg_restore",
         ["bench/bench_backup.py", *(["--sessions", "10000", "--events", "100000"] if q else [])]),
        ("cleanup", "idle-session cleanup: 10,000 idle rows, 500 with tmux sessions on two hosts, vs plain UPDATEs",
         ["bench/bench_cleanup.py", *(["--rows", "1000", "--real", "50"] if q else [])]),
        ("agent", "an agent's loop: trivial exec and send-and-wait through the gateway vs a bare GET on the same "
         "session; the host's own exec vs its send_input",
         ["bench/bench_agent.py", *(["--quick"] if q else [])]),
    ]
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    unknown = only - {name for name, _, _ in runs}
    if unknown:
        ap.error(f"unknown benchmark(s): {sorted(unknown)}")
    runs = [r for r in runs if not only or r[0] in only]
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / (dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + ".txt")
    failed = 0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.split("\n")
    changed = sorted(line[3:] for line in dirty if line.strip())
    with out.open("w") as f:
        f.write(f"# commit {commit.strip() or '?'}" + (f", with changes to {', '.join(changed)}" if changed else "")
                + (" (--quick)" if q else "") + "\n\n")
        for i, (_, title, cmd) in enumerate(runs, 1):
            print(f"[bench {i}/{len(runs)}] {title} ...", flush=True)
            proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True,
                                  env={**__import__("os").environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'layers'}"})
            f.write(f"## {title}\n$ python {' '.join(cmd)}\n{proc.stdout}\n")
            if proc.returncode != 0:
                failed += 1
                f.write(proc.stderr[-4000:])
                print(f"  failed (exit {proc.returncode}); see {out}", flush=True)
    print(out.read_text())
    print(f"results kept in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
