"""Bus time on an RS-485 line, and a poll schedule that never asks for more of it than exists.

A Modbus RTU character is 11 bits on the wire (start, 8 data, parity or a second stop,
stop); frames are separated by 3.5 character times (a fixed 1.75 ms above 19200 baud).
An exchange costs the request frame, the slave's turnaround and the reply frame, each
frame counted with its gap. :class:`LineTiming` does that arithmetic.

:class:`PollSchedule` holds periodic jobs (a column poll, a heartbeat), each with its
period and its bus cost, and hands them out earliest-deadline-first. When the jobs ask
for more than `budget` of the bus (default 80 %: the rest is kept free for limit writes
and retries) every period is stretched by the same factor, so the bus is never
over-subscribed and every column is still polled, just less often; the factor and the
utilisation are reported. Urgent jobs (limit writes) jump the queue: they come out
before any periodic job at the next exchange boundary.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

BITS_PER_CHAR = 11
FAST_BAUD = 19200          # above this the gaps are fixed times
FAST_GAP_S = 0.00175       # inter-frame gap above 19200 baud

# Frame sizes in bytes (address + PDU + CRC).
READ_REQUEST_BYTES = 8               # FC03/FC04: addr fc start(2) count(2) crc(2)
WRITE_SINGLE_BYTES = 8               # FC06 request and its echo
WRITE_MULTIPLE_REPLY_BYTES = 8       # FC16 echo: addr fc start(2) count(2) crc(2)
EXCEPTION_REPLY_BYTES = 5


def read_reply_bytes(count: int) -> int:
    """FC03/FC04 reply: addr fc bytecount data crc."""
    return 5 + 2 * count


def write_multiple_request_bytes(count: int) -> int:
    """FC16 request: addr fc start(2) count(2) bytecount data crc."""
    return 9 + 2 * count


@dataclass(frozen=True)
class LineTiming:
    baud: int
    bits_per_char: int = BITS_PER_CHAR

    @property
    def char_s(self) -> float:
        return self.bits_per_char / self.baud

    @property
    def gap_s(self) -> float:
        """Silence that ends a frame: 3.5 characters, fixed above 19200 baud."""
        return FAST_GAP_S if self.baud > FAST_BAUD else 3.5 * self.char_s

    def frame_s(self, nbytes: int) -> float:
        """Wire time of a frame of `nbytes` including the gap that ends it."""
        return nbytes * self.char_s + self.gap_s

    def exchange_s(self, request_bytes: int, reply_bytes: int, turnaround_s: float = 0.0) -> float:
        """Request, the slave's turnaround, reply."""
        return self.frame_s(request_bytes) + turnaround_s + self.frame_s(reply_bytes)

    def broadcast_s(self, request_bytes: int, turnaround_s: float = 0.0) -> float:
        """A broadcast has no reply; the master waits `turnaround_s` for the slaves."""
        return self.frame_s(request_bytes) + turnaround_s


def spread_s(index: int, count: int, period_s: float, offset: float = 0.0, slot_s: float = 0.0) -> float:
    """Phase of the `index`-th of `count` jobs with the same period, so that their runs are
    spread evenly over the period instead of all falling due at once (`offset` in parts of
    the spacing, e.g. 0.5 puts heartbeats between the polls).

    With `slot_s`, the phases are rounded down to slots of that length: jobs run by many tasks
    on one event loop (a Modbus TCP column each) then fall due in groups, and the loop wakes
    once per slot for a group instead of once per job. On a busy machine each wake-up finds
    the caches cold: a thousand separate wake-ups a second cost as much CPU as the polls."""
    fraction = (index + offset) / max(1, count)
    if slot_s > 0:
        slots = max(1, round(period_s / slot_s))
        return period_s * math.floor(fraction * slots) / slots
    return period_s * fraction


K = TypeVar("K", bound=Hashable)
U = TypeVar("U")


@dataclass
class _Job(Generic[K]):
    key: K
    period_s: float
    cost_s: float
    due: float
    runs: int = 0


class Due(NamedTuple, Generic[K]):
    """A periodic job handed out by take() (a tuple: one is made for every poll)."""

    key: K
    due: float        # when it was due
    late_s: float     # how late it is being taken


_new_due = tuple.__new__


