"""A host on ECS told to go (SIGTERM) drains (tmux_host/drain.py), through the whole local stack: a third host, run
as ECS runs it (``ECS_AGENT_URI`` set; the agent is a fake at the project's boundary, tests/integration/
test_task_protection.py), joins the stack's registry, takes sessions and a viewer, and is sent SIGTERM. While it
drains it takes no new session (they go to the stack's hosts), keeps serving the ones it holds, and sees one
deleted; the one left at the deadline is recorded `lost`, saying why, and its viewer is told both times; the
process is gone soon after the deadline."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.conftest import StackHandle
from tests.e2e.test_websocket import Term, ticket, ws_url
from tests.hosting import free_port, wait_for
from tests.integration.test_task_protection import ON, FakeEcsAgent
from tmux_host.control import kill_tmux_servers
from tmuxi import errors
from tmuxi.db import repo
from tmuxi.host_client import SECRET_HEADER, HostClient
from tmuxi.settings import env_name

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")]

ROOT = Path(__file__).resolve().parents[2]
HOST_ID = "drain-1"
DRAIN_S = 4


def _start_host(stack: StackHandle, agent_url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **stack.stack.env, **stack.stack.aws_env,
           "ECS_AGENT_URI": agent_url,  # as ECS sets it in every task
           env_name("host_id"): HOST_ID, env_name("host_port"): str(port),
           env_name("drain_timeout_s"): str(DRAIN_S),
           # far more free capacity than the stack's hosts: placement picks this host while it is not draining
           env_name("host_capacity"): "100000",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "layers"), str(ROOT)])}
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "tmux_host"], cwd=ROOT, env=env,  # noqa: S603
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


async def test_a_host_told_to_go_drains_then_records_what_is_left_lost(stack: StackHandle,
                                                                         tmp_path: Path) -> None:
    agent = FakeEcsAgent()
    port = free_port()
    log = tmp_path / "drain-host.log"
    proc = _start_host(stack, agent.url, port, log)
    url = f"http://127.0.0.1:{port}"
    term: Term | None = None
    try:
        secret = stack.stack.env[env_name("host_secret")]
        host = HostClient(url, secret=secret)
        wait_for(lambda: (row := repo.get_host(HOST_ID)) is not None and row["url"] == url, timeout=30,
                 what=f"{HOST_ID} to heartbeat (log: {log})")
        _, h = stack.new_user()
        kept, deleted = stack.create_session(h, cols=80, rows=24), stack.create_session(h, cols=80, rows=24)
        assert kept["host_id"] == deleted["host_id"] == HOST_ID
        wait_for(lambda: agent.seen() == [ON], timeout=10, what="the task protected while it holds sessions")
        term = Term(await connect(ws_url(stack, ticket(stack, h)), max_size=None))
        await term.send(action="attach", session_id=kept["id"])
        await term.next("attached")
        await term.next("snapshot")

        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        told = await term.next("host_draining", timeout=DRAIN_S)
        assert told["session_id"] == kept["id"] and 0 < told["deadline_s"] <= DRAIN_S
        wait_for(lambda: (repo.get_host(HOST_ID) or {}).get("draining_at"), timeout=DRAIN_S,
                 what="the registry to mark the host draining")
        # no new session here: placement skips it, and the host itself refuses one that reaches it anyway
        elsewhere = stack.create_session(h, cols=80, rows=24)
        assert elsewhere["host_id"] not in (None, HOST_ID)
        served = httpx.get(url + "/metrics", headers={SECRET_HEADER: secret}, timeout=5).text
        assert 'route="/v1/sessions",status="503"' not in served, "placement skipped it: no create came here"
        with pytest.raises(errors.HostUnavailable) as refused:
            host.create_session(uuid.uuid4(), 1, 80, 24)
        assert refused.value.code == "host_full" and "draining" in refused.value.message
        served = httpx.get(url + "/metrics", headers={SECRET_HEADER: secret}, timeout=5).text
        assert 'route="/v1/sessions",status="503"} 1.0' in served  # (what the check above would have seen)
        assert host.health()["draining"] is True
        # a viewer attaching now is told too, right after `attached`
        late = Term(await connect(ws_url(stack, ticket(stack, h)), max_size=None))
        try:
            await late.send(action="attach", session_id=kept["id"])
            await late.next("attached")
            assert (await late.next("host_draining"))["deadline_s"] <= told["deadline_s"]
        finally:
            await late.ws.close()
        # the sessions it holds are still served: a command runs, a delete goes through
        r = stack.client.post(f"/sessions/{kept['id']}/exec", json={"command": "echo still-$((6*7))"}, headers=h)
        assert r.status_code == 200 and r.json()["stdout"] == "still-42\n", r.text
        assert stack.client.delete(f"/sessions/{deleted['id']}", headers=h).status_code == 204
        assert time.monotonic() - stopped_at < DRAIN_S, "too slow to show anything about the drain; raise DRAIN_S"

        detached = await term.next("detached", timeout=DRAIN_S + 5)
        assert detached["state"] == "lost" and detached["session_id"] == kept["id"]
        assert detached["reason"].startswith("host stopped: its ECS task was stopped")
        assert f"after draining {DRAIN_S} s" in detached["reason"]
        proc.wait(timeout=DRAIN_S + 10)
        took = time.monotonic() - stopped_at
        assert DRAIN_S - 0.5 < took < DRAIN_S + 5, took  # the tail after the drain: ~0.4 s here

        lost = stack.get_session(h, kept["id"])
        assert lost["state"] == "lost" and lost["end_reason"] == detached["reason"]
        assert stack.get_session(h, deleted["id"])["state"] == "deleted"
        assert stack.get_session(h, elsewhere["id"])["state"] == "active"
        assert stack.client.delete(f"/sessions/{elsewhere['id']}", headers=h).status_code == 204
        with pytest.raises(httpx.ConnectError):  # and nothing of it is left serving
            httpx.get(url + "/health", timeout=2)
        assert stack.stack.socket_dir is not None  # nor running: the lost session's tmux server was ended
        sockets = list(stack.stack.socket_dir.glob(f"{HOST_ID}/a*/tmux"))
        assert not [s for s in sockets if subprocess.run(["tmux", "-S", str(s), "list-sessions"],  # noqa: S603, S607
                                                         capture_output=True, timeout=5, check=False).returncode == 0]
    finally:
        if term is not None:
            with contextlib.suppress(Exception):
                await term.ws.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        agent.server.shutdown()
        if stack.stack.socket_dir is not None:
            kill_tmux_servers(stack.stack.socket_dir / HOST_ID)
