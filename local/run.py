"""``make run``: start the whole system locally and keep it running until Ctrl-C (SIGINT) or SIGTERM.

Every ``TMUXI_*`` variable set in its environment reaches the services (README "Configuration"). While it runs,
a tmux host or a gateway that exits is restarted (``LocalStack.supervise``); one that keeps failing is given up
on, said loudly, and makes the exit status 1."""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
from pathlib import Path

from local.stack import ROOT, LocalStack
from tmuxi.settings import Settings, env_name


def _dev_credentials(path: Path) -> dict[str, str]:
    if path.exists():
        path.chmod(0o600)
        data: dict[str, str] = json.loads(path.read_text())
        return data
    data = {"username": "dev", "password": secrets.token_urlsafe(12)}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    return data


def main() -> int:
    ap = argparse.ArgumentParser(description="Run the tmux integration system locally.")
    ap.add_argument("--port", type=int, default=None,
                    help=f"gateway port (default: {env_name('gateway_port')}, else 8080)")
    ap.add_argument("--ws-port", type=int, default=None,
                    help=f"WebSocket API port (default: {env_name('gateway_ws_port')}, else 8081)")
    ap.add_argument("--hosts", type=int, default=2, help="number of tmux hosts (default 2)")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help=f"local state (default: {env_name('data_dir')}, else ./.data)")
    ap.add_argument("--database-url", default=None,
                    help=f"use this PostgreSQL instead of the embedded one (better: {env_name('database_url')}, "
                         "since every user of the machine can read a command line)")
    ap.add_argument("--keep-sessions", action="store_true", help="leave tmux servers running on exit")
    args = ap.parse_args()

    data_dir = args.data_dir or Path(os.environ.get(env_name("data_dir")) or ROOT / ".data")
    ws_port = args.ws_port if args.ws_port is not None else int(
        os.environ.get(env_name("gateway_ws_port")) or Settings.model_fields["gateway_ws_port"].default)
    stack = LocalStack(data_dir=data_dir, hosts=args.hosts, database_url=args.database_url,
                       gateway_port=args.port, gateway_ws_port=ws_port)
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    # Explicitly for SIGINT too: started as a background job of a script, we inherit it *ignored*, and Python
    # then installs no KeyboardInterrupt handler of its own.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        stack.start()
        creds = _dev_credentials(stack.data_dir / "dev-credentials.json")
        stack.ensure_user(creds["username"], creds["password"], "user")
        stack.supervise()
        url = stack.gateway_url
        creds_file = stack.data_dir / "dev-credentials.json"
        print(f"""
tmux integration system running
  REST API (local API Gateway): {url}
  OpenAPI document:             {url}/openapi.json
  WebSocket API:                {stack.ws_url}?ticket=<from POST {url}/ws/tickets> (docs/websocket.md)
  its @connections and metrics: {stack.ws_gateway_url}
  tmux hosts:                   {', '.join(f'{h} {stack.host_url(h)}' for h in stack.host_ports)}
  logs:                         {stack.log_dir}
  (a host or a gateway that exits is restarted; see the [stack] supervisor lines)

Log in as the development user (credentials in {creds_file}, mode 0600):
  TOKEN=$(curl -s {url}/auth/token -H 'content-type: application/json' -d @{creds_file} \\
      | python3 -c 'import sys,json; print(json.load(sys.stdin)["access_token"])')
  curl -s {url}/sessions -H "authorization: Bearer $TOKEN" -H 'content-type: application/json' \\
      -d '{{"name":"demo"}}'
See README.md for the rest of the walk-through (exec, screen, input, delete).

Press Ctrl-C to stop everything.
""", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        print("\nstopping ...", file=sys.stderr, flush=True)
        stack.stop(kill_tmux=not args.keep_sessions)
        print("stopped.", file=sys.stderr, flush=True)
    for name, why in stack.failed.items():
        print(f"ERROR: {name} was given up on ({why})", file=sys.stderr, flush=True)
    return 1 if stack.failed else 0


if __name__ == "__main__":
    sys.exit(main())
