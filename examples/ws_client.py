"""Attach your terminal to a session over the WebSocket API (docs/websocket.md), with automatic resume.

    python examples/ws_client.py --api http://127.0.0.1:8080 --ws ws://127.0.0.1:8081/ --user alice [--session ID]

The password is read from $TMUXI_PASSWORD or asked for. Without --session it creates one. Detach with Ctrl-]
(the session goes on running). A dropped connection is resumed from the last byte received. Needs only
``httpx`` and ``websockets``.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import getpass
import json
import os
import shutil
import signal
import sys
import termios
import tty
from typing import Any

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

DETACH = b"\x1d"  # Ctrl-]


class Attachment:
    def __init__(self, api: httpx.Client, token: str, ws_url: str, session_id: str) -> None:
        self.api, self.ws_url, self.session_id = api, ws_url, session_id
        self.headers = {"authorization": f"Bearer {token}"}
        self.stream: str | None = None
        self.pos: int | None = None  # the stream position reached: resume from here
        self.done = asyncio.Event()

    def ticket(self) -> str:
        r = self.api.post("/ws/tickets", headers=self.headers)
        r.raise_for_status()
        return str(r.json()["ticket"])

    async def run(self) -> None:
        delay = 0.5
        while not self.done.is_set():
            try:
                async with connect(f"{self.ws_url}?ticket={self.ticket()}", max_size=None) as ws:
                    delay = 0.5
                    attach: dict[str, Any] = {"action": "attach", "session_id": self.session_id}
                    if self.stream is not None:
                        attach.update(stream=self.stream, last_seq=self.pos)
                    await ws.send(json.dumps(attach))
                    tasks = [asyncio.create_task(c) for c in (self.receive(ws), self.send_keys(ws),
                                                              self.send_sizes(ws))]
                    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    for t in pending:
                        t.cancel()
                    for t in done:
                        t.result()  # a lost connection raises here: resume
            except (ConnectionClosed, OSError) as exc:
                if self.done.is_set():
                    return
                print(f"\r\n[connection lost ({exc}); resuming in {delay:.1f} s]\r\n", end="", file=sys.stderr)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30)

    async def receive(self, ws: Any) -> None:
        out = sys.stdout.buffer
        async for raw in ws:
            m = json.loads(raw)
            kind = m["type"]
            if kind == "attached":
                self.stream = m["stream"]
                self.pos = m["seq"]
                await ws.send(json.dumps({"action": "resize", **size()}))
            elif kind in ("output", "snapshot"):
                data = base64.b64decode(m["data"])
                out.write(data)
                out.flush()
                self.pos = m["seq"] + (len(data) if kind == "output" else 0)
            elif kind == "detached":
                print(f"\r\n[detached: {m.get('reason')}]\r\n", end="", file=sys.stderr)
                self.done.set()
                await ws.close()
            elif kind == "error":
                print(f"\r\n[error {m['code']}: {m['message']}]\r\n", end="", file=sys.stderr)

    async def send_keys(self, ws: Any) -> None:
        loop = asyncio.get_running_loop()
        keys: asyncio.Queue[bytes] = asyncio.Queue()
        loop.add_reader(sys.stdin.fileno(), lambda: keys.put_nowait(os.read(sys.stdin.fileno(), 4096)))
        try:
            while True:
                data = await keys.get()
                if DETACH in data:
                    self.done.set()
                    await ws.close()
                    return
                await ws.send(json.dumps({"action": "input", "data_b64": base64.b64encode(data).decode()}))
        finally:
            loop.remove_reader(sys.stdin.fileno())

    async def send_sizes(self, ws: Any) -> None:
        changed = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGWINCH, changed.set)
        while True:
            await _wait_or_ping(changed, ws)
            if changed.is_set():
                changed.clear()
                await ws.send(json.dumps({"action": "resize", **size()}))


async def _wait_or_ping(changed: asyncio.Event, ws: Any) -> None:
    """Wait for a window change; ping every 4 minutes meanwhile (API Gateway drops a connection idle 10)."""
    try:
        await asyncio.wait_for(changed.wait(), 240)
    except TimeoutError:
        await ws.send(json.dumps({"action": "ping"}))


def size() -> dict[str, int]:
    cols, rows = shutil.get_terminal_size()
    return {"cols": max(10, min(cols, 1000)), "rows": max(5, min(rows, 500))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--api", default="http://127.0.0.1:8080")
    ap.add_argument("--ws", default="ws://127.0.0.1:8081/")
    ap.add_argument("--user", required=True)
    ap.add_argument("--session")
    args = ap.parse_args()
    password = os.environ.get("TMUXI_PASSWORD") or getpass.getpass(f"password for {args.user}: ")
    api = httpx.Client(base_url=args.api, timeout=30)
    r = api.post("/auth/token", json={"username": args.user, "password": password})
    r.raise_for_status()
    token = r.json()["access_token"]
    sid = args.session
    if sid is None:
        r = api.post("/sessions", headers={"authorization": f"Bearer {token}"}, json=size())
        r.raise_for_status()
        sid = r.json()["id"]
        print(f"created session {sid}", file=sys.stderr)
    saved = termios.tcgetattr(sys.stdin.fileno())
    tty.setraw(sys.stdin.fileno())
    try:
        asyncio.run(Attachment(api, token, args.ws, sid).run())
    finally:
        termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
    print(f"\ndetached from {sid}; it keeps running", file=sys.stderr)


if __name__ == "__main__":
    main()
