"""Cold start of the Lambda functions: the wall time of a fresh process that imports a handler
(``python -c "import functions.X.handler"``, interpreter start included), beside baselines measured in the same
run, interleaved sample by sample so that whatever else the machine does hits every figure alike:

- ``python -c pass`` (the interpreter alone), ``import boto3``, ``import fastapi``, and ``bare_fastapi_mangum``:
  a bare FastAPI app with one route behind Mangum (bench/coldstart_bare_app.py), the api function's baseline.
- Targets (issue 10): the authorizer's median <= 300 ms; the api's median <= 1.5 x bare_fastapi_mangum's.

With ``--first-request`` (needs the local stack: embedded PostgreSQL, redis-server, a tmux host), also the
authorizer's first request after its import (a valid token; the user's state not yet cached), in fresh processes:
deferring an import to the first request does not make it free, so this is the figure to watch beside the import;
and the same first request "primed", after SnapStart's before-snapshot hook (tmuxi/snapstart.py ``prime``), as an
environment restored from a snapshot serves it.

What the processes can import is what the Lambda layer has. ``cryptography`` is in this venv only for moto (a dev
dependency) and is not in the layer; PyJWT imports it optionally (``try: ... except ModuleNotFoundError``), and
with it would pay ~20 ms more. Every process (the baselines too) starts with ``sys.modules["cryptography"] = None``,
which makes ``import cryptography`` raise ModuleNotFoundError exactly as in the layer -- simpler and more honest
than subtracting its share of an ``-X importtime`` tree.

Bytecode: a Lambda bundle cannot write ``__pycache__`` (/var/task and /opt are read-only), so the layer and the
functions' code should ship compiled. This machine sets PYTHONDONTWRITEBYTECODE=1, which would make every process
here compile the project's own source; the processes run with PYTHONPYCACHEPREFIX pointed at a scratch directory
instead, filled by one unmeasured warm-up round (which also warms the page cache).

    python bench/bench_coldstart.py [--n 10] [--first-request]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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

from bench.common import machine, pct  # noqa: E402

AUTHORIZER_TARGET_MS = 300.0
API_TARGET_RATIO = 1.5
BLOCK_CRYPTOGRAPHY = "import sys; sys.modules['cryptography'] = None\n"

CASES: dict[str, str] = {
    # baselines
    "python_pass": "pass",
    "import_boto3": "import boto3",
    "import_fastapi": "import fastapi",
    "bare_fastapi_mangum": "import bench.coldstart_bare_app",
    # the functions
    "authorizer": "import functions.authorizer.handler",
    "api": "import functions.api.handler",
    "ws": "import functions.ws.handler",
    "maintenance": "import functions.maintenance.handler",
}

# One fresh process: import the authorizer, then serve one request with a valid token (argv[1]). With argv[2]
# "primed", SnapStart's before-snapshot hook runs between the two (untimed), as in an environment restored from a
# snapshot: the libraries deferred from the import (tmuxi/snapstart.py) are then already imported.
FIRST_REQUEST = BLOCK_CRYPTOGRAPHY + """
import json, time
t0 = time.perf_counter()
import functions.authorizer.handler as h
t1 = time.perf_counter()
if sys.argv[2] == "primed":
    from tmuxi import snapstart
    snapstart.prime()
    t1 = time.perf_counter()
event = {"type": "REQUEST", "methodArn": "arn:aws:execute-api:us-east-1:123456789012:api1/prod/GET/sessions",
         "headers": {"Authorization": "Bearer " + sys.argv[1]}, "requestContext": {"requestId": "bench-coldstart"}}
