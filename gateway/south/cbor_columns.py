"""Columns on the CBOR message link, over a serial line or TCP: event-driven.

Each column has its own task, connection and :class:`firmware.cbor_link.Link` (the
contract's own code, run with ``side=FROM_GATEWAY``). The column speaks first: boot,
heartbeats, status, meter values and sessions arrive as calls, are answered with a result
and become events (:class:`ColumnReading`, :class:`ColumnSession`, :class:`ColumnBooted`,
:class:`ColumnLink`). The gateway's calls (limits, configuration, reset, trigger) are
matched to their results by id and time out after ``call_timeout_s``.

A column is online while valid messages arrive and offline after ``offline_after_s`` of
silence (garbage does not count as a sign of life) or when its connection is lost. A TCP
column that falls silent is disconnected, so a half-open connection is replaced; TCP and
serial devices that fail are reopened with jittered backoff. Bad input never reaches the
event loop: the Link answers what it can with an error frame and counts everything
(:meth:`CborColumns.link_stats`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import serial  # type: ignore[import-untyped]

from firmware import messages, status, status_names
from firmware.cbor_link import Link
from firmware.messages import ERROR, MessageError
from gateway.recv_into import RecvIntoProtocol
from gateway.south.modbus_bus import Backoff, wall_ms
from gateway.south.types import (
    REASON_DISCONNECTED,
    REASON_EXCEPTION,
    REASON_GARBLED,
    REASON_OK,
    REASON_TIMEOUT,
    ColumnAdapterBase,
    ColumnEvent,
    ColumnReading,
    LimitCommand,
    LimitResult,
    LinkTracker,
    amps_to_da,
)

log = logging.getLogger(__name__)

REASON_REJECTED = "rejected"         # the column answered Rejected
REASON_BAD_REQUEST = "bad_request"   # the call breaks the contract; nothing was sent
MAX_VALIDITY_S = 86400               # SetChargingLimit.validityS in firmware/messages.py
_READ_SIZE = 4096                    # bytes taken from a column's stream at a time (a frame: <= 1029)
_BAD_COUNTERS = ("bad_crc", "oversize", "bad_cbor", "bad_messages", "unknown_actions", "unsupported")


def monotonic_ms() -> int:
    return int(time.monotonic() * 1000)


# -- configuration and events -------------------------------------------------------------------

@dataclass(frozen=True)
class CborSerialColumn:
    column_id: str
    device: str
    baud: int = 115200


@dataclass(frozen=True)
class CborTcpColumn:
    """The gateway connects to the column, which listens on host:port."""

    column_id: str
    host: str
    port: int


CborColumn = CborSerialColumn | CborTcpColumn


@dataclass(frozen=True)
class CborConfig:
    # Told to each column in the boot answer. Keep it well below the columns'
    # heartbeat_timeout_s: our answers are what tells a column the gateway is alive.
    heartbeat_interval_s: int = 20
    offline_after_s: float | None = None  # silence -> offline; None: two heartbeats + 5 s
    call_timeout_s: float = 5.0
    max_pending: int = 4                 # our calls in flight per column; more wait their turn
    tick_s: float = 0.1                  # how often call timeouts and silence are checked
    connect_timeout_s: float = 2.0
    reconnect_base_s: float = 0.5
    reconnect_max_s: float = 30.0
    check_column_id: bool = True         # a boot naming another column id is Rejected
    max_tx_buffer: int = 64 * 1024       # bytes queued for a slow line; beyond: a failed write
    event_queue_size: int = 1000


@dataclass(frozen=True)
class ColumnBooted:
    """A BootNotification. A column with a config error (or the wrong id) is faulted:
    its readings report status Faulted / ConfigError until a clean boot."""

    column_id: str                       # the configured id
    ts_ms: int
    reported_id: str
    firmware: str
    model: str
    phases: int
    hardware_a: float
    bus_address: int
    config_error: str = ""
    accepted: bool = True
    boots: int = 1                       # BootNotifications seen (firmware sends one per connection)

    @property
    def fault(self) -> str:
        if not self.accepted:
            return "columnId %r is not the configured %r" % (self.reported_id, self.column_id)
        return self.config_error


@dataclass(frozen=True)
class ColumnSession:
    """StartTransaction (started) or StopTransaction; energies in Wh."""

    column_id: str
    ts_ms: int
    started: bool
    session_id: int
    meter_wh: int                        # meterStartWh or meterStopWh
    session_energy_wh: int | None = None  # stop: meterStop - meterStart when the start was seen
    reason: str = ""                     # stop reason (messages.STOP_REASONS)


CborEvent = ColumnEvent | ColumnBooted | ColumnSession


class CborCallError(Exception):
    """A call to a column that got no usable answer. `reason`: REASON_TIMEOUT,
    REASON_DISCONNECTED, REASON_EXCEPTION (an error frame, `code` is its errorCode),
    REASON_GARBLED (an invalid result) or REASON_BAD_REQUEST."""

    def __init__(self, reason: str, detail: str = "", code: str = "") -> None:
        super().__init__(reason + (": " + detail if detail else ""))
        self.reason = reason
        self.detail = detail
        self.code = code


@dataclass
class CborStats:
    connects: int = 0
    disconnects: int = 0
    boots: int = 0
    heartbeats: int = 0
    status_notifications: int = 0
    meter_values: int = 0
    duplicates: int = 0              # meter values / session messages seen twice (lost result)
    sessions_started: int = 0
    sessions_stopped: int = 0
    calls: int = 0                   # our calls sent
    call_failures: int = 0           # ... that timed out, errored or were lost
    limits_rejected: int = 0
    id_mismatches: int = 0
    events_dropped: int = 0          # queue full: oldest event dropped
    callback_errors: int = 0
    internal_errors: int = 0


# -- byte streams ---------------------------------------------------------------------------------

class _Conn(Protocol):
    closed: asyncio.Future[str]      # resolves with why the stream ended

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


def _lose(closed: asyncio.Future[str], why: str) -> None:
    if not closed.done():
        closed.set_result(why)


class _TcpConn(RecvIntoProtocol):
    def __init__(self, on_data: Callable[[bytes], None], max_tx: int) -> None:
        self.init_reads(_READ_SIZE)
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._on_data = on_data
        self._max_tx = max_tx
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self._on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        _lose(self.closed, "connection lost" + (": %s" % exc if exc else ""))

    def write(self, data: bytes) -> None:
        t = self._transport
        if t is None or t.is_closing() or self.closed.done():
            raise ConnectionError("not connected")
        if t.get_write_buffer_size() > self._max_tx:
            raise ConnectionError("send buffer full")
        t.write(data)

    def close(self) -> None:
        _lose(self.closed, "closed")
        if self._transport is not None:
            self._transport.close()


class _SerialConn:
    """A serial device opened by pyserial (line settings), read and written through its fd
    from the event loop: no thread, writes queue while the line is busy."""

    def __init__(self, port: serial.Serial, on_data: Callable[[bytes], None], max_tx: int) -> None:
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[str] = self._loop.create_future()
        self._port = port
        self._fd = port.fileno()
        self._on_data = on_data
        self._max_tx = max_tx
        self._out = bytearray()
        os.set_blocking(self._fd, False)
        self._loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, _READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail("read failed: %s" % exc)
            return
        if not data:
            self._fail("device closed")
            return
        self._on_data(data)

    def write(self, data: bytes) -> None:
        if self.closed.done():
            raise ConnectionError("not open")
        if self._out:
            if len(self._out) + len(data) > self._max_tx:
                raise ConnectionError("send buffer full")
            self._out += data
            return
        try:
            n = os.write(self._fd, data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            self._fail("write failed: %s" % exc)
            raise ConnectionError(str(exc)) from None
        if n < len(data):
            self._out += data[n:]
            self._loop.add_writer(self._fd, self._writable)

    def _writable(self) -> None:
        try:
            n = os.write(self._fd, self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail("write failed: %s" % exc)
            return
        del self._out[:n]
        if not self._out:
            self._loop.remove_writer(self._fd)

    def _fail(self, why: str) -> None:
        _lose(self.closed, why)
        self.close()

    def close(self) -> None:
        _lose(self.closed, "closed")
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
            self._fd = -1
            with contextlib.suppress(Exception):
                self._port.close()


def _close_port(opening: asyncio.Future[Any]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        with contextlib.suppress(Exception):
            opening.result().close()


_LOST = object()   # what pending calls resolve to when their connection goes


# -- one column -----------------------------------------------------------------------------------

class _Channel:
    """One column's connection, link and what it last told us."""

    def __init__(self, cfg: CborColumn, config: CborConfig) -> None:
        self.cfg = cfg
        self.tracker = LinkTracker(cfg.column_id, offline_after=1)
        self.backoff = Backoff(config.reconnect_base_s, config.reconnect_max_s)
        self.slots = asyncio.Semaphore(config.max_pending)
        self.link: Link | None = None                 # one per connection
        self.conn: _Conn | None = None
        self.task: asyncio.Task[None] | None = None
        self.calls: set[asyncio.Future[Any]] = set()  # our calls in flight
        self.totals: dict[str, int] = {}              # counters of the links of past connections
        self.connects = 0
        self.last_rx_ms = 0          # monotonic ms of the last valid message (or the connect)
        self.silent = False          # the current silence was reported
        self.bad_seen = 0            # bad frames counted at the last valid message
        self.asked = False           # boot/status were asked for on this connection if unknown
        self.booted_here = False     # a BootNotification came on this connection
        self.info: ColumnBooted | None = None
        self.boots = 0
        self.status: dict[str, Any] | None = None
        self.meter: dict[str, Any] | None = None
        self.offered_a = 0.0
        self.session_id = 0
        self.session_start_wh: int | None = None
        self.last_stop: tuple[int, int] | None = None
        self.failsafe_a = 0.0
        self.limit_until_ms: int | None = None        # monotonic ms the assigned limit expires

    def counters(self) -> dict[str, int]:
        out = dict(self.totals)
        if self.link is not None:
            for key, value in self.link.stats().items():
                out[key] = out.get(key, 0) + value
        return out

    def bad_frames(self) -> int:
        c = self.counters()
        return sum(c.get(k, 0) for k in _BAD_COUNTERS)


