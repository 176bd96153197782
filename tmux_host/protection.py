"""ECS task scale-in protection: while the host holds sessions, ECS must not stop its task for a scale-in or a
deploy (a stopped task takes its users' tmux servers, and their sessions, with it).

The ECS agent serves ``PUT ${ECS_AGENT_URI}/task-protection/v1/state`` in every task, with the task role's
credentials (it calls ecs:UpdateTaskProtection for the task): ``{"ProtectionEnabled": true, "ExpiresInMinutes": N}``
protects the task for N minutes (1 to 2880), ``{"ProtectionEnabled": false}`` ends it. It answers
``{"protection": {...}}``, or ``{"failure": {"Reason", ...}}`` / ``{"error": {"Code", "Message"}}`` (AWS's "Task
scale-in protection endpoint" page). A rolling deploy starts the new tasks and waits for the protected old ones:
the CDK app gives the service maximumPercent 200.

Off the hot path: one background task, woken when the number of sessions held changes (``Engine.sessions_changed``)
and once per heartbeat interval, asks for the state it should be in -- protected while a session is held, renewed
before it expires -- and never blocks a request. A call that fails (agent unreachable, a ``failure`` or ``error``
answer such as ``DEPLOYMENT_BLOCKED`` or ``AccessDeniedException``) is logged (``status=failed``), counted
(``tmux_task_protection_updates{status="failed"}``) and retried with backoff."""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

from tmuxi.observability import TASK_PROTECTED, TASK_PROTECTION_UPDATES, logger

PATH = "/task-protection/v1/state"
# One call protects the task this long. The host renews it while it holds sessions, so a longer period buys nothing
# but the time a hung host (one that stopped renewing) keeps a scale-in or deploy waiting: an hour.
PROTECT_MINUTES = 60
RENEW_BEFORE_S = PROTECT_MINUTES * 60 / 2  # renewed once half of it has gone: two calls an hour per host
RETRY_MIN_S, RETRY_MAX_S = 0.5, 30.0
CALL_TIMEOUT_S = 10.0  # the agent calls the ECS API itself (with its own retries) before it answers


class ProtectionFailed(Exception):
    pass


class TaskProtection:
    """Keeps the task protected exactly while ``count()`` (sessions held) is above zero."""

    def __init__(self, agent_uri: str, count: Callable[[], int], changed: asyncio.Event,
                 interval_s: float) -> None:
        self.url = agent_uri.rstrip("/") + PATH
        self.count = count
        self.changed = changed
        self.interval_s = interval_s
        self.enabled = False  # a task starts unprotected
        self.expires_at: float | None = None  # monotonic, while enabled
        self.failures = 0  # consecutive
        self.last_error: str | None = None
        self._http: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="task-protection")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._http is not None:
            await self._http.close()

    def describe(self) -> dict[str, Any]:
        """For /health."""
        left = None if self.expires_at is None else max(0, round(self.expires_at - time.monotonic()))
        return {"enabled": self.enabled, "expires_in_s": left, "failures": self.failures,
                "last_error": self.last_error}

    async def _run(self) -> None:
        while True:
            self.changed.clear()
            if await self.sync():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), self.interval_s)
            else:  # backoff: a failing agent is not called again on every session change
                await asyncio.sleep(min(RETRY_MAX_S, RETRY_MIN_S * 2 ** (self.failures - 1)))

    async def sync(self) -> bool:
        """Bring the task's protection to what the sessions held want. False: the call failed."""
        want = self.count() > 0
        if want == self.enabled and (not want or self._renew_in() > 0):
            return True
        return await self._put(want)

    def _renew_in(self) -> float:
        return -1.0 if self.expires_at is None else self.expires_at - RENEW_BEFORE_S - time.monotonic()

    async def _put(self, enable: bool) -> bool:
        body: dict[str, Any] = {"ProtectionEnabled": enable}
        if enable:
            body["ExpiresInMinutes"] = PROTECT_MINUTES
        started = time.monotonic()
        label = "true" if enable else "false"
        try:
            if self._http is None:
                self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S))
            async with self._http.put(self.url, json=body) as resp:
                raw = await resp.read()
                status = resp.status
            _check(status, raw)
        except (aiohttp.ClientError, TimeoutError, ProtectionFailed) as exc:
            self.failures += 1
            self.last_error = (str(exc) or type(exc).__name__)[:300]
            TASK_PROTECTION_UPDATES.labels(enabled=label, status="failed").inc()
            logger.warning("ECS task protection not updated; retrying", extra={
                "status": "failed", "enabled": enable, "failures": self.failures, "error": self.last_error,
                "duration": round((time.monotonic() - started) * 1000, 3)})
            return False
        self.enabled = enable
        self.expires_at = started + PROTECT_MINUTES * 60 if enable else None
        self.failures, self.last_error = 0, None
        TASK_PROTECTED.set(1 if enable else 0)
        TASK_PROTECTION_UPDATES.labels(enabled=label, status="ok").inc()
        logger.info("ECS task protection updated", extra={
            "status": "ok", "enabled": enable, "sessions": self.count(),
            "expires_in_minutes": PROTECT_MINUTES if enable else None,
            "duration": round((time.monotonic() - started) * 1000, 3)})
        return True


def _check(status: int, raw: bytes) -> None:
    """Raise ProtectionFailed unless the agent's answer is a ``protection`` (HTTP 200)."""
    try:
        answer = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        answer = None
    if isinstance(answer, dict):
        failure, error = answer.get("failure"), answer.get("error")
        if isinstance(failure, dict):
            raise ProtectionFailed(f"ECS agent: failure {failure.get('Reason')}: {failure.get('Detail')}")
        if isinstance(error, dict):
            raise ProtectionFailed(f"ECS agent: error {error.get('Code')}: {error.get('Message')}")
    if status != 200 or not isinstance(answer, dict) or "protection" not in answer:
        raise ProtectionFailed(f"ECS agent answered HTTP {status}: {raw[:200]!r}")
