"""Draining: what a host on ECS does when it is told to go (SIGTERM: a deploy, a scale-in, a replacement).

ECS stops a task's containers -- the users' tmux servers among them -- ``stopTimeout`` seconds after SIGTERM, so
the sessions this host holds end with it whatever it does. What it does is end them in the open:

1. the registry marks it draining: placement skips it (new sessions go to other hosts), and a create that reaches
   it anyway is refused with ``host_full`` (the API tries the next host);
2. every attached viewer gets ``{"type": "host_draining", "session_id", "deadline_s"}`` (docs/websocket.md), and
   so does every viewer that attaches later;
3. it keeps serving its sessions (input, screen, exec, delete) until none is left -- deleted, or exited by its
   user -- or ``drain_timeout_s`` has passed;
4. a session still open then is recorded ``lost`` with the reason ``host stopped: ...``; its viewers get
   ``detached`` with that state and reason, and its user's tmux server is ended;
5. then the host stops as it always does (uvicorn's graceful shutdown, the lifespan's ``Engine.stop``).

Why not in the lifespan's shutdown: uvicorn runs it only after it has closed its listening socket and its
connections (``Server.shutdown``), and a draining host must go on serving the sessions it holds -- a user deleting
theirs, typing its last commands. uvicorn has no hook between the signal and its shutdown, so ``DrainingServer``
takes SIGTERM itself, drains, and then lets uvicorn shut down as before.

Only on ECS (``ecs_agent_uri`` set) and with ``drain_timeout_s`` > 0: elsewhere the users' tmux servers outlive the
host process and its next run adopts the sessions, so SIGTERM only detaches (as before)."""
from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from tmuxi.observability import ERRORS, logger

if TYPE_CHECKING:
    from tmux_host.engine import Engine

# Why a session still open at the deadline was lost (recorded as its end_reason, and sent to its viewers)
ECS_STOPPED = "its ECS task was stopped (a deploy, a scale-in or a replacement)"
# After the deadline: how long the viewers of the sessions ended then get to receive their `detached` message
FINAL_MESSAGES_S = 2.0
REGISTRY_TIMEOUT_S = 2.0


def lost_reason(why: str, timeout_s: float) -> str:
    return f"host stopped: {why}; the session was still open after draining {timeout_s:g} s"


async def drain(engine: Engine, timeout_s: float, why: str = ECS_STOPPED) -> None:
    """Drain the host (see the module's docstring). Returns within ``timeout_s`` + about FINAL_MESSAGES_S."""
    started = time.monotonic()
    deadline = started + timeout_s
    held = engine.session_count
    engine.draining = True
    logger.warning("tmux host draining: told to go", extra={
        "status": "draining", "sessions": held, "viewers": len(engine.live.viewers), "deadline_s": timeout_s,
        "why": why})
    marking = engine._spawn(_mark_draining(engine, deadline), "mark-draining")
    engine.live.draining(timeout_s)
    while engine.session_count and time.monotonic() < deadline:
        engine.sessions_changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(engine.sessions_changed.wait(), max(0.0, deadline - time.monotonic()))
    left = deadline - time.monotonic()
    if left > 0:  # nothing held (any more) before the deadline: the registry still hears of it before the host goes
        await asyncio.wait([marking], timeout=min(REGISTRY_TIMEOUT_S, left))
    marking.cancel()
    lost = await engine.end_all("lost", lost_reason(why, timeout_s)) if engine.session_count else 0
    delivered = await engine.live.flushed(FINAL_MESSAGES_S)
    logger.warning("tmux host drained", extra={
        "status": "sessions_lost" if lost else "drained", "sessions": held, "lost": lost,
        "final_messages_delivered": delivered, "duration": round((time.monotonic() - started) * 1000, 3)})


async def _mark_draining(engine: Engine, deadline: float) -> None:
    """Tell the registry, again and again until it has it (PostgreSQL may be down for a moment) or the deadline."""
    if engine.registry is None:
        return
    delay = 0.2
    while True:
        try:
            await asyncio.wait_for(asyncio.to_thread(engine.registry.host_draining, engine.host_id),
                                   REGISTRY_TIMEOUT_S)
            return
        except Exception as exc:
            ERRORS.labels(component="host", kind="mark_draining").inc()
            logger.warning("could not mark the host draining in the registry; retrying",
                           extra={"status": "failed", "error": str(exc)[:200]})
        if time.monotonic() + delay >= deadline:
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, except that the first SIGTERM first runs ``on_term`` (the drain), serving meanwhile, and
    only then starts uvicorn's graceful shutdown. Any other signal (SIGINT; a second SIGTERM) is uvicorn's: it
    shuts down now."""

    def __init__(self, config: uvicorn.Config, on_term: Callable[[], Awaitable[None]] | None) -> None:
        super().__init__(config)
        self.on_term = on_term
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Task[None] | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        loop = self._loop
        if sig != signal.SIGTERM or self.on_term is None or loop is None or not self.started \
                or self._draining is not None or self.should_exit:
            if self._draining is not None and loop is not None:
                loop.call_soon_threadsafe(self._draining.cancel)
            super().handle_exit(sig, frame)
            return
        loop.call_soon_threadsafe(self._start_drain, sig)

    def _start_drain(self, sig: int) -> None:
        assert self.on_term is not None
        on_term = self.on_term

        async def run() -> None:
            try:
                await on_term()
            except asyncio.CancelledError:
                logger.warning("drain cut short by another signal", extra={"status": "cancelled"})
            except Exception:
                logger.exception("drain failed; stopping now", extra={"status": "failed"})
            finally:
                super(DrainingServer, self).handle_exit(sig, None)  # uvicorn's graceful shutdown, as without a drain

        if self._draining is None:
            self._draining = asyncio.get_running_loop().create_task(run(), name="drain")
