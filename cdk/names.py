"""Names the constructs share (one place, so a rename cannot leave a dangling reference)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STACK_PREFIX = "tmuxi"
# Lambda functions: functions/<name>/handler.py, entry point ``handler``
FUNCTIONS = ("api", "authorizer", "ws", "maintenance", "alerts", "migrate", "mcp")
# The functions on the request path: SnapStart on (published versions behind the ``live`` alias)
SNAPSTART_FUNCTIONS = ("api", "authorizer", "ws", "mcp")
ALIAS = "live"
# CloudWatch namespace of the metrics the functions and the hosts publish as EMF (Powertools Metrics)
METRICS_NAMESPACE = "Tmuxi"
HOST_CONTAINER = "tmux-host"
HOST_PORT = 7001
NLB_PORT = 80
DB_NAME = "tmuxi"
DB_USER = "tmuxi"
POSTGRES_PORT = 5432
REDIS_PORT = 6379
# users' homes and the host's state inside the container (an ephemeral task volume)
HOST_DATA_DIR = "/var/lib/tmuxi"


def handler(name: str) -> str:
    return f"functions.{name}.handler.handler"
