"""Run every benchmark in one go and keep the results (``make bench``).

Each benchmark reports its figures beside a baseline measured in the same run, with p50/p95/p99 and the
machine it ran on. Output: bench/results/<UTC timestamp>.txt (everything printed) and the last lines here.

    python bench/run_all.py [--quick]
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
    args = ap.parse_args()
    q = args.quick
    runs = [
        ("host input latency + memory per session (sessions over users, one tmux server per user)",
         ["bench/bench_host.py", "--sessions", "50" if q else "500", "--users", "10" if q else "25",
          "--iterations", "300" if q else "2000"]),
        ("session creation through the gateway (a user's first session on a host, and later ones)",
         ["bench/bench_create.py", "--n", "20" if q else "100", "--first", "10" if q else "50"]),
        ("GET /sessions/{id} through the gateway vs bare FastAPI",
         ["bench/bench_gateway.py", "--stack", *(["--duration", "3", "--rounds", "1"] if q else [])]),
    ]
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / (dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + ".txt")
    failed = 0
    with out.open("w") as f:
        for i, (title, cmd) in enumerate(runs, 1):
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
