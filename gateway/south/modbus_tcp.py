"""Modbus TCP to columns that have their own IP address: one connection per column.

Each column gets its own task: connect (reconnect with jittered exponential backoff), and
write limits the moment :meth:`ModbusTcpColumns.set_limits` asks (ahead of the next poll; the
columns' writes run concurrently, each confirmed by its echo). The columns' polls are spread
over the period (column i of n at i/n of it, in groups of `poll_slot_s`; heartbeats in
between), so a site of thousands of columns is polled at an even rate instead of in one burst
a second.

The polls and heartbeats of a connected, idle column do not run in its task: the task parks
the column with the adapter's slot driver and waits. The driver wakes once per slot of the
timer grid (`timer_resolution_s`), writes the request of every due parked column straight to
its connection, and the reply is checked and handed on (online, decoded, emitted) from the
connection's `data_received`, with no task woken and no future made; the slot's reply
deadlines are checked by one timer entry. What a poll costs decides how many columns one
gateway carries, and waking a task per poll cost more than the rest of the poll. Everything
else goes back to the column's task: a failed or timed-out request (its retries and its
accounting, as if the task had sent it), a lost connection (reconnect), urgent limit writes
(the column is handed back at once, or when the request in flight is answered: one request
at a time on a connection, never a poll interleaved with a write).

Timeouts, retries, failure classes and online/offline tracking are the same as on the RTU
bus (shared code in :mod:`gateway.south.modbus_bus`); a column that stops answering on an
open connection is disconnected when it goes offline, so a half-open TCP connection is
replaced. The requests go through the lean client of :mod:`gateway.south.modbus_tcp_client`,
not pymodbus; the task's reply timeouts share one coarse timer
(:mod:`gateway.south.coarse_timer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from firmware import regmap
from gateway.south.coarse_timer import CoarseTimer
from gateway.south.modbus_bus import (
    Backoff,
    EventSink,
    ExchangeError,
    SouthStats,
    UrgentJob,
    plan_limits,
    wall_ms,
)
from gateway.south.modbus_tcp_client import TcpRequester
from gateway.south.schedule import PollSchedule, spread_s
from gateway.south.types import (
    REASON_DISCONNECTED,
    REASON_GARBLED,
    REASON_OK,
    REASON_TIMEOUT,
    ColumnAdapterBase,
    ColumnEvent,
    ColumnLink,
    LimitCommand,
    LimitResult,
    LinkTracker,
    decode_inputs,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TcpColumn:
    column_id: str
    host: str
    port: int = 502
    unit: int = 1
    poll_period_s: float = 1.0
    timeout_s: float = 1.0
    retries: int = 1


@dataclass(frozen=True)
class TcpConfig:
    offline_after: int = 3
    offline_poll_period_s: float = 5.0
    heartbeat_period_s: float | None = 10.0
    connect_timeout_s: float = 2.0
    reconnect_base_s: float = 0.5
    reconnect_max_s: float = 30.0
    event_queue_size: int = 1000
    poll_slot_s: float = 0.02     # the polls are spread over the period in groups of this slot
    max_connecting: int = 200     # connection attempts at a time (a site's start dials every column)
    timer_resolution_s: float = 0.01   # polls and reply timeouts run up to this late (the timer grid)


# Who drives a column's connection (_Channel.mode).
_TASK = 0      # the column's task (connecting, writing, retrying, or about to park)
_PARKED = 1    # the slot driver; nothing in flight
_SENT = 2      # the slot driver; a poll or heartbeat in flight


class _Channel:
    """One column's connection, schedule and link state."""

    def __init__(self, cfg: TcpColumn, config: TcpConfig, rng: random.Random, timer: CoarseTimer) -> None:
        self.cfg = cfg
        self.tracker = LinkTracker(cfg.column_id, config.offline_after)
        self.requester = TcpRequester(cfg.host, cfg.port, timer)
        self.schedule: PollSchedule[str, UrgentJob] = PollSchedule(budget=1.0)
        self.backoff = Backoff(config.reconnect_base_s, config.reconnect_max_s, rng)
        self.waiter: asyncio.Future[None] | None = None   # the parked task's wait, ended by hand_back()
        self.task: asyncio.Task[None] | None = None
        self.mode = _TASK
        self.slot = 0                                      # the driver's grid slot it is booked in
        self.failed: tuple[str, ExchangeError] | None = None   # a slot request's failure, for the task
        self.heartbeat_seq = 0
        self.connects = 0

    def hand_back(self) -> None:
        """The column's task drives the connection again (it resumes if it was parked)."""
        self.mode = _TASK
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def wake(self) -> None:
        """Urgent work was queued: back to the task now, or when the request in flight ends."""
        if self.mode != _SENT:
            self.hand_back()


