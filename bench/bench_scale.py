"""Scale: do session creation and terminal work slow down when two hosts hold thousands of live sessions?

A local stack with two tmux hosts (``TMUXI_HOST_CAPACITY`` raised to hold them all), and three phases, each
measured the same way through the gateway by one probe user who keeps one session on each host:

- A1: 10 live sessions (the probe user's two, and eight of the fill users');
- B: the fill users' sessions created until ``--sessions`` (2,000) are live over the two hosts, progress shown;
- A2: the fill users' sessions deleted back down to the same 10 (an A-B-A design: A1 and A2 bracket B in time, so a
  shared machine's drift shows as A1 against A2, and B is compared with A1 and A2 pooled).

In each phase the operations are interleaved, one of each per iteration: a create (``POST /sessions``, the probe
user's servers already running on both hosts, so no tmux server starts; deleted right after, the delete timed
too, so the live count stays put), then on one of the probe user's sessions (alternating hosts) an input
(``POST /input``, one character), a screen read (``GET /screen``) and an exec (``POST /exec``, ``echo ok``; it
also clears the line the inputs typed), and a cached ``GET /sessions/{id}``: a control, whose work does not
depend on the number of sessions, so its ratio shows the machine's drift between phases.

Users: ``--per-user`` sessions each (default 20: the default ``TMUXI_SESSION_QUOTA``, so 2,000 sessions are 100
users at their quota -- the shape a real fleet at capacity has, and the one with the most tmux servers: every user
has one server per host they have a session on, so 100 users over 2 hosts are ~200 servers, each with its control
client in the host). Fewer users with a higher quota would put more sessions in fewer servers (cheaper for the
host's per-server work, dearer per server listing); the quota is raised by ``bench.common.local_stack`` only so the
probe user's create-then-delete never meets it.

Memory is watched: filling stops early (and says so) if the machine's available memory falls under
``--min-free-gb``; the hosts' RSS, the tmux servers', the shells' and the machine's total are reported at each
phase. The machine is shared: each phase reports the CPU used by this benchmark's processes and by everything
else (other people's work), and the load average.

Targets (issue 8): with 2,000 live sessions, create p95 <= 2x its value with 10; exec, input and screen p95 <=
1.5x theirs.

    python bench/bench_scale.py [--sessions 2000] [--per-user 20] [--creates 300] [--calls 600] [--quick]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "layers", ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import httpx  # noqa: E402

from bench.common import (  # noqa: E402
    cpu_share,
    cpu_times,
    descendants,
    local_stack,
    machine,
    meminfo_gb,
    memory_of,
    pct,
    proc_table,
    summary_ms,
)

TARGETS = {"create": 2.0, "exec": 1.5, "input": 1.5, "screen": 1.5}  # max p95 ratio, B over A
OPS = ("create", "delete", "input", "screen", "exec", "get")
BASE_LIVE = 10
WARMUP = 5


def log(msg: str) -> None:
    print(f"[scale] {msg}", file=sys.stderr, flush=True)


def _auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def _ok(r: httpx.Response, *codes: int) -> httpx.Response:
    if r.status_code not in codes:
        raise RuntimeError(f"{r.request.method} {r.request.url.path} answered {r.status_code}: {r.text[:300]}")
    return r


# --- the stack's processes ----------------------------------------------------------------------------------


class Processes:
    """The stack's processes, found by their place in the process tree (looked up afresh each time)."""

    def __init__(self, stack: Any) -> None:
        self.stack = stack
        self.socket_dir = str(stack.socket_dir)
        self.pgdata = Path(stack.pg.data_dir).resolve() if stack.pg is not None else None

    def groups(self, table: dict[int, tuple[int, str]] | None = None) -> dict[str, set[int]]:
        table = table or proc_table()
        hosts = {p.pid for p in self.stack.host_procs.values()}
        host_tree = descendants(table, sorted(hosts))
        # a user's tmux server is started by the host's control client and leaves it (it daemonizes): it is the
        # process holding the socket directory on its command line outside the host's tree
        servers = {pid for pid, (_, cmd) in table.items()
                   if self.socket_dir in cmd and pid not in host_tree and "tmux" in cmd}
        servers -= {pid for pid in servers if table[pid][0] in servers}  # (never: a server's own children)
        panes = descendants(table, sorted(servers)) - servers
        out = {"hosts": hosts, "host_helpers": host_tree - hosts, "tmux_servers": servers, "panes": panes}
        if self.stack.gateway_proc is not None:
            out["gateway"] = descendants(table, [self.stack.gateway_proc.pid])
        if self.pgdata is not None:
            try:
                master = int((self.pgdata / "postmaster.pid").read_text().split()[0])
                out["postgres"] = descendants(table, [master])
            except (OSError, ValueError):
                out["postgres"] = set()
        if self.stack.redis is not None and self.stack.redis.proc is not None:
            out["redis"] = {self.stack.redis.proc.pid}
        return out

    def ours(self, table: dict[int, tuple[int, str]]) -> set[int]:
        """This benchmark and everything it started (for the CPU it uses, beside other people's)."""
        out = descendants(table, [os.getpid()])
        for pids in self.groups(table).values():
            out |= pids
        return out

    def memory(self) -> dict[str, Any]:
        groups = self.groups()
        out: dict[str, Any] = {name: memory_of(pids) for name, pids in groups.items()}
        out["hosts_each_rss_mb"] = [memory_of([pid])["rss_mb"] for pid in sorted(groups["hosts"])]
        out["stack_total"] = {"pss_mb": round(sum(v["pss_mb"] for k, v in out.items() if isinstance(v, dict)
                                                  and "pss_mb" in v), 1)}
        out["machine"] = meminfo_gb()
        return out


