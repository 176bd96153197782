"""The local EventBridge: invokes the scheduled Lambda handlers with their schedule's input, each on its own
interval. A failed invocation is logged, and the next tick tries again, as EventBridge does.

``python -m local.scheduler`` runs the stack's schedules in a process of their own (the stack starts and supervises
it; settings from TMUXI_*), so their pools and state are nobody else's, as a Lambda function's are."""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from local.lambda_context import LambdaContext


@dataclass
class Schedule:
    name: str
    interval_s: float
    event: dict[str, Any]
    runs: int = 0
    failures: int = 0


@dataclass
class Scheduler:
    schedules: list[Schedule]
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="local-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def run_once(self, schedule: Schedule) -> dict[str, Any] | None:
        from functions.maintenance.handler import handler

        schedule.runs += 1
        try:
            return handler(schedule.event, LambdaContext(function_name="maintenance"))
        except Exception:  # logged by the handler; EventBridge would count an error and try at the next tick
            schedule.failures += 1
            return None

    def _run(self) -> None:
        due = {s.name: time.monotonic() + s.interval_s for s in self.schedules}
        while not self._stop.is_set():
            now = time.monotonic()
            for s in self.schedules:
                if due[s.name] <= now:
                    self.run_once(s)
                    due[s.name] = time.monotonic() + s.interval_s
            self._stop.wait(max(0.05, min(due.values()) - time.monotonic()))


def schedules() -> list[Schedule]:
    """Every task of tmuxi.schedules.SCHEDULES on its rate, with the event its EventBridge rule delivers (the
    rule's constant input, ``{"task": ...}``). Two local departures: ``reconcile`` runs every
    TMUXI_RECONCILE_INTERVAL_S (default 60 s = its rate; the tests' stacks run it every second), and
    TMUXI_SCHEDULER_TASKS limits the tasks run ("none": none). A task the handler does not know is left out."""
    from functions.maintenance.handler import TASKS
    from tmuxi.schedules import SCHEDULES, rate_seconds
    from tmuxi.settings import env_name, get_settings

    s = get_settings()
    wanted = set(SCHEDULES) if s.scheduler_tasks is None else {
        t.strip() for t in s.scheduler_tasks.split(",") if t.strip() and t.strip() != "none"}
    unknown = wanted - set(SCHEDULES)
    if unknown:
        raise SystemExit(f"{env_name('scheduler_tasks')} names unknown tasks {sorted(unknown)}; "
                         f"the tasks are {sorted(SCHEDULES)}")
    out = []
    for task, rate in SCHEDULES.items():
        if task not in wanted or task not in TASKS:
            continue
        interval = s.reconcile_interval_s if task == "reconcile" else float(rate_seconds(rate))
        out.append(Schedule(task, interval, {"task": task}))
    return out


def main() -> None:
    scheduler = Scheduler(schedules())
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    scheduler.start()
    done.wait()
    scheduler.stop()


if __name__ == "__main__":
    main()
