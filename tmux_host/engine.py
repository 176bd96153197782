"""The terminal engine: sharded tmux servers driven through control-mode clients.

Rules that keep user text away from tmux's command parser:
- targets are only ids the host generated (``$N`` session ids, ``%N`` pane ids, ``@N`` window ids);
- input goes as ``send-keys -H <hex bytes>`` (raw bytes, nothing parsed) or validated key names;
- nothing user-controlled comes back through the control channel: screens are captured into a tmux buffer
  saved to a file in a private 0700 directory; formats with user-influenced fields use ``#{q:...}``;
- exec writes the user's command to a file the host creates itself and types a fixed wrapper line.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import stat
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from uuid import UUID, uuid4

from tmux_host.control import ControlClient, ControlClosed, TmuxCommandError, quote
from tmuxi import errors
from tmuxi.host_client import HostFull, HostInfo
from tmuxi.models import KEY_NAME, ExecResult, ScreenResponse
from tmuxi.observability import (
    ACTIVE_SESSIONS,
    ERRORS,
    SESSIONS_CLEANED,
    SESSIONS_CREATED,
    TIMEOUTS,
    logger,
)
from tmuxi.settings import Settings, env_name

SESSION_NAME = re.compile(r"^t([0-9a-f]{32})$")
_SAFE_PATH = re.compile(r"^[A-Za-z0-9/_.+-]+$")
MAX_SOCKET_PATH = 100
# Bytes per `send-keys -H` line. tmux 3.3a parses send-keys arguments in quadratic time (4096 hex args:
# ~100 ms, 256: ~0.3 ms), so -H lines stay short and bigger inputs take the paste path below.
HEX_CHUNK = 256
# Inputs above this go `load-buffer` (from a file the host wrote in its private dir) + `paste-buffer -d -r`:
# byte-exact, O(n), still no user byte on a command line (64 KB in ~0.5 ms).
PASTE_MIN = 257
HISTORY_LIMIT = 5000


class Registry(Protocol):  # what tmuxi.registry provides (module or object)
    def heartbeat(self, info: HostInfo) -> Any: ...
    def reconcile_host(self, host_id: str, present: set[UUID]) -> set[UUID]: ...
    def sessions_exited(self, host_id: str, session_ids: set[UUID]) -> None: ...


@dataclass
class SessionRec:
    session_id: UUID
    shard: int
    tmux_name: str
    tmux_id: str  # "$N"
    pane_id: str  # "%N" (the primary pane: first window, first pane)
    pid: int | None = None
    windows: int = 1
    exec_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    def public(self) -> dict[str, Any]:
        return {
            "session_id": str(self.session_id), "shard": self.shard, "tmux_name": self.tmux_name,
            "pane_id": self.pane_id, "windows": self.windows,
        }


@dataclass
class Shard:
    index: int
    socket_path: Path
    ctl: ControlClient
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    supervisor: asyncio.Task[None] | None = None


def shard_for(owner_key: str, shards: int) -> int:
    """Stable across processes and restarts (crc32, never Python's salted hash())."""
    return zlib.crc32(owner_key.encode("utf-8")) % shards


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` as a 0700 directory owned by us; repair a too-open mode; refuse a foreign owner,
    a symlink or a non-directory."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise RuntimeError(f"{path} is not a directory (symlink or file); refusing to use it")
    if st.st_uid != os.getuid():
        raise RuntimeError(f"{path} is owned by uid {st.st_uid}, not us ({os.getuid()}); refusing to use it")
    if stat.S_IMODE(st.st_mode) != 0o700:
        logger.warning("repairing mode of private directory", extra={"path": str(path),
                                                                      "mode": oct(stat.S_IMODE(st.st_mode))})
        os.chmod(path, 0o700)


def default_terminal() -> str:
    """tmux-256color when its terminfo entry is installed, else the always-available screen-256color."""
    for d in ("/usr/share/terminfo", "/lib/terminfo", "/etc/terminfo", "/usr/lib/terminfo"):
        if os.path.exists(f"{d}/t/tmux-256color"):
            return "tmux-256color"
    return "screen-256color"


def shell_state(pid: int) -> str:
    """``prompt``: process ``pid`` leads the foreground process group of its terminal (``tpgid`` in
    /proc/PID/stat), an interactive shell with no job in the foreground. ``starting``: it has no controlling
    terminal yet (just forked). ``busy``: anything else (a job runs in the foreground, or the process is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return "busy"
    fields = stat[stat.rindex(b")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session tty_nr tpgid
    if int(fields[4]) == 0 or int(fields[5]) <= 0:
        return "starting"
    return "prompt" if int(fields[2]) == pid and int(fields[5]) == pid else "busy"


def _unq(value: str) -> str:
    """Undo tmux's ``#{q:...}`` backslash escaping."""
    return re.sub(r"\\(.)", r"\1", value)


def _not_found(exc: BaseException) -> bool:
    return isinstance(exc, TmuxCommandError) and "can't find" in exc.text


class Engine:
    def __init__(self, settings: Settings, *, registry: Registry | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.host_id = settings.host_id
        self.base_dir = settings.resolved_socket_dir
        self.host_dir = self.base_dir / self.host_id
        self.work_dir = self.host_dir / "x"  # exec scripts/outputs and screen captures
        self.shell = settings.shell
        self.started_at = time.time()
        self.shards: list[Shard] = []
        self._sessions: dict[UUID, SessionRec] = {}
        self._creating: set[UUID] = set()
        self._counter = itertools.count(1)
        # Bumped on every create/drop: a refresh whose listing raced a create or a kill leaves those alone.
        self._change_seq = 0
        self._changed_at: dict[UUID, int] = {}
        self._stopping = False
        self._bg: list[asyncio.Task[None]] = []
        self._refreshing: set[int] = set()
        self._gauge = ACTIVE_SESSIONS.labels(host=self.host_id)
        self.on_notification: Callable[[int, str, str], None] | None = None  # seam for output streaming

    # --- lifecycle ---------------------------------------------------------------------------------
    def _check_paths(self) -> None:
        base = str(self.base_dir)
        if not self.base_dir.is_absolute() or not _SAFE_PATH.match(base):
            raise RuntimeError(
                f"{env_name('socket_dir')}={base!r} must be an absolute path made of [A-Za-z0-9/_.+-] only"
            )
        longest = str(self.host_dir / f"s{self.settings.host_shards - 1}")
        if len(longest.encode()) >= MAX_SOCKET_PATH:
            raise RuntimeError(
                f"tmux socket path {longest!r} is {len(longest.encode())} bytes; unix socket paths must be "
                f"< {MAX_SOCKET_PATH}: set {env_name('socket_dir')} to a shorter directory"
            )

    def socket_path(self, index: int) -> Path:
        return self.host_dir / f"s{index}"

    async def start(self, *, background: bool = True) -> None:
        self._check_paths()
        self.base_dir.parent.mkdir(parents=True, exist_ok=True)
        for d in (self.base_dir, self.host_dir, self.work_dir):
            ensure_private_dir(d)
        self._clean_work_dir()
        for i in range(self.settings.host_shards):
            shard = Shard(i, self.socket_path(i), self._new_ctl(i))
            self.shards.append(shard)
        results = await asyncio.gather(*(self._connect(s) for s in self.shards), return_exceptions=True)
        for shard, res in zip(self.shards, results, strict=True):
            if isinstance(res, BaseException):
                logger.error("tmux shard failed to start", extra={"shard": shard.index, "error": repr(res)})
        await self._reconcile_registry()
        if background:
            for shard in self.shards:
                shard.supervisor = asyncio.create_task(self._supervise(shard), name=f"shard-{shard.index}")
            self._bg.append(asyncio.create_task(self._heartbeat_loop(), name="heartbeat"))
        logger.info("tmux host engine started", extra={
            "host_id": self.host_id, "shards": len(self.shards), "sessions": len(self._sessions)})

    async def stop(self, *, kill_servers: bool = False) -> None:
        """Detach from the tmux servers. Sessions keep running (they outlive the host) unless
        ``kill_servers``."""
        self._stopping = True
        tasks = self._bg + [s.supervisor for s in self.shards if s.supervisor]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for shard in self.shards:
            if kill_servers and shard.ctl.alive:
                with contextlib.suppress(Exception):
                    fut = shard.ctl.submit("kill-server")
                    fut.add_done_callback(lambda f: f.exception())  # reply may never come: server exits
                    await asyncio.wait_for(shard.ctl.wait_closed(), 2.0)
            await shard.ctl.close()

    def _new_ctl(self, index: int) -> ControlClient:
        def note(name: str, args: str) -> None:
            if name == "sessions-changed":  # a session appeared or went away (a shell exited?): re-read it
                self._schedule_refresh(index)
            # Output streaming (later issue) subscribes through `on_notification`.
            if self.on_notification is not None:
                self.on_notification(index, name, args)

        return ControlClient(self.socket_path(index), shell=self.shell, on_notification=note,
                             spin_s=self.settings.control_spin_us / 1e6)

    async def _connect(self, shard: Shard) -> None:
        """(Re)attach to a shard's tmux server (starting it if needed), set options, adopt its sessions."""
        async with shard.lock:
            if shard.ctl.alive:
                return
            await shard.ctl.start()
            # Global options, before any session is created. NB: do NOT set window-size globally:
            # tmux 3.3a crashes on new-session with a global `window-size manual` (resize-window sets
            # it per window instead).
            await shard.ctl.commands([
                f"set-option -g default-shell {quote(self.shell)}",
                f"set-option -g history-limit {HISTORY_LIMIT}",
                "set-option -g allow-rename off",
                "set-option -g exit-empty off",
                f"set-option -g default-terminal {quote(default_terminal())}",
            ])
            exited = await self._adopt(shard)
        await self._report_exited(exited)  # sessions whose shell exited while we were not connected

    async def _ctl(self, index: int) -> ControlClient:
        shard = self.shards[index]
        if not shard.ctl.alive:
            try:
                await self._connect(shard)
            except ControlClosed as exc:
                raise errors.HostUnavailable(f"tmux shard {index} is down: {exc.message}") from exc
        return shard.ctl

    async def _supervise(self, shard: Shard) -> None:
        delay = 0.2
        while not self._stopping:
            await shard.ctl.wait_closed()
            if self._stopping:
                return
            if shard.ctl.alive:
                await asyncio.sleep(0.05)
                continue
            logger.warning("tmux shard control connection lost; reconnecting", extra={"shard": shard.index})
            ERRORS.labels(component="host", kind="shard_down").inc()
            await asyncio.sleep(delay)
            try:
                await self._connect(shard)
                delay = 0.2
            except Exception as exc:
                logger.error("tmux shard reconnect failed", extra={"shard": shard.index, "error": str(exc)})
                delay = min(delay * 2, 10.0)

    # --- session map -------------------------------------------------------------------------------
    async def _adopt(self, shard: Shard) -> set[UUID]:
        """Rebuild the map for one shard from tmux itself (called on (re)connect and refresh). Returns the
        sessions it dropped because tmux no longer has them (their shell exited)."""
        ctl = shard.ctl
        seq = self._change_seq
        sessions, panes = await ctl.commands([
            "list-sessions -F 'L#{session_id} #{session_windows} #{q:session_name}'",
            "list-panes -a -F 'P#{session_id} #{window_index} #{pane_index} #{pane_id} #{pane_pid}'",
        ])
        if isinstance(sessions, BaseException):
            raise sessions
        if isinstance(panes, BaseException):
            raise panes
        first_pane: dict[str, tuple[int, int, str, int]] = {}
        for line in panes:
            parts = line.split(" ")
            if len(parts) != 5 or not line.startswith("P"):
                continue
            sid, widx, pidx, pane, pid = parts[0][1:], int(parts[1]), int(parts[2]), parts[3], int(parts[4])
            cur = first_pane.get(sid)
            if cur is None or (widx, pidx) < (cur[0], cur[1]):
                first_pane[sid] = (widx, pidx, pane, pid)
        present: set[UUID] = set()
        for line in sessions:
            parts = line.split(" ", 2)
            if len(parts) != 3 or not line.startswith("L"):
                continue
            tmux_id, nwin, name = parts[0][1:], int(parts[1]), _unq(parts[2])
            m = SESSION_NAME.match(name)
            if not m or tmux_id not in first_pane:
                continue
            uid = UUID(m.group(1))
            if self._changed_at.get(uid, -1) > seq:
                continue  # created or killed while this listing was in flight
            present.add(uid)
            _, _, pane, pid = first_pane[tmux_id]
            rec = self._sessions.get(uid)
            if rec is None or rec.shard != shard.index:
                self._sessions[uid] = SessionRec(uid, shard.index, name, tmux_id, pane, pid, nwin)
            else:
                rec.tmux_id, rec.pane_id, rec.pid, rec.windows = tmux_id, pane, pid, nwin
        exited: set[UUID] = set()
        for uid in [u for u, r in self._sessions.items() if r.shard == shard.index and u not in present]:
            if uid in self._creating or self._changed_at.get(uid, -1) > seq:
                continue
            del self._sessions[uid]
            exited.add(uid)
            SESSIONS_CLEANED.labels(host=self.host_id, reason="exited").inc()
        self._gauge.set(len(self._sessions))
        return exited

    async def refresh(self) -> None:
        """Re-read every live shard (drops sessions whose shell exited, adopts unknown ones)."""
        for shard in self.shards:
            await self._refresh_shard(shard)

    async def _refresh_shard(self, shard: Shard) -> None:
        if not shard.ctl.alive:
            return
        try:
            exited = await self._adopt(shard)
        except (ControlClosed, TmuxCommandError) as exc:
            logger.warning("shard refresh failed", extra={"shard": shard.index, "error": str(exc)})
            return
        await self._report_exited(exited)

    def _schedule_refresh(self, index: int) -> None:
        """Re-read one shard soon (a burst of notifications makes one refresh)."""
        if self._stopping or index in self._refreshing or index >= len(self.shards):
            return
        self._refreshing.add(index)

        async def run() -> None:
            try:
                await asyncio.sleep(0.02)
                await self._refresh_shard(self.shards[index])
            finally:
                self._refreshing.discard(index)

        task = asyncio.get_running_loop().create_task(run(), name=f"refresh-{index}")
        self._bg.append(task)
        task.add_done_callback(lambda t: self._bg.remove(t) if t in self._bg else None)

    async def _report_exited(self, exited: set[UUID]) -> None:
        """Tell the registry about sessions whose shell exited, so the record says so at once."""
        if not exited or self.registry is None:
            return
        report = getattr(self.registry, "sessions_exited", None)
        if report is None:
            return
        try:
            await asyncio.to_thread(report, self.host_id, exited)
        except Exception as exc:  # the next start's reconcile marks them lost instead
            logger.warning("could not record exited sessions", extra={"count": len(exited), "error": str(exc)})
        else:
            logger.info("sessions exited", extra={"count": len(exited)})

    async def _reconcile_registry(self) -> None:
        if self.registry is None:
            return
        present = set(self._sessions)
        try:
            reconcile = getattr(self.registry, "reconcile_host", None) or self.registry.reconcile  # type: ignore[attr-defined]
            orphans = await asyncio.to_thread(reconcile, self.host_id, present)
        except Exception as exc:
            logger.error("registry reconcile failed; keeping every session", extra={"error": str(exc)})
            return
        for uid in set(orphans or ()) & present:
            logger.info("killing orphan session", extra={"session_id": str(uid)})
            with contextlib.suppress(errors.AppError):
                await self.kill_session(uid, reason="orphan")

    async def _heartbeat_loop(self) -> None:
        while not self._stopping:
            if self.registry is not None:
                try:
                    await asyncio.to_thread(self.registry.heartbeat, self.host_info())
                except Exception as exc:
                    ERRORS.labels(component="host", kind="heartbeat").inc()
                    logger.warning("registry heartbeat failed", extra={"error": str(exc)})
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            await self.refresh()

    def host_info(self) -> HostInfo:
        return HostInfo(self.host_id, self.settings.advertised_host_url, self.settings.host_capacity,
                        len(self._sessions), self.started_at)

    def _get(self, session_id: UUID) -> SessionRec:
        rec = self._sessions.get(session_id)
        if rec is None:
            raise errors.NotFound(f"session {session_id} is not on this host")
        return rec

    def _mark_changed(self, uid: UUID) -> None:
        self._change_seq += 1
        self._changed_at[uid] = self._change_seq
        if len(self._changed_at) > 4096:
            for old in list(self._changed_at)[:2048]:
                del self._changed_at[old]

    def _drop(self, rec: SessionRec, reason: str) -> None:
        if self._sessions.get(rec.session_id) is rec:
            del self._sessions[rec.session_id]
            self._mark_changed(rec.session_id)
            SESSIONS_CLEANED.labels(host=self.host_id, reason=reason).inc()
            self._gauge.set(len(self._sessions))

    async def _run(self, rec: SessionRec, make: Callable[[SessionRec], list[str]]) -> list[list[str]]:
        """Run commands targeting a session; on "can't find" re-resolve its primary pane once (the first
        pane may have exited while the session lives on) or drop it and raise NotFound."""
        for attempt in (0, 1):
            ctl = await self._ctl(rec.shard)
            results = await ctl.commands(make(rec))
            failure = next((r for r in results if isinstance(r, BaseException)), None)
            if failure is None:
                return results  # type: ignore[return-value]
            if isinstance(failure, ControlClosed):
                raise errors.HostUnavailable(failure.message) from failure
            if _not_found(failure):
                if attempt == 0 and await self._reresolve(rec):
                    continue
                raise errors.NotFound(f"session {rec.session_id} is gone") from failure
            ERRORS.labels(component="host", kind="tmux_error").inc()
            raise errors.AppError(str(failure)) from failure
        raise AssertionError("unreachable")

    async def _reresolve(self, rec: SessionRec) -> bool:
        ctl = await self._ctl(rec.shard)
        try:
            lines = await ctl.command(
                f"list-panes -s -t {quote(rec.tmux_id)} "
                "-F 'P#{window_index} #{pane_index} #{pane_id} #{pane_pid}'"
            )
        except TmuxCommandError:
            self._drop(rec, "exited")
            return False
        panes = sorted(
            (int(p[0][1:]), int(p[1]), p[2], int(p[3]))
            for p in (line.split(" ") for line in lines) if len(p) == 4 and p[0].startswith("P")
        )
        if not panes or panes[0][2] == rec.pane_id:
            return False
        rec.pane_id, rec.pid = panes[0][2], panes[0][3]
        return True

    # --- sessions ----------------------------------------------------------------------------------
    @property
    def session_count(self) -> int:
        return len(self._sessions)

    async def create_session(self, session_id: UUID, owner_key: str, cols: int, rows: int) -> dict[str, Any]:
        if session_id in self._sessions or session_id in self._creating:
            raise errors.Conflict(f"session {session_id} already exists on this host")
        if len(self._sessions) + len(self._creating) >= self.settings.host_capacity:
            raise HostFull(f"host {self.host_id} is at capacity ({self.settings.host_capacity} sessions)")
        index = shard_for(owner_key, len(self.shards))
        name = "t" + session_id.hex
        self._creating.add(session_id)
        try:
            ctl = await self._ctl(index)
            try:
                lines = await ctl.command(
                    f"new-session -d -s {name} -x {int(cols)} -y {int(rows)} "
                    f"-e TMUXI_SESSION_ID={session_id} "
                    "-P -F 'N#{session_id} #{window_id} #{pane_id} #{pane_pid}'"
                )
            except TmuxCommandError as exc:
                if "duplicate session" in exc.text:
                    raise errors.Conflict(f"session {session_id} already exists on this host") from exc
                ERRORS.labels(component="host", kind="create_failed").inc()
                raise errors.AppError(f"could not create the session: {exc}") from exc
            except ControlClosed as exc:
                raise errors.HostUnavailable(exc.message) from exc
            parts = next((ln.split(" ") for ln in lines if ln.startswith("N$")), None)
            if parts is None or len(parts) != 4:
                raise errors.AppError("unexpected reply from tmux new-session")
            rec = SessionRec(session_id, index, name, parts[0][1:], parts[2], int(parts[3]), 1)
            self._sessions[session_id] = rec
            self._mark_changed(session_id)
        finally:
            self._creating.discard(session_id)
        SESSIONS_CREATED.labels(host=self.host_id).inc()
        self._gauge.set(len(self._sessions))
        return {"session_id": str(session_id), "shard": index, "tmux_name": name, "pane_id": rec.pane_id,
                "pid": rec.pid}

    async def list_sessions(self) -> list[dict[str, Any]]:
        await self.refresh()
        return [rec.public() for rec in self._sessions.values()]

    async def kill_session(self, session_id: UUID, *, reason: str = "killed") -> None:
        rec = self._get(session_id)
        ctl = await self._ctl(rec.shard)
        try:
            await ctl.command(f"kill-session -t {quote(rec.tmux_id)}")
        except TmuxCommandError as exc:
            if not _not_found(exc):
                raise errors.AppError(str(exc)) from exc
        except ControlClosed as exc:
            raise errors.HostUnavailable(exc.message) from exc
        self._drop(rec, reason)

    # --- input -------------------------------------------------------------------------------------
    @staticmethod
    def input_commands(pane_id: str, data: bytes | None = None, keys: Iterable[str] | None = None) -> list[str]:
        target = quote(pane_id)
        lines: list[str] = []
        if data:
            for off in range(0, len(data), HEX_CHUNK):
                lines.append(f"send-keys -t {target} -H " + data[off:off + HEX_CHUNK].hex(" "))
        if keys:
            keys = list(keys)
            bad = [k for k in keys if not isinstance(k, str) or not KEY_NAME.match(k)]
            if bad:
                raise errors.BadRequest(f"unknown key names: {bad[:5]}")
            for off in range(0, len(keys), 128):
                lines.append(f"send-keys -t {target} " + " ".join(keys[off:off + 128]))
        return lines

    async def send_input(self, session_id: UUID, data: bytes | None = None, keys: list[str] | None = None) -> None:
        rec = self._get(session_id)
        if data is not None and len(data) > self.settings.max_input_bytes:
            raise errors.PayloadTooLarge(f"input is over {self.settings.max_input_bytes} bytes")
        if data is not None and len(data) >= PASTE_MIN:
            self.input_commands(rec.pane_id, None, keys)  # validate keys before anything is sent
            await self._paste(rec, data, keys)
            return
        lines = self.input_commands(rec.pane_id, data, keys)  # validates keys before anything is sent
        if not lines:
            return
        if len(lines) == 1:  # fast path: one round trip, no list/gather overhead
            ctl = self.shards[rec.shard].ctl
            if ctl.alive:
                try:
                    await ctl.command(lines[0])
                    return
                except TmuxCommandError as exc:
                    if not _not_found(exc):
                        raise errors.AppError(str(exc)) from exc
                except ControlClosed:
                    pass
        await self._run(rec, lambda r: self.input_commands(r.pane_id, data, keys))

    async def _paste(self, rec: SessionRec, data: bytes, keys: list[str] | None) -> None:
        n = next(self._counter)
        buf = f"tmuxi_i{n}"
        path = self.work_dir / f"i{n}-{uuid4().hex[:16]}.bin"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        ok = False
        try:
            await self._run(rec, lambda r: [
                f"load-buffer -b {buf} {quote(str(path))}",
                f"paste-buffer -d -r -b {buf} -t {quote(r.pane_id)}",  # -r: bytes as-is, -d: drop buffer
                *self.input_commands(r.pane_id, None, keys),
            ])
            ok = True
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            if not ok:
                with contextlib.suppress(Exception):
                    ctl = self.shards[rec.shard].ctl
                    if ctl.alive:
                        await ctl.commands([f"delete-buffer -b {buf}"])

    # --- screen ------------------------------------------------------------------------------------
    async def screen(self, session_id: UUID, *, escapes: bool = False, history: int = 0) -> ScreenResponse:
        rec = self._get(session_id)
        history = max(0, min(int(history), HISTORY_LIMIT))
        n = next(self._counter)
        buf = f"tmuxi_c{n}"
        path = self.work_dir / f"c{n}-{uuid4().hex}.txt"

        def make(r: SessionRec) -> list[str]:
            opts = (" -e" if escapes else "") + (f" -S -{history}" if history else "")
            return [
                f"capture-pane -b {buf} -t {quote(r.pane_id)}{opts}",
                f"save-buffer -b {buf} {quote(str(path))}",
                f"delete-buffer -b {buf}",
                f"display-message -p -t {quote(r.pane_id)} "
                "'V#{cursor_x} #{cursor_y} #{pane_width} #{pane_height}'",
            ]

        try:
            results = await self._run(rec, make)
            raw = path.read_bytes()
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        info = next((ln for ln in results[3] if ln.startswith("V")), "V0 0 0 0")[1:].split(" ")
        cx, cy, w, h = (int(x) for x in info)
        text = raw.decode("utf-8", errors="replace")
        if text.endswith("\n"):
            text = text[:-1]
        return ScreenResponse(text=text, cols=w, rows=h, cursor_x=cx, cursor_y=cy, escapes=escapes)

    # --- windows -----------------------------------------------------------------------------------
    _WINDOW_FMT = "'W#{window_index} #{window_id} #{window_active} #{window_panes}'"

    @staticmethod
    def _parse_window(line: str) -> dict[str, Any] | None:
        parts = line.split(" ")
        if len(parts) != 4 or not line.startswith("W"):
            return None
        return {"index": int(parts[0][1:]), "id": parts[1], "active": parts[2] == "1", "panes": int(parts[3])}

    async def list_windows(self, session_id: UUID) -> list[dict[str, Any]]:
        rec = self._get(session_id)
        (lines,) = await self._run(rec, lambda r: [f"list-windows -t {quote(r.tmux_id)} -F {self._WINDOW_FMT}"])
        windows = [w for w in map(self._parse_window, lines) if w]
        rec.windows = len(windows)
        return windows

    async def create_window(self, session_id: UUID) -> dict[str, Any]:
        rec = self._get(session_id)
        (lines,) = await self._run(
            rec, lambda r: [f"new-window -d -t {quote(r.tmux_id + ':')} -P -F {self._WINDOW_FMT}"]
        )
        window = next((w for w in map(self._parse_window, lines) if w), None)
        if window is None:
            raise errors.AppError("unexpected reply from tmux new-window")
        rec.windows += 1
        return window

    async def resize(self, session_id: UUID, cols: int, rows: int) -> None:
        rec = self._get(session_id)
        cols, rows = int(cols), int(rows)
        (lines,) = await self._run(rec, lambda r: [f"list-windows -t {quote(r.tmux_id)} -F 'W#{{window_id}}'"])
        window_ids = [ln[1:] for ln in lines if ln.startswith("W@")]

        def make(r: SessionRec) -> list[str]:
            # resize-window also sets window-size=manual on that window; default-size sizes new windows.
            return [f"set-option -t {quote(r.tmux_id)} default-size {cols}x{rows}"] + [
                f"resize-window -t {quote(w)} -x {cols} -y {rows}" for w in window_ids
            ]

        await self._run(rec, make)

    # --- exec --------------------------------------------------------------------------------------
    async def _shell_ready(self, rec: SessionRec, deadline: float) -> bool:
        """The shell is at its prompt. A session created a moment ago whose shell has not taken its terminal
        yet is waited for (within the exec's own timeout); a session running a program is not."""
        state = await self._shell_state(rec)
        while state == "starting" and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            state = await self._shell_state(rec)
        return state == "prompt"

    async def _shell_state(self, rec: SessionRec) -> str:
        """Is the pane's shell at its prompt, i.e. is the terminal's foreground process group the shell's own?
        Read from /proc (the panes run on this machine), so it holds whatever the shell binary is called."""
        pid = rec.pid
        if pid is None:
            (lines,) = await self._run(rec, lambda r: [f"display-message -p -t {quote(r.pane_id)} 'P#{{pane_pid}}'"])
            found = next((ln[1:] for ln in lines if ln.startswith("P") and ln[1:].isdigit()), None)
            if found is None:
                return "busy"
            pid = rec.pid = int(found)
        return shell_state(pid)

    async def exec(self, session_id: UUID, command: str, timeout_s: float | None = None) -> ExecResult:
        rec = self._get(session_id)
        encoded = command.encode("utf-8", errors="surrogateescape")
        if len(encoded) > self.settings.max_command_bytes:
            raise errors.PayloadTooLarge(f"command is over {self.settings.max_command_bytes} bytes")
        timeout = self.settings.exec_timeout_default_s if timeout_s is None else float(timeout_s)
        timeout = max(0.01, min(timeout, self.settings.exec_timeout_max_s))
        # Execs in one session are serialized; waiting for the previous one counts against the timeout.
        waited = time.monotonic()
        try:
            await asyncio.wait_for(rec.exec_lock.acquire(), timeout)
        except TimeoutError:
            raise errors.SessionBusy("another exec is still running in this session") from None
        try:
            if not await self._shell_ready(rec, deadline=waited + timeout):
                raise errors.SessionBusy("the session's shell is not at a prompt (a program is running)")
            remaining = max(0.01, timeout - (time.monotonic() - waited))
            return await self._exec_locked(rec, encoded, remaining)
        finally:
            rec.exec_lock.release()

    async def _exec_locked(self, rec: SessionRec, script: bytes, timeout: float) -> ExecResult:
        xid = uuid4().hex[:16]
        sh, out, rc = (self.work_dir / f"{xid}{ext}" for ext in (".sh", ".out", ".rc"))
        started = time.monotonic()
        try:
            fd = os.open(sh, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(script + b"\n")
            # Leading space keeps it out of history (HISTCONTROL=ignorespace); `\.`/`\echo` dodge aliases.
            # The rc file is written by one echo (one write): complete once it ends with a newline.
            wrapper = (
                f" {{ \\. '{sh}'; }} </dev/null >'{out}' 2>&1; \\echo $? >'{rc}'\n"
            ).encode()
            await self._run(rec, lambda r: self.input_commands(r.pane_id, wrapper))
            code = await self._wait_rc(rc, started + timeout, rec)
            timed_out = code is None
            if timed_out:
                TIMEOUTS.labels(component="host", operation="exec").inc()
                await self._interrupt(rec, rc)
            output, truncated = self._read_output(out)
            return ExecResult(
                exit_code=None if timed_out else code, output=output, timed_out=timed_out,
                truncated=truncated, duration_ms=round((time.monotonic() - started) * 1000, 3),
            )
        finally:
            for p in (sh, out, rc):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def _shell_alive(self, rec: SessionRec) -> bool:
        if self._sessions.get(rec.session_id) is not rec:
            return False  # dropped by a refresh: tmux no longer has the session
        if rec.pid is None:
            return True
        try:
            os.kill(rec.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # alive (and someone else's: not ours to judge)
            return True
        return True

    @staticmethod
    def _read_rc(rc: Path) -> int | None:
        try:
            data = rc.read_bytes()
        except FileNotFoundError:
            return None
        if not data.endswith(b"\n"):
            return None
        try:
            return int(data.strip())
        except ValueError:
            return -1

    async def _wait_rc(self, rc: Path, deadline: float, rec: SessionRec | None = None) -> int | None:
        """The exit code once the rc file is complete; None at the deadline. Raises SessionEnded when the
        session's shell is gone meanwhile (the command ran ``exit`` or ``exec``, or killed it)."""
        delay = 0.002
        while True:
            code = self._read_rc(rc)
            if code is not None:
                return code
            if rec is not None and not self._shell_alive(rec):
                raise errors.SessionEnded("the command ended the session's shell (exit, exec or a signal): "
                                          "the session is over")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 1.5, 0.025)

    async def _interrupt(self, rec: SessionRec, rc: Path) -> None:
        """After a timeout: Ctrl-C the foreground job and give the shell a moment to get back to its
        prompt, so the session is usable for the next exec."""
        with contextlib.suppress(errors.AppError):
            await self._run(rec, lambda r: [f"send-keys -t {quote(r.pane_id)} C-c"])
        await self._wait_rc(rc, time.monotonic() + 0.3)
        deadline = time.monotonic() + 1.5
        delay = 0.005
        while time.monotonic() < deadline:
            with contextlib.suppress(errors.AppError):
                if await self._shell_state(rec) == "prompt":
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.05)

    def _read_output(self, out: Path) -> tuple[str, bool]:
        limit = self.settings.exec_max_output_bytes
        try:
            with open(out, "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            return "", False
        truncated = len(data) > limit
        return data[:limit].decode("utf-8", errors="replace"), truncated

    # --- health ------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        per_shard: dict[int, int] = {}
        for rec in self._sessions.values():
            per_shard[rec.shard] = per_shard.get(rec.shard, 0) + 1
        shards = [{"shard": s.index, "alive": s.ctl.alive, "sessions": per_shard.get(s.index, 0)}
                  for s in self.shards]
        alive = sum(1 for s in shards if s["alive"])
        status = "ok" if shards and alive == len(shards) else ("degraded" if alive else "down")
        return {"status": status, "host_id": self.host_id, "sessions": len(self._sessions),
                "capacity": self.settings.host_capacity, "shards": shards}

    def _clean_work_dir(self) -> None:
        """Leftovers of a previous process (exec files, captures) are ours and stale: remove them."""
        for p in self.work_dir.iterdir():
            with contextlib.suppress(OSError):
                if p.is_file() and not p.is_symlink():
                    p.unlink()