# --- the probe user's operations ---------------------------------------------------------------------------


class Probe:
    def __init__(self, client: httpx.Client, token: str) -> None:
        self.c, self.h = client, _auth(token)
        self.keep: list[str] = []  # one session on each host

    def keep_one_per_host(self, hosts: int) -> None:
        """Sessions until the probe user has one on every host (placement picks the freest host)."""
        seen: dict[str, str] = {}
        for i in range(hosts * 6):
            if len(seen) == hosts:
                break
            body = _ok(self.c.post("/sessions", json={"name": f"probe {i}"}, headers=self.h), 201).json()
            if body["host_id"] in seen:
                _ok(self.c.delete(f"/sessions/{body['id']}", headers=self.h), 204)
            else:
                seen[body["host_id"]] = body["id"]
        if len(seen) != hosts:
            raise RuntimeError(f"the probe user got sessions on {sorted(seen)} only")
        self.keep = [seen[h] for h in sorted(seen)]
        for sid in self.keep:  # the shell is up and at its prompt
            _ok(self.c.post(f"/sessions/{sid}/exec", json={"command": "true", "timeout_s": 20}, headers=self.h), 200)

    def iteration(self, j: int, create: bool) -> dict[str, float]:
        out: dict[str, float] = {}
        c, h = self.c, self.h
        if create:
            t = time.perf_counter()
            r = _ok(c.post("/sessions", json={"name": f"probe c{j}"}, headers=h), 201)
            out["create"] = time.perf_counter() - t
            t = time.perf_counter()
            _ok(c.delete(f"/sessions/{r.json()['id']}", headers=h), 204)
            out["delete"] = time.perf_counter() - t
        sid = self.keep[j % len(self.keep)]
        t = time.perf_counter()
        _ok(c.post(f"/sessions/{sid}/input", json={"text": "x"}, headers=h), 202, 204)
        out["input"] = time.perf_counter() - t
        t = time.perf_counter()
        _ok(c.get(f"/sessions/{sid}/screen", headers=h), 200)
        out["screen"] = time.perf_counter() - t
        t = time.perf_counter()
        r = _ok(c.post(f"/sessions/{sid}/exec", json={"command": "echo ok", "timeout_s": 20}, headers=h), 200)
        out["exec"] = time.perf_counter() - t
        if r.json().get("exit_code") != 0:
            raise RuntimeError(f"exec answered {r.text[:300]}")
        t = time.perf_counter()
        _ok(c.get(f"/sessions/{sid}", headers=h), 200)
        out["get"] = time.perf_counter() - t
        return out


