"""Modbus RTU bus master: many columns on one RS-485 line (pymodbus over pyserial).

One task owns the line. It polls every column's input registers on a bus-time-aware
schedule (:mod:`gateway.south.schedule`), sends heartbeats, and turns each reply into a
:class:`ColumnReading` event. :meth:`ModbusRtuBus.set_limits` does not wait for the next
poll: its writes jump the queue and go out at the next exchange boundary, as one
broadcast table frame (unit 0, FC16, no reply) when several columns change together, the
bus allows it and no damaged reply was seen for `broadcast_quiet_s` (noise loses a broadcast
silently), else as one FC16 per column to HR_ASSIGNED_LIMIT.. (confirmed by the echo). A
broadcast's columns are polled first after it: their replies show whether each took it.
A column that times out, answers with a bad CRC, an exception or a reply of the wrong size
is counted per reason; after `offline_after` failed polls in a row it is offline (polled
slowly, no heartbeats) until its first good reply.

The request machinery (:class:`Requester`, :class:`EventSink`, :func:`plan_limits`) is
shared with the Modbus TCP adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from pymodbus.client import AsyncModbusSerialClient
from pymodbus.client.base import ModbusBaseClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU

from firmware import regmap
from firmware.crc import crc16
from gateway.south.schedule import (
    EXCEPTION_REPLY_BYTES,
    READ_REQUEST_BYTES,
    WRITE_MULTIPLE_REPLY_BYTES,
    WRITE_SINGLE_BYTES,
    LineTiming,
    PollSchedule,
    read_reply_bytes,
    spread_s,
    write_multiple_request_bytes,
)
from gateway.south.types import (
    REASON_CRC,
    REASON_DISCONNECTED,
    REASON_EXCEPTION,
    REASON_GARBLED,
    REASON_OK,
    REASON_TIMEOUT,
    REASON_WRONG_LENGTH,
    ColumnAdapterBase,
    ColumnEvent,
    LimitCommand,
    LimitResult,
    LinkTracker,
    amps_to_da,
    decode_inputs,
    validity_reg,
)

log = logging.getLogger(__name__)

BROADCAST_UNIT = 0
MAX_WRITE_REGS = 123   # FC16 limit; a table frame is validity + up to 122 entries


def wall_ms() -> int:
    return int(time.time() * 1000)


# -- one request at a time, classified --------------------------------------------------------

class ExchangeError(Exception):
    """A request that got no usable reply; `reason` is one of types.FAILURE_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason + (": " + detail if detail else ""))
        self.reason = reason
        self.detail = detail


