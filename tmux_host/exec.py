"""Exec: run a command in a session's own shell, as if typed, and return its output and exit status.

The host writes the command to a file (``<x>.sh``, after a first ``\\history -s -- '<command>'; ``: the history
holds the command, not machinery) beside a wrapper (``<x>.w``) in the account's exchange directory (which the
account cannot list or write: nothing there can be swapped for a link or a FIFO of the user's), and types one
short line, `` \\. '<x>.w'``. The wrapper, in the shell itself::

    \\echo s >'<x>.rc'                                  # started
    trap '\\echo "$? exit" >'<x>.rc'' EXIT              # a command that ends the shell still reports its status
    { \\. '<x>.sh'; } >'<x>.o' 2>'<x>.e'                 # stdin stays the terminal: typed input reaches it
    \\eval "\\echo $? >'<x>.rc'; trap - EXIT; \\read -r _ <'<x>.a'; \\return $?"

The files are made before the exec needs them (``ChannelFiles``: a session keeps sets made ahead), so that an exec
only writes its command.

``.o``, ``.e``, ``.rc`` and ``.a`` are FIFOs the host made and reads (writes, for ``.a``) without blocking, in the
event loop, as the bytes come: the output never touches the disk. Each stream keeps its first and last
``cap / 2`` bytes (``StreamBuffer``) and counts the rest, so the host's memory does not grow with a command's
output however long it runs. The host shows the command and its output on the session's terminal as they come
(``TerminalEcho``: the typed line is replaced by the command, as if the user had typed it), and answers the
wrapper's last ``read`` once all of it is shown, so the next prompt comes after the output, as in a terminal.

A background exec (``background``) runs as a job of the shell, disowned (``{ trap : TERM ...; ( \\. '<x>.sh' ) ...;
\\echo $? >'<x>.rc'; } &``: the wrapper outlives the signals sent to the job to report its status), stdin a FIFO
the host writes (``.i``), its process group reported on ``.rc`` (``p <pid>``) so it can be signalled -- once verified
to be a group of the session's shell and account; several may run at once, and the host ends them with the session.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import os
import re
import stat
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from tmuxi import errors
from tmuxi.models import ExecResult

T = TypeVar("T")
PIPE_SIZE = 1 << 20  # fewer wake-ups for a command that writes fast
RC_MAX = 64
READS_PER_WAKEUP = 16  # bytes a stream takes per loop pass, at most this many pipe buffers (others get a turn)
DISPLAY_MAX = 256 << 10  # output waiting for the terminal beyond this is not shown (counted and said instead)
MARKER = "\n[tmuxi: {omitted} bytes omitted; {total} in all]\n"


def _q(text: str) -> str:
    """Single-quote for sh."""
    return "'" + text.replace("'", "'\\''") + "'"


def open_fifo(path: Path, *, write: bool = False) -> int:
    """Make a FIFO the account can write (through its 0710 exchange directory only) and open our end without
    blocking: the read end, or (``write``) both ends (O_RDWR: the shell's open for reading never blocks, and it
    reads EOF, not forever, should the host go away)."""
    os.mkfifo(path, 0o600)
    os.chmod(path, 0o644 if write else 0o622)  # noqa: S103 - reachable through the account's 0710 directory only
    fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.close(fd)
        raise RuntimeError(f"{path} is not the FIFO the host made")
    return fd


def _history(command: str | None) -> str:
    """A line that puts ``command`` in bash's history (and does nothing in another shell)."""
    return f'[ -n "${{BASH_VERSION-}}" ] && \\history -s -- {_q(command)}' if command else ":"


