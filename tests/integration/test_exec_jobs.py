"""What a hostile shell could make of a background exec's report (its process group, written by the shell on a FIFO
the account can write): a group that is not a job of that session's shell, as its own account, is never signalled,
whatever the shell said. Real engine, real tmux and shells, a real process of another owner."""
from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.hosting import SECRET
from tmux_host.control import kill_tmux_servers
from tmux_host.engine import Engine
from tmuxi.settings import Settings


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="tj"))
    d.chmod(0o711)
    e = Engine(Settings(socket_dir=d / "s", data_dir=d / "data", host_secret=SECRET, host_id="jobs",
                        heartbeat_interval_s=60))
    await e.start(background=False)
    try:
        yield e
    finally:
        await e.stop(kill_servers=True)
        kill_tmux_servers(d)
        shutil.rmtree(d, ignore_errors=True)


async def test_a_reported_group_that_is_not_the_sessions_own_is_never_signalled(engine: Engine) -> None:
    sid = uuid.uuid4()
    await engine.create_session(sid, 1, 80, 24)
    job = await engine.exec(sid, "sleep 30", 0.3, background=True)
    assert job.running
    # the host's own process group elsewhere (another owner, another session): what a forged "p <pid>" would name
    bystander = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        channel = engine._sessions[sid].execs[job.exec_id].channel  # noqa: SLF001 - as the shell's report sets it
        real, channel.pgid = channel.pgid, bystander.pid
        await engine.signal_exec(sid, job.exec_id, "KILL")
        await asyncio.sleep(0.2)
        assert bystander.poll() is None, "a process outside the session was signalled"
        # the job itself is still signalled by its own group
        channel.pgid = real
        stopped = await engine.stop_exec(sid, job.exec_id, grace_s=0.5)
        assert not stopped.running and stopped.exit_code in (143, 137), stopped
    finally:
        bystander.kill()
        bystander.wait()
