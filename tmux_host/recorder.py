"""Recordings: every session's output as asciicast v2, spooled on the host's disk, uploaded when it ends.

One recording per session per host run. The host calls, for each session it streams::

    start(session_id, cols, rows)     # it begins streaming the session (again: only a resize if the size changed)
    output(session_id, data)          # every chunk of the pane's raw output (the hot path: cheap, never raises)
    resize(session_id, cols, rows)
    finish(session_id) -> key | None  # the session ended: close, upload (blocking: asyncio.to_thread)

and, for the host as a whole::

    flush()           # every heartbeat: what was recorded reaches the spool file, so a crash loses little
    retry_uploads()   # every heartbeat: finished recordings whose upload failed (blocking)
    finish_all()      # host stop (blocking)
    recover()         # host start: a previous run's recordings, over since that run is, are uploaded (blocking)

The file, as ``asciinema cat`` / ``asciinema play`` read it: a header line ``{"version": 2, "width", "height",
"timestamp", "env": {"TERM", "SHELL"}}``, then one line per event: ``[seconds since start, "o", text]`` for output
and ``[t, "r", "COLSxROWS"]`` for a resize. The text comes through an incremental UTF-8 decoder per session
(errors="replace"): a character split across chunks arrives whole, an invalid byte becomes U+FFFD.

Past ``max_bytes`` a recording stops growing: it ends with a visible notice (an "o" event; ``asciinema cat`` 2.4
prints only "o" events, so a "m" marker would say nothing) and later output is dropped. The file never exceeds
``max_bytes``.

Spool, ``spool_dir`` (0700, the host's own: users never reach it): ``live/`` holds the recordings being written,
``done/`` the finished ones until their upload succeeds. A file is named ``<session_id>@<name>``, which gives
its storage key ``recordings/<session_id>/<name>``, name = ``<host_id>-<start, UTC %Y%m%dT%H%M%S%fZ>.cast``.

Failures never reach the host's output path: an I/O error (disk full) ends that recording, logged once (what
was written up to the last whole event is still uploaded); a failed upload leaves the file in ``done/`` for
``retry_uploads`` (one warning when uploads start failing, one line when they work again).

Threads: ``output``, ``start``, ``resize`` and ``flush`` run on the event loop; ``finish``, ``finish_all``,
``retry_uploads`` and ``recover`` in worker threads. A lock per recording orders its writes against its close.
"""
from __future__ import annotations

import codecs
import contextlib
import enum
import os
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO
from uuid import UUID

import orjson

from tmux_host.accounts import ensure_dir
from tmux_host.server import default_terminal
from tmuxi.errors import AppError
from tmuxi.observability import ERRORS, logger
from tmuxi.storage import RECORDING_NAME, Store, recording_key

SessionId = UUID | str

_SESSION_PATTERN = re.compile(r"\A[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}\Z")
_HOST_PATTERN = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
# Large enough that a flood of output reaches the disk in big writes; small enough for hundreds of sessions
# (a host's capacity is 500: 16 MiB of buffers in all).
WRITE_BUFFER = 32 * 1024
# CAN ends an escape sequence the cut may have left open, SGR 0 resets colours: the notice shows plainly.
TRUNCATED_NOTICE = "\x18\x1b[0m\r\n[tmuxi: recording truncated: it reached its size limit; later output is not " \
                   "recorded]\r\n"
# room kept for the notice's event line (about 130 bytes, with a time of up to 10^12 s)
_NOTICE_ROOM = 256
_MIN_MAX_BYTES = 1024


class _Upload(enum.Enum):
    SKIPPED = "skipped"  # not ours to upload now: no key in its name, or another thread has it
    FAILED = "failed"