class Requester:
    """A pymodbus client plus what pymodbus does not say: why a request failed.

    pymodbus runs with retries=0 and a backstop timeout; each attempt is timed here, and
    the bytes that came back (seen through the client's trace hook) tell a silent column
    (timeout) from a damaged reply (CRC) or a partial one (garbled).
    """

    def __init__(self, make_client: Callable[[Callable[[bool, bytes], bytes]], ModbusBaseClient], *,
                 rtu: bool) -> None:
        self.rtu = rtu
        self.client = make_client(self._trace)
        self._rx = b""
        self._rx_any = False
        self.exchanges = 0
        self.failures: dict[str, int] = {}

    def _trace(self, sending: bool, data: bytes) -> bytes:
        if sending:
            self._rx = b""
            self._rx_any = False
        elif data:
            self._rx = bytes(data)   # pymodbus hands over its whole receive buffer
            self._rx_any = True
        return data

    @property
    def connected(self) -> bool:
        return bool(self.client.connected)

    async def connect(self) -> bool:
        try:
            return bool(await self.client.connect())
        except (OSError, ModbusException) as exc:
            log.debug("connect failed: %s", exc)
            return False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()

    def _classify(self, reply_len: int) -> str:
        if not self._rx_any:
            return REASON_TIMEOUT
        rx = self._rx
        if self.rtu and len(rx) >= 4 and len(rx) in (reply_len, EXCEPTION_REPLY_BYTES) and crc16(rx) != 0:
            return REASON_CRC
        return REASON_GARBLED

    def _fail(self, reason: str, detail: str = "") -> ExchangeError:
        self.failures[reason] = self.failures.get(reason, 0) + 1
        return ExchangeError(reason, detail)

    async def _call(self, op: Callable[[], Awaitable[ModbusPDU]], timeout_s: float,
                    reply_len: int, fc: int) -> ModbusPDU:
        if not self.connected:
            raise self._fail(REASON_DISCONNECTED)
        self.exchanges += 1
        try:
            async with asyncio.timeout(timeout_s):
                resp = await op()
        except TimeoutError:
            raise self._fail(self._classify(reply_len)) from None
        except ConnectionException as exc:
            raise self._fail(REASON_DISCONNECTED, str(exc)) from None
        except ModbusIOException:
            raise self._fail(self._classify(reply_len)) from None
        except (ModbusException, ValueError) as exc:
            raise self._fail(REASON_GARBLED, str(exc)) from None
        if resp.isError():
            raise self._fail(REASON_EXCEPTION, "exception code %d" % resp.exception_code)
        if resp.function_code != fc:   # pymodbus takes any good frame: this one answers another request
            raise self._fail(REASON_GARBLED, "function code %d for %d" % (resp.function_code, fc))
        return resp

    async def read_input(self, unit: int, address: int, count: int, timeout_s: float) -> list[int]:
        resp = await self._call(
            lambda: self.client.read_input_registers(address, count=count, device_id=unit),
            timeout_s, read_reply_bytes(count), 4)
        regs = list(resp.registers)
        if len(regs) != count:
            raise self._fail(REASON_WRONG_LENGTH, "%d registers for %d" % (len(regs), count))
        return regs

    async def write_multiple(self, unit: int, address: int, values: Sequence[int], timeout_s: float) -> None:
        resp = await self._call(lambda: self.client.write_registers(address, list(values), device_id=unit),
                                timeout_s, WRITE_MULTIPLE_REPLY_BYTES, 16)
        if resp.address != address or resp.count != len(values):
            raise self._fail(REASON_WRONG_LENGTH, "echo %d/%d" % (resp.address, resp.count))

    async def write_single(self, unit: int, address: int, value: int, timeout_s: float) -> None:
        resp = await self._call(lambda: self.client.write_register(address, value, device_id=unit),
                                timeout_s, WRITE_SINGLE_BYTES, 6)
        echo = (resp.address, resp.registers[0] if resp.registers else None)
        if echo != (address, value):   # FC06 echoes address and value: both must be ours
            raise self._fail(REASON_WRONG_LENGTH, "echo %s/%s" % echo)

    async def broadcast(self, address: int, values: Sequence[int]) -> None:
        """FC16 to unit 0: no reply comes, so nothing to wait for here."""
        if not self.connected:
            raise self._fail(REASON_DISCONNECTED)
        self.exchanges += 1
        try:
            await self.client.write_registers(address, list(values), device_id=BROADCAST_UNIT,
                                              no_response_expected=True)
        except ModbusException as exc:
            raise self._fail(REASON_DISCONNECTED, str(exc)) from None


class Backoff:
    """Jittered exponential delay for reconnects: base, 2x base, ... up to max_s."""

    def __init__(self, base_s: float = 0.5, max_s: float = 30.0, rng: random.Random | None = None) -> None:
        self.base_s = base_s
        self.max_s = max_s
        self.attempts = 0
        self._rng = rng or random.Random()

    def next_s(self) -> float:
        delay = min(self.max_s, self.base_s * float(1 << min(self.attempts, 30)))
        self.attempts += 1
        return delay * (0.5 + self._rng.random() / 2)

    def reset(self) -> None:
        self.attempts = 0


# -- events out ------------------------------------------------------------------------------

