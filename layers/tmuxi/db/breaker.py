"""A circuit breaker: once a dependency is found unreachable, callers are refused at once instead of each waiting
out a timeout, and one caller at a time probes whether it is back.

    closed --failure--> open --retry time reached: the next caller is let through--> half-open (that caller probes)
    half-open --probe got an answer--> closed          half-open --probe failed--> open (a new retry time)

What counts as a failure is the caller's business (``db/pool.py``: a connection that could not be made, stopped
answering or broke; a server answering, even with an error, is up). A failure reported on a ticket issued before
the breaker last changed state is stale and ignored: a request that was already waiting on the server when the
breaker opened must not open it again after a probe has closed it. A probe that never reports (a bug) is replaced
by another after ``probe_lease_s``.

No I/O, no knowledge of PostgreSQL; a clock can be given. ``admit()`` on a closed breaker reads one attribute."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Literal, NamedTuple

State = Literal["closed", "open", "half-open"]


class BreakerOpen(Exception):
    """Refused without trying: the dependency was found unreachable and it is not yet time to probe it again."""

    def __init__(self, retry_in_s: float) -> None:
        super().__init__(f"circuit open; next probe in {retry_in_s:.2f} s")
        self.retry_in_s = retry_in_s


class Ticket(NamedTuple):
    generation: int
    probe: bool


class CircuitBreaker:
    def __init__(self, retry_s: float, probe_lease_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.retry_s = retry_s
        self.probe_lease_s = probe_lease_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state: State = "closed"
        self._generation = 0  # + 1 on every change of state
        self._closed_ticket = Ticket(0, False)
        self._retry_at = 0.0  # open: no probe before this
        self._probe_until = 0.0  # half-open: the probe's lease

    @property
    def state(self) -> State:
        return self._state

    def retry_in_s(self) -> float:
        """How long until the next probe may go (0 when closed)."""
        if self._state == "closed":
            return 0.0
        return max(0.0, max(self._retry_at, self._probe_until) - self._clock())

    def admit(self) -> Ticket:
        """A ticket to try (``probe`` set when this caller is the one probe), or BreakerOpen."""
        if self._state == "closed":  # the hot path: no lock
            return self._closed_ticket
        with self._lock:
            state = self.state  # again, under the lock
            if state == "closed":
                return self._closed_ticket
            now = self._clock()
            if now < self._retry_at or (state == "half-open" and now < self._probe_until):
                raise BreakerOpen(max(self._retry_at, self._probe_until) - now)
            self._state = "half-open"
            self._probe_until = now + self.probe_lease_s
            return Ticket(self._generation, True)

    def succeeded(self, ticket: Ticket) -> bool:
        """The dependency answered. Closes the breaker when ``ticket`` is its current probe; True if it did."""
        if not ticket.probe:
            return False
        with self._lock:
            if ticket.generation != self._generation or self._state == "closed":
                return False
            self._change("closed")
            self._closed_ticket = Ticket(self._generation, False)
            return True

    def failed(self, ticket: Ticket, retry_in_s: float | None = None) -> bool:
        """The dependency is unreachable: open (again), with the next probe ``retry_in_s`` (default ``retry_s``)
        from now. True if this opened a closed breaker; a stale ticket changes nothing."""
        with self._lock:
            if ticket.generation != self._generation:
                return False
            was_closed = self._state == "closed"
            if was_closed:
                self._change("open")
            elif ticket.probe:
                self._state = "open"  # the same outage: tickets issued meanwhile stay current
            else:
                return False  # a late report from before the breaker opened
            self._retry_at = self._clock() + (self.retry_s if retry_in_s is None else retry_in_s)
            self._probe_until = 0.0
            return was_closed

    def _change(self, state: State) -> None:
        self._state = state
        self._generation += 1
