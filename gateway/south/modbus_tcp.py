"""Modbus TCP to columns that have their own IP address: one connection per column.

Each column gets its own task: connect (reconnect with jittered exponential backoff),
poll the input registers every `poll_period_s`, send heartbeats, and write limits the
moment :meth:`ModbusTcpColumns.set_limits` asks (ahead of the next poll; the columns'
writes run concurrently, each confirmed by its echo). The columns' polls are spread over
the period (column i of n at i/n of it, in groups of `poll_slot_s` so that the event loop
wakes once per group; heartbeats in between), so a site of thousands of columns is polled
at an even rate instead of in one burst a second. The reply timeouts and the naps of all
columns share one coarse timer (:mod:`gateway.south.coarse_timer`).
Timeouts, retries, failure classes and online/offline tracking are the same as on the RTU
bus (shared code in :mod:`gateway.south.modbus_bus`); a column that stops answering on an
open connection is disconnected when it goes offline, so a half-open TCP connection is
replaced. The requests go through the lean client of
:mod:`gateway.south.modbus_tcp_client` (what a poll costs decides how many columns one
gateway carries), not pymodbus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
    timer_resolution_s: float = 0.01   # reply timeouts and naps fire up to this late (coarse_timer)


class _Channel:
    """One column's connection, schedule and link state."""

    def __init__(self, cfg: TcpColumn, config: TcpConfig, rng: random.Random, timer: CoarseTimer) -> None:
        self.cfg = cfg
        self.tracker = LinkTracker(cfg.column_id, config.offline_after)
        self.requester = TcpRequester(cfg.host, cfg.port, timer)
        self.timer = timer
        self.schedule: PollSchedule[str, UrgentJob] = PollSchedule(budget=1.0)
        self.backoff = Backoff(config.reconnect_base_s, config.reconnect_max_s, rng)
        self.waiter: asyncio.Future[None] | None = None   # the task's nap, cut short by wake()
        self.task: asyncio.Task[None] | None = None
        self.heartbeat_seq = 0
        self.connects = 0

    def wake(self) -> None:
        """Urgent work was queued: end the nap now."""
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def nap(self, seconds: float) -> None:
        """Sleep until the next job is due or wake() is called (a bare future on the shared
        coarse timer: asyncio.wait_for on an Event costs a task per call, a loop timer per
        call a heap entry, and this runs once per poll)."""
        loop = asyncio.get_running_loop()
        self.waiter = waiter = loop.create_future()
        self.timer.call_later(loop, seconds, _settle, waiter)
        try:
            await waiter
        finally:
            self.waiter = None


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


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
        rng = random.Random()   # one for every column's reconnect jitter (each would take 2.5 KB)
        for col in columns:
            if col.column_id in self._channels:
                raise ValueError("duplicate column " + col.column_id)
            self._channels[col.column_id] = _Channel(col, self.config, rng, self._timer)

    # -- lifetime ------------------------------------------------------------------------
    async def start(self) -> None:
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
        tasks = [ch.task for ch in self._channels.values() if ch.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        for ch in self._channels.values():
            ch.task = None
            ch.requester.close()
            self._fail_urgent(ch, REASON_DISCONNECTED)

    def subscribe(self, callback: Callable[[ColumnEvent], None]) -> None:
        self.sink.subscribe(callback)

    def _tracker(self, column_id: str) -> LinkTracker:
        return self._channels[column_id].tracker

    def connects(self, column_id: str) -> int:
        return self._channels[column_id].connects

    # -- limits --------------------------------------------------------------------------
    async def set_limits(self, commands: Sequence[LimitCommand]) -> list[LimitResult]:
        """Write each column's limit now, all columns at once; one result per column."""
        units = {cid: ch.cfg.unit for cid, ch in self._channels.items()}
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
            if not ch.requester.connected and not await self._connect(ch):
                continue
            try:
                job = ch.schedule.take_urgent()
                if job is not None:
                    await job.execute()
                    continue
                if first:   # read at once after the first connect, then in the column's slot
                    first = False
                    await self._poll(ch)
                    continue
                due = ch.schedule.take(self._clock())
                if due is not None:
                    await (self._poll(ch) if due.key == "poll" else self._heartbeat(ch))
                    continue
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop the column: count it, go on
                self.stats.internal_errors += 1
                log.exception("modbus tcp column %s: job failed", ch.cfg.column_id)
                continue
            wait = ch.schedule.wait_s(self._clock())
            await ch.nap(wait if wait is not None else 1.0)

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
        try:   # the first attempt inline: this runs for every column every second
            regs = await ch.requester.read_input(cfg.unit, 0, regmap.POLL_COUNT, cfg.timeout_s)
        except ExchangeError as exc:
            if exc.reason == REASON_DISCONNECTED or not cfg.retries or not ch.tracker.link.online:
                self.stats.poll_failures += 1
                self._note_failure(ch, exc)
                return
            self.stats.retries += 1
            op = partial(ch.requester.read_input, cfg.unit, 0, regmap.POLL_COUNT, cfg.timeout_s)
            try:
                regs = await self._attempts(ch, op, cfg.retries - 1)
            except ExchangeError as exc2:
                self.stats.poll_failures += 1
                self._note_failure(ch, exc2)
                return
        now_ms = self._now_ms()
        self._note_ok(ch, now_ms)
        self.sink.emit(decode_inputs(ch.cfg.column_id, regs, now_ms))

    async def _heartbeat(self, ch: _Channel) -> None:
        if not ch.tracker.link.online:
            return
        self.stats.heartbeats += 1
        ch.heartbeat_seq = (ch.heartbeat_seq + 1) & 0xFFFF
        op = partial(ch.requester.write_single, ch.cfg.unit, regmap.HR_HEARTBEAT, ch.heartbeat_seq,
                     ch.cfg.timeout_s)
        try:
            await self._attempts(ch, op)
        except ExchangeError as exc:
            self._note_failure(ch, exc)
            return
        self._note_ok(ch)

    def _note_ok(self, ch: _Channel, now_ms: int | None = None) -> None:
        changed = ch.tracker.ok(self._now_ms() if now_ms is None else now_ms)
        if changed is not None:
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
