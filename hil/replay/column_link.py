"""The gateway's side of a column's Modbus RTU link, as the realtime targets play it.

`ModbusBus` is a Modbus RTU master (pymodbus) on one serial port, serving any number of
column units (one RS-485 bus: the `serial:` target; one line per column: the `mpy`
target). On its own thread it

- writes each assignment as one FC16 write of HR_ASSIGNED_LIMIT, HR_ASSIGNED_VALIDITY
  (and HR_FAILSAFE_LIMIT when given), retried until the column takes it (a write the
  column refuses with an exception is counted, not retried);
- writes HR_HEARTBEAT every heartbeat_timeout_s / 4 (at most every 5 s) while the
  gateway is not silent; while it is silent nothing is written (an assignment made then,
  or to a column that is off, is refused: `assign` returns False, as a gateway's write
  on a broken link fails). Reads continue: they are the harness observing;
- reads the 32 input registers every poll_s; after a power-on it only polls until the
  column answers (a booting column's timeouts, and those of requests on the wire when
  its power is cut, count as `offline_timeouts`, not failures);
- re-sends the last assignment, with what is left of its validity, when a column has
  rebooted (its boot count moved or its uptime went back) or the gateway stops being
  silent, as a gateway re-asserts its allocation.

Whatever goes wrong on the wire is counted in `LinkStats`; the thread never dies of it,
and pymodbus's own log lines about it (no response, stale bytes cleaned up) are held
back while a bus is open, so a replay's progress bar is not buried under them.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace

from pymodbus.client import ModbusSerialClient
from pymodbus.exceptions import ModbusException

from firmware import regmap, regmap_tables
from hil.replay.target import TargetError

__all__ = ["DEFAULT_BAUD", "LinkStats", "ModbusBus", "TargetError", "rtu_timeout_s"]

DEFAULT_BAUD = 19200
MAX_HEARTBEAT_PERIOD_S = 5.0
_BITS_PER_CHAR = 11
_MAX_RTU = 256


class _WireNoise(logging.Filter):
    """Drops pymodbus's log lines about failed transactions: LinkStats counts those."""

    _DROP = ("No response received", "Cleanup recv buffer", "Repeating....")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self._DROP)


@dataclass
class LinkStats:
    reads_ok: int = 0
    reads_failed: int = 0
    writes_ok: int = 0
    writes_failed: int = 0      # no (valid) reply after the client's retries
    writes_rejected: int = 0    # the column answered with an exception
    retries: int = 0            # requests the client had to repeat
    heartbeats: int = 0
    assignments: int = 0        # assignments the column took
    dropped: int = 0            # assignments that could not reach the column (silent, off)
    reasserts: int = 0          # assignments re-sent after a reboot or a silence
    reboots: int = 0            # reboots seen in the boot count / uptime registers
    offline_timeouts: int = 0   # requests unanswered while the column was off or still booting
    last_error: str = ""


@dataclass
class _Unit:
    column_id: str
    address: int
    hb_period_s: float
    silent: bool = False
    powered: bool = True
    awake: bool = False          # False from (power-)on until the column answers a poll
    pending: tuple[int, int, int | None] | None = None
    last: tuple[int, int, int | None, float] | None = None  # (limit, validity, failsafe, sent at)
    next_hb: float = 0.0
    next_poll: float = 0.0
    retry_at: float = 0.0
    image: list[int] | None = None
    image_t: float = 0.0
    uptime_s: int = -1           # -1: never read
    boots: int = 0
    stats: LinkStats = field(default_factory=LinkStats)


def rtu_timeout_s(baud: int) -> float:
    """Long enough for a longest request and reply at `baud`, plus a turnaround."""
    return 0.05 + 2 * _MAX_RTU * _BITS_PER_CHAR / baud


