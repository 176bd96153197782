"""Files in a session's home: write one, read one, list a directory.

Every operation is done by a short-lived process of the session's OS account (``accounts.Account``), never by the
host: the host keeps ``dac_read_search`` (it reads any file on the machine), the account reads what the OS lets it.
So a link the user planted in their home (``ln -s /etc/shadow x``, ``ln -s <another account's home> y``) is followed
with the account's rights and fails like a ``cat`` in their shell would; a file written is the account's, in owner
and group, by construction. Without isolation (development: ``Isolation.accounts`` false) the process runs as the
host's own user, like the shells do.

The process is ``/bin/sh -c <fixed script> sh <arguments>``: the path and the mode are arguments, never script text,
and every path is absolute (a path never starts with ``-``). It runs coreutils only (stat, head, cat, chmod, mv,
find, realpath, mkdir); the host feeds its stdin, reads at most a bounded amount of its stdout and stderr, and kills
its process group when it runs past its deadline (a FIFO swapped in between the check and the read, a hung disk).
Everything the host learns from it is the account's to forge, and only ever tells that same user about their own
files.

Paths are relative to the home, or absolute inside it. They are normalised lexically (``a/../b`` is ``b``) and one
that leaves the home that way is refused (400); links are the OS's to judge (above). A write goes to a temporary
file in the target's directory (made with the final mode, or 0600 until chmod: never more open than the file will
be) that is then renamed over the target: a reader sees the old file or the new one, never half of one. A write
through a link writes the link's target (as ``cat > link`` would), not the link.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import os
import posixpath
import signal
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

from tmux_host.accounts import Account, Isolation
from tmuxi import errors
from tmuxi.host_client import (
    FileBadPath,
    FileDenied,
    FileMissing,
    FileNoSpace,
    FileTooLarge,
    check_path,
)
from tmuxi.observability import logger

if TYPE_CHECKING:
    from tmux_host.engine import Engine

MAX_NAME_BYTES = 255  # NAME_MAX
MAX_ENTRIES = 10_000  # a listing stops there (``truncated``)
MAX_ENTRY_BYTES = 320  # type, size, mode, mtime and a name of at most NAME_MAX bytes
STDERR_CAP = 4096
NEW_FILE_MODE = 0o644  # a new file without a mode: what `cat > f` makes under the usual umask 022
SHELL = "/bin/sh"

# $1 target, $2 the temporary file's suffix, $3 mode ("": the existing file's, else NEW_FILE_MODE). The temporary
# file is made with the final mode through the umask (never more open than the file will be), or 077 and chmod'ed
# when the mode has an execute or special bit (which a umask cannot give). Exit 3: the target is a directory; any
# other failure: the failing tool's message on stderr.
_WRITE = f"""
f=$1
if [ -L "$f" ]; then f=$(realpath -- "$f") || exit 1; fi
[ -d "$f" ] && exit 3
d=${{f%/*}}; d=${{d:-/}}
[ -d "$d" ] || (umask 022 && mkdir -p -- "$d") || exit 1
m=$3
if [ -z "$m" ]; then
  if [ -e "$f" ]; then m=$(stat -L -c %a -- "$f") || exit 1; else m={NEW_FILE_MODE:o}; fi
fi
case $m in
  ????|*[1357]*) c=1; umask 077;;
  *) c=; umask "$(printf %o $((0777 & ~0$m)))";;
esac
t=$d/.tmuxi-$2.tmp
set -C
cat > "$t" || {{ rm -f -- "$t"; exit 1; }}
if [ -n "$c" ]; then chmod -- "$m" "$t" || {{ rm -f -- "$t"; exit 1; }}; fi
mv -fT -- "$t" "$f" || {{ rm -f -- "$t"; exit 1; }}
printf %s "$m"
"""
# $1 file, $2 cap. Prints "<type>:<size>:<mode>\\n" then at most cap + 1 bytes of the file. Exit 3: a directory;
# 4: not a regular file; 5: larger than the cap (the line printed alone); 6: the account may not read it.
_READ = """
s=$(stat -L -c '%F:%s:%a' -- "$1") || exit 1
case $s in
  'regular file:'*|'regular empty file:'*) ;;
  directory:*) exit 3;;
  *) exit 4;;
esac
n=${s#*:}; n=${n%:*}
[ "$n" -le "$2" ] || { printf '%s\\n' "$s"; exit 5; }
[ -r "$1" ] || exit 6
printf '%s\\n' "$s"
exec head -c "$(($2 + 1))" -- "$1"
"""
# $1 directory. One NUL-terminated record per entry: type/size/mode/mtime/name. Exit 3: not a directory.
_LIST = """
[ -d "$1" ] || { [ -e "$1" ] && exit 3; stat -L -- "$1" >/dev/null; exit 1; }
exec find -H "$1" -mindepth 1 -maxdepth 1 -printf '%y/%s/%m/%T@/%f\\0'
"""
_TYPES = {"f": "file", "d": "dir", "l": "link"}


@dataclass(frozen=True)
class Target:
    """A path the request gave, inside the account's home: ``absolute`` for the process, ``shown`` (relative to
    the home, ``.`` for the home itself) for answers and messages."""

    absolute: str
    shown: str


def target(home: str, path: str) -> Target:
    """Normalise ``path`` (relative to ``home``, or absolute inside it); 400 for one that leaves the home, is
    empty, holds a NUL, or is longer than the OS takes."""
    check_path(path)
    absolute = posixpath.normpath(posixpath.join(home, path))
    if absolute != home and not absolute.startswith(home.rstrip("/") + "/"):
        raise FileBadPath(f"path {path!r} is outside the home directory")
    shown = posixpath.relpath(absolute, home)
    long = next((p for p in shown.split("/") if len(p.encode()) > MAX_NAME_BYTES), None)
    if long is not None:
        raise FileBadPath(f"a name in the path is {len(long.encode())} bytes; the longest is {MAX_NAME_BYTES}")
    return Target(absolute, shown)


def octal(mode: int) -> str:
    return f"{mode:04o}"


def _finite(x: float) -> float:
    if not math.isfinite(x):
        raise ValueError("not a time")
    return x


# --- the account's process ---------------------------------------------------------------------------------
@dataclass
class Outcome:
    code: int  # exit status; negative: the signal that ended it
    out: bytes
    err: bytes
    over: bool  # it wrote more than the cap to stdout (and was ended)


class _Child:
    """A process's pipes and exit, driven by the event loop: stdin fed, stdout kept up to a cap, stderr up to
    STDERR_CAP (the rest drained), the exit seen through a pidfd. ``done`` resolves when all three are over."""

    def __init__(self, proc: subprocess.Popen[bytes], stdin: list[bytes], out_cap: int) -> None:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        self.loop = asyncio.get_running_loop()
        self.proc = proc
        self.out_cap = out_cap
        self.out = bytearray()
        self.err = bytearray()
        self.over = False
        self.done: asyncio.Future[None] = self.loop.create_future()
        self._todo = [memoryview(b) for b in stdin if b]
        self._in, self._out, self._err = proc.stdin.fileno(), proc.stdout.fileno(), proc.stderr.fileno()
        self._pidfd = os.pidfd_open(proc.pid)
        self._open = {self._out, self._err, self._pidfd}
        self._closed = False
        for fd in (self._in, self._out, self._err):
            os.set_blocking(fd, False)
        self.loop.add_writer(self._in, self._feed)
        self.loop.add_reader(self._out, self._read, self._out)
        self.loop.add_reader(self._err, self._read, self._err)
        self.loop.add_reader(self._pidfd, self._exited)

    def _feed(self) -> None:
        try:
            while self._todo:
                n = os.write(self._in, self._todo[0][:1 << 16])
                self._todo[0] = self._todo[0][n:]
                if not self._todo[0]:
                    self._todo.pop(0)
        except BlockingIOError:
            return
        except OSError:  # it stopped reading (EPIPE): its status says why
            self._todo.clear()
        self.loop.remove_writer(self._in)
        self.proc.stdin.close()  # type: ignore[union-attr]

    def _read(self, fd: int) -> None:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        if not data:
            self._finish(fd)
        elif fd == self._err:
            self.err += data[:max(0, STDERR_CAP - len(self.err))]
        else:
            self.out += data
            if len(self.out) > self.out_cap:  # more than anything we take: end it
                del self.out[self.out_cap:]
                self.over = True
                _kill(self.proc)
                self._finish(fd)

    def _exited(self) -> None:
        self.proc.wait()  # it has exited: reaped at once
        self._finish(self._pidfd)
        if self._closed:  # killed and given up on: it was only left to reap
            os.close(self._pidfd)

    def _finish(self, fd: int) -> None:
        self.loop.remove_reader(fd)
        self._open.discard(fd)
        if not self._open and not self.done.done():
            self.done.set_result(None)

    def close(self) -> None:
        """Stop watching its pipes and close our ends. A process still there (killed, not yet gone: SIGKILL takes
        a moment) stays watched through its pidfd, and is reaped when it goes: nobody waits for it."""
        if self._closed:
            return
        self._closed = True
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.loop.remove_writer(self._in)
        for fd in (self._out, self._err):
            self.loop.remove_reader(fd)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        if self.proc.returncode is not None:
            self.loop.remove_reader(self._pidfd)
            os.close(self._pidfd)


async def run(isolation: Isolation, account: Account, script: str, args: list[str], *, stdin: bytes = b"",
              out_cap: int, timeout_s: float) -> Outcome:
    """Run ``script`` as ``account``, the way its tmux server is started (``Isolation.argv``: its cgroups, its
    limits, setpriv to its uid and gid with no other group and no new privileges; in its home, its environment, a
    session of its own), feeding ``stdin``, keeping at most ``out_cap`` bytes of stdout; ended (its whole process
    group) after ``timeout_s``.

    Started with ``subprocess.Popen`` (vfork and exec: a fraction of a millisecond of the event loop) rather than
    the loop's own subprocess support: uvloop forks the whole host for it, ~10 ms with an 80 MB host."""
    argv = isolation.argv(account, [SHELL, "-c", script, "sh", *args])
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,  # noqa: S603
                            env=isolation.env(account, SHELL), **isolation.spawn_kwargs(account))
    child: _Child | None = None
    try:
        isolation.confine(account, proc.pid)  # its limits, before the line that lets it go (Isolation.argv)
        child = _Child(proc, [b"\n", stdin], out_cap)
        async with asyncio.timeout(timeout_s):
            await child.done
    except TimeoutError:
        _kill(proc)
        raise errors.HostUnavailable(f"a file operation as {account.name} did not finish in {timeout_s:g} s") from None
    except BaseException:  # cancelled (the client went away), or it could not be confined: leave nothing running
        _kill(proc)
        raise
    finally:
        if child is not None:
            child.close()
        else:
            for f in (proc.stdin, proc.stdout, proc.stderr):
                if f is not None:
                    f.close()
    assert proc.returncode is not None  # done: it has exited and been reaped
    return Outcome(proc.returncode, bytes(child.out), bytes(child.err), child.over)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.returncode is None:  # not reaped yet: the pid (and its group) is still this process's
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


# What a tool's message ends with (LANG=C.UTF-8: strerror's English) -> the error to answer with
_REASONS: list[tuple[str, type[errors.AppError], str]] = [
    ("No such file or directory", FileMissing, "no such file or directory"),
    ("Permission denied", FileDenied, "permission denied"),
    ("Operation not permitted", FileDenied, "operation not permitted"),
    ("Read-only file system", FileDenied, "the file system is read-only"),
    ("Not a directory", FileBadPath, "a component of the path is not a directory"),
    ("Is a directory", FileBadPath, "is a directory"),
    ("Too many levels of symbolic links", FileBadPath, "too many levels of symbolic links"),
    ("File name too long", FileBadPath, "file name too long"),
    ("No space left on device", FileNoSpace, "no space left on the device"),
    ("Disk quota exceeded", FileNoSpace, "disk quota exceeded"),
]


def failure(outcome: Outcome, t: Target, doing: str) -> errors.AppError:
    """The error for a failed tool: by the reason its message ends with; anything else is ours (500, logged)."""
    lines = outcome.err.decode("utf-8", "replace").strip().splitlines()
    last = lines[-1] if lines else ""
    for text, cls, said in _REASONS:
        if last.endswith(text):
            return cls(f"cannot {doing} {t.shown!r}: {said}")
    logger.warning("file operation failed", extra={"doing": doing, "status": outcome.code, "error": last[-300:]})
    return errors.AppError(f"could not {doing} {t.shown}: status {outcome.code}: {last[-300:]}")


# --- operations --------------------------------------------------------------------------------------------
def _account(engine: Engine, session_id: UUID) -> tuple[Isolation, Account]:
    rec = engine._get(session_id)  # unknown or ended session: 404 / 410
    iso = engine._iso()
    return iso, iso.account(rec.account)


def _deadline(engine: Engine) -> float:
    """Within the API's wait on the host (host_timeout_s), so the host answers before the API gives up."""
    return max(1.0, float(engine.settings.host_timeout_s) - 1.0)


async def write(engine: Engine, session_id: UUID, path: str, data: bytes, mode: int | None) -> dict[str, Any]:
    cap = engine.settings.max_file_bytes
    if len(data) > cap:
        raise errors.PayloadTooLarge(f"the file is {len(data)} bytes; the limit is {cap}")
    iso, account = _account(engine, session_id)
    t = target(str(account.home), path)
    if t.shown == ".":
        raise FileBadPath("path is the home directory, not a file")
    outcome = await run(iso, account, _WRITE, [t.absolute, os.urandom(8).hex(), "" if mode is None else f"{mode:03o}"],
                        stdin=data, out_cap=16, timeout_s=_deadline(engine))
    if outcome.code == 3:
        raise FileBadPath(f"{t.shown!r} is a directory")
    if outcome.code != 0:
        raise failure(outcome, t, "write")
    written = outcome.out.decode("ascii", "replace")
    return {"path": t.shown, "size": len(data),
            "mode": octal(int(written, 8)) if written.isdigit() else written}


async def read(engine: Engine, session_id: UUID, path: str) -> tuple[bytes, dict[str, Any]]:
    """The file's bytes and ``{"path", "mode"}``; 413 for one over ``max_file_bytes`` (naming both sizes)."""
    cap = engine.settings.max_file_bytes
    iso, account = _account(engine, session_id)
    t = target(str(account.home), path)
    outcome = await run(iso, account, _READ, [t.absolute, str(cap)], out_cap=cap + 64, timeout_s=_deadline(engine))
    head, _, data = outcome.out.partition(b"\n")
    size, _, mode = head.decode("utf-8", "replace").partition(":")[2].partition(":")
    if outcome.code == 3:
        raise FileBadPath(f"{t.shown!r} is a directory; list it with files/list")
    if outcome.code == 4:
        raise FileBadPath(f"{t.shown!r} is not a regular file")
    if outcome.code == 5:
        raise FileTooLarge(f"{t.shown!r} is {size} bytes; the limit is {cap}")
    if outcome.code == 6:
        raise FileDenied(f"cannot read {t.shown!r}: permission denied")
    if outcome.code != 0:
        raise failure(outcome, t, "read")
    if len(data) > cap:  # it grew between the look and the read
        raise FileTooLarge(f"{t.shown!r} is over {cap} bytes; the limit is {cap}")
    return data, {"path": t.shown, "mode": octal(int(mode, 8)) if mode.isdigit() else mode}


async def listing(engine: Engine, session_id: UUID, path: str) -> dict[str, Any]:
    """``{"path", "entries": [{name, type, size, mode, mtime}], "truncated"}``, by name; at most MAX_ENTRIES."""
    iso, account = _account(engine, session_id)
    t = target(str(account.home), path)
    outcome = await run(iso, account, _LIST, [t.absolute], out_cap=MAX_ENTRIES * MAX_ENTRY_BYTES,
                        timeout_s=_deadline(engine))
    if outcome.code == 3:
        raise FileBadPath(f"{t.shown!r} is not a directory")
    if outcome.code != 0 and not outcome.over:
        raise failure(outcome, t, "list")
    records = outcome.out.split(b"\0")
    records.pop()  # after the last NUL: nothing, or a record cut at the cap
    entries: list[dict[str, Any]] = []
    for rec in records[:MAX_ENTRIES]:
        fields = rec.split(b"/", 4)
        if len(fields) != 5:
            continue
        kind, size, mode, mtime, name = fields
        try:  # find's own format, unless the account forged it: then it only misleads itself
            entries.append({"name": name.decode("utf-8", "replace"), "type": _TYPES.get(kind.decode(), "other"),
                            "size": int(size), "mode": octal(int(mode, 8)), "mtime": _finite(float(mtime))})
        except ValueError:
            continue
    entries.sort(key=lambda e: e["name"])
    return {"path": t.shown, "entries": entries, "truncated": outcome.over or len(records) > MAX_ENTRIES}