@dataclass
class SouthStats:
    polls: int = 0
    poll_failures: int = 0
    retries: int = 0
    heartbeats: int = 0
    unicast_writes: int = 0
    broadcast_frames: int = 0
    broadcasts_held: int = 0            # limit writes sent answered instead: the line was noisy
    reads_for_others: int = 0      # e.g. the site meter on the same bus
    connects: int = 0
    events_dropped: int = 0        # queue full: oldest event dropped
    callback_errors: int = 0
    internal_errors: int = 0


class EventSink:
    """A bounded queue of ColumnEvents (oldest dropped and counted when full) plus
    callbacks; a callback that raises is counted, never kills the bus task."""

    def __init__(self, stats: SouthStats, maxsize: int = 1000) -> None:
        self.queue: asyncio.Queue[ColumnEvent] = asyncio.Queue(maxsize)
        self._callbacks: list[Callable[[ColumnEvent], None]] = []
        self._stats = stats

    def subscribe(self, callback: Callable[[ColumnEvent], None]) -> None:
        self._callbacks.append(callback)

    def emit(self, event: ColumnEvent) -> None:
        for cb in self._callbacks:
            try:
                cb(event)
            except Exception:
                self._stats.callback_errors += 1
                log.exception("southbound event callback failed")
        if self.queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
            self._stats.events_dropped += 1
        self.queue.put_nowait(event)


# -- limit writes ----------------------------------------------------------------------------

@dataclass(frozen=True)
class BroadcastFrame:
    """One table write: register `start` gets the validity, start+1.. the entries."""

    start: int
    values: tuple[int, ...]
    column_ids: tuple[str, ...]


@dataclass(frozen=True)
class UnicastWrite:
    column_id: str
    values: tuple[int, ...]   # limit_da, validity_s[, failsafe_da] from HR_ASSIGNED_LIMIT


@dataclass(frozen=True)
class LimitPlan:
    broadcasts: tuple[BroadcastFrame, ...]
    unicasts: tuple[UnicastWrite, ...]
    results: Mapping[str, LimitResult]   # the rejected ones now; sent ones filled in later
    order: tuple[str, ...]                # column ids, command order, last command wins


def plan_limits(commands: Sequence[LimitCommand], addresses: Mapping[str, int], *,
                broadcast: bool, min_columns: int = 2) -> LimitPlan:
    """Validate commands and decide which go in broadcast table frames.

    Broadcast only carries limit + validity, so a command with a failsafe goes unicast;
    columns sharing a validity are grouped, each frame spans at most 122 addresses
    (addresses in between get NO_CHANGE), and a frame reaching fewer than `min_columns`
    columns is sent as unicast writes instead (those are confirmed).
    """
    latest: dict[str, LimitCommand] = {}
    for cmd in commands:
        latest.pop(cmd.column_id, None)
        latest[cmd.column_id] = cmd
    results: dict[str, LimitResult] = {}
    table: dict[int, list[tuple[int, str, int]]] = {}   # validity -> (address, column, limit_da)
    unicasts: list[UnicastWrite] = []
    for cid, cmd in latest.items():
        limit = amps_to_da(cmd.limit_a)
        validity = validity_reg(cmd.validity_s)
        failsafe = None if cmd.failsafe_a is None else amps_to_da(cmd.failsafe_a)
        reason = ("unknown_column" if cid not in addresses else "bad_limit" if limit is None
                  else "bad_validity" if validity is None
                  else "bad_failsafe" if cmd.failsafe_a is not None and failsafe is None else "")
        if reason or limit is None or validity is None:
            results[cid] = LimitResult(cid, False, "none", reason)
            continue
        if failsafe is not None:
            unicasts.append(UnicastWrite(cid, (limit, validity, failsafe)))
        elif broadcast:
            table.setdefault(validity, []).append((addresses[cid], cid, limit))
        else:
            unicasts.append(UnicastWrite(cid, (limit, validity)))
    frames: list[BroadcastFrame] = []
    for validity, entries in table.items():
        entries.sort()
        chunk: list[tuple[int, str, int]] = []
        for entry in [*entries, None]:
            if entry is not None and (not chunk or entry[0] - chunk[0][0] + 2 <= MAX_WRITE_REGS):
                chunk.append(entry)
                continue
            if len(chunk) >= min_columns:
                first = chunk[0][0]
                by_addr = {a: lim for a, _c, lim in chunk}
                span = range(first, chunk[-1][0] + 1)
                values = (validity, *(by_addr.get(a, regmap.NO_CHANGE) for a in span))
                frames.append(BroadcastFrame(regmap.BROADCAST_TABLE + first - 1, values,
                                             tuple(c for _a, c, _l in chunk)))
            else:
                unicasts.extend(UnicastWrite(c, (lim, validity)) for _a, c, lim in chunk)
            chunk = [] if entry is None else [entry]
    return LimitPlan(tuple(frames), tuple(unicasts), results, tuple(latest))


