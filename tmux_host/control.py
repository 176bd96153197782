"""Asyncio client for one tmux server in control mode (``tmux -C``).

One persistent ``tmux -S <sock> -f /dev/null -C new-session -A -s _ctl ...`` subprocess per tmux server.
Commands are written one per line; tmux answers each with a ``%begin <time> <num> <flags>`` ...
``%end|%error <time> <num> <flags>`` block, in order, so a FIFO of futures matches replies to commands.
Notifications (``%window-add``, ``%sessions-changed``, ``%output`` ...) arrive between blocks; they are
parsed and handed to an optional callback (the seam for output streaming), never mistaken for replies.

Security: tmux does NOT escape pane content inside a reply block, so anything user-controlled printed in a
reply could forge a ``%end`` line. Callers must never transport user text through this channel (screen
captures go through a buffer saved to a private file; formats use a fixed prefix and ``#{q:...}``). As
defence in depth a block only ends on a ``%end``/``%error`` line whose time, number and flags are exactly
those of its ``%begin``.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tmuxi.errors import HostUnavailable
from tmuxi.observability import logger

CTL_SESSION = "_ctl"
_READ_LIMIT = 64 * 1024 * 1024  # a single reply line (e.g. a long list) may be long; never choke on it
MAX_COMMAND_LINE = 16 * 1024

NotificationCallback = Callable[[str, str], None]


class ControlClosed(HostUnavailable):
    """The control connection to a tmux server is gone (process exited or was closed)."""

    code = "tmux_unavailable"


class TmuxCommandError(Exception):
    """tmux answered a command with ``%error``."""

    def __init__(self, command: str, lines: Sequence[str]) -> None:
        self.command = command.split(" ", 1)[0]
        self.lines = list(lines)
        super().__init__(f"tmux {self.command}: {' / '.join(self.lines) or 'error'}")

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass(frozen=True)
class Notification:
    name: str  # without the leading %, e.g. "sessions-changed"
    args: str


def tmux_binary() -> str:
    return shutil.which("tmux") or "/usr/bin/tmux"


def clean_env(shell: str) -> dict[str, str]:
    """The environment given to tmux (and so to every pane): built from scratch, never inherited, so no
    host secret (TMUXI_HOST_SECRET, database URLs...) can ever reach a user's shell."""
    pw = pwd.getpwuid(os.getuid())
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": pw.pw_dir,
        "USER": pw.pw_name,
        "LOGNAME": pw.pw_name,
        "SHELL": shell,
        "LANG": "C.UTF-8",
        "TERM": "xterm-256color",
    }


def quote(arg: str) -> str:
    """Single-quote a tmux command argument. Only for values the host generated itself (ids, our own
    paths, formats); refuses anything that could break out of the quotes or the command line."""
    if "'" in arg or "\n" in arg or "\r" in arg or "\0" in arg:
        raise ValueError("argument not safe for a tmux command line")
    return "'" + arg + "'"


def parse_notification(line: str) -> Notification:
    name, _, args = line[1:].partition(" ")
    return Notification(name, args)


class _Block:
    __slots__ = ("header", "lines")

    def __init__(self, header: tuple[str, str, str]) -> None:
        self.header = header
        self.lines: list[str] = []


