"""Sessions outlive the host process: SIGKILL the host's whole process group, start it again, and the
sessions are adopted with their screen and shell state intact."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.hosting import SECRET, free_port, kill_tmux_servers, wait_for
from tmuxi import errors
from tmuxi.host_client import HostClient, close_all
from tmuxi.settings import Settings, env_name

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")

ROOT = Path(__file__).resolve().parents[2]


def start_host(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "tmux_host", "--no-registry"], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, which we SIGKILL as a whole below
    )


def test_sessions_survive_host_sigkill() -> None:
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="tr"))
    d.chmod(0o711)
    port = free_port()
    values = {"socket_dir": str(d / "s"), "data_dir": str(d / "data"), "host_secret": SECRET, "host_port": str(port),
              "host_id": "restart-host", "heartbeat_interval_s": "60", "log_level": "WARNING"}
    env = {**os.environ, **{env_name(k): v for k, v in values.items()},
           "PYTHONPATH": os.pathsep.join([str(ROOT / "layers"), str(ROOT)])}
    settings = Settings(**values)  # type: ignore[arg-type]
    client = HostClient(f"http://127.0.0.1:{port}", secret=SECRET, settings=settings)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(start_host(env))
        wait_for(lambda: client.health()["status"] == "ok", timeout=20, what="host up")
        sid = uuid.uuid4()
        client.create_session(sid, 7, 80, 24)
        client.exec(sid, "cd /tmp && export KEEP=kept-value", 10)
        # the host's environment (its secret!) never reaches a user's shell: tmux gets a scrubbed env
        env_out = client.exec(sid, "env", 10).stdout
        assert SECRET not in env_out and "TMUXI_HOST" not in env_out and f"TMUXI_SESSION_ID={sid}" in env_out
        client.send_input(sid, data=b"echo SCREEN-MARKER\n")
        wait_for(lambda: "SCREEN-MARKER\n" in client.screen(sid).text, what="marker")

        os.killpg(procs[0].pid, signal.SIGKILL)
        procs[0].wait(10)
        with pytest.raises(errors.HostUnavailable):
            client.list_sessions()
        close_all()  # drop the dead keep-alive connection

        procs.append(start_host(env))
        wait_for(lambda: client.health()["sessions"] == 1, timeout=20, what="host adopted the session")
        listed = client.list_sessions()
        assert [s["session_id"] for s in listed] == [str(sid)]
        assert "SCREEN-MARKER" in client.screen(sid).text
        r = client.exec(sid, 'echo "$(pwd) $KEEP $(id -u)"', 10)
        assert r.exit_code == 0 and r.stdout == f"/tmp kept-value {settings.account_uid_base + 7}\n"
        # the adopted session is fully manageable
        client.kill_session(sid)
        assert client.list_sessions() == []
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        close_all()
        kill_tmux_servers(d)
        shutil.rmtree(d, ignore_errors=True)


class RecordingRegistry:
    """Stand-in for tmuxi.registry at the host's boundary: records heartbeats; knows some sessions as live, each
    with its owner's account."""

    def __init__(self, live: dict[uuid.UUID, int]) -> None:
        self.live = live
        self.reconciled: list[tuple[str, set[tuple[uuid.UUID, int]]]] = []
        self.heartbeats: list[object] = []

    def reconcile_host(self, host_id: str, present: set[tuple[uuid.UUID, int]]) -> dict[uuid.UUID, int]:
        self.reconciled.append((host_id, set(present)))
        return {sid: acct for sid, acct in present if self.live.get(sid) == acct}

    def sessions_ended(self, host_id: str, ended: dict[uuid.UUID, tuple[str, str]]) -> None:
        pass

    def confirm_sessions(self, host_id: str, present: set[tuple[uuid.UUID, int]]) -> set[uuid.UUID]:
        return {sid for sid, acct in present if self.live.get(sid) == acct}

    def heartbeat(self, info: object) -> None:
        self.heartbeats.append(info)

    def host_stopped(self, host_id: str) -> None:
        pass


def test_restart_adopts_reconciles_orphans_and_heartbeats() -> None:
    from tests.hosting import host_in_thread
    from tmuxi.host_client import HostInfo

    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="tg"))
    d.chmod(0o711)
    settings = Settings(socket_dir=d / "s", data_dir=d / "data", host_secret=SECRET, host_port=free_port(),
                        host_id="reg-host", heartbeat_interval_s=0.2)
    keep, orphan, forged = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    try:
        with host_in_thread(settings) as url:  # registry=None: no database needed
            client = HostClient(url, secret=SECRET, settings=settings)
            keep_pane = client.create_session(keep, 1, 80, 24)["pane_id"]
            client.create_session(orphan, 2, 80, 24)
            # account 2 makes, from its shell, a session named like account 1's (to be adopted in its place)
            made = client.exec(orphan, f"tmux new-session -d -s t{keep.hex} && tmux new -d -s mine && echo ok", 10)
            assert made.stdout == "ok\n"
        close_all()
        registry = RecordingRegistry({keep: 1, forged: 3})
        with host_in_thread(settings, registry=registry) as url:
            client = HostClient(url, secret=SECRET, settings=settings)
            assert registry.reconciled == [("reg-host", {(keep, 1), (keep, 2), (orphan, 2)})]
            assert client.list_sessions() == [
                {"session_id": str(keep), "account": 1, "tmux_name": "t" + keep.hex, "pane_id": keep_pane}]
            # the orphan and the forgery were killed; only account 1's server is left
            assert client.health()["servers"]["running"] == 1
            wait_for(lambda: registry.heartbeats, timeout=5, what="heartbeat")
            info = registry.heartbeats[-1]
            assert isinstance(info, HostInfo)
            assert (info.host_id, info.active_sessions, info.capacity) == ("reg-host", 1, settings.host_capacity)
            assert info.extra_sessions == {}  # account 2's own "mine" ended with its server
            assert info.url == settings.advertised_host_url
            assert isinstance(info.started_at, float) and 0 < time.time() - info.started_at < 60
    finally:
        close_all()
        kill_tmux_servers(d)
        shutil.rmtree(d, ignore_errors=True)