# -- the bus ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class RtuColumn:
    column_id: str
    address: int                     # bus address 1..247
    poll_period_s: float = 1.0
    timeout_s: float | None = None   # None: wire time of the poll + RtuBusConfig.response_margin_s
    retries: int = 1                 # extra attempts per poll / write while online


@dataclass(frozen=True)
class RtuBusConfig:
    device: str
    baud: int = 9600
    parity: str = "N"
    stopbits: int = 1
    broadcast: bool = True               # the columns on this bus take the broadcast limit table
    broadcast_min_columns: int = 2
    broadcast_turnaround_s: float = 0.1  # silence after a broadcast so every slave can act on it
    broadcast_quiet_s: float = 30.0      # no broadcast until this long after a damaged reply
    slave_turnaround_s: float = 0.005    # a column's reply latency, for the bus budget
    response_margin_s: float = 0.1       # added to the wire time for automatic timeouts
    offline_after: int = 3               # failed polls in a row
    offline_poll_period_s: float = 5.0   # probe period while offline (no retries)
    heartbeat_period_s: float | None = 10.0
    budget: float = 0.8                  # fraction of the line periodic polls may use
    reconnect_base_s: float = 0.5
    reconnect_max_s: float = 30.0
    event_queue_size: int = 1000


@dataclass
class _Column:
    cfg: RtuColumn
    tracker: LinkTracker
    timeout_s: float
    heartbeat_seq: int = 0


