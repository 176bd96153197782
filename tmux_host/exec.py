"""Exec: run a command in a session's own shell and return its output and exit status.

The host writes the command to a file the user's shell sources, and types one fixed wrapper line:

    \\echo s >'<x>.rc'; trap '\\echo "$? exit" >'<x>.rc'' EXIT; { \\. '<x>.sh'; } </dev/null >'<x>.out' 2>&1;
    \\echo $? >'<x>.rc'; trap - EXIT

The first line the shell writes says it has started on the line (``s``).
The EXIT trap, set for the exec only, tells a command that ends the shell (``exit 3``, a failure under ``set -e``)
apart, with its status. A command killed by a signal (Ctrl-C) makes the interactive shell abandon the rest of the
line: the engine then asks for ``$?`` itself (``recovery``).

``<x>.out`` and ``<x>.rc`` are FIFOs the host made in the account's exchange directory (which the account cannot
list or write: nothing there can be swapped for a link or a FIFO of the user's) and reads without blocking, in the
event loop, as the bytes come. So the output never touches the disk, the host keeps at most ``cap`` bytes of it
(the rest is spliced to /dev/null so the command still runs to its end), and once the exec is over the read ends
are closed: a background job still writing gets SIGPIPE, and cannot fill a disk or the host's memory.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import stat
from pathlib import Path

PIPE_SIZE = 1 << 20  # fewer wake-ups for a command that writes fast
RC_MAX = 64
_DEVNULL: int | None = None


def _devnull() -> int:
    global _DEVNULL
    if _DEVNULL is None:
        _DEVNULL = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    return _DEVNULL


def open_fifo(path: Path) -> int:
    """Make a FIFO the account can write (through its 0710 exchange directory only) and open its read end
    without blocking."""
    os.mkfifo(path, 0o600)
    os.chmod(path, 0o622)  # noqa: S103 - reachable through the account's 0710 directory only; not the umask's
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.close(fd)
        raise RuntimeError(f"{path} is not the FIFO the host made")
    return fd


class ExecChannel:
    """The output and exit-status FIFOs of one exec."""

    def __init__(self, directory: Path, xid: str, cap: int) -> None:
        self.script = directory / f"{xid}.sh"
        self.out_path = directory / f"{xid}.out"
        self.rc_path = directory / f"{xid}.rc"
        self.cap = cap
        self.output = bytearray()
        self.truncated = False
        self._rc = bytearray()
        self.started = False  # the shell has read the wrapper line and begun it
        self._out_fd: int | None = None
        self._rc_fd: int | None = None
        self._rc_wfd: int | None = None  # ours: the shell opens and closes the rc FIFO twice, never an EOF between
        # (exit status, the shell is exiting): "3" after the command, "3 exit" from the EXIT trap
        self.rc: asyncio.Future[tuple[int, bool]] = asyncio.get_running_loop().create_future()

    def open(self, command: bytes) -> None:
        make_file(self.script, command + b"\n")
        loop = asyncio.get_running_loop()
        self._out_fd = open_fifo(self.out_path)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._out_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self._rc_fd = open_fifo(self.rc_path)
        self._rc_wfd = os.open(self.rc_path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        loop.add_reader(self._out_fd, self._on_out)
        loop.add_reader(self._rc_fd, self._on_rc)

    def wrapper(self) -> bytes:
        # Leading space keeps it out of history (HISTCONTROL=ignorespace); `\.`/`\echo` dodge aliases.
        return (f" \\echo s >'{self.rc_path}'; trap '\\echo \"$? exit\" >'\"'{self.rc_path}'\" EXIT; "
                f"{{ \\. '{self.script}'; }} </dev/null >'{self.out_path}' 2>&1; "
                f"\\echo $? >'{self.rc_path}'; trap - EXIT\n").encode()

    def recovery(self) -> bytes:
        """For a shell back at its prompt without having written the status (a signal ended the command and
        the shell dropped the rest of the line): the status it keeps in ``$?``, and the trap cleared."""
        return f" \\echo $? >'{self.rc_path}'; trap - EXIT\n".encode()

    def _read_out(self) -> int:
        """Take what the pipe holds: the number of bytes, 0 when it is empty, -1 at EOF (every writer closed)."""
        fd = self._out_fd
        if fd is None:
            return 0
        try:
            if len(self.output) > self.cap:  # over the cap: keep the command running, drop the bytes
                self.truncated = True
                n = os.splice(fd, _devnull(), PIPE_SIZE)
            else:
                data = os.read(fd, PIPE_SIZE)
                self.output += data
                n = len(data)
        except BlockingIOError:
            return 0
        return n if n else -1

    def _on_out(self) -> None:
        if self._read_out() < 0 and self._out_fd is not None:
            # EOF: stop watching (the hang-up would fire on every loop pass). More can only come from a writer
            # that opens it again: read in collect(), or refused once it is closed.
            asyncio.get_running_loop().remove_reader(self._out_fd)

    def _on_rc(self) -> None:
        fd = self._rc_fd
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
            if not status.isdigit() or tail not in (b"", b"exit"):
                # "s", or the start marker taken as more words of a line the user left continued (a trailing
                # backslash): the wrapper has begun either way
                self.started = True
            elif not self.rc.done():
                self.rc.set_result((int(status), tail == b"exit"))
        if len(self._rc) > RC_MAX:  # no newline in sight: not the shell's
            self._rc.clear()

    def collect(self) -> tuple[str, bool]:
        """The output so far (what the command wrote before its exit status), decoded, and whether it was cut."""
        for _ in range(64):  # what is still in the pipe; bounded, a background job may keep writing
            if self._read_out() <= 0:
                break
        truncated = self.truncated or len(self.output) > self.cap
        return bytes(self.output[: self.cap]).decode("utf-8", errors="replace"), truncated

    def close(self) -> None:
        """Unlink first (a late redirection then fails instead of waiting for a reader), then close the read
        ends (a writer still running gets SIGPIPE)."""
        for p in (self.script, self.out_path, self.rc_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        loop = asyncio.get_running_loop()
        for fd in (self._out_fd, self._rc_fd):
            if fd is not None:
                loop.remove_reader(fd)
                os.close(fd)
        if self._rc_wfd is not None:
            os.close(self._rc_wfd)
        self._out_fd = self._rc_fd = self._rc_wfd = None


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