class ModbusTcpColumns(ColumnAdapterBase):
    """All Modbus TCP columns of a site. `async with ModbusTcpColumns(columns) as tcp:`."""

    def __init__(self, columns: Sequence[TcpColumn], config: TcpConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic, now_ms: Callable[[], int] = wall_ms) -> None:
        self.config = config or TcpConfig()
        self._clock = clock
        self._now_ms = now_ms
        self.stats = SouthStats()
        self.sink = EventSink(self.stats, self.config.event_queue_size)
        self.events = self.sink.queue
        # Thousands of simultaneous connects (a large site starting) all miss their timeout
        # and back off together; a few hundred at a time each take milliseconds.
        self._connecting = asyncio.Semaphore(self.config.max_connecting)
        self._channels: dict[str, _Channel] = {}
        self._timer = CoarseTimer(self.config.timer_resolution_s)
        # The slot driver: parked columns booked by grid slot (loop time / timer_resolution_s).
        self._grid_s = self.config.timer_resolution_s
        self._slots: dict[int, list[_Channel]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False
        rng = random.Random()   # one for every column's reconnect jitter (each would take 2.5 KB)
        for col in columns:
            if col.column_id in self._channels:
                raise ValueError("duplicate column " + col.column_id)
            self._channels[col.column_id] = _Channel(col, self.config, rng, self._timer)

    # -- lifetime ------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._running = True
        now = self._clock()
        n = len(self._channels)
        hb = self.config.heartbeat_period_s
        for i, ch in enumerate(self._channels.values()):
            if ch.task is not None:
                continue
            period, slot = ch.cfg.poll_period_s, self.config.poll_slot_s
            ch.schedule.add("poll", period, 0.0, now=now, phase_s=spread_s(i, n, period, slot_s=slot))
            if hb:
                ch.schedule.add("heartbeat", hb, 0.0, now=now, phase_s=spread_s(i, n, hb, 0.5, slot))
            ch.task = asyncio.create_task(self._run(ch), name="modbus-tcp:" + ch.cfg.column_id)

    async def stop(self) -> None:
        self._running = False   # the driver sends nothing more; what is in flight ends below
        tasks = [ch.task for ch in self._channels.values() if ch.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        for ch in self._channels.values():
            ch.task = None
            ch.requester.close()   # a slot request in flight ends here (disconnected)
            ch.failed = None       # ... and is not the next task's to count
            ch.mode = _TASK
            self._fail_urgent(ch, REASON_DISCONNECTED)
        self._slots.clear()

    def subscribe(self, callback: Callable[[ColumnEvent], None]) -> None:
        self.sink.subscribe(callback)

    def _tracker(self, column_id: str) -> LinkTracker:
        return self._channels[column_id].tracker

    def connects(self, column_id: str) -> int:
        return self._channels[column_id].connects

    # -- limits --------------------------------------------------------------------------
    async def set_limits(self, commands: Sequence[LimitCommand]) -> list[LimitResult]:
        """Write each column's limit now, all columns at once; one result per column."""
        # The units of the commanded columns only: a site's writers each send one column's
        # limit, and a map of every column per call made a site-wide change O(columns²) (at
        # 4,000 columns the start's first limits held 240 MB of these maps at once).
        channels = self._channels
        units = {c.column_id: channels[c.column_id].cfg.unit for c in commands if c.column_id in channels}
        plan = plan_limits(commands, units, broadcast=False)
        results = dict(plan.results)

        async def one(column_id: str, values: tuple[int, ...]) -> LimitResult:
            ch = self._channels[column_id]
            op = partial(ch.requester.write_multiple, ch.cfg.unit, regmap.HR_ASSIGNED_LIMIT, values,
                         ch.cfg.timeout_s)
            try:
                await self._submit(ch, lambda: self._write(ch, op))
            except ExchangeError as exc:
                return LimitResult(column_id, False, "unicast", exc.reason, values[0], values[1])
            return LimitResult(column_id, True, "unicast", REASON_OK, values[0], values[1])

        done = await asyncio.gather(*(one(w.column_id, w.values) for w in plan.unicasts))
        results.update({r.column_id: r for r in done})
        return [results[c] for c in plan.order]

    async def _write(self, ch: _Channel, op: Callable[[], Awaitable[None]]) -> None:
        self.stats.unicast_writes += 1
        try:
            await self._attempts(ch, op)
        except ExchangeError as exc:
            self._note_failure(ch, exc)
            raise
        self._note_ok(ch)

    async def _submit(self, ch: _Channel, run: Callable[[], Awaitable[Any]]) -> Any:
        if ch.task is None or ch.task.done() or not ch.requester.connected:
            raise ExchangeError(REASON_DISCONNECTED)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        ch.schedule.push_urgent(UrgentJob(run, fut))
        ch.wake()
        return await fut

    def _fail_urgent(self, ch: _Channel, reason: str) -> None:
        while (job := ch.schedule.take_urgent()) is not None:
            if not job.future.done():
                job.future.set_exception(ExchangeError(reason))

    # -- one column's loop ---------------------------------------------------------------
    async def _run(self, ch: _Channel) -> None:
        first = True
        while True:
            try:
                failed = ch.failed
                if failed is not None:   # a request the slot driver sent failed: retry or count it here
                    ch.failed = None
                    if failed[0] == "poll":
                        regs = await self._poll_failed(ch, failed[1])
                        if regs is not None:
                            self._poll_ok(ch, regs)
                    else:
                        await self._heartbeat_failed(ch, failed[1])
                    continue
                if not ch.requester.connected and not await self._connect(ch):
                    continue
                job = ch.schedule.take_urgent()
                if job is not None:
                    await job.execute()
                    continue
                if first:   # read at once after the first connect, then in the column's slot
                    first = False
                    await self._poll(ch)
                    continue
                due = ch.schedule.take(self._clock())
                if due is not None:   # overdue (after a reconnect or a write): run it here
                    await (self._poll(ch) if due.key == "poll" else self._heartbeat(ch))
                    continue
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop the column: count it, go on
                self.stats.internal_errors += 1
                log.exception("modbus tcp column %s: job failed", ch.cfg.column_id)
                continue
            await self._park(ch)

    async def _park(self, ch: _Channel) -> None:
        """Leave the column's periodic requests to the slot driver until it hands the column
        back (a failure, a lost connection, urgent work)."""
        loop = asyncio.get_running_loop()
        ch.waiter = waiter = loop.create_future()
        ch.mode = _PARKED
        self._book(ch)
        try:
            await waiter
        finally:
            ch.waiter = None
            if ch.mode == _PARKED:   # cancelled while parked
                ch.mode = _TASK

    async def _connect(self, ch: _Channel) -> bool:
        ok = False
        async with self._connecting:
            with contextlib.suppress(TimeoutError):
                ok = await asyncio.wait_for(ch.requester.connect(), timeout=self.config.connect_timeout_s)
        if ok:
            ch.backoff.reset()
            ch.connects += 1
            self.stats.connects += 1
            return True
        ch.requester.close()
        self._fail_urgent(ch, REASON_DISCONNECTED)
        self._note_failure(ch, ExchangeError(REASON_DISCONNECTED))
        await asyncio.sleep(ch.backoff.next_s())
        return False

    async def _attempts(self, ch: _Channel, op: Callable[[], Awaitable[Any]],
                        retries: int | None = None) -> Any:
        last = ExchangeError(REASON_TIMEOUT)
        for attempt in range((ch.cfg.retries if retries is None else retries) + 1):
            if attempt:
                self.stats.retries += 1
            try:
                return await op()
            except ExchangeError as exc:
                last = exc
                if exc.reason == REASON_DISCONNECTED:
                    break
        raise last

    async def _poll(self, ch: _Channel) -> None:
        self.stats.polls += 1
        cfg = ch.cfg
        try:   # the first attempt inline, as the slot driver sends it
            regs: tuple[int, ...] | None = await ch.requester.read_input(cfg.unit, 0, regmap.POLL_COUNT,
                                                                         cfg.timeout_s)
        except ExchangeError as exc:
            regs = await self._poll_failed(ch, exc)
        if regs is not None:
            self._poll_ok(ch, regs)

    async def _poll_failed(self, ch: _Channel, exc: ExchangeError) -> tuple[int, ...] | None:
        """A poll's first request failed with `exc`: retry it (a column online, retries
        configured, still connected), else count the failure."""
        cfg = ch.cfg
        if exc.reason == REASON_DISCONNECTED or not cfg.retries or not ch.tracker.link.online:
            self.stats.poll_failures += 1
            self._note_failure(ch, exc)
            return None
        self.stats.retries += 1
        op = partial(ch.requester.read_input, cfg.unit, 0, regmap.POLL_COUNT, cfg.timeout_s)
        try:
            regs: tuple[int, ...] = await self._attempts(ch, op, cfg.retries - 1)
        except ExchangeError as exc2:
            self.stats.poll_failures += 1
            self._note_failure(ch, exc2)
            return None
        return regs

    def _poll_ok(self, ch: _Channel, regs: tuple[int, ...]) -> None:
        now_ms = self._now_ms()
        self._note_ok(ch, now_ms)
        self.sink.emit(decode_inputs(ch.cfg.column_id, regs, now_ms))

    async def _heartbeat(self, ch: _Channel) -> None:
        if not ch.tracker.link.online:
            return
        self.stats.heartbeats += 1
        ch.heartbeat_seq = (ch.heartbeat_seq + 1) & 0xFFFF
        try:
            await ch.requester.write_single(ch.cfg.unit, regmap.HR_HEARTBEAT, ch.heartbeat_seq,
                                            ch.cfg.timeout_s)
        except ExchangeError as exc:
            await self._heartbeat_failed(ch, exc)
            return
        self._note_ok(ch)

    async def _heartbeat_failed(self, ch: _Channel, exc: ExchangeError) -> None:
        """A heartbeat's first request failed with `exc`: retry it, else count the failure."""
        if exc.reason == REASON_DISCONNECTED or not ch.cfg.retries:
            self._note_failure(ch, exc)
            return
        self.stats.retries += 1
        op = partial(ch.requester.write_single, ch.cfg.unit, regmap.HR_HEARTBEAT, ch.heartbeat_seq,
                     ch.cfg.timeout_s)
        try:
            await self._attempts(ch, op, ch.cfg.retries - 1)
        except ExchangeError as exc2:
            self._note_failure(ch, exc2)
            return
        self._note_ok(ch)

    # -- the slot driver -------------------------------------------------------------------
    def _book(self, ch: _Channel) -> None:
        """Book a parked column into the grid slot of its next periodic request."""
        loop = self._loop
        assert loop is not None
        wait = ch.schedule.wait_s(self._clock())
        key = math.ceil((loop.time() + (1.0 if wait is None else wait)) / self._grid_s)
        ch.slot = key
        bucket = self._slots.get(key)
        if bucket is None:   # one loop timer per slot, whatever the number of columns in it
            self._slots[key] = [ch]
            loop.call_at(key * self._grid_s, self._run_slot, key)
        else:
            bucket.append(ch)

    def _run_slot(self, key: int) -> None:
        """Send the due request of every column booked in slot `key`; one deadline check for
        the lot (per reply timeout: normally one)."""
        bucket = self._slots.pop(key, None)
        if bucket is None or not self._running:
            return
        now = self._clock()
        deadlines: dict[float, list[tuple[TcpRequester, int]]] = {}
        for ch in bucket:
            if ch.slot != key or ch.mode != _PARKED:   # handed back or booked again since
                continue
            try:
                tid = self._send(ch, now)
            except Exception:   # a bug here must not stop the others: count it, the task goes on
                self.stats.internal_errors += 1
                log.exception("modbus tcp column %s: slot request failed", ch.cfg.column_id)
                ch.hand_back()
                continue
            if tid >= 0:
                sent = deadlines.get(ch.cfg.timeout_s)
                if sent is None:
                    sent = deadlines[ch.cfg.timeout_s] = []
                sent.append((ch.requester, tid))
        loop = self._loop
        assert loop is not None
        for timeout_s, sent in deadlines.items():
            self._timer.call_later(loop, timeout_s, _expire_all, sent)

    def _send(self, ch: _Channel, now: float) -> int:
        """One parked column's due request, written to its connection; its transaction id
        (-1: nothing in flight)."""
        if ch.schedule.urgent_pending() or not ch.requester.connected:
            ch.hand_back()
            return -1
        due = ch.schedule.take(now)
        if due is None or (due.key != "poll" and not ch.tracker.link.online):
            self._book(ch)   # not due yet (the grid rounds), or a heartbeat skipped while offline
            return -1
        ch.mode = _SENT
        cfg = ch.cfg
        if due.key == "poll":
            self.stats.polls += 1
            return ch.requester.send_read_input(cfg.unit, 0, regmap.POLL_COUNT, self._poll_done, ch)
        self.stats.heartbeats += 1
        ch.heartbeat_seq = (ch.heartbeat_seq + 1) & 0xFFFF
        return ch.requester.send_write_single(cfg.unit, regmap.HR_HEARTBEAT, ch.heartbeat_seq,
                                              self._heartbeat_done, ch)

    def _poll_done(self, ch: _Channel, regs: tuple[int, ...] | None, exc: ExchangeError | None) -> None:
        """A slot poll's outcome (from data_received, the deadline, or the connection's loss).
        Runs for every poll of every column: _poll_ok and _note_ok written out."""
        if exc is not None:
            ch.failed = ("poll", exc)
            ch.hand_back()
            return
        assert regs is not None
        try:
            now_ms = self._now_ms()
            changed = ch.tracker.ok(now_ms)
            if changed is not None:
                self._online(ch, changed)
            self.sink.emit(decode_inputs(ch.cfg.column_id, regs, now_ms))
        except Exception:
            self.stats.internal_errors += 1
            log.exception("modbus tcp column %s: reading failed", ch.cfg.column_id)
        self._resume(ch)

    def _heartbeat_done(self, ch: _Channel, _value: object, exc: ExchangeError | None) -> None:
        if exc is not None:
            ch.failed = ("heartbeat", exc)
            ch.hand_back()
            return
        try:
            self._note_ok(ch)
        except Exception:
            self.stats.internal_errors += 1
            log.exception("modbus tcp column %s: heartbeat failed", ch.cfg.column_id)
        self._resume(ch)

    def _resume(self, ch: _Channel) -> None:
        """A slot request succeeded: book the column's next one, or hand it to its task."""
        if ch.mode != _SENT:
            return
        if (not self._running or ch.waiter is None or ch.schedule.urgent_pending()
                or not ch.requester.connected):
            ch.hand_back()
            return
        ch.mode = _PARKED
        self._book(ch)

    def _note_ok(self, ch: _Channel, now_ms: int | None = None) -> None:
        changed = ch.tracker.ok(self._now_ms() if now_ms is None else now_ms)
        if changed is not None:
            self._online(ch, changed)

    def _online(self, ch: _Channel, changed: ColumnLink) -> None:
        """The column answers again: back to its polling period, announced."""
        ch.schedule.update("poll", period_s=ch.cfg.poll_period_s, now=self._clock())
        log.info("column %s online", ch.cfg.column_id)
        self.sink.emit(changed)

    def _note_failure(self, ch: _Channel, exc: ExchangeError) -> None:
        changed = ch.tracker.fail(exc.reason, self._now_ms(), exc.detail)
        if changed is None:
            return
        ch.schedule.update("poll", period_s=max(self.config.offline_poll_period_s, ch.cfg.poll_period_s))
        if exc.reason in (REASON_TIMEOUT, REASON_GARBLED):
            ch.requester.close()   # maybe half-open: reconnect before the next probe
        log.warning("column %s offline: %s %s", ch.cfg.column_id, exc.reason, exc.detail)
        self.sink.emit(changed)


def _expire_all(sent: list[tuple[TcpRequester, int]]) -> None:
    """A slot's reply deadline: every request of it still unanswered has failed."""
    for requester, tid in sent:
        requester.expire(tid)
