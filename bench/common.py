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
    try:
        stack.start()
        user = "bench-" + uuid.uuid4().hex[:6]
        stack.ensure_user(user, "bench-pw", "user")
        r = httpx.post(stack.gateway_url + "/auth/token", json={"username": user, "password": "bench-pw"})
        r.raise_for_status()
        stack.token = r.json()["access_token"]
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(sockets, ignore_errors=True)