def utf8_complete(data: bytes | bytearray) -> int:
    """The length of ``data`` without a UTF-8 sequence cut at its end (at most 3 bytes held back)."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        b = data[n - back]
        if b < 0x80:
            return n  # ASCII: nothing cut
        if b >= 0xC0:  # a lead byte: is its sequence complete?
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return n if back >= need else n - back
    return n  # continuation bytes only (not UTF-8 anyway): keep them


class StreamBuffer:
    """One output stream: its first ``cap // 2`` bytes and its last ``cap - cap // 2``, and how many in all.
    Positions are absolute byte offsets in the stream (cursors)."""

    __slots__ = ("head", "head_cap", "tail", "tail_cap", "total")

    def __init__(self, cap: int) -> None:
        self.head_cap = cap // 2
        self.tail_cap = cap - self.head_cap
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_cap - len(self.head)
        if room > 0 and not self.tail:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            over = len(self.tail) - self.tail_cap
            if over > 0:
                del self.tail[:over]

    def read(self, cursor: int) -> tuple[bytes, int, bytes]:
        """What is held from ``cursor`` on: (bytes before a gap, bytes omitted in the gap, bytes after it)."""
        cursor = max(0, min(cursor, self.total))
        tail_start = self.total - len(self.tail)
        first = bytes(self.head[cursor:]) if cursor < len(self.head) else b""
        start = max(cursor, len(self.head))
        if start >= tail_start:
            return first, 0, bytes(self.tail[start - tail_start:])
        return first, tail_start - start, bytes(self.tail)


@dataclass(slots=True)
class Chunk:
    text: str  # decoded (or base64), with the omission marker in place
    cursor: int  # where the next read starts
    omitted: int
    lossy: bool


def render(buf: StreamBuffer, cursor: int, *, encoding: str, final: bool) -> Chunk:
    """Bytes from ``cursor`` as text. A gap is cut at line ends (the head back to its last newline, the tail on from
    its first) and marked with the count; in UTF-8, a sequence not yet complete is left for the next read (unless
    ``final``), and bytes that are not UTF-8 become U+FFFD with ``lossy`` set (``base64`` returns them exactly)."""
    first, omitted, rest = buf.read(cursor)
    end = buf.total
    if omitted:
        nl = first.rfind(b"\n")
        if nl >= 0 and nl >= len(first) - 4096:
            omitted += len(first) - nl - 1
            first = first[:nl + 1]
        nl = rest.find(b"\n")
        if 0 <= nl < 4096 and nl < len(rest) - 1:
            omitted += nl + 1
            rest = rest[nl + 1:]
    data = first + rest
    if encoding != "base64" and not final and not omitted:
        keep = utf8_complete(data)
        end -= len(data) - keep
        data = data[:keep]
    marker = MARKER.format(omitted=omitted, total=buf.total) if omitted else ""
    if encoding == "base64":
        if omitted:
            return Chunk(base64.b64encode(first).decode() + "\n" + marker.strip() + "\n" +
                         base64.b64encode(rest).decode(), end, omitted, False)
        return Chunk(base64.b64encode(data).decode(), end, 0, False)
    parts = [first, rest] if omitted else [data]
    lossy = False
    texts = []
    for part in parts:
        try:
            texts.append(part.decode("utf-8"))
        except UnicodeDecodeError:
            texts.append(part.decode("utf-8", errors="replace"))
            lossy = True
    return Chunk(marker.join(texts) if omitted else texts[0], end, omitted, lossy)


class TerminalEcho:
    """Writes to the session's terminal what a command run by exec prints, as a terminal would show it: never
    blocking the host (at most ``DISPLAY_MAX`` bytes wait; beyond that, what does not fit is counted and the count
    shown), and ``drained`` once everything given to it is on its way."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._pending = bytearray()
        self._dropped = 0
        self._watching = False
        self._drained: asyncio.Future[None] | None = None

    def write(self, data: bytes) -> None:
        if self.fd < 0:
            return
        if not self._pending:
            try:
                n = os.write(self.fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                self.close()
                return
            data = data[n:]
            if not data:
                return
        if len(self._pending) + len(data) > DISPLAY_MAX:
            self._dropped += len(data)
            return
        self._pending += data
        self._watch()

    def _watch(self) -> None:
        if not self._watching and self.fd >= 0:
            asyncio.get_running_loop().add_writer(self.fd, self._flush)
            self._watching = True

    def _flush(self) -> None:
        try:
            if self._pending:
                n = os.write(self.fd, self._pending)
                del self._pending[:n]
            if not self._pending and self._dropped:
                self._pending += f"\r\n[tmuxi: {self._dropped} bytes of output not shown]\r\n".encode()
                self._dropped = 0
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        if not self._pending:
            asyncio.get_running_loop().remove_writer(self.fd)
            self._watching = False
            if self._drained is not None and not self._drained.done():
                self._drained.set_result(None)

    async def drained(self, within_s: float) -> None:
        if self.fd < 0 or (not self._pending and not self._dropped):
            return
        self._drained = asyncio.get_running_loop().create_future()
        self._watch()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained, within_s)

    def close(self) -> None:
        if self.fd >= 0:
            if self._watching:
                asyncio.get_running_loop().remove_writer(self.fd)
                self._watching = False
            os.close(self.fd)
            self.fd = -1
            self._pending.clear()