class PollSchedule(Generic[K, U]):
    """Earliest-deadline-first periodic jobs on one bus, with an urgent FIFO in front.

    Times are floats in seconds from the caller's monotonic clock, passed in; costs are
    seconds of bus time per run (from :class:`LineTiming` on a serial line).
    """

    def __init__(self, *, budget: float = 0.8, window_s: float = 10.0) -> None:
        if not 0.0 < budget <= 1.0:
            raise ValueError("budget must be in (0, 1]")
        self.budget = budget
        self.window_s = window_s
        self._jobs: dict[K, _Job[K]] = {}
        self._demand: float | None = None   # cached sum of cost/period, None when stale
        # A list and a lazily made deque: one schedule per Modbus TCP column, where these stay
        # empty or nearly so, and an empty deque alone takes 600 bytes.
        self._urgent: list[U] = []
        self._busy: deque[tuple[float, float]] | None = None  # (start, end) of recorded bus use
        self.busy_total_s = 0.0
        self.urgent_taken = 0
        self.skipped_cycles = 0  # periodic runs dropped because a job fell a whole period behind

    # -- the job table ---------------------------------------------------------------------
    def add(self, key: K, period_s: float, cost_s: float, *, now: float, phase_s: float = 0.0) -> None:
        if period_s <= 0 or cost_s < 0:
            raise ValueError("period must be > 0 and cost >= 0")
        self._jobs[key] = _Job(key, period_s, cost_s, now + phase_s)
        self._demand = None

    def update(self, key: K, *, period_s: float | None = None, cost_s: float | None = None,
               now: float | None = None) -> None:
        """Change a job's period or cost; with `now`, a shorter period takes effect at once."""
        job = self._jobs[key]
        if cost_s is not None:
            job.cost_s = cost_s
        if period_s is not None:
            job.period_s = period_s
        self._demand = None
        if period_s is not None and now is not None:
            job.due = min(job.due, now + period_s * self.stretch())

    def advance(self, key: K, now: float) -> None:
        """Run a job at the next opportunity (its slot moves there): no extra run, an earlier one."""
        job = self._jobs.get(key)
        if job is not None:
            job.due = min(job.due, now)

    def remove(self, key: K) -> None:
        self._jobs.pop(key, None)
        self._demand = None

    def __contains__(self, key: object) -> bool:
        return key in self._jobs

    def keys(self) -> list[K]:
        return list(self._jobs)

    # -- the bus budget --------------------------------------------------------------------
    def demand(self) -> float:
        """Fraction of the bus the jobs ask for at their configured periods."""
        if self._demand is None:   # asked at every take(): summed only when a job changed
            self._demand = sum(j.cost_s / j.period_s for j in self._jobs.values())
        return self._demand

    def stretch(self) -> float:
        """Factor applied to every period so the jobs fit in the budget (1.0 = none)."""
        return max(1.0, self.demand() / self.budget)

    def utilisation(self) -> float:
        """Planned fraction of the bus the periodic jobs use after stretching."""
        return self.demand() / self.stretch()

    def period_s(self, key: K) -> float:
        """Effective period of a job (its configured period times the stretch)."""
        return self._jobs[key].period_s * self.stretch()

    # -- handing out work ------------------------------------------------------------------
    def push_urgent(self, item: U) -> None:
        self._urgent.append(item)

    def urgent_pending(self) -> int:
        return len(self._urgent)

    def take_urgent(self) -> U | None:
        if not self._urgent:
            return None
        self.urgent_taken += 1
        return self._urgent.pop(0)

    def _next(self) -> _Job[K] | None:
        first = None
        for job in self._jobs.values():
            if first is None or job.due < first.due:
                first = job
        return first

    def take(self, now: float) -> Due[K] | None:
        """The most overdue periodic job, if any is due; its next run is booked. (Runs for
        every poll of every column: _next and stretch written out.)"""
        job = None
        for j in self._jobs.values():
            if job is None or j.due < job.due:
                job = j
        if job is None or job.due > now:
            return None
        demand = self._demand if self._demand is not None else self.demand()
        stretch = demand / self.budget
        period = job.period_s * (stretch if stretch > 1.0 else 1.0)
        due = job.due
        job.due += period
        if job.due <= now:
            # A whole period behind (a long outage, a stalled loop, a slow start): skip the
            # missed runs, do not burst. The next run stays in the job's slot of the period, so
            # jobs spread over the period (spread_s) do not all fall into step after a stall.
            self.skipped_cycles += 1
            job.due += period * math.floor((now - job.due) / period + 1.0)
            while job.due <= now:   # rounding
                job.due += period
        job.runs += 1
        return _new_due(Due, (job.key, due, now - due))   # without NamedTuple's __new__ frame

    def wait_s(self, now: float) -> float | None:
        """Seconds until the next job is due: 0 with urgent work, None with no jobs."""
        if self._urgent:
            return 0.0
        job = self._next()
        return None if job is None else max(0.0, job.due - now)

    def runs(self, key: K) -> int:
        return self._jobs[key].runs

    # -- measured use ----------------------------------------------------------------------
    def record_busy(self, start: float, end: float) -> None:
        """Book bus time actually spent (an exchange, a timeout, a broadcast's wait)."""
        if end <= start:
            return
        self.busy_total_s += end - start
        if self._busy is None:
            self._busy = deque()
        self._busy.append((start, end))
        self._trim(end)

    def measured_utilisation(self, now: float) -> float:
        """Fraction of the last `window_s` (or since the first record) the bus was busy."""
        self._trim(now)
        if not self._busy:
            return 0.0
        lo = max(now - self.window_s, self._busy[0][0])
        span = now - lo
        if span <= 0:
            return 0.0
        busy = sum(min(e, now) - max(s, lo) for s, e in self._busy if e > lo)
        return min(1.0, busy / span)

    def _trim(self, now: float) -> None:
        lo = now - self.window_s
        busy = self._busy
        while busy and busy[0][1] <= lo:
            busy.popleft()
