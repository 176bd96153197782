"""Asyncio client for one tmux server in control mode (``tmux -C``).

One persistent ``tmux -S <sock> -f /dev/null -C new-session -A -s _ctl ...`` subprocess per tmux server.
Commands are written one per line; tmux answers each with a ``%begin <time> <num> <flags>`` ...
``%end|%error <time> <num> <flags>`` block, in order, so a FIFO of futures matches replies to commands.
Notifications (``%window-add``, ``%sessions-changed`` ...) arrive between blocks; they are parsed and handed
to an optional callback, never mistaken for replies. Pane output (``%output`` / ``%extended-output``) goes to
``on_output`` as raw bytes, unescaped but never decoded: UTF-8 may split across lines, and the bytes are what
viewers and recordings get.

Two kinds of client per tmux server (``server.UserServer``): the command client, attached to the hidden
``_ctl`` session with ``no-output``, and the output client, attached to ``_out`` (into which each session's
window is linked, so that its panes' output reaches this client) with ``pause-after``.

Security: tmux does NOT escape pane content inside a reply block, so anything user-controlled printed in a
reply could forge a ``%end`` line. Callers must never transport user text through this channel (screen
captures go through a buffer saved to a private file; formats use a fixed prefix and ``#{q:...}``). As
defence in depth a block only ends on a ``%end``/``%error`` line whose time, number and flags are exactly
those of its ``%begin``.
"""
from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import pwd
import shutil
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tmuxi.errors import HostUnavailable
from tmuxi.observability import logger

CTL_SESSION = "_ctl"
OUT_SESSION = "_out"
MAX_COMMAND_LINE = 16 * 1024
# What the host keeps of one tmux server's output before it gives up on the connection: a line this long, or
# this much unsent to a server that does not read its commands, means the server (its user's) is hostile or
# wedged. Replies the host asks for are far smaller.
MAX_LINE = 1 << 20
MAX_UNSENT = 1 << 20

NotificationCallback = Callable[[str, str], None]
OutputCallback = Callable[[str, bytes], None]  # (pane id "%N", raw bytes)


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


def kill_tmux_servers(socket_dir: Path | str) -> None:
    """kill-server every tmux socket under ``socket_dir`` (recursively): their sessions end with them."""
    for sock in Path(socket_dir).rglob("*"):
        if sock.is_socket() and not sock.is_symlink():
            with contextlib.suppress(subprocess.TimeoutExpired):  # a stopped server: skip it, end the others
                subprocess.run([tmux_binary(), "-S", str(sock), "kill-server"],  # noqa: S603
                               capture_output=True, timeout=5, check=False)


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
        **SHELL_HOOKS,
    }


# Given to every shell (its startup files may change them): the exec line, typed with a leading space, stays out of
# the history; and before each prompt the shell prints the "semantic prompt" mark (OSC 133;A, which terminals and
# tmux ignore or use for prompt navigation), by which send-and-wait knows the shell is back at its prompt.
SHELL_HOOKS = {"HISTCONTROL": "ignorespace", "PROMPT_COMMAND": "builtin printf '\\033]133;A\\007'"}


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