@dataclass
class UrgentJob:
    """Work that jumps the poll queue; whoever queued it awaits `future`."""

    run: Callable[[], Awaitable[Any]]
    future: asyncio.Future[Any]

    async def execute(self) -> None:
        """Run it and settle the future whatever happens (even when the loop is cancelled,
        so a caller of set_limits is never left waiting). Non-protocol errors re-raise."""
        try:
            result = await self.run()
        except ExchangeError as exc:
            self._settle(exc)
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            self._settle(ExchangeError(REASON_DISCONNECTED) if cancelled else exc)
            raise
        else:
            if not self.future.done():
                self.future.set_result(result)

    def _settle(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


Key = tuple[str, str]   # ("poll" | "heartbeat", column_id)
_NOISE_REASONS = (REASON_CRC, REASON_GARBLED)


class ModbusRtuBus(ColumnAdapterBase):
    """The master of one RS-485 line. `async with ModbusRtuBus(cfg, columns) as bus:`
    (or start()/stop()); read `bus.events` or `subscribe(callback)`."""

    def __init__(self, config: RtuBusConfig, columns: Sequence[RtuColumn], *,
                 clock: Callable[[], float] = time.monotonic, now_ms: Callable[[], int] = wall_ms) -> None:
        self.config = config
        self.timing = LineTiming(config.baud)
        self._clock = clock
        self._now_ms = now_ms
        self.stats = SouthStats()
        self.sink = EventSink(self.stats, config.event_queue_size)
        self.events = self.sink.queue
        self.schedule: PollSchedule[Key, UrgentJob] = PollSchedule(budget=config.budget)
        turnaround = config.slave_turnaround_s
        self._poll_cost = self.timing.exchange_s(READ_REQUEST_BYTES, read_reply_bytes(regmap.POLL_COUNT),
                                                 turnaround)
        self._hb_cost = self.timing.exchange_s(WRITE_SINGLE_BYTES, WRITE_SINGLE_BYTES, turnaround)
        self._columns: dict[str, _Column] = {}
        for col in columns:
            if col.column_id in self._columns or not 1 <= col.address <= regmap.BROADCAST_MAX_ADDRESS:
                raise ValueError("duplicate column or bad address: %s/%d" % (col.column_id, col.address))
            timeout = col.timeout_s
            if timeout is None:
                timeout = self._poll_cost + config.response_margin_s
            tracker = LinkTracker(col.column_id, config.offline_after)
            self._columns[col.column_id] = _Column(col, tracker, timeout)
        self._addresses = {c.cfg.column_id: c.cfg.address for c in self._columns.values()}
        max_timeout = max((c.timeout_s for c in self._columns.values()), default=1.0)
        self.requester = Requester(lambda trace: AsyncModbusSerialClient(
            config.device, framer=FramerType.RTU, baudrate=config.baud, parity=config.parity,
            stopbits=config.stopbits, timeout=max_timeout + 1.0, retries=0, reconnect_delay=0,
            trace_packet=trace), rtu=True)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._backoff = Backoff(config.reconnect_base_s, config.reconnect_max_s)
        self._noise_at: float | None = None   # clock of the last damaged reply (CRC, garbled)

    # -- lifetime ------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._book_jobs()
            if await self.requester.connect():
                self.stats.connects += 1
            self._task = asyncio.create_task(self._run(), name="modbus-rtu:" + self.config.device)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, timeout=5.0)
        self.requester.close()
        self._fail_urgent(REASON_DISCONNECTED)

    def subscribe(self, callback: Callable[[ColumnEvent], None]) -> None:
        self.sink.subscribe(callback)

    # -- what others ask -----------------------------------------------------------------
    def _tracker(self, column_id: str) -> LinkTracker:
        return self._columns[column_id].tracker

    def failures(self) -> dict[str, int]:
        return dict(self.requester.failures)

    def utilisation(self) -> float:
        """Planned share of the line used by polls and heartbeats (after any stretching)."""
        return self.schedule.utilisation()

    def measured_utilisation(self) -> float:
        return self.schedule.measured_utilisation(self._clock())

    async def set_limits(self, commands: Sequence[LimitCommand]) -> list[LimitResult]:
        """Write limits now (ahead of any poll). One result per column, command order."""
        # A broadcast is lost with any one of its bytes and nobody says so: on a line that
        # damaged replies lately, limits go as answered writes until it has been quiet a while.
        noisy = self._line_noisy()
        if noisy:
            self.stats.broadcasts_held += 1
        plan = plan_limits(commands, self._addresses, broadcast=self.config.broadcast and not noisy,
                           min_columns=self.config.broadcast_min_columns)
        results = dict(plan.results)
        if plan.broadcasts or plan.unicasts:
            try:
                results.update(await self._submit(lambda: self._write_plan(plan)))
            except ExchangeError as exc:
                for frame in plan.broadcasts:
                    for cid in frame.column_ids:
                        results[cid] = LimitResult(cid, False, "broadcast", exc.reason)
                for write in plan.unicasts:
                    results[write.column_id] = LimitResult(write.column_id, False, "unicast", exc.reason)
        return [results[c] for c in plan.order]

    async def read_input_registers(self, unit: int, address: int, count: int, timeout_s: float) -> list[int]:
        """A read for another device on this line (e.g. the site meter), queued ahead of polls."""
        self.stats.reads_for_others += 1

        async def run() -> list[int]:
            t0 = self._clock()
            try:
                return await self.requester.read_input(unit, address, count, timeout_s)
            finally:
                self.schedule.record_busy(t0, self._clock())

        result: list[int] = await self._submit(run)
        return result

    async def _submit(self, run: Callable[[], Awaitable[Any]]) -> Any:
        if self._task is None or self._task.done() or not self.requester.connected:
            raise ExchangeError(REASON_DISCONNECTED)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.schedule.push_urgent(UrgentJob(run, fut))
        self._wake.set()
        return await fut

    def _fail_urgent(self, reason: str) -> None:
        while (job := self.schedule.take_urgent()) is not None:
            if not job.future.done():
                job.future.set_exception(ExchangeError(reason))

    # -- the loop ------------------------------------------------------------------------
    def _book_jobs(self) -> None:
        now = self._clock()
        n = len(self._columns)
        for i, col in enumerate(self._columns.values()):
            cid = col.cfg.column_id
            period = col.cfg.poll_period_s
            self.schedule.add(("poll", cid), period, self._poll_cost, now=now, phase_s=spread_s(i, n, period))
            hb = self.config.heartbeat_period_s
            if hb:
                self.schedule.add(("heartbeat", cid), hb, self._hb_cost, now=now,
                                  phase_s=spread_s(i, n, hb, 0.5))

    async def _run(self) -> None:
        while True:
            if not self.requester.connected:
                if not await self._reconnect():
                    continue
            self._wake.clear()
            try:
                job = self.schedule.take_urgent()
                if job is not None:
                    await job.execute()
                    continue
                due = self.schedule.take(self._clock())
                if due is not None:
                    kind, cid = due.key
                    col = self._columns[cid]
                    await (self._poll(col) if kind == "poll" else self._heartbeat(col))
                    continue
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop the line: count it, go on
                self.stats.internal_errors += 1
                log.exception("modbus rtu bus %s: job failed", self.config.device)
                continue
            wait = self.schedule.wait_s(self._clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait if wait is not None else 1.0)

    async def _reconnect(self) -> bool:
        if await self.requester.connect():
            self._backoff.reset()
            self.stats.connects += 1
            return True
        self._fail_urgent(REASON_DISCONNECTED)
        now_ms = self._now_ms()
        for col in self._columns.values():
            self._note_failure(col, ExchangeError(REASON_DISCONNECTED), now_ms)
        await asyncio.sleep(self._backoff.next_s())
        return False

    async def _attempts(self, col: _Column, op: Callable[[], Awaitable[Any]], retries: int) -> Any:
        """Run op up to 1 + retries times; books bus time; raises the last ExchangeError."""
        last = ExchangeError(REASON_TIMEOUT)
        for attempt in range(retries + 1):
            if attempt:
                self.stats.retries += 1
                # A limit write queued meanwhile goes before the retry, not after it.
                while (job := self.schedule.take_urgent()) is not None:
                    await job.execute()
            t0 = self._clock()
            try:
                return await op()
            except ExchangeError as exc:
                last = exc
                if exc.reason in _NOISE_REASONS:
                    self._noise_at = self._clock()
                if exc.reason == REASON_DISCONNECTED:
                    break
            finally:
                self.schedule.record_busy(t0, self._clock())
        raise last

    def _line_noisy(self) -> bool:
        """Damaged replies seen lately (not silence: a dead column only times out)."""
        return self._noise_at is not None and self._clock() - self._noise_at < self.config.broadcast_quiet_s

    async def _poll(self, col: _Column) -> None:
        self.stats.polls += 1
        online = col.tracker.link.online
        address = col.cfg.address
        try:
            regs = await self._attempts(
                col, lambda: self.requester.read_input(address, 0, regmap.POLL_COUNT, col.timeout_s),
                col.cfg.retries if online else 0)
        except ExchangeError as exc:
            self.stats.poll_failures += 1
            self._note_failure(col, exc, self._now_ms())
            return
        now_ms = self._now_ms()
        self._note_ok(col, now_ms)
        self.sink.emit(decode_inputs(col.cfg.column_id, regs, now_ms))

    async def _heartbeat(self, col: _Column) -> None:
        if not col.tracker.link.online:
            return  # an offline column is probed by its (slow) polls, not by heartbeats
        self.stats.heartbeats += 1
        col.heartbeat_seq = (col.heartbeat_seq + 1) & 0xFFFF
        seq, address = col.heartbeat_seq, col.cfg.address
        try:
            await self._attempts(col, lambda: self.requester.write_single(
                address, regmap.HR_HEARTBEAT, seq, col.timeout_s), col.cfg.retries)
        except ExchangeError as exc:
            self._note_failure(col, exc, self._now_ms())
            return
        self._note_ok(col, self._now_ms())

    async def _write_plan(self, plan: LimitPlan) -> dict[str, LimitResult]:
        results: dict[str, LimitResult] = {}
        for frame in plan.broadcasts:
            t0 = self._clock()
            try:
                await self.requester.broadcast(frame.start, frame.values)
                self.stats.broadcast_frames += 1
                # The frame is still leaving the UART; then every slave gets time to act.
                await asyncio.sleep(self.timing.broadcast_s(write_multiple_request_bytes(len(frame.values)),
                                                            self.config.broadcast_turnaround_s))
                ok, reason = True, REASON_OK
                # Nobody answers a broadcast: its columns are polled first after it, and
                # their replies show whether each one took it (the gateway re-sends, answered,
                # to one that did not). Their polls move earlier, none is added.
                now = self._clock()
                for cid in frame.column_ids:
                    self.schedule.advance(("poll", cid), now)
            except ExchangeError as exc:
                ok, reason = False, exc.reason
            finally:
                self.schedule.record_busy(t0, self._clock())
            first = frame.start - regmap.BROADCAST_TABLE + 1
            for cid in frame.column_ids:
                limit = frame.values[self._addresses[cid] - first + 1]
                results[cid] = LimitResult(cid, ok, "broadcast", reason, limit, frame.values[0])
        for write in plan.unicasts:
            col = self._columns[write.column_id]
            self.stats.unicast_writes += 1
            values = write.values
            op = partial(self.requester.write_multiple, col.cfg.address, regmap.HR_ASSIGNED_LIMIT, values,
                         col.timeout_s)
            try:
                await self._attempts(col, op, col.cfg.retries)
            except ExchangeError as exc:
                self._note_failure(col, exc, self._now_ms())
                results[write.column_id] = LimitResult(write.column_id, False, "unicast", exc.reason,
                                                       values[0], values[1])
                continue
            self._note_ok(col, self._now_ms())
            results[write.column_id] = LimitResult(write.column_id, True, "unicast", REASON_OK,
                                                   values[0], values[1])
        return results

    # -- link state ----------------------------------------------------------------------
    def _note_ok(self, col: _Column, now_ms: int) -> None:
        changed = col.tracker.ok(now_ms)
        if changed is not None:
            key = ("poll", col.cfg.column_id)
            if key in self.schedule:
                self.schedule.update(key, period_s=col.cfg.poll_period_s, cost_s=self._poll_cost,
                                     now=self._clock())
            log.info("column %s online", col.cfg.column_id)
            self.sink.emit(changed)

    def _note_failure(self, col: _Column, exc: ExchangeError, now_ms: int) -> None:
        changed = col.tracker.fail(exc.reason, now_ms, exc.detail)
        if changed is not None:
            key = ("poll", col.cfg.column_id)
            if key in self.schedule:
                period = max(self.config.offline_poll_period_s, col.cfg.poll_period_s)
                self.schedule.update(key, period_s=period, cost_s=col.timeout_s)
            log.warning("column %s offline: %s %s", col.cfg.column_id, exc.reason, exc.detail)
            self.sink.emit(changed)