class _Recording:
    __slots__ = ("sid", "key", "path", "file", "decode", "lock", "t0", "last", "size", "limit", "cols", "rows",
                 "accepting", "open", "truncated", "failed")

    def __init__(self, sid: str, key: str, path: Path, file: BinaryIO, t0: float, limit: int, cols: int,
                 rows: int) -> None:
        self.sid = sid
        self.key = key
        self.path = path
        self.file = file
        self.decode = codecs.getincrementaldecoder("utf-8")("replace").decode
        self.lock = threading.Lock()
        self.t0 = t0
        self.last = 0.0  # the latest event's time: a wall clock stepped back never makes time run backwards
        self.size = 0
        self.limit = limit
        self.cols = cols
        self.rows = rows
        self.accepting = True  # False once truncated, failed or finished: output is dropped
        self.open = True  # the file is open
        self.truncated = False
        self.failed = False


class Recorder:
    def __init__(self, spool_dir: Path, store: Store, host_id: str, max_bytes: int,
                 clock: Callable[[], float] = time.time, *, term: str | None = None,
                 user_shell: str = "/bin/bash") -> None:
        """``term``: the TERM of the panes, what their programs write for (default: the tmux servers'
        default-terminal); ``user_shell``: the sessions' shell. Both only go into each recording's header."""
        if not _HOST_PATTERN.match(host_id):
            raise ValueError(f"host id {host_id!r} cannot name a recording")
        if max_bytes < _MIN_MAX_BYTES:
            raise ValueError(f"max_bytes must be at least {_MIN_MAX_BYTES}")
        self.spool_dir = Path(spool_dir).absolute()
        self.store = store
        self.host_id = host_id
        self.max_bytes = max_bytes
        self._clock = clock
        self._env = {"TERM": term or default_terminal(), "SHELL": user_shell}
        self.live_dir = self.spool_dir / "live"
        self.done_dir = self.spool_dir / "done"
        self.spool_dir.parent.mkdir(parents=True, exist_ok=True)
        for d in (self.spool_dir, self.live_dir, self.done_dir):
            ensure_dir(d, 0o700)
        self._recs: dict[SessionId, _Recording] = {}
        self._upload_lock = threading.Lock()
        self._uploading: set[Path] = set()
        self._uploads_failing = False
        self._skipped: set[str] = set()  # spool files with names that give no key: warned about once

    # --- the host's output path ------------------------------------------------------------------------------
    def start(self, session_id: SessionId, cols: int, rows: int) -> None:
        """Begin recording ``session_id`` (pass the same value, UUID or str, to every call for it)."""
        try:
            rec = self._recs.get(session_id)
            if rec is not None:
                self.resize(session_id, cols, rows)
                return
            sid = str(session_id)
            if not _SESSION_PATTERN.match(sid):
                raise ValueError(f"session id {sid!r} cannot name a recording")
            t0 = self._clock()
            name = f"{self.host_id}-{datetime.fromtimestamp(t0, UTC).strftime('%Y%m%dT%H%M%S%fZ')}.cast"
            key = recording_key(sid, name)
            path = self.live_dir / f"{sid}@{name}"
            header = orjson.dumps({"version": 2, "width": cols, "height": rows, "timestamp": int(t0),
                                   "env": self._env}) + b"\n"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            file = open(fd, "wb", buffering=WRITE_BUFFER)  # noqa: SIM115 - closed by finish()
            try:
                file.write(header)
            except BaseException:
                file.close()
                path.unlink(missing_ok=True)
                raise
            rec = _Recording(sid, key, path, file, t0, self.max_bytes - _NOTICE_ROOM, cols, rows)
            rec.size = len(header)
        except Exception as exc:  # a recording that cannot start must not stop the session
            ERRORS.labels(component="recorder", kind="start").inc()
            logger.error("recording not started", extra={"session_id": str(session_id), "error": repr(exc)})
            return
        self._recs[session_id] = rec

    def output(self, session_id: SessionId, data: bytes) -> None:
        """Record one chunk of the pane's output. Measured on one core of a shared 2-core VM: 1.4-2.3 us a call
        for 64-byte chunks, 0.6-1.0 GB/s of 4 KiB ASCII chunks, 240-320 MB/s of 4 KiB full of escapes and
        multi-byte characters (decoding, and JSON's six-byte escape of each ESC, cost most); 0.1 us for a
        session not being recorded."""
        rec = self._recs.get(session_id)
        if rec is None or not rec.accepting:
            return
        with rec.lock:
            if not rec.accepting:
                return
            try:
                text = rec.decode(data)
                if not text:
                    return  # only the start of a character: it comes out with the next chunk
                t = self._clock() - rec.t0
                if t < rec.last:
                    t = rec.last
                rec.last = t
                self._write(rec, t, b'[%.6f, "o", %b]\n' % (t, orjson.dumps(text)))
            except Exception as exc:  # never into the host's output path
                self._failed(rec, exc)

    def resize(self, session_id: SessionId, cols: int, rows: int) -> None:
        rec = self._recs.get(session_id)
        if rec is None or not rec.accepting or (cols, rows) == (rec.cols, rec.rows):
            return
        with rec.lock:
            if not rec.accepting:
                return
            try:
                rec.cols, rec.rows = cols, rows
                t = max(self._clock() - rec.t0, rec.last)
                rec.last = t
                self._write(rec, t, b'[%.6f, "r", "%dx%d"]\n' % (t, cols, rows))
            except Exception as exc:
                self._failed(rec, exc)

    def _write(self, rec: _Recording, t: float, line: bytes) -> None:
        """One event line, unless it would take the recording past its limit: then the truncation notice."""
        size = rec.size + len(line)
        if size > rec.limit:
            self._truncate(rec, t)
            return
        rec.size = size
        rec.file.write(line)

    def _truncate(self, rec: _Recording, t: float) -> None:
        """Called with rec.lock held."""
        rec.accepting = False
        rec.truncated = True
        line = b'[%.6f, "o", %b]\n' % (t, orjson.dumps(TRUNCATED_NOTICE))
        rec.size += len(line)
        rec.file.write(line)
        logger.info("recording truncated at its size limit", extra={
            "session_id": rec.sid, "key": rec.key, "max_bytes": self.max_bytes})

    def _failed(self, rec: _Recording, exc: BaseException) -> None:
        """An I/O error ended this recording (called with rec.lock held). Logged once; finish() uploads what
        reached the file."""
        rec.accepting = False
        if rec.failed:
            return
        rec.failed = True
        ERRORS.labels(component="recorder", kind="io").inc()
        logger.error("recording stopped: writing its spool file failed", extra={
            "session_id": rec.sid, "key": rec.key, "error": repr(exc)})
        if rec.open:
            rec.open = False
            with contextlib.suppress(Exception):  # flushing again fails too; the descriptor is closed regardless
                rec.file.close()

    def flush(self) -> None:
        """Write every recording's buffered events to its spool file (the host's heartbeat)."""
        for rec in list(self._recs.values()):
            with rec.lock:
                if not rec.open:
                    continue
                try:
                    rec.file.flush()
                except Exception as exc:
                    self._failed(rec, exc)

    # --- ends and uploads (blocking: worker threads) ---------------------------------------------------------
    def finish(self, session_id: SessionId) -> str | None:
        """End the session's recording and upload it. Returns its storage key once stored; None when the session
        was not being recorded, or the upload failed (the recording stays in the spool and ``retry_uploads``
        stores it under the same key)."""
        done = self._close(session_id)
        outcome = None if done is None else self._upload(done)
        return outcome if isinstance(outcome, str) else None

    def finish_all(self) -> int:
        """End every recording and upload everything in the spool (host stop). Returns how many were stored."""
        for session_id in list(self._recs):
            self._close(session_id)
        return self.retry_uploads()

    def _close(self, session_id: SessionId) -> Path | None:
        """Close the recording's file and move it to done/. Returns its path there (None: nothing to upload)."""
        rec = self._recs.pop(session_id, None)
        if rec is None:
            return None
        with rec.lock:
            rec.accepting = False
            try:
                if rec.open and not rec.truncated:
                    tail = rec.decode(b"", True)  # an incomplete character at the very end: U+FFFD
                    if tail:
                        t = max(self._clock() - rec.t0, rec.last)
                        line = b'[%.6f, "o", %b]\n' % (t, orjson.dumps(tail))
                        if rec.size + len(line) <= rec.limit:
                            rec.file.write(line)
                if rec.open:
                    rec.open = False
                    rec.file.close()
            except Exception as exc:
                self._failed(rec, exc)
        try:
            if rec.failed and not _seal(rec.path):
                return None
            done = self.done_dir / rec.path.name
            os.replace(rec.path, done)
            return done
        except Exception as exc:
            ERRORS.labels(component="recorder", kind="io").inc()
            logger.error("finished recording could not be moved for upload; the next host start recovers it", extra={
                "session_id": rec.sid, "key": rec.key, "error": repr(exc)})
            return None

    def retry_uploads(self) -> int:
        """Upload the finished recordings still in the spool, oldest first; the first failure ends the round
        (the store is most likely down: the next heartbeat tries again). Returns how many were stored."""
        try:
            pending = sorted(self.done_dir.iterdir(), key=_mtime)
        except OSError as exc:
            logger.error("recording spool unreadable", extra={"error": repr(exc)})
            return 0
        stored = 0
        for path in pending:
            outcome = self._upload(path)
            if outcome is _Upload.FAILED:
                break
            stored += isinstance(outcome, str)
        return stored

    def recover(self) -> int:
        """At host start: a previous run's recordings (in live/, over since that run is) are cut back to their
        last whole event and uploaded with the rest of the spool. Returns how many were stored."""
        own = {rec.path for rec in list(self._recs.values())}
        try:
            left = [p for p in self.live_dir.iterdir() if p not in own]
        except OSError as exc:
            logger.error("recording spool unreadable", extra={"error": repr(exc)})
            return 0
        for path in left:
            try:
                if _seal(path):
                    os.replace(path, self.done_dir / path.name)
            except OSError as exc:
                logger.error("left-over recording could not be recovered", extra={
                    "file": path.name, "error": repr(exc)})
        if left:
            logger.info("recordings left by the previous run queued for upload", extra={"count": len(left)})
        return self.retry_uploads()

    def _key(self, path: Path) -> str | None:
        sid, sep, name = path.name.partition("@")
        if sep and _SESSION_PATTERN.match(sid) and RECORDING_NAME.match(name):
            return recording_key(sid, name)
        if path.name not in self._skipped:
            self._skipped.add(path.name)
            logger.warning("spool file with no recording name ignored", extra={"file": path.name})
        return None

    def _upload(self, path: Path) -> str | _Upload:
        """The key it was stored under, or why not."""
        key = self._key(path)
        if key is None:
            return _Upload.SKIPPED
        with self._upload_lock:
            if path in self._uploading:
                return _Upload.SKIPPED  # another thread is on it
            self._uploading.add(path)
        try:
            self.store.put_file(key, path)
            path.unlink(missing_ok=True)
        except FileNotFoundError:
            return _Upload.SKIPPED  # another thread stored it and removed it between our listing and now
        except (AppError, OSError) as exc:
            ERRORS.labels(component="recorder", kind="upload").inc()
            if not self._uploads_failing:
                self._uploads_failing = True
                logger.warning("recording upload failed; it stays in the spool and is retried every heartbeat",
                               extra={"key": key, "error": getattr(exc, "message", None) or repr(exc)})
            return _Upload.FAILED
        except Exception as exc:  # the host's heartbeat must go on
            ERRORS.labels(component="recorder", kind="upload").inc()
            logger.exception("recording upload failed unexpectedly", extra={"key": key, "error": repr(exc)})
            return _Upload.FAILED
        finally:
            with self._upload_lock:
                self._uploading.discard(path)
        if self._uploads_failing:
            self._uploads_failing = False
            logger.info("recording uploads work again", extra={"key": key})
        return key


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _seal(path: Path) -> bool:
    """Cut a recording that was not closed cleanly (a crash, a write error) back to its last whole line. False
    (and the file removed) when not even the header is whole."""
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            step = min(64 * 1024, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                cut = pos - step + nl + 1
                if cut < end:
                    f.truncate(cut)
                return True
            pos -= step
    path.unlink()
    return False