out = h.handler(event, None)
t2 = time.perf_counter()
assert out["policyDocument"]["Statement"][0]["Effect"] == "Allow", out
print("BENCH " + json.dumps({"import_s": t1 - t0, "first_request_s": t2 - t1}))
"""


def _env(pycache: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = f"{ROOT}:{ROOT / 'layers'}"
    env["PYTHONPYCACHEPREFIX"] = pycache
    env.update(extra or {})
    return env


def _run(code: str, env: dict[str, str], *args: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", BLOCK_CRYPTOGRAPHY + code, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{code!r} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed, proc.stdout


def _summary(samples_s: list[float]) -> dict[str, float]:
    ms = [x * 1000 for x in samples_s]
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 1), "p95_ms": round(pct(ms, 95), 1),
            "max_ms": round(max(ms), 1)}


def bench_imports(n: int, pycache: str) -> dict[str, dict[str, float]]:
    env = _env(pycache)
    for code in CASES.values():  # warm-up: bytecode into the prefix, files into the page cache
        _run(code, env)
    samples: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(n):
        for name, code in CASES.items():  # interleaved: each round runs every case once
            samples[name].append(_run(code, env)[0])
    return {name: _summary(s) for name, s in samples.items()}


def bench_first_request(n: int, pycache: str) -> dict[str, Any]:
    """The authorizer's import and first request in fresh processes against the local stack (one host)."""
    from bench.common import local_stack

    with local_stack(hosts=1) as stack:
        env = _env(pycache, stack.env)
        imports, firsts, primed = [], [], []
        _run(FIRST_REQUEST, env, stack.token, "cold")  # warm-up (bytecode)
        for _ in range(n):
            for mode in ("cold", "primed"):
                # the user's state is cached in Redis for user_state_ttl_s: a new user each time, so every first
                # request also reads PostgreSQL, as a cold environment's usually does
                name = "cold-" + uuid.uuid4().hex[:8]
                stack.ensure_user(name, "bench-pw", "user")
                token = _login(stack.gateway_url, name)
                _, out = _run(FIRST_REQUEST, env, token, mode)
                line = next(x for x in out.splitlines() if x.startswith("BENCH "))
                got = json.loads(line[len("BENCH "):])
                if mode == "cold":
                    imports.append(got["import_s"])
                    firsts.append(got["first_request_s"])
                else:
                    primed.append(got["first_request_s"])
    return {"import_in_process": _summary(imports), "first_request": _summary(firsts),
            "import_plus_first_request": _summary([a + b for a, b in zip(imports, firsts, strict=True)]),
            "first_request_primed_as_after_snapstart_restore": _summary(primed)}


def _login(gateway_url: str, username: str) -> str:
    import httpx

    r = httpx.post(gateway_url + "/auth/token", json={"username": username, "password": "bench-pw"}, timeout=30)
    r.raise_for_status()
    return str(r.json()["access_token"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--n", type=int, default=10, help="fresh processes per case (default 10)")
    ap.add_argument("--first-request", action="store_true",
                    help="also the authorizer's first request after import (starts the local stack)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tmuxi-coldstart-pyc-") as pycache:
        out: dict[str, Any] = {"machine": machine(), "n": args.n, "imports": bench_imports(args.n, pycache)}
        if args.first_request:
            out["authorizer_first_request"] = bench_first_request(args.n, pycache)
    imp = out["imports"]
    ratio = imp["api"]["p50_ms"] / imp["bare_fastapi_mangum"]["p50_ms"]
    out["api_over_bare_fastapi_mangum"] = round(ratio, 2)
    out["authorizer_over_python_pass"] = round(imp["authorizer"]["p50_ms"] / imp["python_pass"]["p50_ms"], 2)
    out["pass_authorizer"] = imp["authorizer"]["p50_ms"] <= AUTHORIZER_TARGET_MS
    out["pass_api"] = ratio <= API_TARGET_RATIO

    print("| fresh process importing | n | p50 ms | p95 ms | max ms |\n|---|---|---|---|---|")
    for name, s in imp.items():
        print(f"| {name} | {s['n']} | {s['p50_ms']:.1f} | {s['p95_ms']:.1f} | {s['max_ms']:.1f} |")
    if "authorizer_first_request" in out:
        print("\n| authorizer, in process | n | p50 ms | p95 ms | max ms |\n|---|---|---|---|---|")
        for name, s in out["authorizer_first_request"].items():
            print(f"| {name} | {s['n']} | {s['p50_ms']:.1f} | {s['p95_ms']:.1f} | {s['max_ms']:.1f} |")
    print(f"\ntarget authorizer p50 <= {AUTHORIZER_TARGET_MS:g} ms: {imp['authorizer']['p50_ms']:.1f} ms, "
          f"{'met' if out['pass_authorizer'] else 'MISSED'}; api p50 <= {API_TARGET_RATIO:g} x bare FastAPI + "
          f"Mangum: {ratio:.2f} x, {'met' if out['pass_api'] else 'MISSED'}")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
