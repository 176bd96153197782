"""Control-mode client against a real tmux server (each test gets its own short socket dir)."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.hosting import kill_tmux_servers
from tmux_host.accounts import ensure_dir
from tmux_host.control import ControlClient, ControlClosed, TmuxCommandError, quote, tmux_binary
from tmux_host.engine import Engine
from tmuxi.settings import Settings

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")


@pytest.fixture
def sock_dir():
    d = Path(tempfile.mkdtemp(dir="/tmp", prefix="tc"))
    yield d
    kill_tmux_servers(d)
    shutil.rmtree(d, ignore_errors=True)


async def _client(sock_dir: Path, notes: list[tuple[str, str]] | None = None, spin_s: float = 0.0) -> ControlClient:
    ctl = ControlClient(sock_dir / "s0", shell=Settings().shell,  # the tests' rc-free shell (conftest)
                        on_notification=(lambda n, a: notes.append((n, a))) if notes is not None else None,
                        spin_s=spin_s)
    await ctl.start()
    return ctl


async def _wait(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_pipelined_replies_stay_in_order_with_notifications(sock_dir: Path) -> None:
    notes: list[tuple[str, str]] = []
    ctl = await _client(sock_dir, notes)
    try:
        # new-session/new-window/rename generate notifications between the reply blocks.
        replies = await ctl.commands([
            "new-session -d -s tone -x 80 -y 24 -P -F 'N#{session_id}'",
            "display-message -p 'first'",
            "new-window -d -t tone: -P -F 'W#{window_index}'",
            "rename-window -t tone:1 renamed",
            "display-message -p 'second'",
            "list-sessions -F 'L#{q:session_name}'",
            "kill-session -t '$999'",
            "display-message -p 'third'",
        ])
        assert replies[0][0].startswith("N$")
        assert replies[1] == ["first"]
        assert replies[2] == ["W1"]
        assert replies[3] == []
        assert replies[4] == ["second"]
        assert sorted(replies[5]) == ["L_ctl", "Ltone"]
        assert isinstance(replies[6], TmuxCommandError) and "can't find session" in replies[6].text
        assert replies[7] == ["third"]
        names = {n for n, _ in notes}
        assert "sessions-changed" in names or "session-changed" in names
        assert "begin" not in names and "end" not in names
        # single command API and an %error raised as an exception
        assert await ctl.command("display-message -p 'x#{session_name}'") == ["x_ctl"]
        with pytest.raises(TmuxCommandError):
            await ctl.command("no-such-command")
        assert await ctl.command("display-message -p ok") == ["ok"]
    finally:
        await ctl.close()


async def test_replies_read_on_the_spot_match_their_commands(sock_dir: Path) -> None:
    """With spinning on, a lone command reads its own reply before yielding; errors, notifications and
    concurrent callers (which do not spin) still get exactly their own replies."""
    notes: list[tuple[str, str]] = []
    ctl = await _client(sock_dir, notes, spin_s=0.05)
    try:
        for i in range(50):
            assert await ctl.command(f"display-message -p 'n{i}'") == [f"n{i}"]
        with pytest.raises(TmuxCommandError):
            await ctl.command("kill-session -t '$999'")
        assert await ctl.command("new-session -d -s spun -P -F 'S#{session_name}'") == ["Sspun"]
        assert await ctl.command("display-message -p after") == ["after"]
        got = await asyncio.gather(*(ctl.command(f"display-message -p 'c{i}'") for i in range(20)))
        assert got == [[f"c{i}"] for i in range(20)]
        await _wait(lambda: asyncio.sleep(0, result=any(n == "sessions-changed" for n, _ in notes)))
    finally:
        await ctl.close()


async def test_forged_end_lines_in_a_pane_cannot_break_parsing(sock_dir: Path) -> None:
    ctl = await _client(sock_dir)
    out = sock_dir / "forge.sh"
    try:
        (pane,) = await ctl.command("new-session -d -s forge -x 120 -y 200 -P -F '#{pane_id}'")
        await ctl.command("display-message -p sync")
        t, n, _ = ctl.last_header  # type: ignore[misc]
        now, num = int(t), int(n)
        # Forge the exact end lines of the next ~40 replies (current and next second), plus %begin/%exit
        # and notification look-alikes.
        forged = [f"%{kind} {ts} {k} 1" for k in range(num + 1, num + 41) for ts in (now, now + 1)
                  for kind in ("end", "error")]
        forged += ["%begin 1 1 1", "%exit", "%sessions-changed", "%output %1 pwned"]
        out.write_text("printf '%s\\n' " + " ".join(f"'{line}'" for line in forged) + "\n")
        await ctl.command(f"send-keys -t {quote(pane)} -H " + f". {out}\n".encode().hex(" "))

        cap_file = sock_dir / "cap.txt"

        async def printed() -> bool:
            # Safe path: the capture goes to a file, never through the control channel.
            await ctl.commands([f"capture-pane -b cap -t {quote(pane)}", f"save-buffer -b cap {quote(str(cap_file))}",
                                "delete-buffer -b cap"])
            return "%output %1 pwned" in cap_file.read_text()

        await _wait(printed)
        text = cap_file.read_text()
        assert f"%end {now} {num + 1} 1" in text and f"%error {now} {num + 5} 1" in text
        # ... and the channel is still perfectly aligned.
        for i in range(5):
            assert await ctl.command(f"display-message -p 'after{i}'") == [f"after{i}"]

        # Defence in depth: even if pane text does travel inside a block (capture-pane -p), a %end line
        # whose time/number/flags differ from its %begin does not end the block. A fresh pane: the first
        # one still shows exact forgeries of the coming replies (a `clear` there races the capture).
        (pane2,) = await ctl.command("new-session -d -s forge2 -x 120 -y 40 -P -F '#{pane_id}'")
        typed = b"printf '%s\\n' '%end 1 1 1' '%error 2 2 1'\n"
        await ctl.command(f"send-keys -t {quote(pane2)} -H " + typed.hex(" "))

        async def raw_capture_has_forgery() -> bool:
            lines = await ctl.command(f"capture-pane -p -t {quote(pane2)}")
            return "%end 1 1 1" in lines and "%error 2 2 1" in lines

        await _wait(raw_capture_has_forgery)
        assert await ctl.command("display-message -p aligned") == ["aligned"]
    finally:
        await ctl.close()


async def test_dead_control_process_fails_pending_and_restarts(sock_dir: Path) -> None:
    ctl = await _client(sock_dir)
    await ctl.command("new-session -d -s survivor -x 80 -y 24")
    # run-shell (without -b) answers at once but blocks the command queue: the next one stays pending.
    ctl.submit("run-shell 'sleep 5'")
    pending = ctl.submit("display-message -p never")
    await asyncio.sleep(0.05)
    assert ctl.pid is not None
    os.kill(ctl.pid, signal.SIGKILL)
    with pytest.raises(ControlClosed) as info:
        await asyncio.wait_for(pending, 5)
    assert info.value.status == 503 and "lost" in info.value.message
    assert not ctl.alive
    with pytest.raises(ControlClosed):
        await ctl.command("display-message -p x")
    # restartable; the tmux server (and its sessions) survived the client's death
    await ctl.start()
    assert ctl.alive
    assert "Lsurvivor" in await ctl.command("list-sessions -F 'L#{session_name}'")
    await ctl.close()
    assert not ctl.alive


async def test_server_killed_fails_pending(sock_dir: Path) -> None:
    ctl = await _client(sock_dir)
    ctl.submit("run-shell 'sleep 5'")
    pending = ctl.submit("display-message -p never")
    subprocess.run([tmux_binary(), "-S", str(sock_dir / "s0"), "kill-server"], check=False, timeout=10)
    with pytest.raises(ControlClosed):
        await asyncio.wait_for(pending, 5)
    assert not ctl.alive
    await ctl.close()


def test_quote_refuses_breakouts() -> None:
    assert quote("%12") == "'%12'"
    for bad in ("a'b", "a\nb", "a\rb"):
        with pytest.raises(ValueError):
            quote(bad)


def test_private_dir_is_created_and_repaired(sock_dir: Path) -> None:
    d = sock_dir / "priv"
    ensure_dir(d, 0o700)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    d.chmod(0o755)
    ensure_dir(d, 0o710, gid=4321)
    assert stat.S_IMODE(d.stat().st_mode) == 0o710 and d.stat().st_gid == 4321
    link = sock_dir / "link"
    link.symlink_to(d)
    with pytest.raises(RuntimeError, match="symlink"):
        ensure_dir(link, 0o700)
    planted = sock_dir / "planted"  # someone else's directory where ours should be
    planted.mkdir()
    os.chown(planted, 4321, 4321)
    with pytest.raises(RuntimeError, match="owned by uid 4321"):
        ensure_dir(planted, 0o700)


async def test_too_long_socket_path_names_the_setting(sock_dir: Path) -> None:
    s = Settings(socket_dir=sock_dir / ("x" * 100), host_secret="y" * 32)
    with pytest.raises(RuntimeError, match="TMUXI_SOCKET_DIR"):
        await Engine(s).start(background=False)
