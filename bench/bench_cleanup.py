"""Idle-session cleanup (the maintenance function's ``cleanup`` task) of 10,000 idle sessions, 500 of them with
real tmux sessions over the two hosts of a local stack (the rest rows only, as after a host restart took their
tmux sessions), beside a baseline in the same run: the plain UPDATEs of the same rows (``deleting``, then
``deleted``) in one transaction, rolled back -- the database work alone, no audit, no hosts, no Redis.

The stack's scheduler runs no task here (TMUXI_SCHEDULER_TASKS=none), so the run measured is the only one.
Target: <= 10 s for the 10,000.

    python bench/bench_cleanup.py [--rows 10000] [--real 500]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "layers", ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import httpx  # noqa: E402
import psycopg  # noqa: E402

from bench.common import local_stack, machine  # noqa: E402

TARGET_S = 10.0
USER_SESSIONS = 25  # sessions per user: 500 over 20 users, as in bench_host


def _held(host_ids: list[str]) -> int:
    from tmuxi import host_client, registry

    return sum(len(host_client.HostClient(registry.host_url(h)).list_sessions()) for h in host_ids)


def run(rows: int, real: int) -> dict[str, Any]:
    with local_stack(hosts=2, TMUXI_SCHEDULER_TASKS="none") as stack:
        from functions.maintenance.handler import TASKS
        from tmuxi.db.pool import connection
        from tmuxi.services import maintenance

        t0 = time.perf_counter()
        with httpx.Client(base_url=stack.gateway_url, timeout=60) as c:
            # sessions spread over users (each user's shells share their per-user process limit on a host)
            headers = []
            for u in range(max(1, real // USER_SESSIONS)):
                name = f"idle-{u}-{uuid.uuid4().hex[:6]}"
                stack.ensure_user(name, "bench-pw", "user")
                r = c.post("/auth/token", json={"username": name, "password": "bench-pw"})
                r.raise_for_status()
                headers.append({"authorization": f"Bearer {r.json()['access_token']}"})

            def create(i: int) -> dict[str, Any]:
                r = c.post("/sessions", json={"name": f"idle {i}"}, headers=headers[i % len(headers)])
                if r.status_code != 201:
                    raise RuntimeError(f"create {i}: {r.status_code} {r.text[:300]}")
                out: dict[str, Any] = r.json()
                return out

            with ThreadPoolExecutor(max_workers=8) as pool:
                made = list(pool.map(create, range(real)))
        setup_real_s = time.perf_counter() - t0
        hosts = sorted({m["host_id"] for m in made})
        with connection() as conn:
            owner = conn.execute("SELECT owner_id FROM sessions WHERE id = %s", (uuid.UUID(made[0]["id"]),)
                                 ).fetchone()["owner_id"]  # the rows-only sessions: one user's
            fake = [uuid.uuid4() for _ in range(rows - real)]
            conn.execute(
                "INSERT INTO sessions (id, owner_id, name, state, host_id, tmux_name, cols, rows)"
                " SELECT i, %s, 'idle', 'active', (%s::text[])[1 + (n %% %s)], 't' || replace(i::text, '-', ''),"
                " 80, 24 FROM unnest(%s::uuid[]) WITH ORDINALITY AS f(i, n)",
                (owner, hosts, len(hosts), fake))
            conn.execute("UPDATE sessions SET last_active_at = now() - interval '1 hour' WHERE state = 'active'")
            ids = [r["id"] for r in conn.execute("SELECT id FROM sessions WHERE state = 'active'").fetchall()]
        assert len(ids) == rows, len(ids)
        held_before = _held(hosts)

        # baseline: the same rows' state changes as plain UPDATEs, rolled back
        with connection() as conn, conn.transaction():
            tb = time.perf_counter()
            conn.execute("UPDATE sessions SET state = 'deleting' WHERE id = ANY(%s)", (ids,))
            conn.execute("UPDATE sessions SET state = 'deleted' WHERE id = ANY(%s)", (ids,))
            baseline_s = time.perf_counter() - tb
            raise psycopg.Rollback()  # nothing changed: the rows are the cleanup's to take

        tc = time.perf_counter()
        out = maintenance.run("cleanup", TASKS["cleanup"])
        cleanup_s = time.perf_counter() - tc
        with connection() as conn:
            left = conn.execute("SELECT count(*) AS n FROM sessions WHERE id = ANY(%s) AND state <> 'deleted'",
                                (ids,)).fetchone()["n"]
        held_after = _held(hosts)
    return {"rows": rows, "real_tmux_sessions": real, "held_before": held_before, "held_after": held_after,
            "not_deleted_after": int(left), "result": out, "setup_real_sessions_s": round(setup_real_s, 2),
            "cleanup_s": round(cleanup_s, 3), "baseline_plain_updates_s": round(baseline_s, 3),
            "target_s": TARGET_S, "pass": cleanup_s <= TARGET_S and left == 0 and held_after == 0,
            "machine": machine()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--real", type=int, default=500)
    args = ap.parse_args()
    out = run(args.rows, args.real)
    print("| cleanup | rows | real tmux sessions | seconds |\n|---|---|---|---|")
    print(f"| maintenance cleanup (batched, hosts, audit, Redis) | {out['rows']} | {out['real_tmux_sessions']} | "
          f"{out['cleanup_s']:.3f} |")
    print(f"| baseline: plain UPDATE deleting + deleted, rolled back | {out['rows']} | - | "
          f"{out['baseline_plain_updates_s']:.3f} |")
    print(f"\ntarget <= {TARGET_S:g} s: {'met' if out['pass'] else 'MISSED'} (tmux sessions held before "
          f"{out['held_before']}, after {out['held_after']}; rows not deleted after: {out['not_deleted_after']})")
    print(json.dumps(out, indent=2, default=str))
    if not out["pass"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