class _Protocol(asyncio.SubprocessProtocol):
    """Keeps the first 4 KB of tmux's stderr (for error messages) and notices the process's exit. Its stdout
    is a pipe the client reads itself (``ControlClient._on_readable``)."""

    def __init__(self, client: ControlClient) -> None:
        self.client = client
        self.stderr = bytearray()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 2 and len(self.stderr) < 4096:
            self.stderr += data[: 4096 - len(self.stderr)]

    def process_exited(self) -> None:
        # stdout EOF (above) normally comes first and carries every byte written before the exit; this is
        # only a fallback should some other process keep the pipe open.
        asyncio.get_running_loop().call_later(0.5, self.client._eof, self)


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
        command_timeout_s: float = 30.0,
        spin_s: float = 0.0,
        env: dict[str, str] | None = None,
        wrap: Callable[[list[str]], list[str]] | None = None,
        spawn_kwargs: dict[str, Any] | None = None,
        on_spawned: Callable[[int], None] | None = None,
        session: str = CTL_SESSION,
        flags: str = "no-output",
        on_output: OutputCallback | None = None,
    ) -> None:
        """``wrap``/``spawn_kwargs``/``on_spawned``: how to start tmux as a user's account (``accounts.Isolation``):
        the wrapped command waits for one line on stdin, sent once ``on_spawned(pid)`` has confined it."""
        self.socket_path = str(socket_path)
        self.shell = shell
        self.cwd = cwd
        self.env = env
        self.wrap = wrap
        self.spawn_kwargs = spawn_kwargs or {"start_new_session": True}
        self.on_spawned = on_spawned
        self.on_notification = on_notification
        self.session = session
        self.flags = flags
        self.on_output = on_output
        self.start_timeout_s = start_timeout_s
        self.command_timeout_s = command_timeout_s
        self.spin_s = spin_s
        self._out_fd: int | None = None  # tmux's stdout, read here (non-blocking)
        self._transport: asyncio.SubprocessTransport | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._protocol: _Protocol | None = None
        self._buf = bytearray()
        self._block: _Block | None = None
        self._pending: deque[tuple[asyncio.Future[list[str]], str, Callable[[], None] | None]] = deque()
        self._startup: asyncio.Future[list[str]] | None = None
        self._closed: asyncio.Event | None = None
        self._closed_reason: str | None = "not started"
        self.last_header: tuple[str, str, str] | None = None  # (time, number, flags) of the last reply
        self._exit_line = ""

    # --- lifecycle ---------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._closed_reason is None and self._transport is not None

    @property
    def pid(self) -> int | None:
        return self._transport.get_pid() if self._transport else None

    async def start(self) -> None:
        if self.alive:
            return
        await self.close()
        loop = asyncio.get_running_loop()
        self._startup = loop.create_future()
        self._closed = asyncio.Event()
        self._pending.clear()
        self._buf.clear()
        self._block = None
        self._exit_line = ""
        self._closed_reason = None
        env = self.env or clean_env(self.shell)
        argv = [tmux_binary(), "-S", self.socket_path, "-f", "/dev/null", "-C",
                "new-session", "-A", "-s", self.session, "-x", "80", "-y", "24", "exec sleep 2147483647"]
        if self.wrap is not None:
            argv = self.wrap(argv)
        kwargs = {"cwd": self.cwd or env["HOME"], **self.spawn_kwargs}
        # tmux's stdout is a pipe of our own, read by a loop reader callback -- and, right after a command,
        # by `command` itself for a moment (see `_spin`): transports do not expose their pipe.
        out_r, out_w = os.pipe()
        os.set_blocking(out_r, False)
        try:
            # start_new_session (in spawn_kwargs): not in the host's process group, so Ctrl-C/kill of the host
            # spare it
            transport, protocol = await loop.subprocess_exec(
                lambda: _Protocol(self), *argv,
                stdin=asyncio.subprocess.PIPE, stdout=out_w, stderr=asyncio.subprocess.PIPE, env=env, **kwargs,
            )
        except OSError as exc:
            os.close(out_r)
            self._closed_reason = f"cannot start tmux: {exc}"
            self._closed.set()
            raise ControlClosed(self._closed_reason) from exc
        finally:
            os.close(out_w)
        self._transport, self._protocol = transport, protocol
        self._out_fd = out_r
        loop.add_reader(out_r, self._on_readable, protocol)
        # (uvloop's pipe transports are not asyncio.WriteTransport subclasses; only write/close are used)
        self._stdin = transport.get_pipe_transport(0)  # type: ignore[assignment]
        try:
            if self.wrap is not None:  # confine the waiting process, then let it exec tmux
                pid = transport.get_pid()
                if self.on_spawned is not None:
                    self.on_spawned(pid)
                assert self._stdin is not None
                self._stdin.write(b"\n")
            # The first block is the reply to the startup command itself (flags 0): consume it.
            await asyncio.wait_for(asyncio.shield(self._startup), self.start_timeout_s)
            # The command client must not receive pane output ("no-output"); the output client asks tmux to
            # pause a pane it falls behind on instead of buffering without bound ("pause-after=N").
            await self.command(f"refresh-client -f {self.flags}")
        except (TimeoutError, ControlClosed, TmuxCommandError, OSError) as exc:
            await self.close()
            raise ControlClosed(f"tmux control client for {self.socket_path} failed to start: {exc}") from exc

    async def close(self) -> None:
        """Detach (the tmux server and its sessions keep running)."""
        transport = self._transport
        self._fail_all("control client closed")
        if transport is None:
            return
        if self._stdin is not None:
            self._stdin.close()  # EOF: the tmux client detaches and exits
        if transport.get_returncode() is None and self._closed is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wait_exit(transport), 2.0)
            if transport.get_returncode() is None:
                with contextlib.suppress(ProcessLookupError):
                    transport.kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wait_exit(transport), 2.0)
        transport.close()
        self._close_out()
        if self._transport is transport:
            self._transport = None
            self._stdin = None

    def _close_out(self) -> None:
        fd, self._out_fd = self._out_fd, None
        if fd is not None:
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    def _on_readable(self, protocol: _Protocol) -> None:
        fd = self._out_fd
        if fd is None or protocol is not self._protocol:
            return
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._feed(data)
        else:  # EOF: the tmux client exited (every byte it wrote has been read)
            self._close_out()
            self._eof(protocol)

    @staticmethod
    async def _wait_exit(transport: asyncio.SubprocessTransport) -> None:
        while transport.get_returncode() is None:
            await asyncio.sleep(0.01)

    async def wait_closed(self) -> None:
        """Return once the current connection is gone (immediately if there is none)."""
        if self._closed is not None and self._closed_reason is None:
            await self._closed.wait()

    # --- commands ----------------------------------------------------------------------------------
    def submit(self, line: str, at_reply: Callable[[], None] | None = None) -> asyncio.Future[list[str]]:
        """Write one command line now and return the future of its reply lines (raises TmuxCommandError on
        ``%error``). Several submits in a row pipeline commands without waiting for each reply. ``at_reply`` is
        called the moment the reply is read, before any later line (pane output) is: what came before the reply
        on this client is exactly what tmux sent before it ran the command."""
        return self._submit([line], at_reply)[0]

    def _submit(self, lines: Sequence[str], at_first_reply: Callable[[], None] | None = None,
                ) -> list[asyncio.Future[list[str]]]:
        """Several command lines in one write (one wake-up of tmux, not one per line)."""
        if not self.alive or self._stdin is None:
            raise ControlClosed(f"tmux control connection to {self.socket_path} is down: {self._closed_reason}")
        encoded = []
        for line in lines:
            if "\n" in line or "\r" in line:
                raise ValueError("one command per line")
            data = line.encode("utf-8") + b"\n"
            if len(data) > MAX_COMMAND_LINE:
                raise ValueError(f"tmux command line too long ({len(data)} bytes)")
            encoded.append(data)
        if self._stdin.get_write_buffer_size() > MAX_UNSENT:
            self._abandon(f"tmux is not reading its commands ({MAX_UNSENT} bytes unsent)")
            raise ControlClosed(f"tmux control connection to {self.socket_path} is down: {self._closed_reason}")
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[list[str]]] = []
        # Append and write without any await in between: FIFO order == write order.
        for i, line in enumerate(lines):
            fut: asyncio.Future[list[str]] = loop.create_future()
            self._pending.append((fut, line, at_first_reply if i == 0 else None))
            futs.append(fut)
        try:
            self._stdin.write(b"".join(encoded))
        except (ConnectionError, RuntimeError) as exc:
            self._fail_all(f"write failed: {exc}")
        return futs

    async def _await(self, fut: asyncio.Future[list[str]]) -> list[str]:
        # A timer on the future itself (cheaper than asyncio.wait_for on this hot path). On timeout the
        # future fails; its reply is still consumed when (if) it comes, so the FIFO stays aligned.
        timer = asyncio.get_running_loop().call_later(self.command_timeout_s, self._expire, fut)
        try:
            return await fut
        finally:
            timer.cancel()

    def _expire(self, fut: asyncio.Future[list[str]]) -> None:
        """A reply overdue: the server is stopped or wedged (its user can do that to it). Give up on this
        connection, so every other caller fails now instead of waiting too; the supervisor reconnects."""
        if not fut.done():
            self._abandon(f"tmux did not answer within {self.command_timeout_s} s")

    def _abandon(self, reason: str) -> None:
        self._fail_all(reason)
        if self._transport is not None:
            with contextlib.suppress(ProcessLookupError):
                self._transport.kill()

    async def command(self, line: str) -> list[str]:
        fut = self.submit(line)
        if self.spin_s > 0 and len(self._pending) == 1:
            self._spin(fut)
        if fut.done():
            return fut.result()
        return await self._await(fut)

    def _spin(self, fut: asyncio.Future[list[str]]) -> None:
        """Read the reply for up to ``spin_s`` right here instead of going back to the event loop. tmux
        answers a command in ~20 us; sleeping in epoll until it does and being woken costs ~70 us more on
        the 2-core VMs (bench/bench_host.py). Only when this command is the only one in flight, so a
        busy host never spins: concurrent callers wait in the loop as usual."""
        fd = self._out_fd
        if fd is None:
            return
        deadline = time.perf_counter() + self.spin_s
        while not fut.done() and time.perf_counter() < deadline:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                return
            if not data:
                return  # EOF: the reader callback deals with it
            self._feed(data)

    async def commands(self, lines: Sequence[str]) -> list[list[str] | BaseException]:
        """Pipeline several commands; return each reply or its exception (in order)."""
        # Replies come in order: awaiting each in turn costs no task per command (as gather would).
        results: list[list[str] | BaseException] = []
        for fut in self._submit(lines):
            try:
                results.append(await self._await(fut))
            except Exception as exc:  # noqa: BLE001 - returned, as gather(return_exceptions=True) would
                results.append(exc)
        return results

    # --- reading -----------------------------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        start = 0
        on_output = self.on_output
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            if on_output is not None and self._block is None and buf[start] == 0x25 and (  # "%"
                    buf.startswith(b"%output ", start) or buf.startswith(b"%extended-output ", start)):
                self._output(on_output, bytes(buf[start:nl]))
            else:
                self._on_line(bytes(buf[start:nl]).decode("utf-8", errors="replace"))
            start = nl + 1
        if start:
            del buf[:start]
        if len(buf) > MAX_LINE:
            buf.clear()
            self._abandon(f"tmux sent a line of over {MAX_LINE} bytes")

    @staticmethod
    def _output(on_output: OutputCallback, line: bytes) -> None:
        """``%output %N <data>`` or ``%extended-output %N <age> ... : <data>``. tmux escapes every byte below
        0x20 and the backslash itself as ``\\ooo`` (so any backslash starts an octal escape) and sends the rest
        raw: ``codecs.escape_decode`` undoes exactly that, in C."""
        _, pane, rest = line.split(b" ", 2) if line.count(b" ") >= 2 else (b"", b"", b"")
        if line.startswith(b"%extended-output "):
            rest = rest.partition(b" : ")[2]
        if not pane.startswith(b"%"):
            return
        data = codecs.escape_decode(rest)[0] if b"\\" in rest else rest
        try:
            on_output(pane.decode("ascii"), data)
        except Exception:  # a buggy subscriber must not break the connection
            logger.exception("output callback failed")

    def _on_line(self, line: str) -> None:
        block = self._block
        if block is not None:
            if self._is_block_end(line, block):
                self._block = None
                self._finish_block(block, line.startswith("%error"))
            else:
                block.lines.append(line)
            return
        if line.startswith("%begin "):
            parts = line.split(" ")
            if len(parts) == 4:
                self._block = _Block((parts[1], parts[2], parts[3]))
                return
        if line.startswith("%exit"):
            self._exit_line = line[1:]
            return
        if line.startswith("%"):
            self._notify(parse_notification(line))
        # anything else outside a block is not expected from tmux: ignore it

    def _eof(self, protocol: _Protocol) -> None:
        if protocol is not self._protocol or self._closed_reason is not None:
            return
        reason = "tmux control process exited"
        if self._exit_line:
            reason += f" ({self._exit_line})"
        if protocol.stderr:
            reason += ": " + protocol.stderr.decode("utf-8", "replace").strip()[:200]
        self._fail_all(reason)
        if self._transport is not None:
            self._transport.close()  # release pipes (kills the tmux client if it somehow lingers)

    @staticmethod
    def _is_block_end(line: str, block: _Block) -> bool:
        if not (line.startswith("%end ") or line.startswith("%error ")):
            return False
        parts = line.split(" ")
        return len(parts) == 4 and (parts[1], parts[2], parts[3]) == block.header

    def _finish_block(self, block: _Block, error: bool) -> None:
        self.last_header = block.header
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
        fut, line, at_reply = self._pending.popleft()
        if at_reply is not None:
            try:
                at_reply()
            except Exception:
                logger.exception("reply callback failed")
        if fut.done():  # caller gave up; reply still consumed so the FIFO stays aligned
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
        except Exception:  # a buggy subscriber must not break the connection
            logger.exception("notification callback failed")

    def _fail_all(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        if self._closed is not None:
            self._closed.set()
        err_msg = f"tmux control connection to {self.socket_path} lost: {reason}"
        if self._startup is not None and not self._startup.done():
            self._startup.set_exception(ControlClosed(err_msg))
            self._startup.exception()  # retrieved: start() reports it
        while self._pending:
            fut, _, _ = self._pending.popleft()
            if not fut.done():
                fut.set_exception(ControlClosed(err_msg))