class ControlClient:
    """One control-mode connection. ``await start()``, then ``await command("list-sessions ...")``.

    A dead process fails every pending command with :class:`ControlClosed`; ``start()`` may be called
    again to reconnect (the tmux server itself keeps running if only the client died).
    """

    def __init__(
        self,
        socket_path: Path | str,
        *,
        shell: str = "/bin/bash",
        cwd: str | None = None,
        on_notification: NotificationCallback | None = None,
        start_timeout_s: float = 10.0,
    ) -> None:
        self.socket_path = str(socket_path)
        self.shell = shell
        self.cwd = cwd
        self.on_notification = on_notification
        self.start_timeout_s = start_timeout_s
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: deque[tuple[asyncio.Future[list[str]], str]] = deque()
        self._startup: asyncio.Future[list[str]] | None = None
        self._closed_reason: str | None = "not started"

    # --- lifecycle ---------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._closed_reason is None and self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def start(self) -> None:
        if self.alive:
            return
        await self._reap()
        loop = asyncio.get_running_loop()
        self._startup = loop.create_future()
        self._pending.clear()
        self._closed_reason = None
        try:
            self._proc = await asyncio.create_subprocess_exec(
                tmux_binary(), "-S", self.socket_path, "-f", "/dev/null", "-C",
                "new-session", "-A", "-s", CTL_SESSION, "-x", "80", "-y", "24", "exec sleep 2147483647",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=clean_env(self.shell),
                cwd=self.cwd or clean_env(self.shell)["HOME"],
                start_new_session=True,  # not in the host's process group: Ctrl-C/kill of the host spare it
                limit=_READ_LIMIT,
            )
        except OSError as exc:
            self._closed_reason = f"cannot start tmux: {exc}"
            raise ControlClosed(self._closed_reason) from exc
        self._reader = asyncio.create_task(self._read_loop(), name=f"tmux-ctl-{self.socket_path}")
        try:
            # The first block is the reply to the startup command itself (flags 0): consume it.
            await asyncio.wait_for(asyncio.shield(self._startup), self.start_timeout_s)
            # This client only drives commands; it must not receive pane output (it is attached to the
            # hidden _ctl session only). Output streaming will use its own subscription (later issue).
            await self.command("refresh-client -f no-output")
        except (TimeoutError, ControlClosed, TmuxCommandError) as exc:
            await self.close()
            raise ControlClosed(f"tmux control client for {self.socket_path} failed to start: {exc}") from exc

    async def close(self) -> None:
        """Detach (the tmux server and its sessions keep running)."""
        proc = self._proc
        self._fail_all("control client closed")
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(Exception):
                assert proc.stdin is not None
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 2.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        await self._reap()

    async def wait_closed(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._reader)

    async def _reap(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        self._reader = None

    # --- commands ----------------------------------------------------------------------------------
    def submit(self, line: str) -> asyncio.Future[list[str]]:
        """Write one command line now and return the future of its reply lines (raises TmuxCommandError on
        ``%error``). Several submits in a row pipeline commands without waiting for each reply."""
        if not self.alive:
            raise ControlClosed(f"tmux control connection to {self.socket_path} is down: {self._closed_reason}")
        if "\n" in line or "\r" in line:
            raise ValueError("one command per line")
        data = line.encode("utf-8") + b"\n"
        if len(data) > MAX_COMMAND_LINE:
            raise ValueError(f"tmux command line too long ({len(data)} bytes)")
        fut: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        assert self._proc is not None and self._proc.stdin is not None
        # Append and write without any await in between: FIFO order == write order.
        self._pending.append((fut, line))
        try:
            self._proc.stdin.write(data)
        except (ConnectionError, RuntimeError) as exc:
            self._fail_all(f"write failed: {exc}")
        return fut

    async def command(self, line: str) -> list[str]:
        fut = self.submit(line)
        await self._drain()
        return await fut

    async def commands(self, lines: Sequence[str]) -> list[list[str] | BaseException]:
        """Pipeline several commands; return each reply or its exception (in order)."""
        futs = [self.submit(line) for line in lines]
        await self._drain()
        return list(await asyncio.gather(*futs, return_exceptions=True))

    async def _drain(self) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None:
            return
        try:
            await proc.stdin.drain()
        except (ConnectionError, RuntimeError) as exc:
            self._fail_all(f"write failed: {exc}")

    # --- reading -----------------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        stdout = self._proc.stdout
        block: _Block | None = None
        reason = "tmux control process exited"
        try:
            while True:
                raw = await stdout.readline()
                if not raw:
                    break
                line = raw.rstrip(b"\n").decode("utf-8", errors="replace")
                if block is not None:
                    if self._is_block_end(line, block):
                        self._finish_block(block, line.startswith("%error"))
                        block = None
                    else:
                        block.lines.append(line)
                    continue
                if line.startswith("%begin "):
                    parts = line.split(" ")
                    if len(parts) == 4:
                        block = _Block((parts[1], parts[2], parts[3]))
                        continue
                if line.startswith("%exit"):
                    reason = f"tmux control client exited ({line[1:]})"
                    continue
                if line.startswith("%"):
                    self._notify(parse_notification(line))
                # anything else outside a block is noise from tmux (not expected): ignore
        except asyncio.CancelledError:
            self._fail_all("control client closed")
            raise
        except Exception as exc:  # pragma: no cover - defensive
            reason = f"control reader failed: {exc!r}"
            logger.exception("tmux control reader failed", extra={"socket": self.socket_path})
        proc = self._proc
        if proc is not None and proc.stderr is not None:
            with contextlib.suppress(Exception):
                tail = await asyncio.wait_for(proc.stderr.read(4096), 0.2)
                if tail:
                    reason += f": {tail.decode('utf-8', 'replace').strip()[:200]}"
        self._fail_all(reason)

    @staticmethod
    def _is_block_end(line: str, block: _Block) -> bool:
        if not (line.startswith("%end ") or line.startswith("%error ")):
            return False
        parts = line.split(" ")
        return len(parts) == 4 and (parts[1], parts[2], parts[3]) == block.header

    def _finish_block(self, block: _Block, error: bool) -> None:
        if self._startup is not None and not self._startup.done():
            # First block = reply to the startup command (flags 0).
            if error:
                self._startup.set_exception(ControlClosed("startup command failed: " + " / ".join(block.lines)))
            else:
                self._startup.set_result(block.lines)
            return
        if block.header[2] == "0" or not self._pending:
            # Not a reply to one of our command lines (flags 0), or nothing pending: ignore it.
            logger.debug("unsolicited tmux block ignored", extra={"socket": self.socket_path})
            return
        fut, line = self._pending.popleft()
        if fut.done():  # caller cancelled; reply still consumed so the FIFO stays aligned
            return
        if error:
            fut.set_exception(TmuxCommandError(line, block.lines))
        else:
            fut.set_result(block.lines)

    def _notify(self, note: Notification) -> None:
        cb = self.on_notification
        if cb is None:
            return
        try:
            cb(note.name, note.args)
        except Exception:  # a buggy subscriber must not kill the reader
            logger.exception("notification callback failed")

    def _fail_all(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        err_msg = f"tmux control connection to {self.socket_path} lost: {reason}"
        if self._startup is not None and not self._startup.done():
            self._startup.set_exception(ControlClosed(err_msg))
        while self._pending:
            fut, _ = self._pending.popleft()
            if not fut.done():
                fut.set_exception(ControlClosed(err_msg))
