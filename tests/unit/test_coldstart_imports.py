"""A cold start imports what the first request needs and creates nothing (tmuxi/snapstart.py): in a fresh
interpreter, importing a Lambda handler leaves the libraries some requests need (redis, psycopg, httptools,
prometheus_client, boto3) unimported, starts no thread and opens no pool, client or connection -- so nothing of
the kind can be in a SnapStart snapshot -- and the before-snapshot hook then imports those libraries, still
without a connection. bench/bench_coldstart.py measures what this saves."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEFERRED = ["redis", "psycopg", "psycopg_pool", "httptools", "prometheus_client", "boto3",
            "aws_lambda_powertools.utilities.parameters"]

PROBE = """
import json, sys, threading
import functions.%s.handler
from tmuxi import cache, secrets, snapstart, host_client
from tmuxi.db import pool

def state():
    return {"imported": [m for m in %r if sys.modules.get(m) is not None],
            "threads": sorted(t.name for t in threading.enumerate()),
            "pool": pool._pool is not None, "redis_client": cache._gate._client is not None,
            "secrets_client": secrets._provider is not None, "host_clients": len(host_client._pools)}

at_import = state()
from snapshot_restore_py import get_before_snapshot
for func, args, kwargs in get_before_snapshot():  # as the runtime does before it takes the snapshot
    func(*args, **kwargs)
print(json.dumps({"at_import": at_import, "primed": state()}))
"""


@pytest.mark.parametrize("function", ["authorizer", "api", "ws", "maintenance"])
def test_a_handler_imports_no_deferred_library_and_creates_nothing(function: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{ROOT / 'layers'}",
           # configured as in AWS: a database and Redis that a connection attempt would fail to reach
           "TMUXI_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", "TMUXI_REDIS_URL": "redis://127.0.0.1:1/0",
           "TMUXI_APP_SECRET_ID": "tmuxi/app"}
    proc = subprocess.run([sys.executable, "-c", PROBE % (function, DEFERRED)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    nothing = {"threads": ["MainThread"], "pool": False, "redis_client": False, "secrets_client": False,
               "host_clients": 0}
    assert got["at_import"] == {"imported": [], **nothing}
    # the before-snapshot hook imports them all, and still connects to nothing
    assert got["primed"] == {"imported": DEFERRED, **nothing}