_files_pool: ThreadPoolExecutor | None = None


def in_files_thread(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """Run ``fn`` (making or removing exec files) in the one thread that does that: off the event loop, and one
    thing at a time in the exchange directories (not a pool of threads contending for them). At the same CPU
    priority as the rest: a lower one would starve it whenever the users' processes keep the CPU busy."""
    global _files_pool
    if _files_pool is None:
        _files_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="exec-files")
    return asyncio.get_running_loop().run_in_executor(_files_pool, fn, *args)


def clear_exchange(root: Path) -> int:
    """Remove what a previous run of the host left in the accounts' exchange directories (``root``/<account>/):
    exec files made ahead, those of execs it did not see end. Run at start, before anything of this run is there.
    Returns how many entries it removed."""
    removed = 0
    for account in os.scandir(root):
        if account.is_dir(follow_symlinks=False):
            for entry in os.scandir(account.path):
                if not entry.is_dir(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed += 1
    return removed


class ChannelFiles:
    """An exec's files in the account's exchange directory: the wrapper, the command file (empty until the exec
    writes its command there), and the FIFOs -- stdout, stderr (unless merged), exit status, acknowledgement, and
    stdin for a background job -- with the host's ends open. Their name is the exec's id (unless the API gives it
    one).

    Making them is file-system work, an inode each, and that cost is the disk's: on this project's machine a new
    inode on the journaled root file system took from 15 us to 0.6 ms, varying minute to minute -- six of them, then
    their removal, were most of a trivial exec's time. So none of it is on an exec's path: a session keeps sets made
    ahead, in a thread (``Engine._replenish``); an exec writes its command into the (existing) file, and its files
    are removed in that thread after it ends. Each exec still has files of its own: nothing a command leaves
    behind (a background process holding its stdout) ever reaches another exec."""

    def __init__(self, directory: Path, *, merged: bool = False, background: bool = False) -> None:
        self.name = uuid.uuid4().hex[:16]
        self.merged = merged
        self.background = background
        base = directory / self.name
        self.script, self.wrapper_path = base.with_suffix(".sh"), base.with_suffix(".w")
        self.out_path, self.err_path = base.with_suffix(".o"), base.with_suffix(".e")
        self.rc_path, self.ack_path = base.with_suffix(".rc"), base.with_suffix(".a")
        self.in_path, self.recovery_path = base.with_suffix(".i"), base.with_suffix(".r")
        self.fds: dict[str, int] = {}

    @classmethod
    def make(cls, directory: Path, *, merged: bool = False, background: bool = False,
             history: str | None = None) -> ChannelFiles:
        """Make them (blocking: in a thread, or where its cost does not matter). Nothing is left on failure.
        ``history``: a background job's command, for the shell's history (its wrapper puts it there: the command
        file runs in the job's subshell, whose history is not the shell's)."""
        files = cls(directory, merged=merged, background=background)
        try:
            files._make(history)
        except BaseException:
            files.remove(dict(files.fds))
            raise
        return files

    def _make(self, history: str | None) -> None:
        rc, ack, sh = _q(str(self.rc_path)), _q(str(self.ack_path)), _q(str(self.script))
        out = _q(str(self.out_path))
        redirect = f">{out} 2>&1" if self.merged else f">{out} 2>{_q(str(self.err_path))}"
        if self.background:
            body = (f"\\echo s >{rc}\n{_history(history)}\n"
                    f"{{ {{ trap : INT TERM HUP QUIT USR1 USR2; ( \\. {sh} ) <{_q(str(self.in_path))} {redirect}; "
                    f"\\echo $? >{rc}; }} & }} 2>/dev/null\n"
                    f"\\echo \"p $!\" >{rc}; \\disown $! 2>/dev/null; \\read -r _ <{ack}\n")
        else:
            body = (f"\\echo s >{rc}\ntrap '\\echo \"$? exit\" >'{_q(str(self.rc_path))} EXIT\n"
                    f"{{ \\. {sh}; }} {redirect}\n"
                    f"\\eval \"\\echo \\$? >{rc}; trap - EXIT; \\read -r _ <{ack}; \\return $?\"\n")
        make_file(self.script)
        make_file(self.wrapper_path, body.encode())
        for name in ["o"] if self.merged else ["o", "e"]:
            fd = self.fds[name] = open_fifo(self.out_path if name == "o" else self.err_path)
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self.fds["rc"] = open_fifo(self.rc_path)
        # ours, so the shell opening and closing it (twice or more) never leaves it without a writer: no EOF between
        self.fds["rcw"] = os.open(self.rc_path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self.fds["a"] = open_fifo(self.ack_path, write=True)
        if self.background:
            self.fds["i"] = open_fifo(self.in_path, write=True)

    def write_script(self, command: bytes, history: str | None) -> None:
        """The command, into the file the wrapper sources. Before it, on its first line (so that the shell's
        messages about the command give its own line numbers), the shell's history gets the command: the history
        holds what was run, not the wrapper (the line typed is kept out, HISTCONTROL=ignorespace)."""
        hist = f"{_history(history)}; " if history and not self.background else ""
        fd = os.open(self.script, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            view = memoryview(hist.encode("utf-8", errors="surrogateescape") + command + b"\n")
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    def remove(self, fds: dict[str, int]) -> None:
        """Unlink first (a late redirection then fails instead of waiting for a reader), then close our ends (a
        writer still running gets SIGPIPE; the wrapper's read returns at EOF). Blocking, like ``make``."""
        for p in (self.script, self.wrapper_path, self.out_path, self.err_path, self.rc_path, self.ack_path,
                  self.in_path, self.recovery_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        for fd in fds.values():
            os.close(fd)


class ExecChannel:
    """One exec's run through its files (``ChannelFiles``): what it prints, as it comes, and its status."""

    def __init__(self, files: ChannelFiles, cap: int) -> None:
        self.files = files
        self.id = files.name
        self.erase: bytes | None = None  # what takes a typed recovery line off the terminal, once it has run
        self.merged = files.merged
        self.background = files.background
        self.stdout = StreamBuffer(cap)
        self.stderr = StreamBuffer(cap)
        self.echo: TerminalEcho | None = None  # the session's terminal, once the command's line is shown there
        self._unshown = bytearray()  # output that came before the line was shown (bounded as the terminal is)
        self._line: bytes | None = None
        self._echo_to: TerminalEcho | None = None
        self._rc = bytearray()
        self.started = False  # the shell has begun the wrapper
        self.pgid: int | None = None  # a background job's process group (as the shell said: verify before use)
        self._fds = files.fds
        self._eof: set[str] = set()
        self.changed = asyncio.Event()  # output came, or the status (set; waiters clear it)
        # (exit status, the shell is exiting): "3" after the command, "3 exit" from the EXIT trap
        self.rc: asyncio.Future[tuple[int, bool]] = asyncio.get_running_loop().create_future()

    # --- setup -------------------------------------------------------------------------------------
    def open(self, command: bytes, history: str | None) -> None:
        """Write the command and start reading the pipes."""
        self.files.write_script(command, history)
        loop = asyncio.get_running_loop()
        for name in ("o", "e"):
            if name in self._fds:
                loop.add_reader(self._fds[name], self._on_out, name)
        loop.add_reader(self._fds["rc"], self._on_rc)

    def typed_line(self) -> bytes:
        # Leading space keeps it out of history (HISTCONTROL=ignorespace); `\.` dodges aliases.
        return f" \\. {_q(str(self.files.wrapper_path))}\r".encode()

    def recovery(self) -> bytes:
        """For a shell back at its prompt without having written the status (a signal ended the command and
        the shell dropped the rest of the wrapper): a line that sources a file saying the status it keeps in ``$?``
        (still the command's, at the top of a sourced file), clearing the trap, and waiting, like the wrapper, for
        the host to have erased that line from the terminal."""
        f = self.files
        if not f.recovery_path.exists():
            rc, ack = _q(str(f.rc_path)), _q(str(f.ack_path))
            make_file(f.recovery_path,
                      f"\\eval \"\\echo \\$? >{rc}; trap - EXIT; \\read -r _ <{ack}; \\return $?\"\n".encode())
        return f" \\. {_q(str(f.recovery_path))}\r".encode()

    # --- reading -----------------------------------------------------------------------------------
    def _read(self, name: str) -> int:
        """Take what the pipe holds: bytes read, 0 when it is empty, -1 at EOF (every writer closed)."""
        fd = self._fds.get(name)
        if fd is None or name in self._eof:
            return 0
        got = 0
        for _ in range(READS_PER_WAKEUP):
            try:
                data = os.read(fd, PIPE_SIZE)
            except BlockingIOError:
                break
            if not data:
                self._eof.add(name)
                asyncio.get_running_loop().remove_reader(fd)  # the hang-up would fire on every loop pass
                return got or -1
            got += len(data)
            (self.stdout if name == "o" else self.stderr).feed(data)
            if self.echo is not None:
                self.echo.write(data.replace(b"\n", b"\r\n") if b"\n" in data else data)
            elif self._line is None and len(self._unshown) < DISPLAY_MAX:
                self._unshown += data
        return got

    def show(self, echo: TerminalEcho, line: bytes) -> None:
        """Show the command (``line``) on the terminal in place of the typed line -- once the shell has begun it,
        which may be before or after this is called -- and from then on its output as it comes."""
        self._line = line
        self._echo_to = echo
        if self.started:
            self._show()

    def _show(self) -> None:
        echo, line = self._echo_to, self._line
        if echo is None or line is None or self.echo is not None:
            return
        echo.write(line)
        if not self.background:
            if self._unshown:
                echo.write(bytes(self._unshown).replace(b"\n", b"\r\n"))
            self.echo = echo
        self._unshown.clear()

    def _on_out(self, name: str) -> None:
        if not self.started:
            self._on_rc()  # the start first: the command's line is shown before its output
        if self._read(name):
            self.changed.set()

    def _on_rc(self) -> None:
        fd = self._fds.get("rc")
        if fd is None:
            return
        try:
            data = os.read(fd, RC_MAX)
        except BlockingIOError:
            return
        self._rc += data
        while b"\n" in self._rc:
            line, _, rest = bytes(self._rc).partition(b"\n")
            self._rc[:] = rest
            line = line.strip()
            status, _, tail = line.partition(b" ")
            if status == b"p" and tail.isdigit() and self.pgid is None:
                self.pgid = int(tail)
                self.ack()  # the job runs: let the shell go back to its prompt
            elif not status.isdigit() or tail not in (b"", b"exit"):
                # "s", or the start marker taken as more words of a line the user left continued (a trailing
                # backslash): the wrapper has begun either way
                if not self.started:
                    self.started = True
                    self._show()
            elif not self.rc.done():
                self.rc.set_result((int(status), tail == b"exit"))
            self.changed.set()
        if len(self._rc) > RC_MAX:  # no newline in sight: not the shell's
            self._rc.clear()

    async def drain(self, within_s: float) -> None:
        """After the status: what is still in the pipes, up to EOF -- waiting at most ``within_s`` for a writer
        that keeps one open (a background job the command left)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        for name in ("o", "e"):
            while name in self._fds and name not in self._eof:
                if self._read(name) == 0:
                    if loop.time() >= deadline:
                        break
                    await asyncio.sleep(0.002)
        if self.echo is not None:
            await self.echo.drained(0.5)

    # --- the wrapper's waits -------------------------------------------------------------------------
    def ack(self) -> None:
        """Let the wrapper's ``read`` return (its output is on the terminal)."""
        fd = self._fds.get("a")
        if fd is not None:
            with contextlib.suppress(OSError):
                os.write(fd, b"\n")

    def write_stdin(self, data: bytes) -> int:
        fd = self._fds.get("i")
        if fd is None:
            return -1
        try:
            return os.write(fd, data)
        except BlockingIOError:
            return 0

    def close_stdin(self) -> None:
        fd = self._fds.pop("i", None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Stop reading, and have the files removed in a thread (``ChannelFiles.remove``)."""
        loop = asyncio.get_running_loop()
        for name, fd in self._fds.items():
            if name in ("o", "e", "rc") and name not in self._eof:
                loop.remove_reader(fd)
        fds = dict(self._fds)
        self._fds.clear()
        in_files_thread(self.files.remove, fds)


def read_private_file(path: Path, cap: int) -> bytes:
    """Read a file the host made in an exchange directory and the account's tmux wrote: never through a link,
    never blocking on a FIFO or device, at most ``cap`` bytes. (Run off the event loop.)"""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RuntimeError(f"{path} is not a regular file")
        chunks = []
        left = cap
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def make_file(path: Path, data: bytes = b"", mode: int = 0o644) -> None:
    """A new file of the host's in an exchange directory (never an existing one, never through a link)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


class ExecJob:
    """One exec: running in the session's shell (foreground or background), then finished and kept a while for its
    final poll."""

    def __init__(self, xid: str, command: str, background: bool, channel: ExecChannel, encoding: str) -> None:
        self.id = xid
        self.command = command
        self.background = background
        self.channel = channel
        self.encoding = encoding
        self.started_at = datetime.now(UTC)
        self.started = time.monotonic()
        self.ended: float | None = None
        self.exit_code: int | None = None
        self.session_ended = False
        self.killed = False  # stopped because its wait timed out (on_timeout=kill)
        self.prompts = 0  # prompt marks its session had shown when it was typed
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def running(self) -> bool:
        return not self.done.done()

    def finish(self, exit_code: int | None, session_ended: bool) -> None:
        if self.done.done():
            return
        self.exit_code, self.session_ended, self.ended = exit_code, session_ended, time.monotonic()
        self.done.set_result(None)
        self.channel.changed.set()

    def info(self) -> dict[str, Any]:
        return {"exec_id": self.id, "command": self.command[:200], "background": self.background,
                "running": self.running, "exit_code": self.exit_code, "started_at": self.started_at.isoformat()}

    def result(self, out_at: int, err_at: int) -> ExecResult:
        ch, final = self.channel, not self.running
        out = render(ch.stdout, out_at, encoding=self.encoding, final=final)
        err = render(ch.stderr, err_at, encoding=self.encoding, final=final) if not ch.merged else None
        return ExecResult(
            exec_id=self.id, running=not final, exit_code=self.exit_code, timed_out=not final or self.killed,
            stdout="" if ch.merged else out.text, stderr=err.text if err is not None else "",
            output=out.text if ch.merged else None, encoding=self.encoding,
            lossy=out.lossy or (err is not None and err.lossy),
            stdout_bytes=ch.stdout.total, stderr_bytes=ch.stderr.total,
            truncated=bool(out.omitted or (err is not None and err.omitted)),
            cursor=f"{out.cursor}.{err.cursor if err is not None else 0}",
            duration_ms=round(((self.ended or time.monotonic()) - self.started) * 1000, 3),
            session_ended=self.session_ended,
        )


def parse_cursor(cursor: str) -> tuple[int, int]:
    """``"<stdout offset>.<stderr offset>"`` as an exec answer gives it; empty: from the start."""
    if not cursor:
        return 0, 0
    out, sep, err = cursor.partition(".")
    if not sep or not out.isdigit() or not err.isdigit() or len(cursor) > 40:
        raise errors.InvalidField("query.cursor", "not a cursor from an exec answer (two offsets: '123.45')")
    return int(out), int(err)


def _rows(col: int, width: int, typed: int) -> int:
    """Terminal rows a line of ``typed`` columns took from column ``col``."""
    return (col + typed - 1) // width + 1 if width > 0 else 1


def erase_line(col: int, width: int, typed: int) -> bytes:
    """Back to the start of the row a typed line began on, and clear to the end of the screen (the shell draws its
    next prompt there)."""
    return f"\x1b[{_rows(col, width, typed)}A\r\x1b[J".encode()


def command_line(command: str, background: bool, col: int, width: int, typed: int) -> bytes:
    """What replaces the typed line on the terminal: back to where it began (it took ``typed`` columns from ``col``),
    clear to the end of the screen, and the command as a user would have typed it (continuation lines after
    ``> ``, control characters made visible)."""
    rows = _rows(col, width, typed)
    shown = command if len(command) <= 4000 else command[:4000] + " …"
    shown = _CONTROLS.sub(lambda m: "^" + chr(ord(m.group()) ^ 0x40), shown.rstrip("\n"))
    text = shown.replace("\n", "\r\n> ") + (" &" if background else "")
    return (f"\x1b[{rows}A\r" + (f"\x1b[{col}C" if col else "") + "\x1b[J" + text + "\r\n").encode("utf-8", "replace")


_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
