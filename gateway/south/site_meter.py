"""The energy meter at the site's connection point (Eastron SDM630/SDM120), read over
Modbus RTU or TCP: the measured site load.

The register map and the float decoding are the firmware's (`firmware.sdm`): the same
blocks, field addresses and integer-exact decoder the column uses for its own meter.
The meter may hang off its own line or TCP address (:class:`ClientReader`) or share the
columns' RS-485 bus (pass the :class:`~gateway.south.modbus_bus.ModbusRtuBus`, whose
reads are queued between polls).

Stale data fails safe: :meth:`SiteMeter.latest` returns None once the last good reading
is older than `stale_s`, and a :class:`MeterState` event says when the meter went stale
and when it came back. A reply whose currents do not decode (NaN, infinity) is counted
and does not refresh the reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.framer import FramerType

from firmware import sdm
from gateway.south.modbus_bus import Backoff, ExchangeError, Requester, wall_ms
from gateway.south.types import REASON_DISCONNECTED, REASON_OK

log = logging.getLogger(__name__)

REASON_NO_READING = "no_reading"
REASON_STALE = "stale"
REASON_INVALID = "invalid"    # a reply whose values do not decode


class RegisterReader(Protocol):
    async def read_input_registers(self, unit: int, address: int, count: int,
                                   timeout_s: float) -> list[int]: ...


class ClientReader:
    """A meter on a line or TCP address of its own. Connects on first use and after a
    failure, no more often than a jittered backoff allows."""

    def __init__(self, requester: Requester, *, reconnect_base_s: float = 0.5, reconnect_max_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.requester = requester
        self._backoff = Backoff(reconnect_base_s, reconnect_max_s)
        self._clock = clock
        self._next_try = 0.0
        self.connects = 0

    @classmethod
    def rtu(cls, device: str, *, baud: int = 9600, parity: str = "N", stopbits: int = 1,
            reconnect_base_s: float = 0.5, reconnect_max_s: float = 30.0) -> ClientReader:
        return cls(Requester(lambda trace: AsyncModbusSerialClient(
            device, framer=FramerType.RTU, baudrate=baud, parity=parity, stopbits=stopbits, timeout=5.0,
            retries=0, reconnect_delay=0, trace_packet=trace), rtu=True),
            reconnect_base_s=reconnect_base_s, reconnect_max_s=reconnect_max_s)

    @classmethod
    def tcp(cls, host: str, port: int = 502, *, reconnect_base_s: float = 0.5,
            reconnect_max_s: float = 30.0) -> ClientReader:
        return cls(Requester(lambda trace: AsyncModbusTcpClient(
            host, port=port, timeout=2.0, retries=0, reconnect_delay=0, trace_packet=trace), rtu=False),
            reconnect_base_s=reconnect_base_s, reconnect_max_s=reconnect_max_s)

    async def read_input_registers(self, unit: int, address: int, count: int, timeout_s: float) -> list[int]:
        if not self.requester.connected:
            now = self._clock()
            if now < self._next_try:
                raise ExchangeError(REASON_DISCONNECTED, "waiting to reconnect")
            if not await self.requester.connect():
                self._next_try = now + self._backoff.next_s()
                raise ExchangeError(REASON_DISCONNECTED, "connect failed")
            self._backoff.reset()
            self.connects += 1
        return await self.requester.read_input(unit, address, count, timeout_s)

    def close(self) -> None:
        self.requester.close()


@dataclass(frozen=True)
class MeterReading:
    """One complete read of the meter, in V, A, W, Hz and Wh (None: not on this meter type)."""

    ts_ms: int
    kind: str
    voltage_v: tuple[float | None, float | None, float | None]
    current_a: tuple[float | None, float | None, float | None]
    power_w: tuple[int | None, int | None, int | None]
    total_power_w: int | None
    frequency_hz: float | None
    import_wh: int | None
    export_wh: int | None


@dataclass(frozen=True)
class MeterState:
    """The meter's data went stale (fresh=False) or is fresh again."""

    fresh: bool
    reason: str                  # REASON_OK, or why not: stale / no_reading
    last_ok_ms: int | None
    ts_ms: int
    detail: str = ""             # the last failure, for logs


def decode_blocks(kind: str, blocks: list[tuple[int, list[int]]], ts_ms: int) -> MeterReading:
    """(start, registers) of each sdm.BLOCKS[kind] read -> a reading, with sdm's decoder."""
    raw: list[bytes] = [struct.pack(">%dH" % len(regs), *regs) for _start, regs in blocks]

    def field(fid: int) -> int | None:
        addr = sdm.FIELDS[kind][fid]
        if addr < 0:
            return None
        for (start, regs), buf in zip(blocks, raw, strict=True):
            if start <= addr and addr + 2 <= start + len(regs):
                value = sdm.decode_f32(buf, 2 * (addr - start), sdm.SCALE[fid])
                return None if value is None else int(value)
        return None

    def scaled(fid: int, div: float) -> float | None:
        v = field(fid)
        return None if v is None else v / div

    return MeterReading(
        ts_ms=ts_ms, kind=kind,
        voltage_v=(scaled(sdm.F_V1, 10), scaled(sdm.F_V2, 10), scaled(sdm.F_V3, 10)),
        current_a=(scaled(sdm.F_I1, 10), scaled(sdm.F_I2, 10), scaled(sdm.F_I3, 10)),
        power_w=(field(sdm.F_P1), field(sdm.F_P2), field(sdm.F_P3)),
        total_power_w=field(sdm.F_PTOTAL) if kind == sdm.SDM630 else field(sdm.F_P1),
        frequency_hz=scaled(sdm.F_FREQ, 100),
        import_wh=field(sdm.F_IMPORT),
        export_wh=field(sdm.F_EXPORT),
    )