class ModbusBus:
    """A Modbus RTU master on one serial port, serving any number of column units."""

    def __init__(self, port: str, *, baud: int = DEFAULT_BAUD, timeout_s: float | None = None,
                 retries: int = 3, poll_s: float = 0.1, name: str = "modbus-bus") -> None:
        self.port = port
        self.baud = baud
        self.poll_s = poll_s
        self.retry_s = 0.05
        self.retries = retries
        self.client = ModbusSerialClient(port, baudrate=baud, retries=retries,
                                         timeout=timeout_s if timeout_s is not None else rtu_timeout_s(baud))
        self._units: dict[str, _Unit] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._quiet = _WireNoise()

    # -- API (any thread) --------------------------------------------------------------------
    def add_unit(self, column_id: str, address: int, heartbeat_timeout_s: float) -> None:
        period = min(MAX_HEARTBEAT_PERIOD_S, max(0.2, heartbeat_timeout_s / 4))
        with self._lock:
            self._units[column_id] = _Unit(column_id, address, period)
        self._wake.set()

    def start(self) -> None:
        if not self.client.connect():
            raise TargetError("cannot open the link port %s" % self.port)
        logging.getLogger("pymodbus.logging").addFilter(self._quiet)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.client.close()
        logging.getLogger("pymodbus.logging").removeFilter(self._quiet)

    def assign(self, column_id: str, limit_da: int, validity_s: int, failsafe_da: int | None) -> bool:
        """Queue an assignment for the column (sent at once, retried until taken). False:
        it cannot reach the column now (the gateway is silent or the column is off)."""
        with self._lock:
            unit = self._units[column_id]
            if unit.silent or not unit.powered:
                unit.stats.dropped += 1
                return False
            unit.pending = (limit_da, validity_s, failsafe_da)
            unit.retry_at = 0.0
            unit.last = (limit_da, validity_s, failsafe_da, time.monotonic())
        self._wake.set()
        return True

    def set_silent(self, column_id: str, silent: bool) -> None:
        with self._lock:
            unit = self._units[column_id]
            if silent and not unit.silent:
                if unit.pending is not None:
                    unit.stats.dropped += 1
                unit.pending = None
            elif unit.silent and not silent:
                self._reassert(unit)
                unit.next_hb = 0.0
            unit.silent = silent
        self._wake.set()

    def set_powered(self, column_id: str, on: bool) -> None:
        """A column the harness switched off is not polled (its image is dropped)."""
        with self._lock:
            unit = self._units[column_id]
            unit.powered = on
            unit.awake = False      # from power-on: poll, write nothing until it answers
            if not on:
                unit.image = None
            unit.next_poll = unit.next_hb = 0.0
        self._wake.set()

    def image(self, column_id: str) -> list[int] | None:
        """The latest input registers read from the column (None: none since it powered up)."""
        with self._lock:
            img = self._units[column_id].image
            return list(img) if img is not None else None

    def stats(self, column_id: str) -> LinkStats:
        with self._lock:
            return replace(self._units[column_id].stats)

    def wait_image(self, column_id: str, timeout_s: float) -> list[int]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            img = self.image(column_id)
            if img is not None:
                return img
            if not self._thread.is_alive():
                break
            time.sleep(0.02)
        with self._lock:
            unit = self._units[column_id]
            why = unit.stats.last_error or "no reply"
            address = unit.address
        raise TargetError("column %s (bus address %d) does not answer on %s within %.0f s: %s"
                          % (column_id, address, self.port, timeout_s, why))

    # -- the master's thread ---------------------------------------------------------------
    def _reassert(self, unit: _Unit) -> None:
        """Queue what is left of the last assignment (called with the lock held)."""
        if unit.last is None:
            return
        limit_da, validity_s, failsafe_da, sent = unit.last
        if validity_s == 0:
            unit.pending = (limit_da, 0, failsafe_da)
        else:
            left = validity_s - int(time.monotonic() - sent)
            if left <= 0:
                return
            unit.pending = (limit_da, left, failsafe_da)
        unit.retry_at = 0.0
        unit.stats.reasserts += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                units = list(self._units.values())
            wake_at = time.monotonic() + 0.5
            for unit in units:
                if self._stop.is_set():
                    return
                wake_at = min(wake_at, self._service(unit))
            delay = wake_at - time.monotonic()
            if delay > 0 and self._wake.wait(delay):
                self._wake.clear()

    def _service(self, unit: _Unit) -> float:
        """One round of duties for a unit; returns when it next needs the bus. Whatever
        goes wrong is counted in the unit's stats: the master's thread never dies."""
        try:
            return self._duties(unit)
        except Exception as exc:  # a stray reply type, a closed port...
            unit.stats.last_error = "%s: %s" % (type(exc).__name__, exc)
            return time.monotonic() + self.retry_s

    def _duties(self, unit: _Unit) -> float:
        with self._lock:
            if not unit.powered:
                return time.monotonic() + 0.5
            # Nothing is written to a column that has not answered since it powered up.
            pending = unit.pending if not unit.silent and unit.awake else None
            silent = unit.silent or not unit.awake
        now = time.monotonic()
        if pending is not None and now >= unit.retry_at:
            self._write_assignment(unit, pending)
        if not silent and now >= unit.next_hb:
            unit.next_hb = now + unit.hb_period_s
            if self._write(unit, regmap.HR_HEARTBEAT, [unit.stats.heartbeats & 0xFFFF]):
                unit.stats.heartbeats += 1
        if now >= unit.next_poll:
            unit.next_poll = now + self.poll_s
            self._poll(unit)
        with self._lock:
            due = [unit.next_poll]
            if not unit.silent and unit.awake:
                due.append(unit.next_hb)
                if unit.pending is not None:
                    due.append(unit.retry_at)
        return min(due)

    def _write_assignment(self, unit: _Unit, pending: tuple[int, int, int | None]) -> None:
        limit_da, validity_s, failsafe_da = pending
        values = [limit_da, validity_s] if failsafe_da is None else [limit_da, validity_s, failsafe_da]
        done = self._write(unit, regmap.HR_ASSIGNED_LIMIT, values)
        with self._lock:
            if done is None:          # no reply: try again shortly, unless superseded
                unit.retry_at = time.monotonic() + self.retry_s
                return
            if unit.pending == pending:
                unit.pending = None
            if done:
                unit.stats.assignments += 1

    def _write(self, unit: _Unit, address: int, values: list[int]) -> bool | None:
        """True: written; False: the column refused it; None: no valid reply."""
        try:
            reply = self.client.write_registers(address, values, device_id=unit.address)
        except (ModbusException, OSError) as exc:
            self._count_failure(unit, "writes_failed", exc)
            return None
        unit.stats.retries += getattr(reply, "retries", 0)
        if reply.isError():
            unit.stats.writes_rejected += 1
            unit.stats.last_error = "write of %s at %d refused with exception %s" % (
                values, address, getattr(reply, "exception_code", "?"))
            return False
        unit.stats.writes_ok += 1
        return True

    def _count_failure(self, unit: _Unit, counter: str, exc: Exception) -> None:
        with self._lock:
            online = unit.powered and unit.awake
        stats = unit.stats
        if online:
            setattr(stats, counter, getattr(stats, counter) + 1)
            stats.retries += self.retries
        else:
            stats.offline_timeouts += 1   # booting, or cut off while the request was on the wire
        stats.last_error = str(exc)

    def _poll(self, unit: _Unit) -> None:
        try:
            reply = self.client.read_input_registers(0, count=regmap.POLL_COUNT, device_id=unit.address)
        except (ModbusException, OSError) as exc:
            self._count_failure(unit, "reads_failed", exc)
            return
        unit.stats.retries += getattr(reply, "retries", 0)
        if reply.isError() or len(getattr(reply, "registers", ())) != regmap.POLL_COUNT:
            unit.stats.reads_failed += 1
            unit.stats.last_error = "read refused: %s" % (reply,)
            return
        regs = list(reply.registers)
        unit.stats.reads_ok += 1
        uptime = regmap_tables.get_u32(regs, regmap.IR_UPTIME)
        boots = regs[regmap.IR_BOOTS]
        with self._lock:
            if not unit.powered:
                return  # switched off while the read was on the wire
            if unit.uptime_s >= 0 and (uptime < unit.uptime_s or boots != unit.boots):
                unit.stats.reboots += 1
                if not unit.silent:
                    self._reassert(unit)
            unit.uptime_s = uptime
            unit.boots = boots
            unit.image = regs
            if not unit.awake:
                unit.awake = True
                unit.next_hb = 0.0
            unit.image_t = time.monotonic()