def live_counts() -> dict[str, int]:
    from tmuxi.db.pool import connection

    with connection() as conn:
        rows = conn.execute("SELECT host_id, count(*) AS n FROM sessions WHERE state IN ('creating', 'active')"
                            " GROUP BY host_id ORDER BY host_id").fetchall()
    return {r["host_id"]: int(r["n"]) for r in rows}


def settle(procs: Processes, max_s: float = 60.0, below_cores: float = 0.25) -> dict[str, float]:
    """Until this benchmark's processes (shells starting, tmux servers, hosts) use under ``below_cores`` over a
    second, at most ``max_s``: what the machine's other users do is not waited for."""
    t0 = time.monotonic()
    share: dict[str, float] = {}
    while time.monotonic() - t0 < max_s:
        table = proc_table()
        before = cpu_times(table)
        time.sleep(1.0)
        table = proc_table()
        share = cpu_share(before, cpu_times(table), procs.ours(table))
        if share["ours_cores"] < below_cores:
            break
    return {"waited_s": round(time.monotonic() - t0, 1), **share}


def idle_cpu(procs: Processes, seconds: float = 5.0) -> dict[str, float]:
    """With no request in flight: the cores each group of the stack's processes uses (its background work:
    heartbeats, the hosts' periodic re-reading of every tmux server, the shells themselves)."""
    table = proc_table()
    groups = procs.groups(table)
    before = cpu_times(table)
    time.sleep(seconds)
    after = cpu_times(proc_table())
    out = {name: cpu_share(before, after, pids)["ours_cores"] for name, pids in groups.items()}
    out["all_stack"] = round(sum(out.values()), 3)
    return out


def phase(name: str, probe: Probe, procs: Processes, creates: int, calls: int) -> dict[str, Any]:
    iters = max(creates, calls)
    for j in range(WARMUP):
        probe.iteration(-1 - j, create=True)
    samples: dict[str, list[float]] = {op: [] for op in OPS}
    table = proc_table()
    cpu0, load0, t0 = cpu_times(table), os.getloadavg()[0], time.monotonic()
    for j in range(iters):
        create = (j * creates) // iters != ((j + 1) * creates) // iters  # creates spread evenly
        for op, dt in probe.iteration(j, create).items():
            samples[op].append(dt)
    elapsed = time.monotonic() - t0
    table = proc_table()
    cpu = cpu_share(cpu0, cpu_times(table), procs.ours(table))
    out: dict[str, Any] = {"live": live_counts(), "elapsed_s": round(elapsed, 1),
                           "loadavg1": [round(load0, 2), round(os.getloadavg()[0], 2)], "cpu_cores": cpu,
                           "ops": {op: summary_ms(v) for op, v in samples.items()}, "_samples": samples}
    ops = out["ops"]
    log(f"{name}: live {sum(out['live'].values())} {out['live']}, {elapsed:.0f} s; p95 ms: "
        + ", ".join(f"{op} {ops[op]['p95_ms']:.1f}" for op in OPS)
        + f"; cores busy {cpu['busy_cores']} (ours {cpu['ours_cores']}, others {cpu['others_cores']})")
    return out


# --- filling and draining ----------------------------------------------------------------------------------


