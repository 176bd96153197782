"""One user's tmux server on this host: started as the user's account, driven through one control-mode client,
supervised (reconnected when the connection drops), stopped when the user has no session left.

Everything that comes back from it is the user's to forge: the server runs as the user, who can stop it, kill it,
or replace it with a program of their own on the same socket. The host only asks it about that user's sessions,
bounds every wait on it (``control_timeout_s``), and checks what it says against its own records.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from tmux_host.accounts import Account, Isolation, ensure_dir
from tmux_host.control import OUT_SESSION, ControlClient, ControlClosed, OutputCallback, TmuxCommandError, quote
from tmuxi.observability import ERRORS, logger
from tmuxi.settings import Settings

HISTORY_LIMIT = 5000
RSS_SAMPLE_S = 0.1


def default_terminal() -> str:
    """tmux-256color when its terminfo entry is installed, else the always-available screen-256color."""
    for d in ("/usr/share/terminfo", "/lib/terminfo", "/etc/terminfo", "/usr/lib/terminfo"):
        if Path(f"{d}/t/tmux-256color").exists():
            return "tmux-256color"
    return "screen-256color"


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (a killed server whose parent has not reaped it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:][:1] != b"Z"


class UserServer:
    def __init__(self, settings: Settings, isolation: Isolation, account: Account, host_dir: Path,
                 on_notification: Callable[[UserServer, str, str], None], lock: asyncio.Lock,
                 on_output: Callable[[UserServer, str, bytes], None] | None = None) -> None:
        self.settings = settings
        self.isolation = isolation
        self.account = account
        self.socket_dir = host_dir / account.name
        self.socket_path = self.socket_dir / "tmux"
        self.exchange_dir = host_dir / "x" / account.name  # see accounts.py: the host's files for this account
        self.lock = lock  # the engine's, per account: start, stop, and creates against this server
        self.supervisor: asyncio.Task[None] | None = None
        self.refreshing = False
        self.refresh_pending = False
        self.stopping = False
        self.pid: int | None = None  # the tmux server's
        self.restarted = False  # the last connect found a new server: the one before died, with its sessions
        self.output_restarted = False  # the output client was (re)started: the engine relinks and resyncs
        self._rss: tuple[float, int | None] = (0.0, None)
        self.ctl = ControlClient(
            self.socket_path, shell=settings.shell, env=isolation.env(account, settings.shell),
            wrap=lambda argv: isolation.argv(account, argv), spawn_kwargs=isolation.spawn_kwargs(account),
            on_spawned=lambda pid: isolation.confine(account, pid),
            on_notification=lambda name, args: on_notification(self, name, args),
            spin_s=settings.control_spin_us / 1e6, command_timeout_s=settings.control_timeout_s,
            start_timeout_s=max(2.0, settings.control_timeout_s),
        )
        # The output client: attached to _out, into which the engine links each session's window, so that tmux
        # sends it their panes' output; tmux pauses a pane whose output it has not read for pause-after seconds
        # (rather than buffering it without bound) and says so (%pause). ignore-size: its own size never
        # changes a window's.
        self.out: ControlClient | None = None
        if on_output is not None:
            out_cb: OutputCallback = lambda pane, data: on_output(self, pane, data)  # noqa: E731
            self.out = ControlClient(
                self.socket_path, shell=settings.shell, env=isolation.env(account, settings.shell),
                wrap=lambda argv: isolation.argv(account, argv), spawn_kwargs=isolation.spawn_kwargs(account),
                on_spawned=lambda pid: isolation.confine(account, pid),
                on_notification=lambda name, args: on_notification(self, name, args),
                command_timeout_s=settings.control_timeout_s, start_timeout_s=max(2.0, settings.control_timeout_s),
                session=OUT_SESSION, flags=f"ignore-size,pause-after={settings.stream_pause_after_s}",
                on_output=out_cb,
            )

    @property
    def alive(self) -> bool:
        return self.ctl.alive

    def prepare_dirs(self) -> None:
        a = self.account
        self.isolation.prepare(a)
        ensure_dir(self.socket_dir, 0o710, a.uid, os.getgid())  # the host reaches it by group: no dac_override
        ensure_dir(self.exchange_dir, 0o710, None, a.gid)

    async def connect(self) -> None:
        """(Re)attach to the server, starting it if needed, and set its options; then its output client."""
        if not self.ctl.alive:
            await self._connect_commands()
            await self._end_orphaned_clients()
        try:
            if await self.connect_output():
                self.output_restarted = True
        except ControlClosed as exc:  # sessions still work, unwatched and unrecorded; the supervisor retries
            ERRORS.labels(component="host", kind="output_client").inc()
            logger.warning("tmux output client failed to start", extra={"account": self.account.name,
                                                                       "error": str(exc)[:200]})

    async def _connect_commands(self) -> None:
        if self.pid is not None and not _running(self.pid):
            self.restarted = True  # known before anything can use the new server's connection
        self.prepare_dirs()
        await self.ctl.start()
        # Global options, before any session is created. NB: do NOT set window-size globally: tmux 3.3a crashes
        # on new-session with a global `window-size manual` (resize-window sets it per window instead).
        replies = await self.ctl.commands([
            f"set-option -g default-shell {quote(self.settings.shell)}",
            f"set-option -g history-limit {HISTORY_LIMIT}",
            "set-option -g allow-rename off",
            "set-option -g exit-empty off",
            f"set-option -g default-terminal {quote(default_terminal())}",
            "display-message -p 'P#{pid}'",
        ])
        pid_line = replies[-1]
        before, self.pid = self.pid, None
        if isinstance(pid_line, list):
            self.pid = next((int(ln[1:]) for ln in pid_line if ln.startswith("P") and ln[1:].isdigit()), None)
        self.restarted = self.restarted or (before is not None and self.pid != before)

    def start_supervising(self, on_reconnect: Callable[[UserServer], object]) -> None:
        if self.supervisor is None or self.supervisor.done():
            self.supervisor = asyncio.create_task(self._supervise(on_reconnect), name=f"tmux-{self.account.name}")

    async def _supervise(self, on_reconnect: Callable[[UserServer], object]) -> None:
        delay = 0.2
        while not self.stopping:
            waits = [asyncio.ensure_future(c.wait_closed()) for c in (self.ctl, self.out) if c is not None]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if self.stopping:
                return
            if self.ctl.alive and (self.out is None or self.out.alive):
                await asyncio.sleep(0.05)
                continue
            if not self.ctl.alive:
                logger.warning("tmux control connection lost; reconnecting", extra={"account": self.account.name})
                ERRORS.labels(component="host", kind="tmux_server_down").inc()
            await asyncio.sleep(delay)
            try:
                async with self.lock:
                    if self.stopping:
                        return
                    await self.connect()
                delay = 0.2
                result = on_reconnect(self)
                if asyncio.iscoroutine(result):
                    await result
            except Exception as exc:
                logger.error("tmux reconnect failed", extra={"account": self.account.name, "error": str(exc)})
                delay = min(delay * 2, 10.0)

    async def _end_orphaned_clients(self) -> None:
        """End control clients a host that died left attached (their parent gone: adopted by init). Nobody reads
        them, so once their output pipe fills they stop reading from the server too, and the server, which waits
        for every client before it exits, could then never be ended (kill-server hangs)."""
        try:
            lines = await self.ctl.command("list-clients -F 'C#{client_pid} #{client_control_mode}'")
        except (ControlClosed, TmuxCommandError):
            return
        ours = {c.pid for c in (self.ctl, self.out) if c is not None and c.pid is not None}
        for line in lines:
            pid_s, _, control = line[1:].partition(" ")
            if not line.startswith("C") or not pid_s.isdigit() or control != "1" or int(pid_s) in ours:
                continue
            pid = int(pid_s)
            try:
                stat = Path(f"/proc/{pid}/stat").read_bytes()
                ppid, uid = int(stat[stat.rindex(b")") + 2:].split()[1]), os.stat(f"/proc/{pid}").st_uid
            except (OSError, ValueError, IndexError):
                continue
            if ppid == 1 and uid == self.account.uid:  # an orphan of ours (a user's own client has a parent)
                logger.info("ending a control client a previous host left", extra={"account": self.account.name})
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    async def connect_output(self) -> bool:
        """Start the output client if it is not running (the command client must be). True: it was (re)started,
        so output may have been missed meanwhile."""
        if self.out is None or self.out.alive:
            return False
        await self.out.start()
        return True

    async def stop(self, *, kill: bool) -> None:
        """Detach (the server lives on) or, with ``kill``, end the server and everything its user left running."""
        self.stopping = True
        if self.supervisor is not None and self.supervisor is not asyncio.current_task():
            self.supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.supervisor
        if kill and self.ctl.alive:
            with contextlib.suppress(Exception):
                fut = self.ctl.submit("kill-server")
                fut.add_done_callback(lambda f: f.exception())  # the reply may never come: the server exits
                await asyncio.wait_for(self.ctl.wait_closed(), 2.0)
        await self.ctl.close()
        if self.out is not None:
            await self.out.close()
        if kill:
            await asyncio.to_thread(self.isolation.reap, self.account)

    def memory_used(self) -> int | None:
        """The server's resident memory, sampled at most every RSS_SAMPLE_S (input is refused above a limit)."""
        at, value = self._rss
        now = time.monotonic()
        if now - at >= RSS_SAMPLE_S:
            value = self.isolation.memory_used(self.account, self.pid)
            self._rss = (now, value)
        return value
