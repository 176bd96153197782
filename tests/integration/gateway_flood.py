"""A login flood for ``test_gateway_edge.py``, run in a process of its own so that its threads never take the
GIL from the latency measurement. Guessers post wrong passwords for unknown usernames (hashed all the same) to
``POST /auth/token`` from loopback addresses of their own, while ``go`` is set, until ``stop``."""
from __future__ import annotations

import threading
import uuid
from typing import Any

import httpx

# under the API's limits on failed logins per source address (services/throttle.py), so every admitted guess
# costs a password hash rather than a lockout check
MAX_ADMITTED_PER_ADDRESS = 25


def flood(url: str, addresses: list[str], retry_s: float, go: Any, stop: Any, counters: Any, sample: Any) -> None:
    """``counters``: shared ints [in flight, answered by the API (401), answered otherwise by the API,
    throttled by the gateway]; ``sample``: a queue that gets the first throttled answer (status, headers,
    body)."""
    lock = threading.Lock()

    def add(i: int, n: int) -> None:
        with lock:
            counters[i] += n

    def guess(address: str) -> None:
        admitted = 0
        transport = httpx.HTTPTransport(local_address=address)
        with httpx.Client(base_url=url, timeout=30, transport=transport) as c:
            for n in range(2000):  # bounded even if never stopped
                go.wait(30)
                if stop.is_set():
                    return
                add(0, 1)
                try:
                    r = c.post("/auth/token", json={"username": f"nobody-{uuid.uuid4().hex[:12]}",
                                                    "password": f"guess-{n}"})
                finally:
                    add(0, -1)
                if r.headers.get("x-amzn-errortype") == "THROTTLED":
                    if counters[3] == 0:
                        sample.put((r.status_code, dict(r.headers), r.text))
                    add(3, 1)
                    stop.wait(retry_s)
                    continue
                add(1 if r.status_code == 401 else 2, 1)
                admitted += 1
                if admitted >= MAX_ADMITTED_PER_ADDRESS:
                    return

    threads = [threading.Thread(target=guess, args=(a,), daemon=True) for a in addresses]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