def fill(client: httpx.Client, tokens: list[str], plan: list[int], concurrency: int, min_free_gb: float,
         ) -> tuple[list[tuple[int, str]], dict[str, Any]]:
    """Create a session for each user index in ``plan``, ``concurrency`` at a time, with progress; stops early
    if the machine's available memory falls under ``min_free_gb``. Returns [(user index, session id)] and facts
    (time, rate, create latencies at this concurrency for the first and last tenth)."""
    made: list[tuple[int, str]] = []
    lat: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()
    step = max(1, len(plan) // 10)
    t0 = time.monotonic()

    def one(u: int) -> None:
        if stop.is_set():
            return
        t = time.perf_counter()
        r = _ok(client.post("/sessions", json={"name": "fill"}, headers=_auth(tokens[u])), 201)
        dt = time.perf_counter() - t
        with lock:
            made.append((u, r.json()["id"]))
            lat.append(dt)
            n = len(made)
        if n % step == 0 and len(plan) >= 50:
            mem = meminfo_gb()
            log(f"  filled {n}/{len(plan)} ({time.monotonic() - t0:.0f} s, machine {mem['available_gb']:.1f} GB "
                "available)")
            if mem["available_gb"] < min_free_gb:
                log(f"  STOPPING: under {min_free_gb} GB available")
                stop.set()

    with concurrent.futures.ThreadPoolExecutor(concurrency) as ex:
        for f in [ex.submit(one, u) for u in plan]:
            f.result()
    took = time.monotonic() - t0
    tenth = max(1, len(lat) // 10)
    facts = {"created": len(made), "planned": len(plan), "stopped_early": stop.is_set(), "seconds": round(took, 1),
             "per_second": round(len(made) / took, 1) if took else 0.0, "concurrency": concurrency,
             "first_tenth_p95_ms": round(pct(lat[:tenth], 95) * 1000, 1),
             "last_tenth_p95_ms": round(pct(lat[-tenth:], 95) * 1000, 1)}
    return made, facts


def drain(client: httpx.Client, tokens: list[str], made: list[tuple[int, str]], concurrency: int) -> float:
    t0 = time.monotonic()
    done = 0
    step = max(1, len(made) // 5)

    def one(item: tuple[int, str]) -> None:
        nonlocal done
        u, sid = item
        _ok(client.delete(f"/sessions/{sid}", headers=_auth(tokens[u])), 204)
        done += 1
        if done % step == 0 and len(made) >= 50:
            log(f"  deleted {done}/{len(made)} ({time.monotonic() - t0:.0f} s)")

    with concurrent.futures.ThreadPoolExecutor(concurrency) as ex:
        for f in [ex.submit(one, item) for item in made]:
            f.result()
    return round(time.monotonic() - t0, 1)


# --- the run -----------------------------------------------------------------------------------------------


def ratios(b: list[float], a: list[float]) -> dict[str, float]:
    return {f"p{q}": round(pct(b, q) / pct(a, q), 3) if pct(a, q) else float("nan") for q in (50, 95, 99)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tmuxi.auth import hash_password, issue_token
    from tmuxi.db import repo

    mem_before = meminfo_gb()
    capacity = str(max(500, args.sessions + 100))  # either host could hold them all; placement balances
    out: dict[str, Any] = {"benchmark": "scale", "machine": machine(), "params": vars(args)}
    t_run = time.monotonic()
    with local_stack(hosts=2, TMUXI_HOST_CAPACITY=capacity) as stack, \
            httpx.Client(base_url=stack.gateway_url, timeout=60,
                         limits=httpx.Limits(max_connections=args.concurrency + 2)) as client:
        procs = Processes(stack)
        probe = Probe(client, stack.token)
        probe.keep_one_per_host(len(stack.host_procs))
        fill_total = args.sessions - len(probe.keep)
        users = -(-fill_total // args.per_user)
        pw = hash_password("bench-pw")
        tokens = []
        for i in range(users):
            name = f"fill-{i:03d}-{uuid.uuid4().hex[:4]}"
            uid = repo.create_user(name, pw, "user")
            tokens.append(issue_token(uid, name, "user")[0])
        plan = [i % users for i in range(fill_total)]  # round-robin: every user's servers start early
        base = BASE_LIVE - len(probe.keep)
        out["shape"] = {"hosts": len(stack.host_procs), "host_capacity": int(capacity), "fill_users": users,
                        "sessions_per_user": args.per_user, "probe_user_sessions": len(probe.keep),
                        "live_target": args.sessions, "live_base": BASE_LIVE}
        log(f"stack up; {users} fill users x {args.per_user} sessions; base {BASE_LIVE} live")
        base_made, _ = fill(client, tokens, plan[:base], 1, args.min_free_gb)
        out["settle_a1"] = settle(procs)
        out["idle_cpu_a1"] = idle_cpu(procs)
        out["memory_a1"] = procs.memory()
        out["A1"] = phase("A1", probe, procs, args.creates, args.calls)
        log(f"filling to {args.sessions} live sessions, {args.concurrency} at a time ...")
        made, out["fill"] = fill(client, tokens, plan[base:], args.concurrency, args.min_free_gb)
        out["settle_b"] = settle(procs)
        out["idle_cpu_b"] = idle_cpu(procs)
        out["memory_b"] = procs.memory()
        mb = out["memory_b"]
        log(f"memory at B: hosts RSS {mb['hosts_each_rss_mb']} MB, tmux servers PSS {mb['tmux_servers']['pss_mb']} "
            f"MB ({mb['tmux_servers']['processes']}), shells PSS {mb['panes']['pss_mb']} MB, stack PSS "
            f"{mb['stack_total']['pss_mb']} MB; machine {mb['machine']['used_gb']} of {mb['machine']['total_gb']} GB "
            "in use")
        out["B"] = phase("B", probe, procs, args.creates, args.calls)
        if not args.no_a2:
            log(f"deleting the {len(made)} fill sessions ...")
            out["drain_s"] = drain(client, tokens, made, args.concurrency)
            out["settle_a2"] = settle(procs)
            out["A2"] = phase("A2", probe, procs, args.creates, args.calls)
        drain(client, tokens, base_made, 1)
    out["run_s"] = round(time.monotonic() - t_run, 1)
    out["machine"]["mem_before_gb"] = mem_before
    out["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]

    # B against A1 and A2 pooled (and each alone), per operation
    a_names = [n for n in ("A1", "A2") if n in out]
    out["ratios"] = {}
    for op in OPS:
        a = [x for n in a_names for x in out[n]["_samples"][op]]
        b = out["B"]["_samples"][op]
        out["ratios"][op] = {"B_over_A": ratios(b, a), "A": summary_ms(a),
                             **{f"B_over_{n}": ratios(b, out[n]["_samples"][op]) for n in a_names}}
    out["targets"] = {op: {"max_p95_ratio": lim, "p95_ratio": out["ratios"][op]["B_over_A"]["p95"],
                           "met": out["ratios"][op]["B_over_A"]["p95"] <= lim} for op, lim in TARGETS.items()}
    out["pass"] = all(t["met"] for t in out["targets"].values()) and not out["fill"]["stopped_early"]
    for n in ("A1", "B", "A2"):
        if n in out:
            out[n].pop("_samples")
    return out


def markdown(r: dict[str, Any]) -> str:
    m, s = r["machine"], r["shape"]
    live = {n: sum(r[n]["live"].values()) for n in ("A1", "B", "A2") if n in r}
    lines = [
        f"## scale: {live.get('B')} live sessions over {s['hosts']} hosts vs {s['live_base']}\n",
        f"{m['cpu']} ({m['cores']} cores), {m['mem_gb']} GB, Python {m['python']}, kernel {m['kernel']}; load "
        f"{m['load1']} before, {m['loadavg_after']} after; run {r['run_s']} s",
        f"{s['fill_users']} users x {s['sessions_per_user']} sessions (one tmux server per user per host), probe "
        f"user with {s['probe_user_sessions']} sessions (one per host); host capacity {s['host_capacity']}; fill "
        f"{r['fill']['created']} sessions in {r['fill']['seconds']} s ({r['fill']['per_second']}/s at concurrency "
        f"{r['fill']['concurrency']}; create p95 at that concurrency, first tenth {r['fill']['first_tenth_p95_ms']} "
        f"ms, last tenth {r['fill']['last_tenth_p95_ms']} ms)" + (" STOPPED EARLY (memory)"
                                                                 if r["fill"]["stopped_early"] else ""),
        "",
        "| phase | live (per host) | s | load1 | cores busy: ours / others |",
        "|---|---|---|---|---|",
    ]
    for n in ("A1", "B", "A2"):
        if n in r:
            p = r[n]
            lines.append(f"| {n} | {sum(p['live'].values())} {p['live']} | {p['elapsed_s']} | {p['loadavg1']} | "
                         f"{p['cpu_cores']['ours_cores']} / {p['cpu_cores']['others_cores']} |")
    lines += ["", "| operation | A (A1+A2) p50 / p95 / p99 ms | B p50 / p95 / p99 ms | B/A p50 | B/A p95 | B/A p99 | "
              "B/A1 p95 | B/A2 p95 | target p95 |", "|---|---|---|---|---|---|---|---|---|"]
    for op in OPS:
        a, b, rt = r["ratios"][op]["A"], r["B"]["ops"][op], r["ratios"][op]
        tgt = r["targets"].get(op)
        lines.append(
            f"| {op} | {a['p50_ms']:.2f} / {a['p95_ms']:.2f} / {a['p99_ms']:.2f} | {b['p50_ms']:.2f} / "
            f"{b['p95_ms']:.2f} / {b['p99_ms']:.2f} | {rt['B_over_A']['p50']} | {rt['B_over_A']['p95']} | "
            f"{rt['B_over_A']['p99']} | {rt.get('B_over_A1', {}).get('p95', '-')} | "
            f"{rt.get('B_over_A2', {}).get('p95', '-')} | "
            + (f"<= {tgt['max_p95_ratio']}x {'met' if tgt['met'] else 'MISSED'}" if tgt else "(control)") + " |")
    mb, ma = r["memory_b"], r["memory_a1"]
    lines += ["", "| memory | at A1: PSS / RSS MB (processes) | at B: PSS / RSS MB (processes) |", "|---|---|---|"]
    for k in ("hosts", "host_helpers", "tmux_servers", "panes", "gateway", "postgres", "redis"):
        if k in mb:
            lines.append(f"| {k} | {ma[k]['pss_mb']} / {ma[k]['rss_mb']} ({ma[k]['processes']}) | "
                         f"{mb[k]['pss_mb']} / {mb[k]['rss_mb']} ({mb[k]['processes']}) |")
    lines.append(f"| stack total PSS | {ma['stack_total']['pss_mb']} | {mb['stack_total']['pss_mb']} |")
    lines.append(f"| machine in use (GB, of {mb['machine']['total_gb']}) | {ma['machine']['used_gb']} | "
                 f"{mb['machine']['used_gb']} (before the stack: {m['mem_before_gb']['used_gb']}) |")
    lines.append(f"\nhosts' own RSS at B: {mb['hosts_each_rss_mb']} MB")
    lines.append("the stack's own CPU with no request in flight (cores, over 5 s), at A1 / at B: " + ", ".join(
        f"{k} {r['idle_cpu_a1'].get(k, 0)} / {v}" for k, v in r["idle_cpu_b"].items()))
    lines.append("settled before each phase (until this benchmark's processes used < 0.25 core over 1 s): "
                 + ", ".join(f"{n} {r[k]['waited_s']} s" for n, k in (("A1", "settle_a1"), ("B", "settle_b"),
                                                                     ("A2", "settle_a2")) if k in r))
    missed = [op for op, t in r["targets"].items() if not t["met"]]
    lines.append("targets: " + ("all met" if r["pass"] else "MISSED: " + ", ".join(missed or ["fill stopped early"])))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=2000, help="live sessions in phase B (default 2000)")
    ap.add_argument("--per-user", type=int, default=20, help="sessions per fill user (default 20, the quota)")
    ap.add_argument("--creates", type=int, default=300, help="timed creates per phase (default 300)")
    ap.add_argument("--calls", type=int, default=600,
                    help="timed exec, input and screen calls, each, per phase (default 600)")
    ap.add_argument("--concurrency", type=int, default=4, help="creates/deletes in flight while filling")
    ap.add_argument("--min-free-gb", type=float, default=6.0, help="stop filling under this much available")
    ap.add_argument("--no-a2", action="store_true", help="skip draining back to 10 and measuring again")
    ap.add_argument("--quick", action="store_true", help="200 sessions, 30 creates, 60 calls (a smoke run)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()
    if args.quick:
        args.sessions, args.creates, args.calls = 200, 30, 60
    if args.sessions <= BASE_LIVE:
        ap.error(f"--sessions must be over {BASE_LIVE}")
    r = run(args)
    print(markdown(r))
    print()
    print(json.dumps(r, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
