"""`serial:PORT`: columns on a real serial port, in real time (see hil.replay.target).

The harness plays the gateway on the columns' link: a Modbus RTU master on PORT
(hil.replay.column_link.ModbusBus), one bus for every column in the run, addressed by
each config's bus_address; the link baud is the configs' `link.baud` (else 19200) unless
`baud` is given. Pacing, inputs, outputs and power cuts: hil.replay.realtime.

The board's analogue world (CP, diode, PP, RCD) and the meter are real hardware unless
the target is given stand-ins: `io_port`, a serial port path speaking the virtual
board's JSON lines (hil.replay.board_io), or any object with `board(**inputs)` and
`outputs()` (a hil.rig.vcolumn.VirtualColumn); `meter_port`, a path where the target
serves a simulated SDM meter (hil.models.sdm_meter), or `meter`, a SdmMeterModel served
by someone else. With several columns, give these as {column_id: ...}. Without them
`set_inputs` cannot reach those parts and leaves them alone.

`power_cut` needs a `power(column_id, on)` switch (a relay on a bench, or a process
restart for a stand-in, see hil.replay.mpy.ColumnPower); without one it raises
TargetError. Bus noise (`link_fault`) is not put on a real port: the engine models it.

Additions to the Target contract (all optional): `TargetError`, `stats(column_id)`
(link counters), `registers(column_id)` (the latest input registers), `max_lag_ms`
(how far wall time ran behind the trace).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from hil.models.sdm_meter import SdmMeterModel, ThreadedSdmMeter
from hil.replay.board_io import BoardIo, JsonLinesBoard
from hil.replay.column_link import DEFAULT_BAUD, LinkStats, ModbusBus, TargetError
from hil.replay.realtime import Column, PowerSwitch, RealtimeColumns

__all__ = ["BoardIo", "JsonLinesBoard", "LinkStats", "ModbusBus", "RealtimeColumns", "SerialTarget",
           "TargetError"]


class SerialTarget(RealtimeColumns):
    """Columns on a real serial link PORT (see the module docstring)."""

    def __init__(self, port: str, *, baud: int | None = None, speed: float | str | None = 1.0,
                 io_port: str | BoardIo | Mapping[str, str | BoardIo] | None = None,
                 meter_port: str | Mapping[str, str] | None = None,
                 meter: SdmMeterModel | Mapping[str, SdmMeterModel] | None = None,
                 power: PowerSwitch | None = None, poll_s: float = 0.1,
                 timeout_s: float | None = None, retries: int = 3, boot_timeout_s: float = 20.0) -> None:
        super().__init__(speed, boot_timeout_s)
        self.port = port
        self.baud = baud
        self.io_port = io_port
        self.meter_port = meter_port
        self.meter = meter
        self.power = power
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.retries = retries
        self.bus: ModbusBus | None = None
        self._owned: list[Any] = []   # lines and meter servers this target opened

    @staticmethod
    def _per_column(value: Any, column_id: str, count: int, what: str) -> Any:
        if value is None or isinstance(value, Mapping):
            return None if value is None else value.get(column_id)
        if count > 1:
            raise TargetError("%s: give one per column as {column_id: ...} for a bus of %d columns"
                              % (what, count))
        return value

    def start(self, columns: dict[str, dict[str, object]]) -> None:
        if not columns:
            raise TargetError("no columns to start")
        try:
            self._start(columns)
        except BaseException:
            self.close()
            raise

    def _start(self, columns: dict[str, dict[str, Any]]) -> None:
        bauds = {int(cfg.get("link", {}).get("baud", DEFAULT_BAUD)) for cfg in columns.values()}
        baud = self.baud or (bauds.pop() if len(bauds) == 1 else DEFAULT_BAUD)
        self.bus = bus = ModbusBus(self.port, baud=baud, timeout_s=self.timeout_s,
                                   retries=self.retries, poll_s=self.poll_s, name="serial-target")
        many = len(columns)
        addresses: dict[int, str] = {}
        for column_id, cfg in columns.items():
            address = int(cfg["bus_address"])
            if address in addresses:
                raise TargetError("columns %s and %s share bus address %d on %s"
                                  % (addresses[address], column_id, address, self.port))
            addresses[address] = column_id
            bus.add_unit(column_id, address, float(cfg.get("heartbeat_timeout_s", 60)))
            col = Column(column_id, dict(cfg), bus)
            io = self._per_column(self.io_port, column_id, many, "io_port")
            if isinstance(io, (str, os.PathLike)):
                io = JsonLinesBoard(os.fspath(io))
                self._owned.append(io)
            col.board = io
            col.meter = self._per_column(self.meter, column_id, many, "meter")
            meter_port = self._per_column(self.meter_port, column_id, many, "meter_port")
            if meter_port is not None:
                meter_cfg = cfg.get("meter", {})
                col.meter = col.meter or SdmMeterModel(meter_cfg.get("type", "sdm630"),
                                                       meter_cfg.get("address", 1))
                server = ThreadedSdmMeter(col.meter, meter_port, baudrate=meter_cfg.get("baud", 9600))
                server.start()
                self._owned.append(server)
            if self.power is not None:
                switch = self.power
                col.power = lambda on, cid=column_id, sw=switch: sw(cid, on)
            self.columns[column_id] = col
        bus.start()
        self._wait_booted()

    def close(self) -> None:
        if self.bus is not None:
            self.bus.close()
            self.bus = None
        while self._owned:
            part = self._owned.pop()
            if isinstance(part, ThreadedSdmMeter):
                part.stop()
            else:
                part.close()
