"""What a hostile shell could make of a background exec's report (its process group, written by the shell on a FIFO
the account can write): a group that is not a job of that session's shell, as its own account, is never signalled,
whatever the shell said. Real engine, real tmux and shells, a real process of another owner."""
from __future__ import annotations

import asyncio
import os
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


async def _files_in(directory: Path, n: int, besides: frozenset[str] = frozenset(),
                    within_s: float = 5.0) -> list[str]:
    """The exchange directory's files once there are ``n`` of them, none of ``besides`` (they are made and removed
    in threads: poll)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        names = sorted(p.name for p in directory.iterdir())
        if (len(names) == n and not besides & set(names)) or loop.time() > deadline:
            return names
        await asyncio.sleep(0.02)


async def test_exec_files_are_made_ahead_used_once_and_gone_with_the_session(engine: Engine) -> None:
    sid = uuid.uuid4()
    await engine.create_session(sid, 1, 80, 24)
    rec = engine._sessions[sid]  # noqa: SLF001
    xdir = engine.servers[rec.account].exchange_dir
    per_set = 6  # .w .sh .o .e .rc .a
    ahead = await _files_in(xdir, engine.SPARES * per_set)
    assert len(ahead) == engine.SPARES * per_set, ahead
    first = await engine.exec(sid, "echo one", 10)
    second = await engine.exec(sid, "echo two", 10)
    assert (first.stdout, second.stdout) == ("one\n", "two\n")
    # each exec ran from a set made before it was asked for (the oldest first), its own: those are removed, and
    # new ones wait
    used = {first.exec_id, second.exec_id}
    assert used == {n.split(".")[0] for n in ahead}, (used, ahead)
    after = await _files_in(xdir, engine.SPARES * per_set, besides=frozenset(ahead))
    assert len(after) == engine.SPARES * per_set and not set(after) & set(ahead), (ahead, after)
    await engine.kill_session(sid)
    assert await _files_in(xdir, 0) == []


async def test_exchange_files_a_previous_run_left_are_removed_at_start() -> None:
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="tj"))
    d.chmod(0o711)
    settings = Settings(socket_dir=d / "s", data_dir=d / "data", host_secret=SECRET, host_id="jobs",
                        heartbeat_interval_s=60)
    left = d / "s" / "jobs" / "x" / "a7"  # an account's exchange directory, as a crashed host leaves it
    left.mkdir(parents=True)
    (left / "0123456789abcdef.w").write_text("stale wrapper")
    os.mkfifo(left / "0123456789abcdef.o")
    e = Engine(settings)
    try:
        assert e.host_dir / "x" / "a7" == left
        await e.start(background=False)
        assert list(left.iterdir()) == []
    finally:
        await e.stop(kill_servers=True)
        kill_tmux_servers(d)
        shutil.rmtree(d, ignore_errors=True)