@dataclass
class MeterStats:
    reads: int = 0
    failures: int = 0
    invalid: int = 0
    stale_events: int = 0
    events_dropped: int = 0


class SiteMeter:
    """Polls the connection-point meter every `period_s`; `async with SiteMeter(...) as m:`."""

    def __init__(self, reader: RegisterReader, *, kind: str = sdm.SDM630, unit: int = 1,
                 period_s: float = 1.0, stale_s: float = 10.0, timeout_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic, now_ms: Callable[[], int] = wall_ms,
                 event_queue_size: int = 100) -> None:
        if kind not in sdm.KINDS:
            raise ValueError("unknown meter kind %r" % kind)
        self.reader = reader
        self.kind = kind
        self.unit = unit
        self.period_s = period_s
        self.stale_s = stale_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._now_ms = now_ms
        self.stats = MeterStats()
        self.failures: dict[str, int] = {}
        self.events: asyncio.Queue[MeterReading | MeterState] = asyncio.Queue(event_queue_size)
        self._reading: MeterReading | None = None
        self._ok_at: float | None = None          # monotonic time of the last good reading
        self._announced: bool | None = None       # fresh/stale as last announced, None = not yet
        self._started: float | None = None
        self._last_failure = ""
        self._task: asyncio.Task[None] | None = None

    # -- lifetime ------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._started = self._clock()
            self._task = asyncio.create_task(self._run(), name="site-meter")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, timeout=5.0)
        close = getattr(self.reader, "close", None)
        if callable(close):
            close()

    async def __aenter__(self) -> SiteMeter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the data ------------------------------------------------------------------------
    def is_stale(self) -> bool:
        return self._ok_at is None or self._clock() - self._ok_at > self.stale_s

    def latest(self) -> MeterReading | None:
        """The last good reading, or None once it is older than stale_s (fail safe)."""
        return None if self.is_stale() else self._reading

    async def read_once(self) -> MeterReading:
        """Read every block of the map; raises ExchangeError (reason counted) on failure."""
        self.stats.reads += 1
        try:
            blocks = [(start, await self.reader.read_input_registers(self.unit, start, count, self.timeout_s))
                      for start, count in sdm.BLOCKS[self.kind]]
        except ExchangeError as exc:
            self._count_failure(exc)
            raise
        reading = decode_blocks(self.kind, blocks, self._now_ms())
        if any(a is None for a in reading.current_a[: sdm.PHASES[self.kind]]):
            self.stats.invalid += 1
            invalid = ExchangeError(REASON_INVALID, "current does not decode")
            self._count_failure(invalid)
            raise invalid
        self._reading = reading
        self._ok_at = self._clock()
        self._emit(reading)
        self._check_fresh()
        return reading

    # -- the loop ------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            t0 = self._clock()
            try:
                await self.read_once()
            except ExchangeError:
                pass
            except Exception:  # a bug must not stop the meter task: count it, go on
                self._count_failure(ExchangeError("internal"))
                log.exception("site meter read failed")
            self._check_fresh()
            await asyncio.sleep(max(0.0, self.period_s - (self._clock() - t0)))

    def _count_failure(self, exc: ExchangeError) -> None:
        self.stats.failures += 1
        self.failures[exc.reason] = self.failures.get(exc.reason, 0) + 1
        self._last_failure = str(exc)

    def _check_fresh(self) -> None:
        """Announce a change between fresh and stale (once each way)."""
        fresh = not self.is_stale()
        if fresh == self._announced:
            return
        if self._announced is None and not fresh and (
                self._started is None or self._clock() - self._started <= self.stale_s):
            return  # just started: the meter has stale_s to answer before it is called stale
        self._announced = fresh
        last_ok = self._reading.ts_ms if self._reading is not None else None
        reason = REASON_OK if fresh else REASON_STALE if self._ok_at is not None else REASON_NO_READING
        if not fresh:
            self.stats.stale_events += 1
            log.warning("site meter %s: %s", reason, self._last_failure)
        self._emit(MeterState(fresh, reason, last_ok, self._now_ms(), "" if fresh else self._last_failure))

    def _emit(self, event: MeterReading | MeterState) -> None:
        if self.events.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.events.get_nowait()
            self.stats.events_dropped += 1
        self.events.put_nowait(event)
