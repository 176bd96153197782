"""Shared helpers for the benchmarks: percentiles, machine facts, a throw-away local stack."""
from __future__ import annotations

import contextlib
import os
import platform
import shutil
import statistics
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def summary_ms(samples_s: Sequence[float]) -> dict[str, float]:
    ms = [x * 1000 for x in samples_s]
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 4), "p95_ms": round(pct(ms, 95), 4),
            "p99_ms": round(pct(ms, 99), 4), "mean_ms": round(statistics.fmean(ms), 4)}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gb": round(mem_gb, 1), "python": platform.python_version(),
            "kernel": platform.release(), "load1": round(os.getloadavg()[0], 2)}


@contextlib.contextmanager
def local_stack(hosts: int = 2, **extra_env: str) -> Iterator[Any]:
    """A throw-away local stack (embedded PostgreSQL, redis, tmux hosts, gateway) and an admin token."""
    import httpx

    from local.services import free_port
    from local.stack import LocalStack

    base = Path(tempfile.mkdtemp(prefix="tmuxi-bench-", dir="/tmp"))
    sockets = Path(tempfile.mkdtemp(prefix="tb", dir="/tmp"))
    base.chmod(0o711)  # the users' accounts reach their homes (under data/) and sockets through these
    sockets.chmod(0o711)
    env = {"TMUXI_SESSION_QUOTA": "100000", "TMUXI_RATE_LIMIT_PER_MINUTE": "100000000"}
    env.update(extra_env)
    stack = LocalStack(data_dir=base / "data", hosts=hosts, socket_dir=sockets, gateway_port=free_port(),
                       environment="test", extra_env=env)
    from tmuxi.settings import get_settings

    try:
        stack.start()
        # this process now runs with the stack's settings (database, Redis, secrets): one read before the start
        # (importing tmuxi.db reads them) would otherwise be kept
        get_settings.cache_clear()
        user = "bench-" + uuid.uuid4().hex[:6]
        stack.ensure_user(user, "bench-pw", "user")
        r = httpx.post(stack.gateway_url + "/auth/token", json={"username": user, "password": "bench-pw"})
        r.raise_for_status()
        stack.token = r.json()["access_token"]
        yield stack
    finally:
        stack.stop()
        get_settings.cache_clear()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(sockets, ignore_errors=True)


# --- processes: memory and CPU of what a benchmark started, beside everything else on the machine ---------


def proc_table() -> dict[int, tuple[int, str]]:
    """Every process we may look at: pid -> (parent pid, command line)."""
    out: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[int(entry)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmd.strip())
    return out


def descendants(table: dict[int, tuple[int, str]], roots: Sequence[int]) -> set[int]:
    """``roots`` and every process below them."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = set(), [r for r in roots if r in table]
    while stack:
        pid = stack.pop()
        if pid not in out:
            out.add(pid)
            stack.extend(children.get(pid, []))
    return out


def memory_of(pids: Sequence[int] | set[int]) -> dict[str, float]:
    """Summed PSS and RSS (MB) of ``pids`` (those gone meanwhile count nothing)."""
    pss = rss = 0
    n = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1])
            n += 1
    return {"processes": n, "pss_mb": round(pss / 1024, 1), "rss_mb": round(rss / 1024, 1)}


def meminfo_gb() -> dict[str, float]:
    """The machine's memory: total, available, and in use (total - available), GB."""
    vals: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, rest = line.split(":", 1)
            vals[key] = int(rest.split()[0])
    total, avail = vals["MemTotal"] / 2**20, vals["MemAvailable"] / 2**20
    return {"total_gb": round(total, 2), "available_gb": round(avail, 2), "used_gb": round(total - avail, 2)}


def cpu_times(table: dict[int, tuple[int, str]] | None = None) -> dict[str, Any]:
    """The machine's CPU time (jiffies: busy, total) and each process's (utime + stime), for ``cpu_share``."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    per: dict[int, int] = {}
    for pid in table or proc_table():
        with contextlib.suppress(OSError, ValueError, IndexError):
            st = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            per[pid] = int(st[11]) + int(st[12])
    return {"busy": sum(fields) - idle, "total": sum(fields), "per": per, "at": os.times().elapsed}


def cpu_share(before: dict[str, Any], after: dict[str, Any], ours: set[int]) -> dict[str, float]:
    """Between two ``cpu_times``: the machine's busy cores, and how many of them the processes in ``ours``
    used and how many everything else did (other people's work on a shared machine). A process that exited
    between the two is not counted in either share; one that started is counted from its start."""
    cores = os.cpu_count() or 1
    total = after["total"] - before["total"]
    if total <= 0:
        return {"busy_cores": 0.0, "ours_cores": 0.0, "others_cores": 0.0}
    wall_jiffies = total / cores  # jiffies per core over the interval
    busy = (after["busy"] - before["busy"]) / wall_jiffies
    ours_j = sum(v - before["per"].get(pid, 0) for pid, v in after["per"].items() if pid in ours)
    others_j = sum(v - before["per"].get(pid, 0) for pid, v in after["per"].items() if pid not in ours)
    return {"busy_cores": round(busy, 2), "ours_cores": round(ours_j / wall_jiffies, 2),
            "others_cores": round(max(0.0, others_j / wall_jiffies), 2)}
