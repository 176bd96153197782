"""The terminal engine: each user's sessions on a tmux server of their own (``server.UserServer``), run as their
own OS account (``accounts``), driven through control-mode clients.

Rules that keep user text away from tmux's command parser:
- targets are only ids tmux gave the host (``$N`` session ids, ``%N`` pane ids, ``@N`` window ids);
- input goes as ``send-keys -H <hex bytes>`` (raw bytes, nothing parsed) or validated key names;
- nothing user-controlled comes back through the control channel: screens are captured into a tmux buffer
  saved to a file the host made; formats with user-influenced fields use ``#{q:...}``;
- exec writes the user's command to a file the host creates itself and types a fixed wrapper line (``exec.py``).

And the rules that keep one user from another: a user's tmux server, its replies and every file its processes
write are that user's to forge, so the host bounds every wait on them, never blocks on them, and believes about
them only what its own records confirm (it adopts only sessions the system of record knows, on the server of the
account that owns them).
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import signal
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from uuid import UUID, uuid4

import regex

from tmux_host.accounts import Isolation, check_reachable, ensure_dir
from tmux_host.control import CTL_SESSION, OUT_SESSION, ControlClosed, TmuxCommandError, quote
from tmux_host.ecs import emit_sessions_metric
from tmux_host.exec import (
    ChannelFiles,
    ExecChannel,
    ExecJob,
    TerminalEcho,
    clear_exchange,
    command_line,
    erase_line,
    in_files_thread,
    make_file,
    parse_cursor,
    read_private_file,
)
from tmux_host.recorder import Recorder
from tmux_host.server import HISTORY_LIMIT, UserServer
from tmux_host.stream import Live
from tmuxi import errors
from tmuxi.host_client import HostFull, HostInfo
from tmuxi.models import KEY_NAME, ExecResult, InputWaitResult, ScreenResponse
from tmuxi.observability import (
    ACTIVE_SESSIONS,
    ERRORS,
    SESSIONS_CLEANED,
    SESSIONS_CREATED,
    TIMEOUTS,
    logger,
)
from tmuxi.settings import Settings, env_name
from tmuxi.storage import get_store

SESSION_NAME = re.compile(r"^t([0-9a-f]{32})\Z")
ACCOUNT_DIR = re.compile(r"^a([1-9][0-9]{0,9})\Z")
_SAFE_PATH = re.compile(r"^[A-Za-z0-9/_.+-]+\Z")
MAX_SOCKET_PATH = 100
# Bytes per `send-keys -H` line. tmux 3.3a parses send-keys arguments in quadratic time (4096 hex args:
# ~100 ms, 256: ~0.3 ms), so -H lines stay short and bigger inputs take the paste path below.
HEX_CHUNK = 256
# Inputs above this go `load-buffer` (from a file the host wrote) + `paste-buffer -d -r`: byte-exact, O(n),
# still no user byte on a command line (64 KB in ~0.5 ms).
PASTE_MIN = 257
MAX_SCREEN_BYTES = 16 << 20


class Registry(Protocol):  # what tmuxi.registry provides (module or object)
    def heartbeat(self, info: HostInfo) -> Any: ...
    def reconcile_host(self, host_id: str, present: set[tuple[UUID, int]]) -> dict[UUID, int]: ...
    def sessions_ended(self, host_id: str, ended: dict[UUID, tuple[str, str]]) -> None: ...
    def confirm_sessions(self, host_id: str, present: set[tuple[UUID, int]]) -> set[UUID]: ...
    def host_stopped(self, host_id: str) -> None: ...
    def host_draining(self, host_id: str) -> None: ...
    def connection_target(self, connection_id: str) -> tuple[str, str] | None: ...


# How many sessions that ended here are remembered, to answer 410 (how it ended) rather than 404.
GONE_MEMORY = 4096
# Every this many heartbeats the host asks the record which of its sessions it still holds, and kills the rest.
CONFIRM_EVERY = 6


@dataclass
class SessionRec:
    session_id: UUID
    account: int
    tmux_name: str
    tmux_id: str  # "$N"
    pane_id: str  # "%N" (the primary pane: first window, first pane)
    pid: int | None = None
    window_id: str | None = None  # "@N": the primary pane's window, linked into _out for its output
    exec_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    execs: dict[str, ExecJob] = field(default_factory=dict, repr=False)  # running, then kept a while
    foreground: ExecJob | None = field(default=None, repr=False)  # the exec holding its shell
    echo: TerminalEcho | None = field(default=None, repr=False)  # its terminal, where exec shows its output
    prompts: int = 0  # prompt marks (OSC 133;A) seen in its output
    prompted: bool = False  # its first prompt was waited for
    shell_ids: tuple[int, int] | None = field(default=None, repr=False)  # its shell's (session id, uid)
    last_output: float = 0.0  # time.monotonic() of its last output
    output_changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    spares: list[ChannelFiles] = field(default_factory=list, repr=False)  # the next execs' files, made ahead
    spare_making: asyncio.Task[None] | None = field(default=None, repr=False)  # making them (in a thread)

    def public(self) -> dict[str, Any]:
        return {"session_id": str(self.session_id), "account": self.account, "tmux_name": self.tmux_name,
                "pane_id": self.pane_id}


@dataclass
class _Listing:
    """One read of a server: our candidates (``t<uuid>`` sessions with their primary pane) and how many other
    sessions its user made from a shell."""

    sessions: dict[UUID, tuple[str, str, int, str]]  # session id -> (tmux id, pane id, pane pid, window id)
    extra: int


def shell_state(pid: int) -> str:
    """``prompt``: process ``pid`` leads the foreground process group of its terminal (``tpgid`` in
    /proc/PID/stat), an interactive shell with no job in the foreground. ``starting``: it has no controlling
    terminal yet (just forked). ``busy``: anything else (a job runs in the foreground, or the process is gone)."""
    try:  # os.read, not Path.read_bytes: asked at least twice per exec, it needs no file object
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            raw = os.read(fd, 4096)
        finally:
            os.close(fd)
    except OSError:
        return "busy"
    fields = raw[raw.rindex(b")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session tty_nr tpgid
    if int(fields[4]) == 0 or int(fields[5]) <= 0:
        return "starting"
    return "prompt" if int(fields[2]) == pid and int(fields[5]) == pid else "busy"


def _two_ints(lines: list[str], prefix: str) -> tuple[int, int]:
    found = next((ln[len(prefix):].split(" ") for ln in lines if ln.startswith(prefix)), [])
    return (int(found[0]), int(found[1])) if len(found) == 2 and all(x.isdigit() for x in found) else (0, 0)


PROMPT_MARK = b"\x1b]133;A"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        self.shell = settings.shell
        self.started_at = time.time()
        self.isolation: Isolation | None = None
        self.servers: dict[int, UserServer] = {}
        self.extra_sessions: dict[int, int] = {}  # account -> tmux sessions its user made from a shell
        self._sessions: dict[UUID, SessionRec] = {}
        self._by_account: dict[int, set[UUID]] = {}  # the same sessions by account (a server's refresh reads its own)
        self._creating: dict[UUID, int] = {}
        # sessions that ended here: (state, reason); those not yet written to the record are in _unreported
        self._gone: dict[UUID, tuple[str, str]] = {}
        # sessions with input since the last heartbeat: reported with it (_report_activity)
        self._touched: set[UUID] = set()
        self._unreported: dict[UUID, tuple[str, str]] = {}
        self._locks: dict[int, asyncio.Lock] = {}  # per account: start / stop of its server, creates on it
        self._counter = itertools.count(1)
        # Bumped on every create/drop: a refresh whose listing raced a create or a kill leaves those alone.
        self._change_seq = 0
        self._changed_at: dict[UUID, int] = {}
        self._started = False  # adoption done: until then no refresh may judge a server unused
        self._stopping = False
        # Told to go (drain.py): creates are refused (HostFull: the API places them on another host)
        self.draining = False
        # Set whenever a session is added or dropped: what wakes the task protection (protection.py) and a drain
        self.sessions_changed = asyncio.Event()
        self._bg: set[asyncio.Task[Any]] = set()
        self._gauge = ACTIVE_SESSIONS.labels(host=self.host_id)
        # Live output: every session's stream, its viewers and its recording (stream.py, recorder.py)
        self.live = Live(self, settings, getattr(registry, "connection_target", None))
        self.recorder: Recorder | None = None

    # --- lifecycle ---------------------------------------------------------------------------------
    def _check_paths(self) -> None:
        base = str(self.base_dir)
        if not self.base_dir.is_absolute() or not _SAFE_PATH.match(base):
            raise RuntimeError(
                f"{env_name('socket_dir')}={base!r} must be an absolute path made of [A-Za-z0-9/_.+-] only"
            )
        longest = str(self.host_dir / f"a{'9' * 10}" / "tmux")
        if len(longest.encode()) >= MAX_SOCKET_PATH:
            raise RuntimeError(
                f"tmux socket paths like {longest!r} are {len(longest.encode())} bytes; unix socket paths must be "
                f"< {MAX_SOCKET_PATH}: set {env_name('socket_dir')} to a shorter directory"
            )

    async def start(self, *, background: bool = True) -> None:
        self._check_paths()
        self.isolation = Isolation.probe(self.settings)
        self.base_dir.parent.mkdir(parents=True, exist_ok=True)
        # Traversable (not listable) by the accounts: each reaches its own 0700 / 0710 directory below.
        for d in (self.base_dir, self.host_dir, self.host_dir / "x"):
            ensure_dir(d, 0o711)
        stale = await asyncio.to_thread(clear_exchange, self.host_dir / "x")
        if stale:
            logger.info("exchange files of a previous run removed", extra={"count": stale})
        if self.isolation.accounts:
            check_reachable(self.base_dir)
            check_reachable(self.settings.resolved_home_dir)
        self.recorder = Recorder(self.settings.data_dir.absolute() / "spool" / self.host_id,
                                 get_store(self.settings), self.host_id, self.settings.recording_max_bytes,
                                 user_shell=self.settings.shell)
        await asyncio.to_thread(self.recorder.recover)  # recordings a previous run left: finished, uploaded
        await self._adopt_existing()
        self._started = True
        if background:
            self._spawn(self._heartbeat_loop(), "heartbeat")
            self._spawn(self._refresh_loop(), "refresh")
        logger.info("tmux host engine started", extra={
            "host_id": self.host_id, "servers": len(self.servers), "sessions": len(self._sessions),
            "isolation": self.isolation.describe()})

    async def stop(self, *, kill_servers: bool = False) -> None:
        """Detach from the tmux servers. Sessions keep running (they outlive the host) unless ``kill_servers``."""
        self._stopping = True
        if self.registry is not None and self._started:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._report_ended(), 2.0)  # what ended here reaches the record
                await asyncio.wait_for(asyncio.to_thread(self.registry.host_stopped, self.host_id), 2.0)
        for t in list(self._bg):
            t.cancel()
        for t in list(self._bg):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for rec in self._sessions.values():  # the files made ahead (an exec's own go when it ends)
            for files in rec.spares:
                with contextlib.suppress(OSError):
                    files.remove(dict(files.fds))
            rec.spares.clear()
        await asyncio.gather(*(s.stop(kill=kill_servers) for s in self.servers.values()), return_exceptions=True)
        await self.live.close()
        if self.recorder is not None:  # this run's recordings end here (a restart begins new ones)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.to_thread(self.recorder.finish_all), 10.0)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)
        return task

    def _iso(self) -> Isolation:
        if self.isolation is None:
            raise errors.HostUnavailable("the tmux host is starting")
        return self.isolation

    def _lock(self, account: int) -> asyncio.Lock:
        lock = self._locks.get(account)
        if lock is None:
            lock = self._locks[account] = asyncio.Lock()
        return lock

    def _server_for(self, account: int) -> UserServer:
        server = self.servers.get(account)
        if server is None or server.stopping:
            iso = self._iso()
            server = UserServer(self.settings, iso, iso.account(account), self.host_dir, self._note,
                                self._lock(account), on_output=self._on_output)
            self.servers[account] = server
        return server

    def _note(self, server: UserServer, name: str, args: str) -> None:
        if name == "sessions-changed":  # a session appeared or went away (a shell exited?): re-read it
            self._schedule_refresh(server)
        elif name == "pause":  # tmux paused a pane the host fell behind on: go on, and resync its viewers
            pane = args.strip()
            if re.fullmatch(r"%[0-9]+", pane) and server.out is not None and server.out.alive:
                fut = server.out.submit(f"refresh-client -A {quote(pane + ':continue')}")
                fut.add_done_callback(lambda f: f.cancelled() or f.exception())
                rec = self._session_of_pane(server.account.number, pane)
                if rec is not None:
                    logger.info("tmux paused a pane's output; resyncing its viewers",
                                extra={"session_id": str(rec.session_id)})
                    self.live.resync([rec.session_id])

    def _session_of_pane(self, account: int, pane: str) -> SessionRec | None:
        for sid in self._by_account.get(account, ()):
            rec = self._sessions[sid]
            if rec.pane_id == pane:
                return rec
        return None

    def _on_output(self, server: UserServer, pane: str, data: bytes) -> None:
        """A pane's output (raw bytes) from a user's output client: into its session's stream and recording."""
        rec = self._session_of_pane(server.account.number, pane)
        if rec is None:
            return  # another pane of a linked window (only the primary pane is streamed), or not ours
        rec.last_output = time.monotonic()
        if PROMPT_MARK in data:
            rec.prompts += data.count(PROMPT_MARK)
        rec.output_changed.set()
        self.live.output(rec.session_id, data)
        if self.recorder is not None:
            self.recorder.output(rec.session_id, data)

    async def _link_windows(self, server: UserServer) -> None:
        """After the output client (re)started: link every session's window into _out (again: it may be a new
        server, or the user may have unlinked them) and resync their viewers (output was not read meanwhile)."""
        if not server.output_restarted or not server.alive:
            return
        server.output_restarted = False
        acct = server.account.number
        recs = [self._sessions[sid] for sid in self._by_account.get(acct, ())]
        try:
            lines = await server.ctl.command(f"list-windows -t {quote(OUT_SESSION)} -F 'W#{{window_id}}'")
        except (ControlClosed, TmuxCommandError) as exc:
            logger.warning("could not list the output session", extra={"account": server.account.name,
                                                                       "error": str(exc)[:200]})
            return
        linked = {ln[1:] for ln in lines if ln.startswith("W@")}
        missing = [r for r in recs if r.window_id is not None and r.window_id not in linked]
        if missing:
            await server.ctl.commands([self._link_command(r) for r in missing])
        self.live.resync([r.session_id for r in recs])

    @staticmethod
    def _link_command(rec: SessionRec) -> str:
        assert rec.window_id is not None
        return f"link-window -d -s {quote(rec.window_id)} -t {quote(OUT_SESSION + ':')}"

    async def _ensure_server(self, account: int) -> UserServer:
        """The account's server, started (as the account) if it is not running. Call with its lock held."""
        server = self._server_for(account)
        if not server.alive:
            try:
                await server.connect()
            except ControlClosed as exc:
                raise errors.HostUnavailable(f"could not start the tmux server: {exc.message}") from exc
            self._server_replaced(server)
            server.start_supervising(self._on_reconnect)
        await self._link_windows(server)
        return server

    def _server_replaced(self, server: UserServer) -> None:
        """Right after a connect, before anything reads the server: if it is a new one, the one before died
        (killed) and its sessions with it -- lost, not exited."""
        if server.restarted:
            server.restarted = False
            acct = server.account.number
            for rec in [self._sessions[sid] for sid in self._by_account.get(acct, ())]:
                self._ended(rec, "lost", "its tmux server died")

    async def _on_reconnect(self, server: UserServer) -> None:
        self._server_replaced(server)
        await self._refresh_server(server)
        await self._link_windows(server)

    async def _server(self, rec: SessionRec) -> UserServer:
        server = self.servers.get(rec.account)
        if server is None or not server.alive:
            async with self._lock(rec.account):
                server = await self._ensure_server(rec.account)
        return server

    # --- adoption: only what the system of record knows --------------------------------------------
    async def _adopt_existing(self) -> None:
        """After a restart: attach to the servers found in the host's directory, and adopt the sessions on them
        that the registry says are live on this host *and* owned by that server's account. ``t<uuid>`` sessions
        it does not confirm (orphans of a failed create, or made from a shell to look like ours) are killed; any
        other session a user made is theirs, and counted against their quota (``extra_sessions``)."""
        iso = self._iso()
        found: dict[int, _Listing] = {}
        for entry in sorted(os.scandir(self.host_dir), key=lambda e: e.name):
            m = ACCOUNT_DIR.match(entry.name)
            if not m or not entry.is_dir(follow_symlinks=False):
                continue
            account = iso.account(int(m.group(1)))
            st = os.lstat(entry.path)
            sock = Path(entry.path) / "tmux"
            if (iso.accounts and st.st_uid != account.uid) or not sock.is_socket():
                continue  # not one of ours, or no server to attach to
            server = self._server_for(account.number)
            try:
                async with self._lock(account.number):
                    await server.connect()
                found[account.number] = await self._list(server)
            except (ControlClosed, TmuxCommandError, OSError) as exc:
                logger.error("could not attach to a tmux server", extra={"account": entry.name, "error": str(exc)})
        present = {(sid, acct) for acct, listing in found.items() for sid in listing.sessions}
        adopt: dict[UUID, int] = dict(present)
        reconciled = True
        if self.registry is not None:
            try:
                adopt = await asyncio.to_thread(self.registry.reconcile_host, self.host_id, present)
            except Exception as exc:
                logger.error("registry reconcile failed; adopting nothing, killing nothing", extra={"error": str(exc)})
                adopt, reconciled = {}, False
        else:
            logger.warning("no registry: adopting every session found unchecked (development and tests only)")
        for acct, listing in found.items():
            server = self.servers[acct]
            for sid, (tmux_id, pane, pid, window) in listing.sessions.items():
                if adopt.get(sid) == acct:
                    self._add(SessionRec(sid, acct, "t" + sid.hex, tmux_id, pane, pid, window_id=window))
                elif reconciled:
                    logger.info("killing a tmux session the registry does not confirm", extra={"session_id": str(sid)})
                    with contextlib.suppress(Exception):
                        await server.ctl.command(f"kill-session -t {quote(tmux_id)}")
            self.extra_sessions[acct] = listing.extra
            if self._in_use(acct):
                server.start_supervising(self._on_reconnect)
                await self._link_windows(server)
            else:
                await self._stop_server(acct)
        self._gauge.set(len(self._sessions))

    async def _list(self, server: UserServer) -> _Listing:
        sessions, panes = await server.ctl.commands([
            "list-sessions -F 'L#{session_id} #{q:session_name}'",
            "list-panes -a -F 'P#{session_id} #{window_index} #{pane_index} #{pane_id} #{pane_pid} #{window_id}'",
        ])
        if isinstance(sessions, BaseException):
            raise sessions
        if isinstance(panes, BaseException):
            raise panes
        first_pane: dict[str, tuple[int, int, str, int, str]] = {}
        for line in panes:
            parts = line.split(" ")
            if len(parts) != 6 or not line.startswith("P") or not (parts[1] + parts[2] + parts[4]).isdigit():
                continue
            sid, widx, pidx, pane, pid = parts[0][1:], int(parts[1]), int(parts[2]), parts[3], int(parts[4])
            cur = first_pane.get(sid)
            if cur is None or (widx, pidx) < (cur[0], cur[1]):
                first_pane[sid] = (widx, pidx, pane, pid, parts[5])
        out: dict[UUID, tuple[str, str, int, str]] = {}
        extra = 0
        for line in sessions:
            parts = line.split(" ", 1)
            if len(parts) != 2 or not line.startswith("L"):
                continue
            tmux_id, name = parts[0][1:], _unq(parts[1])
            m = SESSION_NAME.match(name)
            if m and tmux_id in first_pane:
                _, _, pane, pid, window = first_pane[tmux_id]
                out[UUID(m.group(1))] = (tmux_id, pane, pid, window)
            elif name not in (CTL_SESSION, OUT_SESSION):
                extra += 1
        return _Listing(out, extra)

    # --- keeping the map true ----------------------------------------------------------------------
    async def _refresh_server(self, server: UserServer) -> None:
        """Re-read one server: drop our sessions it no longer has (their shell exited), count the sessions its
        user made from a shell (never adopted: a ``t<uuid>`` one we did not create counts as theirs too)."""
        acct = server.account.number
        if server.refreshing or not server.alive:
            return
        server.refreshing = True
        try:
            seq = self._change_seq
            listing = await self._list(server)
        except (ControlClosed, TmuxCommandError) as exc:
            logger.warning("tmux server refresh failed", extra={"account": server.account.name, "error": str(exc)})
            return
        finally:
            server.refreshing = False
        self._server_replaced(server)  # its sessions are lost, not exited, if it is a new server
        extra = listing.extra
        for sid, (tmux_id, pane, pid, window) in listing.sessions.items():
            rec = self._sessions.get(sid)
            if rec is not None and rec.account == acct:
                rec.tmux_id, rec.pane_id, rec.pid, rec.window_id = tmux_id, pane, pid, window
            elif sid not in self._creating:
                extra += 1
        self.extra_sessions[acct] = extra
        for sid in [s for s in self._by_account.get(acct, ()) if s not in listing.sessions]:
            if sid in self._creating or self._changed_at.get(sid, -1) > seq:
                continue  # created or killed while this listing was in flight
            self._ended(self._sessions[sid], "exited", "its shell exited")
        await self._stop_if_unused(acct)

    async def refresh(self, timeout_s: float | None = None) -> None:
        """Re-read every server, concurrently: a stopped one delays nobody (bounded by ``timeout_s``)."""
        tasks = [self._spawn(self._refresh_server(s), f"refresh-{a}") for a, s in list(self.servers.items())]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    def _schedule_refresh(self, server: UserServer) -> None:
        """Re-read one server soon: a burst of notifications (a user can make any number) makes one refresh."""
        if self._stopping or not self._started or server.refresh_pending:
            return
        server.refresh_pending = True

        async def run() -> None:
            await asyncio.sleep(0.02)
            server.refresh_pending = False
            await self._refresh_server(server)

        self._spawn(run(), f"refresh-{server.account.name}")

    async def _refresh_loop(self) -> None:
        """A safety net behind tmux's own notifications: every server re-read once per heartbeat interval, spread
        over it (a hundred servers at once held the event loop for tens of milliseconds)."""
        while not self._stopping:
            servers = list(self.servers.values())
            gap = self.settings.heartbeat_interval_s / max(1, len(servers))
            for server in servers:
                await asyncio.sleep(gap)
                if not server.refreshing and not server.stopping:
                    self._spawn(self._refresh_server(server), f"refresh-{server.account.name}")
            if not servers:
                await asyncio.sleep(self.settings.heartbeat_interval_s)

    def _ended(self, rec: SessionRec, state: str, reason: str, *, report: bool = True) -> None:
        """A session ended here on its own (``exited``: its shell exited; ``lost``: its server died): forget it,
        remember how (requests for it answer 410 saying so), and report it to the record -- until the record has
        it: a report that fails is sent again with the next heartbeat, never dropped."""
        if self._sessions.get(rec.session_id) is not rec:
            return
        self._drop(rec, state)
        self._remember(rec.session_id, state, reason)
        self._unreported[rec.session_id] = (state, reason)
        if self.registry is not None and not self._stopping and report:
            self._spawn(self._report_ended(), "report-ended")

    def _remember(self, sid: UUID, state: str, reason: str) -> None:
        self._gone[sid] = (state, reason)
        if len(self._gone) > GONE_MEMORY:
            for old in list(self._gone)[:GONE_MEMORY // 2]:
                del self._gone[old]

    async def _report_ended(self) -> None:
        if not self._unreported or self.registry is None:
            return
        batch = dict(self._unreported)
        try:
            await asyncio.to_thread(self.registry.sessions_ended, self.host_id, batch)
        except Exception as exc:
            ERRORS.labels(component="host", kind="report_ended").inc()
            logger.warning("could not record ended sessions; will retry", extra={"count": len(batch),
                                                                                 "error": str(exc)[:200]})
            return
        for sid, what in batch.items():
            if self._unreported.get(sid) == what:
                del self._unreported[sid]
        logger.info("sessions ended", extra={"count": len(batch)})

    async def _confirm(self) -> None:
        """Kill the tmux sessions the record does not have as held here (a create rolled back or moved to
        another host, a delete whose kill never reached this host)."""
        if self.registry is None:
            return
        present = {(sid, r.account) for sid, r in self._sessions.items() if sid not in self._creating}
        if not present:
            return
        seq = self._change_seq
        try:
            keep = await asyncio.to_thread(self.registry.confirm_sessions, self.host_id, present)
        except Exception as exc:
            logger.warning("could not confirm sessions with the record", extra={"error": str(exc)[:200]})
            return
        for sid, _ in present - {(k, self._sessions[k].account) for k in keep if k in self._sessions}:
            rec = self._sessions.get(sid)
            if rec is None or self._changed_at.get(sid, -1) > seq:
                continue  # created or ended while the record was asked
            logger.info("killing a tmux session the record no longer has here", extra={"session_id": str(sid)})
            with contextlib.suppress(errors.AppError):
                await self.kill_session(sid, reason="unconfirmed")

    async def _heartbeat_loop(self) -> None:
        """Only the registry: nothing a user's server does can delay it. Reports of ended sessions that failed
        go again; every CONFIRM_EVERY beats the host's sessions are confirmed with the record."""
        for beat in itertools.count(1):
            if self._stopping:
                return
            if self.registry is not None:
                try:
                    await asyncio.to_thread(self.registry.heartbeat, self.host_info())
                except Exception as exc:
                    ERRORS.labels(component="host", kind="heartbeat").inc()
                    logger.warning("registry heartbeat failed", extra={"error": str(exc)})
                if self._unreported:
                    await self._report_ended()
                await self._report_activity()
                if beat % CONFIRM_EVERY == 0:
                    await self._confirm()
            if self.settings.ecs_container_metadata_uri is not None:  # on ECS: sessions per task, for autoscaling
                with contextlib.suppress(Exception):
                    emit_sessions_metric(self.settings, len(self._sessions))
            if self.recorder is not None:  # a crash loses at most one interval of recordings; failed uploads retried
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.recorder.flush)
                    await asyncio.to_thread(self.recorder.retry_uploads)
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def _report_activity(self) -> None:
        """Sessions someone typed into (WebSocket keystrokes come here through `$default`, never through the API,
        which records the REST input it forwards) or has a viewer attached to, since the last beat: one batched
        report, which bumps their last_active_at, so idle cleanup does not end a session in use. A report that
        fails goes with the next beat."""
        report = getattr(self.registry, "sessions_active", None)
        if report is None:
            return
        ids = self._touched | {v.stream.session_id for v in self.live.viewers.values()}
        if not ids:
            return
        self._touched = set()
        try:
            await asyncio.to_thread(report, self.host_id, ids)
        except Exception as exc:
            self._touched |= ids
            logger.warning("activity report failed; sent again with the next heartbeat", extra={"error": str(exc)})

    def host_info(self) -> HostInfo:
        extra = {a: n for a, n in self.extra_sessions.items() if n}
        return HostInfo(self.host_id, self.settings.advertised_host_url, self.settings.host_capacity,
                        len(self._sessions), self.started_at, extra)

    def ended_how(self, session_id: UUID) -> tuple[str, str] | None:
        """(state, reason) of a session that ended here; None while it is held (or was never here)."""
        return None if session_id in self._sessions else self._gone.get(session_id)

    def _get(self, session_id: UUID) -> SessionRec:
        rec = self._sessions.get(session_id)
        if rec is None:
            gone = self._gone.get(session_id)
            if gone is not None:
                raise errors.SessionGone(f"session {session_id} has ended: {gone[1]}", state=gone[0],
                                         end_reason=gone[1])
            raise errors.NotFound(f"session {session_id} is not on this host")
        return rec

    def _mark_changed(self, uid: UUID) -> None:
        self._change_seq += 1
        self._changed_at[uid] = self._change_seq
        if len(self._changed_at) > 4096:
            for old in list(self._changed_at)[:2048]:
                del self._changed_at[old]

    def _add(self, rec: SessionRec, cols: int | None = None, rows: int | None = None) -> None:
        self._sessions[rec.session_id] = rec
        self._by_account.setdefault(rec.account, set()).add(rec.session_id)
        self.sessions_changed.set()
        self.live.started(rec.session_id, rec.account)
        if self.recorder is not None:
            self.recorder.start(rec.session_id, cols or self.settings.default_cols, rows or self.settings.default_rows)

    def _drop(self, rec: SessionRec, reason: str) -> None:
        if self._sessions.get(rec.session_id) is rec:
            del self._sessions[rec.session_id]
            held = self._by_account.get(rec.account)
            if held is not None:
                held.discard(rec.session_id)
                if not held:
                    del self._by_account[rec.account]
            self._mark_changed(rec.session_id)
            self.sessions_changed.set()
            SESSIONS_CLEANED.labels(host=self.host_id, reason=reason).inc()
            self._gauge.set(len(self._sessions))
            self._end_execs(rec)
            for files in rec.spares:
                self._discard(files)
            rec.spares.clear()
            if rec.echo is not None:
                rec.echo.close()
            # once the caller has remembered how it ended (_ended, kill_session): viewers told, recording finished
            asyncio.get_running_loop().call_soon(self._stream_ended, rec)

    def _stream_ended(self, rec: SessionRec) -> None:
        state, reason = self._gone.get(rec.session_id, ("exited", "its shell exited"))
        self.live.ended(rec.session_id, state, reason)
        if self.recorder is not None:
            self._spawn(asyncio.to_thread(self.recorder.finish, rec.session_id), "recording-finish")
        server = self.servers.get(rec.account)
        if state == "exited" and rec.window_id is not None and server is not None and server.alive:
            # its session is gone; if the user ended it with `tmux kill-session`, its window lives on in _out:
            # end it (nothing to do when the shell exited: the window went with it)
            fut = server.ctl.submit(f"kill-window -t {quote(rec.window_id)}")
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _in_use(self, account: int) -> bool:
        return bool(self._by_account.get(account)) or account in self._creating.values()

    async def _stop_if_unused(self, account: int) -> None:
        if account not in self.servers or self._in_use(account):
            return
        async with self._lock(account):  # a create for this account waits, then starts a new server
            if account in self.servers and not self._in_use(account):
                await self._stop_server(account)

    async def _stop_server(self, account: int) -> None:
        """The account has no session left: end its server and whatever it left running (its cgroup)."""
        server = self.servers.pop(account, None)
        if server is not None:
            await server.stop(kill=True)
        self.extra_sessions.pop(account, None)

    async def _run(self, rec: SessionRec, make: Callable[[SessionRec], list[str]]) -> list[list[str]]:
        """Run commands targeting a session; on "can't find" re-resolve its primary pane once (the first
        pane may have exited while the session lives on) or drop it and raise NotFound."""
        for attempt in (0, 1):
            server = await self._server(rec)
            results = await server.ctl.commands(make(rec))
            failure = next((r for r in results if isinstance(r, BaseException)), None)
            if failure is None:
                return results  # type: ignore[return-value]
            if isinstance(failure, ControlClosed):
                raise errors.HostUnavailable(failure.message) from failure
            if _not_found(failure):
                self._server_replaced(server)  # a server that died under this request: lost, not exited
                if attempt == 0 and self._sessions.get(rec.session_id) is rec and await self._reresolve(rec):
                    continue
                gone = self._gone.get(rec.session_id, ("exited", "its shell exited"))
                if self._sessions.get(rec.session_id) is rec:
                    self._ended(rec, *gone)
                raise errors.SessionGone(f"session {rec.session_id} has ended: {gone[1]}", state=gone[0],
                                         end_reason=gone[1]) from failure
            ERRORS.labels(component="host", kind="tmux_error").inc()
            raise errors.AppError(str(failure)) from failure
        raise AssertionError("unreachable")

    async def _reresolve(self, rec: SessionRec) -> bool:
        server = await self._server(rec)
        try:
            lines = await server.ctl.command(f"list-panes -s -t {quote(rec.tmux_id)} "
                                             "-F 'P#{window_index} #{pane_index} #{pane_id} #{pane_pid}'")
        except TmuxCommandError:
            self._ended(rec, "exited", "its shell exited")
            return False
        panes = sorted(
            (int(p[0][1:]), int(p[1]), p[2], int(p[3]))
            for p in (line.split(" ") for line in lines)
            if len(p) == 4 and p[0].startswith("P") and (p[0][1:] + p[1] + p[3]).isdigit()
        )
        if not panes or panes[0][2] == rec.pane_id:
            return False
        rec.pane_id, rec.pid = panes[0][2], panes[0][3]
        return True

    # --- sessions ----------------------------------------------------------------------------------
    @property
    def session_count(self) -> int:
        return len(self._sessions)

    async def create_session(self, session_id: UUID, account: int, cols: int, rows: int) -> dict[str, Any]:
        if session_id in self._sessions or session_id in self._creating:
            raise errors.Conflict(f"session {session_id} already exists on this host")
        if len(self._sessions) + len(self._creating) >= self.settings.host_capacity:
            raise HostFull("this tmux host is at capacity")
        if self.draining:
            raise HostFull("this tmux host is draining (it is being stopped)")
        name = "t" + session_id.hex
        self._creating[session_id] = account
        try:
            async with self._lock(account):
                server = await self._ensure_server(account)
                try:
                    lines = await server.ctl.command(
                        f"new-session -d -s {name} -x {int(cols)} -y {int(rows)} "
                        f"-c {quote(str(server.account.home))} -e TMUXI_SESSION_ID={session_id} "
                        "-P -F 'N#{session_id} #{window_id} #{pane_id} #{pane_pid}'"
                    )
                except TmuxCommandError as exc:
                    if "duplicate session" in exc.text:
                        raise errors.Conflict(f"session {session_id} already exists on this host") from exc
                    ERRORS.labels(component="host", kind="create_failed").inc()
                    logger.warning("tmux new-session failed", extra={"error": exc.text[:200]})
                    raise errors.AppError("tmux could not create the session") from exc
                except ControlClosed as exc:
                    raise errors.HostUnavailable(exc.message) from exc
                parts = next((ln.split(" ") for ln in lines if ln.startswith("N$")), None)
                if parts is None or len(parts) != 4 or not parts[3].isdigit():
                    raise errors.AppError("unexpected reply from tmux new-session")
                rec = SessionRec(session_id, account, name, parts[0][1:], parts[2], int(parts[3]), window_id=parts[1])
                self._add(rec, cols, rows)
                self._mark_changed(session_id)
                if server.out is not None and server.out.alive:  # its output reaches the output client
                    try:
                        await server.ctl.command(self._link_command(rec))
                    except (TmuxCommandError, ControlClosed) as exc:
                        logger.warning("could not link a session's window for its output",
                                       extra={"session_id": str(session_id), "error": str(exc)[:200]})
        finally:
            self._creating.pop(session_id, None)
        SESSIONS_CREATED.labels(host=self.host_id).inc()
        self._gauge.set(len(self._sessions))
        self._replenish(rec)  # its first exec's files
        return {"session_id": str(session_id), "account": account, "tmux_name": name, "pane_id": rec.pane_id,
                "pid": rec.pid}

    async def end_all(self, state: str, reason: str) -> int:
        """The host must go with sessions still open (drain.py): each is recorded ``state`` with ``reason``, its
        viewers told, its recording finished, and its user's tmux server ended. Returns how many."""
        recs = list(self._sessions.values())
        for rec in recs:
            self._ended(rec, state, reason, report=False)  # one report for all of them, below
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._report_ended(), 5.0)  # failed: sent again by stop()
        await asyncio.gather(*(self._stop_if_unused(a) for a in {rec.account for rec in recs}),
                             return_exceptions=True)
        return len(recs)

    async def list_sessions(self) -> list[dict[str, Any]]:
        await self.refresh(timeout_s=1.0)
        return [rec.public() for rec in self._sessions.values()]

    async def kill_session(self, session_id: UUID, *, reason: str = "killed") -> None:
        rec = self._get(session_id)
        server = await self._server(rec)
        self._end_execs(rec)  # its background jobs, which its shell going away would not end
        # its window first: linked into _out as well, it would outlive the session (and its shell with it)
        lines = ([f"kill-window -t {quote(rec.window_id)}"] if rec.window_id else []) + \
            [f"kill-session -t {quote(rec.tmux_id)}"]
        for result in await server.ctl.commands(lines):
            if isinstance(result, ControlClosed):
                raise errors.HostUnavailable(result.message) from result
            if isinstance(result, TmuxCommandError) and not _not_found(result):
                raise errors.AppError(str(result)) from result
        self._drop(rec, reason)
        self._remember(session_id, "deleted", "it was deleted")
        self._spawn(self._stop_if_unused(rec.account), f"stop-{rec.account}")

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
            bad = [k for k in keys if not isinstance(k, str) or not KEY_NAME.fullmatch(k)]
            if bad:
                raise errors.BadRequest(f"unknown key names: {bad[:5]}")
            for off in range(0, len(keys), 128):
                lines.append(f"send-keys -t {target} " + " ".join(keys[off:off + 128]))
        return lines

    def _check_backlog(self, rec: SessionRec) -> None:
        """Text for a program that does not read it piles up in the user's tmux server: refuse more once the
        server holds ``user_tmux_memory_mb`` (keys such as C-c still pass)."""
        server = self.servers.get(rec.account)
        used = server.memory_used() if server is not None else None
        limit = self.settings.user_tmux_memory_mb << 20
        if used is not None and used > limit:
            raise errors.InputBacklog(
                f"this user's tmux server holds {used >> 20} MB (limit {limit >> 20} MB): a program is not reading "
                "its input. Send keys (C-c) to stop it, or delete sessions."
            )

    async def send_input(self, session_id: UUID, data: bytes | None = None, keys: list[str] | None = None) -> None:
        rec = self._get(session_id)
        self._touched.add(session_id)
        if data is not None and len(data) > self.settings.max_input_bytes:
            raise errors.PayloadTooLarge(f"input is over {self.settings.max_input_bytes} bytes")
        if data:
            self._check_backlog(rec)
        if data is not None and len(data) >= PASTE_MIN:
            self.input_commands(rec.pane_id, None, keys)  # validate keys before anything is sent
            await self._paste(rec, data, keys)
            return
        lines = self.input_commands(rec.pane_id, data, keys)  # validates keys before anything is sent
        if not lines:
            return
        if len(lines) == 1:  # fast path: one round trip, no list/gather overhead
            server = self.servers.get(rec.account)
            if server is not None and server.alive:
                try:
                    await server.ctl.command(lines[0])
                    return
                except TmuxCommandError as exc:
                    if not _not_found(exc):
                        raise errors.AppError(str(exc)) from exc
                except ControlClosed:
                    pass
        await self._run(rec, lambda r: self.input_commands(r.pane_id, data, keys))

    def _exchange(self, rec: SessionRec) -> Path:
        server = self.servers.get(rec.account)
        if server is None:
            raise errors.HostUnavailable("the session's tmux server is not running")
        return server.exchange_dir

    async def _paste(self, rec: SessionRec, data: bytes, keys: list[str] | None) -> None:
        n = next(self._counter)
        buf = f"tmuxi_i{n}"
        await self._server(rec)
        path = self._exchange(rec) / f"i{n}-{uuid4().hex}"
        make_file(path, data)
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
                    server = self.servers.get(rec.account)
                    if server is not None and server.alive:
                        await server.ctl.commands([f"delete-buffer -b {buf}"])

    # --- screen ------------------------------------------------------------------------------------
    async def screen(self, session_id: UUID, *, escapes: bool = False, history: int = 0,
                     at_capture: Callable[[], None] | None = None) -> ScreenResponse:
        """The pane's screen. With ``at_capture`` (a live snapshot): captured through the output client, and
        ``at_capture`` called the moment the capture's reply is read there -- after exactly the output tmux had
        sent before it captured, so the stream's position then is where the screen leaves off."""
        rec = self._get(session_id)
        history = max(0, min(int(history), HISTORY_LIMIT))
        n = next(self._counter)
        buf = f"tmuxi_c{n}"
        server = await self._server(rec)
        path = self._exchange(rec) / f"c{n}-{uuid4().hex}"
        make_file(path, mode=0o622)  # the account's tmux writes it; only the host could have made it

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
            if at_capture is None:
                results = await self._run(rec, make)
            else:
                results = await self._on_output_client(server, make(rec), at_capture)
            raw = await asyncio.to_thread(read_private_file, path, MAX_SCREEN_BYTES)
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        info = next((ln for ln in results[3] if ln.startswith("V")), "V0 0 0 0")[1:].split(" ")
        cx, cy, w, h = (int(x) if x.isdigit() else 0 for x in (info + ["0"] * 4)[:4])
        text = raw.decode("utf-8", errors="replace")
        if text.endswith("\n"):
            text = text[:-1]
        return ScreenResponse(text=text, cols=w, rows=h, cursor_x=cx, cursor_y=cy, escapes=escapes)

    async def _on_output_client(self, server: UserServer, lines: list[str],
                                at_first_reply: Callable[[], None]) -> list[list[str]]:
        out = server.out
        if out is None or not out.alive:
            raise errors.HostUnavailable("the session's output is not being read (its output client is down)")
        futs = [out.submit(line, at_reply=at_first_reply if i == 0 else None) for i, line in enumerate(lines)]
        replies = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), self.settings.control_timeout_s)
        failure = next((r for r in replies if isinstance(r, BaseException)), None)
        if isinstance(failure, ControlClosed):
            raise errors.HostUnavailable(failure.message) from failure
        if failure is not None:
            if _not_found(failure):  # its shell exited a moment ago: re-read the server (it ends the session)
                self._schedule_refresh(server)
            raise errors.AppError(str(failure)) from failure
        return replies  # type: ignore[return-value]

    async def pane_size(self, session_id: UUID) -> tuple[int, int]:
        rec = self._get(session_id)
        (lines,) = await self._run(rec, lambda r: [
            f"display-message -p -t {quote(r.pane_id)} 'S#{{pane_width}} #{{pane_height}}'"])
        found = next((ln[1:].split(" ") for ln in lines if ln.startswith("S")), ["0", "0"])
        return (int(found[0]), int(found[1])) if len(found) == 2 and "".join(found).isdigit() else (0, 0)

    async def resize(self, session_id: UUID, cols: int, rows: int) -> None:
        rec = self._get(session_id)
        cols, rows = int(cols), int(rows)
        (lines,) = await self._run(rec, lambda r: [f"list-windows -t {quote(r.tmux_id)} -F 'W#{{window_id}}'"])
        window_ids = [ln[1:] for ln in lines if re.fullmatch(r"W@[0-9]+", ln)]

        def make(r: SessionRec) -> list[str]:
            # resize-window also sets window-size=manual on that window; default-size sizes new windows.
            return [f"set-option -t {quote(r.tmux_id)} default-size {cols}x{rows}"] + [
                f"resize-window -t {quote(w)} -x {cols} -y {rows}" for w in window_ids
            ]

        await self._run(rec, make)
        if self.recorder is not None:
            self.recorder.resize(session_id, cols, rows)

    # --- exec --------------------------------------------------------------------------------------
    # Finished execs a session remembers (for their final poll), and background execs it may run at once.
    EXECS_KEPT = 32
    BACKGROUND_MAX = 8

    async def _shell_ready(self, rec: SessionRec, deadline: float) -> bool:
        """The shell is at its prompt. A session created a moment ago whose shell has not taken its terminal
        yet is waited for (within the exec's own timeout), and then for its first prompt to be drawn (or a second:
        a shell whose startup files dropped the prompt mark); a session running a program is not."""
        state = await self._shell_state(rec)
        while state == "starting" and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            state = await self._shell_state(rec)
        if state == "prompt" and not rec.prompted:
            # Its first prompt drawn (the cursor has left the top left corner; its mark may have come before the
            # host read the pane's output): typed before, a line is echoed by the terminal, not the line editor.
            until = min(deadline, time.monotonic() + 1.0)
            while rec.prompts == 0 and time.monotonic() < until:
                (lines,) = await self._run(rec, lambda r: [
                    f"display-message -p -t {quote(r.pane_id)} 'C#{{cursor_x}} #{{cursor_y}}'"])
                if _two_ints(lines, "C") != (0, 0):
                    break
                await asyncio.sleep(0.005)
            rec.prompted = True
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

    async def exec(self, session_id: UUID, command: str, timeout_s: float | None = None, *,
                   on_timeout: str = "background", background: bool = False, streams: str = "split",
                   encoding: str = "utf-8", max_output_bytes: int | None = None,
                   exec_id: str | None = None) -> ExecResult:
        rec = self._get(session_id)
        self._touched.add(session_id)
        encoded = command.encode("utf-8", errors="surrogateescape")
        if len(encoded) > self.settings.max_command_bytes:
            raise errors.PayloadTooLarge(f"command is over {self.settings.max_command_bytes} bytes")
        timeout = self.settings.exec_timeout_default_s if timeout_s is None else float(timeout_s)
        timeout = max(0.01, min(timeout, self.settings.exec_timeout_max_s))
        cap = min(max_output_bytes or self.settings.exec_max_output_bytes, self.settings.exec_max_output_bytes)
        # Starting execs in one session is serialized (each types a line); waiting counts against the timeout.
        waited = time.monotonic()
        try:
            async with asyncio.timeout(timeout):  # (a free lock is taken without a turn of the loop)
                await rec.exec_lock.acquire()
        except TimeoutError:
            raise errors.SessionBusy("another exec is still starting in this session") from None
        try:
            fg = rec.foreground
            if fg is not None and fg.running:
                raise errors.SessionBusy(
                    f"exec {fg.id} is still running in this session's foreground: poll it (GET .../execs/{fg.id}), "
                    f"send it input, or stop it (DELETE .../execs/{fg.id})")
            if background and sum(j.running and j.background for j in rec.execs.values()) >= self.BACKGROUND_MAX:
                raise errors.SessionBusy(f"{self.BACKGROUND_MAX} background execs are running in this session: "
                                         "stop one first")
            if not await self._shell_ready(rec, deadline=waited + timeout):
                raise errors.SessionBusy("the session's shell is not at a prompt (a program is running)")
            if exec_id is not None and exec_id in rec.execs:
                raise errors.Conflict(f"exec {exec_id} already exists in this session")
            job = await self._start_exec(rec, command, encoded, cap, background=background,
                                         merged=streams == "merged", encoding=encoding,
                                         deadline=waited + timeout, exec_id=exec_id)
        finally:
            rec.exec_lock.release()
        remaining = timeout - (time.monotonic() - waited)
        if remaining > 0:
            await asyncio.wait([job.done], timeout=remaining)  # (the job goes on at the timeout)
        if job.running and on_timeout == "kill":
            TIMEOUTS.labels(component="host", operation="exec").inc()
            job.killed = True
            await self._stop_exec(rec, job, steps=("int", "term", "kill"))
        return job.result(0, 0)

    async def _start_exec(self, rec: SessionRec, command: str, script: bytes, cap: int, *, background: bool,
                          merged: bool, encoding: str, deadline: float, exec_id: str | None = None) -> ExecJob:
        await self._server(rec)
        self._prune_execs(rec)
        directory = self._exchange(rec)
        # The files made ahead are for the usual exec (foreground, split); the oldest first. None ready (execs one
        # straight after another, faster than the files thread makes them): made here, not waited for.
        ahead = not (background or merged)
        files = rec.spares.pop(0) if ahead and rec.spares else None
        if ahead and not rec.spares:
            self._replenish(rec)  # the last one taken (execs in a burst): the next now, not after this one
        if files is None:
            files = ChannelFiles.make(directory, merged=merged, background=background,
                                      history=command if background else None)
        channel = ExecChannel(files, cap)
        xid = exec_id or channel.id
        job = ExecJob(xid, command, background, channel, encoding)
        try:
            channel.open(script, history=command)
            echo = await self._terminal(rec)
            typed = channel.typed_line()
            rec.execs[xid] = job
            if not background:
                rec.foreground = job
            # One write to tmux: a half-typed line the user left at the prompt is cleared first (end of line, kill
            # to its start: readline's keys, and the terminal's own line kill where there is no line editor),
            # never glued to ours; where the line starts is noted (to show the command there instead); ours typed.
            (_, where, *_) = await self._run(rec, lambda r: [
                f"send-keys -t {quote(r.pane_id)} C-e C-u",
                f"display-message -p -t {quote(r.pane_id)} 'C#{{cursor_x}} #{{pane_width}}'",
                *self.input_commands(r.pane_id, typed)])
            job.prompts = rec.prompts
            if echo is not None:
                col, width = _two_ints(where, "C")
                channel.show(echo, command_line(command, background, col, width, len(typed) - 1))
        except BaseException:
            rec.execs.pop(xid, None)
            if rec.foreground is job:
                rec.foreground = None
            channel.close()
            raise
        self._spawn(self._follow(rec, job), f"exec-{xid}")
        if background:
            self._shell_ids(rec)
            # the shell is back at its prompt once it has started the job (it says so with the job's pid)
            while channel.pgid is None and not job.done.done() and time.monotonic() < deadline:
                await asyncio.wait([job.done], timeout=0.02)
        return job

    # Sets of exec files a session keeps made ahead: two, so that an exec that follows another at once (an agent's
    # loop) still finds one, made while the one before ran.
    SPARES = 2

    def _replenish(self, rec: SessionRec) -> None:
        """Make the session's next exec's files ahead, in a thread (``ChannelFiles``: off every exec's path)."""
        server = self.servers.get(rec.account)
        if len(rec.spares) >= self.SPARES or rec.spare_making is not None or server is None or self._stopping:
            return

        async def make() -> None:
            try:
                while len(rec.spares) < self.SPARES:
                    files = await in_files_thread(ChannelFiles.make, server.exchange_dir)
                    if self._sessions.get(rec.session_id) is not rec or self._stopping:
                        self._discard(files)
                        return
                    rec.spares.append(files)
            except OSError as exc:  # the next exec makes its own, and says what is wrong if it cannot
                logger.warning("exec files not made ahead", extra={"session_id": str(rec.session_id),
                                                                   "error": str(exc)[:200]})
            finally:
                rec.spare_making = None

        rec.spare_making = self._spawn(make(), "exec-spare")

    @staticmethod
    def _discard(files: ChannelFiles) -> None:
        in_files_thread(files.remove, dict(files.fds))

    async def _follow(self, rec: SessionRec, job: ExecJob) -> None:
        """Until the exec ends: its status, then the rest of its output, then the shell let go on."""
        ch = job.channel
        try:
            if job.background:
                status = await self._wait_job(rec, ch)
            else:
                status = await self._wait_status(rec, ch, float("inf"), prompts=job.prompts)
            await ch.drain(0.05)
            if ch.erase is not None and rec.echo is not None:
                rec.echo.write(ch.erase)
            ch.ack()
            ended = not self._shell_alive(rec) or (status is not None and status[1])
            job.finish(None if status is None else status[0], ended)
            if ended and not job.background:
                await self._shell_gone(rec)
        except asyncio.CancelledError:
            job.finish(None, not self._shell_alive(rec))
            raise
        except Exception:
            logger.exception("exec follow-up failed", extra={"session_id": str(rec.session_id), "exec_id": job.id})
            job.finish(None, False)
        finally:
            if rec.foreground is job:
                rec.foreground = None
            # Its files' removal and the next exec's set (both in the files thread): once this exec's answer has gone
            # out -- written within a fraction of a millisecond of the job's end -- not while it is being written,
            # the two taking turns at the interpreter lock (measured: 0.1-0.2 ms p50 more on the exec's path).
            self._spawn(self._tidy(rec, job), f"exec-tidy-{job.id}")

    TIDY_AFTER_S = 0.002

    async def _tidy(self, rec: SessionRec, job: ExecJob) -> None:
        try:
            if not self._stopping:
                await asyncio.sleep(self.TIDY_AFTER_S)
        finally:  # at once when the host stops (the task is cancelled)
            job.channel.close()
            if not job.background:
                self._replenish(rec)  # the next exec's files: made now, between execs, not during one

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

    async def _shell_gone(self, rec: SessionRec, within_s: float = 2.0) -> None:
        """The shell is exiting (its EXIT trap answered): wait for it to be gone, then forget the session."""
        deadline = time.monotonic() + within_s
        while self._shell_alive(rec) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        server = self.servers.get(rec.account)
        if server is not None:
            self._schedule_refresh(server)  # drops it and reports it exited

    async def _wait_job(self, rec: SessionRec, ch: ExecChannel) -> tuple[int | None, bool] | None:
        """A background job's status, written by the job itself when it ends (its wrapper outlives every signal but
        SIGKILL: a job gone without a word was killed, 137); None if its shell went first."""
        while not ch.rc.done():
            if not self._shell_alive(rec):
                self._signal_job(rec, ch, signal.SIGHUP)  # its session is over: so is the job
                await asyncio.wait([ch.rc], timeout=0.2)
                break
            if ch.pgid is not None and not _alive(ch.pgid):
                await asyncio.wait([ch.rc], timeout=0.05)
                return ch.rc.result() if ch.rc.done() else (128 + signal.SIGKILL, False)
            await asyncio.wait([ch.rc], timeout=0.2)
        return ch.rc.result() if ch.rc.done() else None

    def _prune_execs(self, rec: SessionRec) -> None:
        done = [k for k, j in rec.execs.items() if not j.running]
        for k in done[: max(0, len(rec.execs) - self.EXECS_KEPT + 1)]:
            del rec.execs[k]

    def _job(self, session_id: UUID, exec_id: str) -> tuple[SessionRec, ExecJob]:
        rec = self._get(session_id)
        job = rec.execs.get(exec_id)
        if job is None:
            raise errors.ExecNotFound(f"no exec {exec_id!r} in this session (finished execs are kept for a while: "
                                  f"the last {self.EXECS_KEPT})")
        return rec, job

    def list_execs(self, session_id: UUID) -> list[dict[str, Any]]:
        rec = self._get(session_id)
        return [j.info() for j in rec.execs.values()]

    async def poll_exec(self, session_id: UUID, exec_id: str, cursor: str = "", wait_s: float = 0.0) -> ExecResult:
        """The exec's output after ``cursor`` (never repeated), waiting up to ``wait_s`` for some or for its end."""
        rec, job = self._job(session_id, exec_id)
        self._touched.add(session_id)
        out_at, err_at = parse_cursor(cursor)
        deadline = time.monotonic() + max(0.0, min(wait_s, self.settings.exec_timeout_max_s))
        ch = job.channel
        while job.running and ch.stdout.total <= out_at and ch.stderr.total <= err_at:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ch.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ch.changed.wait(), remaining)
        return job.result(out_at, err_at)

    async def exec_input(self, session_id: UUID, exec_id: str, data: bytes, *, eof: bool = False) -> None:
        rec, job = self._job(session_id, exec_id)
        if not job.running:
            raise errors.Conflict(f"exec {exec_id} has ended (exit code {job.exit_code})")
        if len(data) > self.settings.max_input_bytes:
            raise errors.PayloadTooLarge(f"input is over {self.settings.max_input_bytes} bytes")
        if not job.background:  # the foreground command reads the terminal, as typed there
            await self.send_input(session_id, data=data or None, keys=["C-d"] if eof else None)
            return
        if data:
            written = job.channel.write_stdin(data)
            if written < len(data):
                raise errors.InputBacklog(f"the command is not reading its input: {max(written, 0)} of {len(data)} "
                                          "bytes taken; send the rest later")
        if eof:
            job.channel.close_stdin()

    async def signal_exec(self, session_id: UUID, exec_id: str, name: str) -> None:
        rec, job = self._job(session_id, exec_id)
        if not job.running:
            raise errors.Conflict(f"exec {exec_id} has ended (exit code {job.exit_code})")
        sig = signal.Signals[f"SIG{name}"]
        if job.background:
            self._signal_job(rec, job.channel, sig)
        elif sig == signal.SIGINT:  # as Ctrl-C at the terminal: the shell learns of it too
            await self._run(rec, lambda r: [f"send-keys -t {quote(r.pane_id)} C-c"])
        else:
            self._signal_foreground(rec, sig)

    async def stop_exec(self, session_id: UUID, exec_id: str, grace_s: float = 2.0) -> ExecResult:
        """SIGTERM, then SIGKILL after ``grace_s`` -- for a command in the foreground, Ctrl-C first, as at a terminal
        (the only stop for a loop the shell runs itself) -- and answer once it has ended, with all of its output."""
        rec, job = self._job(session_id, exec_id)
        if job.running:
            steps = ("term", "kill") if job.background else ("int", "term", "kill")
            await self._stop_exec(rec, job, steps=steps, grace_s=grace_s)
        return job.result(0, 0)

    async def _stop_exec(self, rec: SessionRec, job: ExecJob, steps: tuple[str, ...], grace_s: float = 1.0) -> None:
        for step in steps:
            if job.background:
                self._signal_job(rec, job.channel, signal.SIGTERM if step == "term" else
                                 signal.SIGKILL if step == "kill" else signal.SIGINT)
            elif step == "int":
                with contextlib.suppress(errors.AppError):
                    await self._run(rec, lambda r: [f"send-keys -t {quote(r.pane_id)} C-c"])
            else:
                self._signal_foreground(rec, signal.SIGTERM if step == "term" else signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(job.done), grace_s if step != "kill" else 0.5)
            if not job.running:
                return
        if not job.background and rec.pid is not None and shell_state(rec.pid) == "prompt" and job.channel.started:
            # stopped, and its shell back at its prompt without a word (one that draws no prompt mark): ask it
            await self._recover(rec, job.channel)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(job.done), 1.0)

    def _signal_job(self, rec: SessionRec, ch: ExecChannel, sig: signal.Signals) -> None:
        """Signal a background job's process group -- as its shell reported it, so only once it is verified to be
        a process group of this session's shell (same session id) owned by the session's account."""
        pgid, ids = ch.pgid, self._shell_ids(rec)
        if pgid is None or ids is None or pgid <= 1:
            return
        try:
            leader = Path(f"/proc/{pgid}/stat").read_bytes().rsplit(b")", 1)[1].split()
            if (int(leader[3]), os.stat(f"/proc/{pgid}").st_uid) != ids:
                return  # not a job of this shell's session (or not the account's): never signalled
            if int(leader[2]) == pgid:
                os.killpg(pgid, sig)
            else:  # job control off in that shell: the job has no group of its own
                os.kill(pgid, sig)
        except (OSError, ValueError, IndexError):
            return

    @staticmethod
    def _shell_ids(rec: SessionRec) -> tuple[int, int] | None:
        """The (session id, uid) of the session's shell, noted while it lives: its jobs are signalled by them even
        once it is gone (a session ends by its shell going first)."""
        if rec.shell_ids is None and rec.pid is not None:
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat_ = Path(f"/proc/{rec.pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
                rec.shell_ids = (int(stat_[3]), os.stat(f"/proc/{rec.pid}").st_uid)
        return rec.shell_ids

    def _end_execs(self, rec: SessionRec) -> None:
        """The session is over: so are its background jobs (a shell going away does not end those it disowned)."""
        for job in rec.execs.values():
            if job.running and job.background:
                self._signal_job(rec, job.channel, signal.SIGKILL)

    async def _terminal(self, rec: SessionRec) -> TerminalEcho | None:
        """The session's terminal, open for writing what exec shows there. Only a pseudo-terminal owned by the
        session's own account (what tmux names could be anything: the user runs that tmux server)."""
        if rec.echo is not None:
            return rec.echo if rec.echo.fd >= 0 else None
        (lines,) = await self._run(rec, lambda r: [f"display-message -p -t {quote(r.pane_id)} 'T#{{pane_tty}}'"])
        path = next((ln[1:] for ln in lines if ln.startswith("T")), "")
        server = self.servers.get(rec.account)
        owner = server.account.uid if server is not None and self._iso().accounts else os.geteuid()
        fd = -1
        if re.fullmatch(r"/dev/pts/[0-9]{1,7}", path):
            try:
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
                except PermissionError:
                    # A pseudo-terminal is its user's, 0600 (or 0620, group tty). The host is not that user and has
                    # no DAC override: its group is given write access, as `mesg y` gives group tty (no other account
                    # is in the host's group). Only one owned by the session's account.
                    st = os.stat(path)
                    if not stat.S_ISCHR(st.st_mode) or st.st_uid != owner:
                        raise
                    os.chown(path, -1, os.getegid())
                    os.chmod(path, 0o620)
                    fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
                st = os.fstat(fd)
                if not stat.S_ISCHR(st.st_mode) or st.st_uid != owner:
                    os.close(fd)
                    fd = -1
            except OSError as exc:
                logger.warning("cannot open the session's terminal: exec output is not shown there",
                               extra={"session_id": str(rec.session_id), "error": str(exc)})
                fd = -1
        rec.echo = TerminalEcho(fd)
        return rec.echo if fd >= 0 else None

    async def _wait_status(self, rec: SessionRec, channel: ExecChannel, deadline: float, *, prompts: int,
                           recover: bool = True) -> tuple[int | None, bool] | None:
        """The command's (exit status, shell exiting) as soon as it is known; None at the deadline.

        Known when the shell writes it (after the command, or from its EXIT trap); or, for a command a signal
        ended (Ctrl-C through /input, `kill -INT`), once the shell is back at its prompt without having written
        it -- the interactive shell drops the rest of the wrapper then -- by asking it for ``$?`` (``recovery``).
        Back at its prompt: it drew one (a prompt mark more than the ``prompts`` seen when the line was typed) and
        leads the terminal again. (A shell without the mark: the old guess, at its prompt for a while.)
        A shell gone without a word (killed): (None, True)."""
        seen_busy = False
        prompt_since: float | None = None
        recovered = False
        retyped = not recover
        typed_at = time.monotonic()
        # most commands are done within this: their status comes before any look at the shell is needed
        await asyncio.wait([channel.rc], timeout=max(0.0, min(0.02, deadline - typed_at)))
        while True:
            if channel.rc.done():
                return channel.rc.result()
            if not self._shell_alive(rec):
                await asyncio.wait([channel.rc], timeout=0.05)  # its EXIT trap may still be writing
                return channel.rc.result() if channel.rc.done() else (None, True)
            state = shell_state(rec.pid) if rec.pid is not None else "busy"
            now = time.monotonic()
            if state == "prompt" and not channel.started and not seen_busy and not retyped \
                    and now - typed_at >= self.UNSTARTED_S:
                # Still at the prompt and the wrapper never began: the shell took it as more of an unfinished
                # command the user left (an open quote, a trailing backslash). Ctrl-C drops that whole command,
                # ours inside it; then the line is typed once more -- only if it still has not begun.
                retyped = True
                await self._abandon_pending_input(rec, channel)
                typed_at = time.monotonic()
                continue
            if state == "busy":
                seen_busy, prompt_since = True, None
            elif state == "prompt" and channel.started and recover and not recovered:
                # Back at its prompt with no status written: ask for it. With the prompt mark, once it is drawn;
                # without, soon after a job was seen running -- never while the shell itself is what runs (a loop
                # of builtins would read the question as its input): stopping the exec asks then.
                prompt_since = prompt_since or now
                if rec.prompts > prompts or (rec.prompts == 0 and seen_busy and now - prompt_since >= 0.05):
                    recovered = True
                    await self._recover(rec, channel)
            remaining = deadline - now
            if remaining <= 0:
                return None
            await asyncio.wait([channel.rc], timeout=min(0.02 if prompt_since else 0.05, remaining))

    # How long the shell may sit at its prompt without beginning the wrapper before it is taken to have read it as
    # part of an unfinished command (the wrapper's first act, a builtin, takes well under a millisecond).
    UNSTARTED_S = 0.3

    async def _recover(self, rec: SessionRec, channel: ExecChannel) -> None:
        """Type the recovery line (``ExecChannel.recovery``), noting where it begins so that it is erased once it has
        run: the terminal shows the interrupted command and the next prompt, not machinery."""
        typed = channel.recovery()
        with contextlib.suppress(errors.AppError):
            (where, *_) = await self._run(rec, lambda r: [
                f"display-message -p -t {quote(r.pane_id)} 'C#{{cursor_x}} #{{pane_width}}'",
                *self.input_commands(r.pane_id, typed)])
            channel.erase = erase_line(*_two_ints(where, "C"), len(typed) - 1)

    async def _abandon_pending_input(self, rec: SessionRec, channel: ExecChannel) -> None:
        logger.info("exec line absorbed by unfinished input; clearing it", extra={"session_id": str(rec.session_id)})
        with contextlib.suppress(errors.AppError):
            await self._run(rec, lambda r: [f"send-keys -t {quote(r.pane_id)} C-c"])
        await asyncio.sleep(0.05)  # the shell redraws its prompt
        await self._back_at_prompt(rec, 1.0)
        if not channel.started and not channel.rc.done():
            typed = channel.typed_line()
            with contextlib.suppress(errors.AppError):
                await self._run(rec, lambda r: self.input_commands(r.pane_id, typed))

    async def _back_at_prompt(self, rec: SessionRec, within_s: float) -> bool:
        deadline = time.monotonic() + within_s
        while self._shell_alive(rec):
            if rec.pid is not None and shell_state(rec.pid) == "prompt":
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True  # gone: nothing left to stop

    def _signal_foreground(self, rec: SessionRec, sig: signal.Signals) -> None:
        """Signal the terminal's foreground process group -- only one of this session's own (same session id
        as its shell), never the shell itself."""
        if rec.pid is None:
            return
        try:
            fields = Path(f"/proc/{rec.pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
            tpgid, sid = int(fields[5]), int(fields[3])
            if tpgid <= 0 or tpgid == rec.pid:
                return
            leader = Path(f"/proc/{tpgid}/stat").read_bytes().rsplit(b")", 1)[1].split()
            if int(leader[3]) != sid:
                return  # not a job of this shell's session
            os.killpg(tpgid, sig)
        except (OSError, ValueError, IndexError):
            return

    # --- send and wait -----------------------------------------------------------------------------
    async def send_and_wait(self, session_id: UUID, data: bytes | None, keys: list[str] | None, *, until: str,
                            timeout_s: float, quiet_ms: int = 300, pattern: str | None = None) -> InputWaitResult:
        """Send input, then wait until the shell is back at its prompt, the screen has been quiet for
        ``quiet_ms``, or ``pattern`` is on the screen; answer with the screen (``matched`` false at the timeout).

        The prompt is known from the mark the shell prints before each prompt (OSC 133;A, the terminals' "semantic
        prompt", from the PROMPT_COMMAND the host gives every shell); for a shell that dropped it, from the shell
        being in the foreground with no output for 50 ms."""
        rec = self._get(session_id)
        rx = None
        if pattern is not None:
            try:
                rx = regex.compile(pattern)
            except regex.error as exc:
                raise errors.InvalidField("body.wait.pattern", f"not a valid regular expression: {exc}") from None
        started = time.monotonic()
        deadline = started + max(0.0, min(timeout_s, self.settings.exec_timeout_max_s))
        prompts = rec.prompts
        waiter = rec.output_changed
        await self.send_input(session_id, data=data, keys=keys)
        sent = time.monotonic()
        matched = False
        while True:
            now = time.monotonic()
            if until == "prompt":
                if rec.prompts > prompts:
                    # the mark comes just before the prompt itself: let that be drawn (no output for 2 ms)
                    matched = now - rec.last_output >= 0.002
                elif rec.prompts == 0 and rec.pid is not None and shell_state(rec.pid) == "prompt":
                    matched = rec.last_output > sent and now - rec.last_output >= 0.05
            elif until == "quiet":
                matched = now - max(rec.last_output, sent) >= quiet_ms / 1000
            else:
                screen = await self.screen(session_id)
                try:
                    # in a thread, the GIL released (`concurrent`): a costly pattern never holds the event loop
                    matched = rx is not None and await asyncio.to_thread(
                        rx.search, screen.text, concurrent=True, timeout=0.05) is not None
                except TimeoutError:
                    raise errors.InvalidField("body.wait.pattern", "the pattern takes too long to match "
                                                                   "(over 50 ms on one screen): simplify it") from None
                if matched:
                    return InputWaitResult(matched=True, waited_ms=round((time.monotonic() - started) * 1000, 3),
                                           screen=screen)
            if matched or now >= deadline:
                break
            step = 0.002 if until == "prompt" and rec.prompts > prompts else 0.05
            if until == "quiet":
                step = max(0.001, max(rec.last_output, sent) + quiet_ms / 1000 - now)
            if until == "pattern":  # a screen read and a match at most every 50 ms, however much output comes
                await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
                continue
            waiter.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), min(step, max(0.0, deadline - now)))
        screen = await self.screen(session_id)
        return InputWaitResult(matched=matched, waited_ms=round((time.monotonic() - started) * 1000, 3), screen=screen)

    # --- health ------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        servers = list(self.servers.values())
        alive = sum(1 for s in servers if s.alive)
        iso = self.isolation
        status = "ok" if iso is not None else "down"
        if iso is not None and not iso.accounts:
            status = "degraded"  # development without isolation: say so wherever anyone looks
        return {"status": status, "host_id": self.host_id, "sessions": len(self._sessions), "draining": self.draining,
                "capacity": self.settings.host_capacity,
                "servers": {"running": len(servers), "connected": alive},
                "isolation": iso.describe() if iso is not None else None}