def _amps(da: int) -> int | float:
    """Deci-amps as the number on the wire: an int when whole (no float on the column's heap)."""
    return da // 10 if da % 10 == 0 else da / 10


def _validity(validity_s: float) -> int | None:
    if isinstance(validity_s, bool) or not isinstance(validity_s, int | float):
        return None
    if not math.isfinite(validity_s):
        return None
    v = int(validity_s)
    return v if 0 <= v <= MAX_VALIDITY_S else None


class CborColumns(ColumnAdapterBase):
    """All CBOR-link columns of a site. `async with CborColumns(columns) as cbor:`; events
    arrive on `events` (bounded, oldest dropped and counted) and at `subscribe`d callbacks."""

    def __init__(self, columns: Sequence[CborColumn], config: CborConfig | None = None, *,
                 clock_ms: Callable[[], int] = monotonic_ms, now_ms: Callable[[], int] = wall_ms) -> None:
        self.config = config or CborConfig()
        self._clock = clock_ms
        self._now_ms = now_ms
        c = self.config
        self._offline_after_ms = int(1000 * (c.offline_after_s if c.offline_after_s is not None
                                             else 2 * c.heartbeat_interval_s + 5))
        self.stats = CborStats()
        self.events: asyncio.Queue[CborEvent] = asyncio.Queue(c.event_queue_size)
        self._callbacks: list[Callable[[CborEvent], None]] = []
        self._aux: set[asyncio.Task[None]] = set()
        self._channels: dict[str, _Channel] = {}
        for col in columns:
            if col.column_id in self._channels:
                raise ValueError("duplicate column " + col.column_id)
            self._channels[col.column_id] = _Channel(col, c)

    # -- lifetime ------------------------------------------------------------------------------
    async def start(self) -> None:
        for ch in self._channels.values():
            if ch.task is None:
                ch.task = asyncio.create_task(self._run(ch), name="cbor:" + ch.cfg.column_id)

    async def stop(self) -> None:
        tasks = [ch.task for ch in self._channels.values() if ch.task is not None] + list(self._aux)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        for ch in self._channels.values():
            ch.task = None
            self._close(ch)

    # -- what the service reads ----------------------------------------------------------------
    def subscribe(self, callback: Callable[[CborEvent], None]) -> None:
        self._callbacks.append(callback)

    def _tracker(self, column_id: str) -> LinkTracker:
        return self._channels[column_id].tracker

    def column_info(self, column_id: str) -> ColumnBooted | None:
        return self._channels[column_id].info

    def connects(self, column_id: str) -> int:
        return self._channels[column_id].connects

    def link_stats(self, column_id: str) -> dict[str, int]:
        """The column's link counters over all its connections (firmware.cbor_link.COUNTERS
        plus the frame reader's bad_crc, oversize, garbage_bytes, ...) and `bad_frames`."""
        ch = self._channels[column_id]
        out = ch.counters()
        out["bad_frames"] = ch.bad_frames()
        return out

    # -- commands ------------------------------------------------------------------------------
    async def set_limits(self, commands: Sequence[LimitCommand]) -> list[LimitResult]:
        """SetChargingLimit to each column at once; one result per column, in command order
        (the last command for a column wins). `limit_da` of an answered call is the limit the
        column says it applies (appliedA), which may be below the one asked for."""
        latest: dict[str, LimitCommand] = {}
        for cmd in commands:
            latest.pop(cmd.column_id, None)
            latest[cmd.column_id] = cmd
        return list(await asyncio.gather(*(self._set_limit(cmd) for cmd in latest.values())))

    async def _set_limit(self, cmd: LimitCommand) -> LimitResult:
        cid = cmd.column_id
        limit = amps_to_da(cmd.limit_a)
        validity = _validity(cmd.validity_s)
        failsafe = None if cmd.failsafe_a is None else amps_to_da(cmd.failsafe_a)
        reason = ("unknown_column" if cid not in self._channels else "bad_limit" if limit is None
                  else "bad_validity" if validity is None
                  else "bad_failsafe" if cmd.failsafe_a is not None and failsafe is None else "")
        if reason or limit is None or validity is None:
            return LimitResult(cid, False, "none", reason)
        payload: dict[str, Any] = {"limitA": _amps(limit), "validityS": validity}
        if failsafe is not None:
            payload["failsafeA"] = _amps(failsafe)
        ch = self._channels[cid]

        def applied(res: dict[str, Any]) -> None:
            # At once, so the status the column sends right after its answer shows the new limit.
            if res["status"] == "Accepted":
                ch.limit_until_ms = self._clock() + validity * 1000 if validity else None
                if failsafe is not None:
                    ch.failsafe_a = failsafe / 10

        try:
            res = await self._call(ch, "SetChargingLimit", payload, applied)
        except CborCallError as exc:
            return LimitResult(cid, False, "unicast", exc.reason, limit, validity)
        applied_da = round(res["appliedA"] * 10)
        if res["status"] != "Accepted":
            self.stats.limits_rejected += 1
            return LimitResult(cid, False, "unicast", REASON_REJECTED, applied_da, validity)
        return LimitResult(cid, True, "unicast", REASON_OK, applied_da, validity)

    async def get_configuration(self, column_id: str,
                                keys: Sequence[str] | None = None) -> tuple[dict[str, Any], list[str]]:
        """(configuration, unknown keys); all keys when `keys` is None."""
        res = await self.call(column_id, "GetConfiguration", {} if keys is None else {"keys": list(keys)})
        return dict(res["configuration"]), list(res["unknownKeys"])

    async def change_configuration(self, column_id: str, key: str, value: Any) -> str:
        """Accepted, Rejected, RebootRequired or NotSupported."""
        res = await self.call(column_id, "ChangeConfiguration", {"key": key, "value": value})
        return str(res["status"])

    async def reset(self, column_id: str, hard: bool = False) -> str:
        res = await self.call(column_id, "Reset", {"type": "Hard" if hard else "Soft"})
        return str(res["status"])

    async def trigger_message(self, column_id: str, message: str) -> str:
        """Ask the column to send BootNotification, Heartbeat, StatusNotification or MeterValues."""
        res = await self.call(column_id, "TriggerMessage", {"requestedMessage": message})
        return str(res["status"])

    async def call(self, column_id: str, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Any gateway-to-column call of the contract; the valid result payload, else CborCallError."""
        ch = self._channels.get(column_id)
        if ch is None:
            raise CborCallError(REASON_BAD_REQUEST, "unknown column " + column_id)
        return await self._call(ch, action, payload)

    async def _call(self, ch: _Channel, action: str, payload: dict[str, Any],
                    on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Send and await the answer; `on_result` sees a valid result the moment it arrives."""
        if messages.direction(action) != messages.FROM_GATEWAY:
            raise CborCallError(REASON_BAD_REQUEST, "%s is not a gateway call" % action)
        try:
            messages.validate_payload(action, payload)
        except MessageError as exc:
            raise CborCallError(REASON_BAD_REQUEST, exc.description, exc.code) from None
        async with ch.slots:
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

            def answered(answer: Any) -> None:
                if fut.done():
                    return
                fut.set_result(answer)
                if on_result is not None and isinstance(answer, dict):
                    try:
                        on_result(answer)
                    except Exception:
                        self.stats.internal_errors += 1
                        log.exception("cbor column %s: %s result hook failed", ch.cfg.column_id, action)

            link = ch.link
            if link is None or ch.conn is None or ch.conn.closed.done():
                raise CborCallError(REASON_DISCONNECTED)
            if link.call(action, payload, self._clock(), answered) is None:
                raise CborCallError(REASON_DISCONNECTED, "could not send")
            self.stats.calls += 1
            ch.calls.add(fut)
            try:
                # The link's poll resolves the call at its timeout; this is only a backstop.
                async with asyncio.timeout(self.config.call_timeout_s + 4 * self.config.tick_s + 1.0):
                    answer = await fut
            except TimeoutError:
                answer = None
            finally:
                ch.calls.discard(fut)
        if isinstance(answer, dict):
            return answer
        self.stats.call_failures += 1
        if answer is None:
            raise CborCallError(REASON_TIMEOUT, action)
        if isinstance(answer, MessageError):
            if answer.frame_type == ERROR:
                raise CborCallError(REASON_EXCEPTION, answer.description, answer.code)
            raise CborCallError(REASON_GARBLED, answer.description, answer.code)
        raise CborCallError(REASON_DISCONNECTED, "connection lost")

    # -- connection loop -----------------------------------------------------------------------
    async def _run(self, ch: _Channel) -> None:
        while True:
            ch.link = Link(partial(self._write, ch), self._handlers(ch),
                           int(self.config.call_timeout_s * 1000), self.config.max_pending,
                           side=messages.FROM_GATEWAY)
            ch.silent = ch.asked = ch.booted_here = False   # per connection
            try:
                ch.conn = await self._open(ch)
            except (OSError, TimeoutError, ValueError) as exc:   # serial.SerialException is an OSError
                self._close(ch)
                self._fail(ch, REASON_DISCONNECTED, str(exc))
                await asyncio.sleep(ch.backoff.next_s())
                continue
            ch.last_rx_ms = self._clock()   # silence is timed from the connect
            ch.connects += 1
            self.stats.connects += 1
            reason, detail, reported = REASON_DISCONNECTED, "", False
            try:
                reason, detail, reported = await self._serve(ch, ch.conn)
            except Exception:   # a bug here must not stop the column: reconnect
                self.stats.internal_errors += 1
                log.exception("cbor column %s: serve failed", ch.cfg.column_id)
            finally:
                self._close(ch)
            self.stats.disconnects += 1
            if not reported:
                self._fail(ch, reason, detail)
            log.info("cbor column %s: connection closed (%s %s)", ch.cfg.column_id, reason, detail)
            await asyncio.sleep(ch.backoff.next_s())

    async def _open(self, ch: _Channel) -> _Conn:
        cfg = ch.cfg
        on_data = partial(self._on_data, ch)
        max_tx = self.config.max_tx_buffer
        timeout = self.config.connect_timeout_s
        if isinstance(cfg, CborTcpColumn):
            def protocol() -> _TcpConn:
                conn = _TcpConn(on_data, max_tx)
                ch.conn = conn   # bytes may arrive before create_connection returns
                return conn

            loop = asyncio.get_running_loop()
            async with asyncio.timeout(timeout):
                _transport, proto = await loop.create_connection(protocol, cfg.host, cfg.port)
            return proto
        # Opening may block (a USB adapter): a thread does it. If we stop waiting, the port
        # still gets closed when the open completes, or its exclusive lock would stay held.
        opening = asyncio.get_running_loop().run_in_executor(
            None, partial(serial.Serial, cfg.device, cfg.baud, timeout=0, exclusive=True))
        try:
            port = await asyncio.wait_for(asyncio.shield(opening), timeout)
        except BaseException:
            opening.add_done_callback(_close_port)
            raise
        return _SerialConn(port, on_data, max_tx)

    async def _serve(self, ch: _Channel, conn: _Conn) -> tuple[str, str, bool]:
        """Tick until the connection ends: (reason, detail, already reported offline)."""
        while True:
            done, _pending = await asyncio.wait({conn.closed}, timeout=self.config.tick_s)
            if done:
                return REASON_DISCONNECTED, conn.closed.result(), False
            now = self._clock()
            if ch.link is not None:
                ch.link.poll(now)
            if not ch.silent and now - ch.last_rx_ms >= self._offline_after_ms:
                ch.silent = True
                reason = REASON_GARBLED if ch.bad_frames() > ch.bad_seen else REASON_TIMEOUT
                self._fail(ch, reason, "no valid message for %d ms" % (now - ch.last_rx_ms))
                if isinstance(ch.cfg, CborTcpColumn):
                    return reason, "silent", True   # maybe half-open: connect afresh

    def _write(self, ch: _Channel, data: bytes) -> None:
        if ch.conn is None:
            raise ConnectionError("not connected")
        ch.conn.write(data)

    def _close(self, ch: _Channel) -> None:
        conn, ch.conn = ch.conn, None
        if conn is not None:
            conn.close()
        link, ch.link = ch.link, None
        if link is not None:
            for key, value in link.stats().items():
                ch.totals[key] = ch.totals.get(key, 0) + value
        for fut in list(ch.calls):
            if not fut.done():
                fut.set_result(_LOST)

    def _on_data(self, ch: _Channel, data: bytes) -> None:
        link = ch.link
        if link is None:
            return
        c = link.counters
        try:
            good = c["rx_calls"] + c["rx_results"] + c["rx_errors"]
            link.on_bytes(data, self._clock())
            if c["rx_calls"] + c["rx_results"] + c["rx_errors"] > good:
                self._alive(ch)
        except Exception:   # the Link never raises; anything else here must not close the stream
            self.stats.internal_errors += 1
            log.exception("cbor column %s: receive failed", ch.cfg.column_id)

    # -- online / offline ----------------------------------------------------------------------
    def _alive(self, ch: _Channel) -> None:
        ch.last_rx_ms = self._clock()
        ch.silent = False
        ch.bad_seen = ch.bad_frames()
        ch.backoff.reset()
        changed = ch.tracker.ok(self._now_ms())
        if changed is not None:
            self._emit(changed)
        if not ch.asked:
            ch.asked = True
            self._spawn(self._ask_unknowns(ch))

    def _fail(self, ch: _Channel, reason: str, detail: str = "") -> None:
        changed = ch.tracker.fail(reason, self._now_ms(), detail)
        if changed is not None:
            self._emit(changed)

    async def _ask_unknowns(self, ch: _Channel) -> None:
        """A column first heard without a boot (the gateway restarted, not the column):
        ask for what the events need. Runs after the message that woke it was answered."""
        wanted = []
        if ch.info is None and not ch.booted_here:
            wanted.append("BootNotification")
        if ch.status is None and not ch.booted_here:
            wanted.append("StatusNotification")
        for message in wanted:
            try:
                await self._call(ch, "TriggerMessage", {"requestedMessage": message})
            except CborCallError as exc:
                log.info("cbor column %s: trigger %s failed: %s", ch.cfg.column_id, message, exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._aux.add(task)
        task.add_done_callback(self._aux.discard)

    def _emit(self, event: CborEvent) -> None:
        for cb in self._callbacks:
            try:
                cb(event)
            except Exception:
                self.stats.callback_errors += 1
                log.exception("cbor event callback failed")
        if self.events.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.events.get_nowait()
            self.stats.events_dropped += 1
        self.events.put_nowait(event)

    # -- calls from the column -----------------------------------------------------------------
    def _handlers(self, ch: _Channel) -> dict[str, Callable[[dict[str, Any], int], dict[str, Any] | None]]:
        return {"BootNotification": partial(self._on_boot, ch),
                "Heartbeat": partial(self._on_heartbeat, ch),
                "StatusNotification": partial(self._on_status, ch),
                "MeterValues": partial(self._on_meter, ch),
                "StartTransaction": partial(self._on_start, ch),
                "StopTransaction": partial(self._on_stop, ch)}

    def _on_boot(self, ch: _Channel, p: dict[str, Any], _now: int) -> dict[str, Any]:
        ts = self._now_ms()
        ch.booted_here = True
        self._alive(ch)
        accepted = not self.config.check_column_id or p["columnId"] == ch.cfg.column_id
        ch.boots += 1
        self.stats.boots += 1
        ch.info = ColumnBooted(ch.cfg.column_id, ts, p["columnId"], p["firmwareVersion"], p["model"],
                               p["phases"], float(p["hardwareRatingA"]), p["busAddress"],
                               p.get("configError", ""), accepted, ch.boots)
        ch.limit_until_ms = None   # a restarted column has forgotten the limit we gave it
        if not accepted:
            self.stats.id_mismatches += 1
            log.warning("cbor column %s: %s", ch.cfg.column_id, ch.info.fault)
        elif ch.info.config_error:
            log.warning("cbor column %s: config error: %s", ch.cfg.column_id, ch.info.config_error)
        self._emit(ch.info)
        if ch.info.fault:
            self._emit_reading(ch)
        return {"status": "Accepted" if accepted else "Rejected",
                "heartbeatIntervalS": self.config.heartbeat_interval_s, "currentTimeMs": ts}

    def _on_heartbeat(self, ch: _Channel, _p: dict[str, Any], _now: int) -> dict[str, Any]:
        self._alive(ch)
        self.stats.heartbeats += 1
        return {"currentTimeMs": self._now_ms()}

    def _on_status(self, ch: _Channel, p: dict[str, Any], _now: int) -> None:
        self._alive(ch)
        self.stats.status_notifications += 1
        ch.status = dict(p)
        ch.offered_a = float(p["offeredA"])
        self._emit_reading(ch)

    def _on_meter(self, ch: _Channel, p: dict[str, Any], _now: int) -> None:
        self._alive(ch)
        last = ch.meter
        if last is not None and last["seq"] == p["seq"] and last["energyWh"] == p["energyWh"]:
            self.stats.duplicates += 1   # our result was lost and the column sent it again
            return
        self.stats.meter_values += 1
        ch.meter = dict(p)
        ch.offered_a = float(p["offeredA"])
        self._emit_reading(ch)

    def _on_start(self, ch: _Channel, p: dict[str, Any], _now: int) -> None:
        self._alive(ch)
        sid, start = p["sessionId"], p["meterStartWh"]
        if ch.session_id == sid and ch.session_start_wh == start:
            self.stats.duplicates += 1
            return
        ch.session_id, ch.session_start_wh = sid, start
        self.stats.sessions_started += 1
        self._emit(ColumnSession(ch.cfg.column_id, self._now_ms(), True, sid, start))

    def _on_stop(self, ch: _Channel, p: dict[str, Any], _now: int) -> None:
        self._alive(ch)
        sid, stop = p["sessionId"], p["meterStopWh"]
        if ch.last_stop == (sid, stop):
            self.stats.duplicates += 1
            return
        start = ch.session_start_wh if ch.session_id == sid else None
        energy = stop - start if start is not None and stop >= start else None
        ch.session_id, ch.session_start_wh, ch.last_stop = 0, None, (sid, stop)
        self.stats.sessions_stopped += 1
        self._emit(ColumnSession(ch.cfg.column_id, self._now_ms(), False, sid, stop, energy, p["reason"]))

    def _emit_reading(self, ch: _Channel) -> None:
        """Status and meter values merged into one reading. Held until the first status
        (a reading with a guessed status would mislead the allocation), unless faulted."""
        info = ch.info
        fault = info.fault if info is not None else ""
        st = ch.status
        if st is None and not fault:
            return
        mv = ch.meter or {}
        amps = mv.get("currentA") or (0.0, 0.0, 0.0)
        volts = mv.get("voltageV") or (0.0, 0.0, 0.0)
        remaining = 0
        if ch.limit_until_ms is not None:
            remaining = max(0, (ch.limit_until_ms - self._clock() + 999) // 1000)
        self._emit(ColumnReading(
            column_id=ch.cfg.column_id,
            ts_ms=self._now_ms(),
            status="Faulted" if fault or st is None else st["status"],
            error=status_names.ERROR_NAMES[status.ERR_CONFIG] if fault or st is None else st["errorCode"],
            cp_state=st["cpState"] if st is not None else "F",
            offered_a=ch.offered_a,
            current_a=(float(amps[0]), float(amps[1]), float(amps[2])),
            voltage_v=(float(volts[0]), float(volts[1]), float(volts[2])),
            power_w=round(mv.get("powerW", 0)),
            energy_wh=int(mv.get("energyWh", 0)),
            session_energy_wh=int(mv.get("sessionEnergyWh", 0)),
            session_id=ch.session_id,
            limit_source=st["limitSource"] if st is not None and not fault else "safety",
            flags=(),
            failsafe_a=ch.failsafe_a,
            online=ch.tracker.link.online,
            assigned_remaining_s=remaining,
            phases=info.phases if info is not None else 0,
            hardware_a=info.hardware_a if info is not None else 0.0,
            fw_version=info.firmware if info is not None else "",
            bad_frames=ch.bad_frames(),
            boots=ch.boots,
        ))
