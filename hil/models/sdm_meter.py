"""A simulated Eastron SDM630 / SDM120 energy meter, served as a Modbus RTU slave.

`SdmMeterModel` holds what the meter measures (per phase voltage, current, power; import
and export energy; frequency). A test or the HIL sets those values, and the model can
integrate energy from power over time, on a clock the caller chooses (wall clock or a
virtual one). `SdmMeterServer` serves one or more models (one RS-485 bus) on a serial
port path with pymodbus 3.16's async serial server and the simulator data classes
(`SimDevice`/`SimData`, no deprecated datastore). `ThreadedSdmMeter` runs that server on
its own event loop thread for synchronous tests.

The register map is the firmware's own (`firmware.sdm`): one contract, used by both.
Like a real SDM120, the simulated SDM120 answers only reads of registers it defines
(its map has holes, and a read spanning one gets exception 02); the SDM630 answers any
read inside 0x0000..0x004B.

Fault modes (`model.fault`): `None`, `"no_reply"` (the request is swallowed),
`"exception"` (exception reply with `model.exception_code`), `"bad_crc"` (the reply's
last CRC byte is flipped).
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusSerialServer
from pymodbus.simulator import DataType, SimData, SimDevice

from firmware import sdm

FAULTS = (None, "no_reply", "exception", "bad_crc")


def float_registers(value: float) -> tuple[int, int]:
    """A float32 as two 16-bit registers, high word first (the SDM byte order)."""
    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
    return hi, lo


class SdmMeterModel:
    """What one simulated meter measures. Thread-safe: set values from any thread.

    Units are the meter's own: V, A, W, kWh, Hz. Power per phase defaults to
    V x I x power factor when only the current is set. With `integrate=True`, energy
    advances by the total power for the time `clock()` moved since the last update
    (checked whenever the registers are read or values change); `advance(seconds)`
    does the same by hand. Positive total power counts as import, negative as export.
    """

    def __init__(self, kind: str = sdm.SDM630, address: int = 1, *, voltage_v: float = 230.0,
                 frequency_hz: float = 50.0, import_kwh: float = 0.0, export_kwh: float = 0.0,
                 integrate: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        if kind not in sdm.KINDS:
            raise ValueError(f"unknown meter type {kind!r}; choose from {sdm.KINDS}")
        if not 1 <= address <= 247:
            raise ValueError(f"meter address {address} not in 1..247")
        self.kind = kind
        self.address = address
        self.phases = sdm.PHASES[kind]
        self.voltage_v = [voltage_v] * 3
        self.current_a = [0.0] * 3
        self.power_w = [0.0] * 3
        self.frequency_hz = frequency_hz
        self.import_kwh = import_kwh
        self.export_kwh = export_kwh
        self.integrate = integrate
        self.clock = clock
        self.fault: str | None = None
        self.exception_code = int(ExcCodes.DEVICE_FAILURE)
        self.reads = 0           # read requests that reached the register map
        self.faulted = 0         # requests answered with a fault (or swallowed)
        self._last_t = clock()
        self.lock = threading.RLock()

    # -- setting values --------------------------------------------------------------------
    def set_phase(self, phase: int, *, voltage_v: float | None = None, current_a: float | None = None,
                  power_w: float | None = None, power_factor: float = 1.0) -> None:
        """Set one phase (0-based). Power follows V x I x pf unless given."""
        if not 0 <= phase < self.phases:
            raise ValueError(f"phase {phase} not on a {self.phases}-phase meter")
        with self.lock:
            self._update_energy()
            if voltage_v is not None:
                self.voltage_v[phase] = float(voltage_v)
            if current_a is not None:
                self.current_a[phase] = float(current_a)
            if power_w is not None:
                self.power_w[phase] = float(power_w)
            elif current_a is not None or voltage_v is not None:
                self.power_w[phase] = self.voltage_v[phase] * self.current_a[phase] * power_factor

    def set_load(self, current_a: float | Sequence[float], power_factor: float = 1.0) -> None:
        """Set the current on every phase (one value for all, or one per phase)."""
        currents = [current_a] * self.phases if isinstance(current_a, (int, float)) else list(current_a)
        if len(currents) != self.phases:
            raise ValueError(f"{len(currents)} currents for a {self.phases}-phase meter")
        for phase, amps in enumerate(currents):
            self.set_phase(phase, current_a=amps, power_factor=power_factor)

    def set_energy(self, *, import_kwh: float | None = None, export_kwh: float | None = None) -> None:
        with self.lock:
            self._update_energy()
            if import_kwh is not None:
                self.import_kwh = float(import_kwh)
            if export_kwh is not None:
                self.export_kwh = float(export_kwh)

    def set_fault(self, fault: str | None, exception_code: int | None = None) -> None:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; choose from {FAULTS}")
        with self.lock:
            self.fault = fault
            if exception_code is not None:
                self.exception_code = int(ExcCodes(exception_code))

    @property
    def total_power_w(self) -> float:
        return sum(self.power_w[: self.phases])

    # -- time ----------------------------------------------------------------------------
    def advance(self, seconds: float) -> None:
        """Integrate energy over `seconds` at the present power."""
        with self.lock:
            self._integrate(seconds)

    def _integrate(self, seconds: float) -> None:
        kwh = self.total_power_w * seconds / 3_600_000.0
        if kwh >= 0:
            self.import_kwh += kwh
        else:
            self.export_kwh -= kwh

    def _update_energy(self) -> None:
        now = self.clock()
        if self.integrate and now > self._last_t:
            self._integrate(now - self._last_t)
        self._last_t = now

    # -- registers -----------------------------------------------------------------------
    def values(self) -> dict[int, float]:
        """Register address -> float value, for every register this meter type defines."""
        with self.lock:
            self._update_energy()
            out: dict[int, float] = {}
            for ph in range(self.phases):
                out[sdm.REG_VOLTAGE[ph]] = self.voltage_v[ph]
                out[sdm.REG_CURRENT[ph]] = self.current_a[ph]
                out[sdm.REG_POWER[ph]] = self.power_w[ph]
            if self.kind == sdm.SDM630:
                out[sdm.REG_TOTAL_POWER] = self.total_power_w
            out[sdm.REG_FREQUENCY] = self.frequency_hz
            out[sdm.REG_IMPORT_KWH] = self.import_kwh
            out[sdm.REG_EXPORT_KWH] = self.export_kwh
            out[sdm.REG_TOTAL_KWH] = self.import_kwh + self.export_kwh
            return out

    def sim_device(self) -> SimDevice:
        """The pymodbus simulator device for this meter (registers refreshed on each read)."""
        if self.kind == sdm.SDM630:
            blocks = [SimData(address=0, count=76, values=0, datatype=DataType.REGISTERS)]
        else:
            blocks = [SimData(address=reg, count=2, values=0, datatype=DataType.REGISTERS)
                      for reg in sorted(self.values()) if reg != sdm.REG_TOTAL_KWH]
        blocks.append(SimData(address=sdm.REG_TOTAL_KWH, count=2, values=0,
                              datatype=DataType.REGISTERS))
        return SimDevice(id=self.address, simdata=blocks, action=self._on_access)

    async def _on_access(self, function_code: int, start_address: int,  # noqa: PLR0917 (pymodbus API)
                         address: int, count: int,
                         registers: list[int], set_values: Any) -> ExcCodes | None:
        """pymodbus calls this before it answers: fill in the present values, or fail."""
        with self.lock:
            self.reads += 1
            if self.fault == "exception":
                self.faulted += 1
                return ExcCodes(self.exception_code)
            if function_code != sdm.FC_READ_INPUT or set_values is not None:
                return ExcCodes.ILLEGAL_FUNCTION
            for reg, value in self.values().items():
                registers[reg - start_address], registers[reg - start_address + 1] = \
                    float_registers(value)
        return None

    def _on_packet(self, sending: bool, packet: bytes) -> bytes:
        """Fault injection on the wire bytes of the replies."""
        if not sending:
            return packet
        with self.lock:
            fault = self.fault
            if fault in ("no_reply", "bad_crc"):
                self.faulted += 1
        if fault == "no_reply":
            return b""
        if fault == "bad_crc" and packet:
            return packet[:-1] + bytes([packet[-1] ^ 0xFF])
        return packet


class SdmMeterServer:
    """One or more simulated meters on one serial line (an RS-485 bus).

    Construct anywhere; `await start()` inside a running event loop (pymodbus builds its
    server there), `await stop()` to close the port.
    """

    def __init__(self, models: SdmMeterModel | Sequence[SdmMeterModel], port: str, *,
                 baudrate: int = 9600) -> None:
        self.models = [models] if isinstance(models, SdmMeterModel) else list(models)
        if len({m.address for m in self.models}) != len(self.models):
            raise ValueError("two meters with the same address on one bus")
        self.port = port
        self.baudrate = baudrate
        self._server: ModbusSerialServer | None = None

    def _trace_packet(self, sending: bool, packet: bytes) -> bytes:
        # A reply carries its slave's address in its first byte; a request for an address
        # nobody here has reached the catch-all device, and its reply is dropped: on a real
        # bus nobody answers.
        if sending and packet:
            for model in self.models:
                if model.address == packet[0]:
                    return model._on_packet(sending, packet)
            return b""
        return packet

    async def start(self) -> None:
        devices = [m.sim_device() for m in self.models]
        # id 0 = "every other address" in pymodbus; without it pymodbus logs a traceback.
        devices.append(SimDevice(id=0, simdata=[SimData(address=0, datatype=DataType.INVALID)]))
        self._server = ModbusSerialServer(
            devices, port=self.port, baudrate=self.baudrate,
            trace_packet=self._trace_packet, reconnect_delay=0.1)
        await self._server.serve_forever(background=True)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()
            self._server = None

    async def __aenter__(self) -> SdmMeterServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class ThreadedSdmMeter:
    """`SdmMeterServer` on a private event loop thread: `with ThreadedSdmMeter(model, path):`."""

    def __init__(self, models: SdmMeterModel | Sequence[SdmMeterModel], port: str, *,
                 baudrate: int = 9600, timeout_s: float = 5.0) -> None:
        self.server = SdmMeterServer(models, port, baudrate=baudrate)
        self.timeout_s = timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="sdm-meter", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.server.start(), loop).result(self.timeout_s)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        try:
            if thread.is_alive():
                asyncio.run_coroutine_threadsafe(self.server.stop(), loop).result(self.timeout_s)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(self.timeout_s)
            if not thread.is_alive():
                loop.close()

    def __enter__(self) -> ThreadedSdmMeter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
