"""The `sim` target: the firmware's control core in this process, on the replay's virtual clock.

Each column is what firmware/app.py wires on a board, minus the I/O: the control core
(`firmware.controller.Controller`), the energy register kept by the real
`firmware.energy_store.EnergyStore` on a two-slot flash held in RAM (it survives a
simulated power cut; the store object and the RAM register do not), and a stand-in for
the meter driver with the same staleness rule as `firmware.meter.Meter`. Values cross
the boundary as the firmware sees them: currents in deci-amps rounded like the SDM
driver, the import register as a float32 kWh value (the SDM's register) in whole Wh.

Stepping: `set_inputs(column, now, inputs)` presents a column's world; the next
`advance(to_ms)` runs one control step of every presented column at `to_ms` (as the
app's control task does every CONTROL_PERIOD_MS on a board). The engine decides how often
each column is stepped (finely around pilot changes, coarsely while nothing moves); a
column that is never presented does not run. Gateway commands (`assign_limit`) reach
the core at once unless the column's link is silent or the column is off, in which case
they return False (not delivered).
"""

from __future__ import annotations

import math
import struct
from typing import Any

from firmware import config as fw_config
from firmware.controller import Controller
from firmware.energy_store import EnergyStore
from firmware.session import EV_SESSION_START, EV_SESSION_STOP
from firmware.status_names import CP_NAMES, ERROR_NAMES, LIMIT_SOURCE_NAMES, STATUS_NAMES
from hil.replay.target import ColumnInputs, ColumnOutputs, TargetError

PP_OPEN_OHMS = 100_000  # no cable: far above firmware.pilot_decode.PP_OPEN_OHMS
_F32 = struct.Struct(">f")
OFF_STATUS = "Unavailable"  # what a column without power reports (nothing, really)


def meter_register_wh(energy_wh: float) -> int:
    """The import register as the firmware reads it: float32 kWh, x1000, rounded half away."""
    kwh = _F32.unpack(_F32.pack(energy_wh / 1000.0))[0]
    wh = kwh * 1000.0
    return math.floor(wh + 0.5) if wh >= 0 else -math.floor(-wh + 0.5)


def _da(amps: float) -> int:
    """Amps as the SDM driver reports them: deci-amps rounded half away from zero."""
    if amps >= 0:
        return int(amps * 10.0 + 0.5)
    return -int(-amps * 10.0 + 0.5)


def _limit_da(amps: float) -> int:
    """A gateway current in whole deci-amps, never rounded up (the column may not get more)."""
    if not math.isfinite(amps) or amps <= 0:
        return 0
    return math.floor(amps * 10.0 + 1e-6)


class MemFlash:
    """The energy store's two slots in RAM (firmware/flash.py's interface)."""

    def __init__(self) -> None:
        self.slots: list[bytes | None] = [None, None]
        self.writes = 0

    def read(self, slot: int) -> bytes | None:
        return self.slots[slot]

    def write(self, slot: int, data: bytes | bytearray | memoryview) -> None:
        self.slots[slot] = bytes(data)
        self.writes += 1


class SimColumn:
    """One column's firmware core, energy register and meter driver stand-in."""

    def __init__(self, column_id: str, cfg: dict[str, Any]) -> None:
        self.id = column_id
        self.cfg = cfg
        self.flash = MemFlash()
        self.stale_ms = int(cfg["meter_stale_s"]) * 1000
        self.silent = False
        self.down_until: int | None = None
        self.boots = 0
        self.steps = 0
        self.sessions = 0
        self.inputs: ColumnInputs | None = None
        self.ctl: Controller | None = None
        self._boot(0)

    def _boot(self, now_ms: int) -> None:
        """What App.__init__ does at power-up: load the store, close a session cut by power loss."""
        cfg = self.cfg
        self.store = store = EnergyStore(
            self.flash,
            quantum_wh=int(cfg["energy_quantum_wh"]),
            quantum_ms=int(cfg["energy_quantum_s"]) * 1000,
        )
        store.load()
        self.ctl = ctl = Controller(cfg, store.session_id + 1)
        if store.session_active:
            ctl.record_power_loss(store.session_id, store.energy_wh)
            store.stop_session(now_ms)
        self.energy_wh = store.energy_wh
        self.boots += 1
        self.down_until = None
        self._meter_prev_wh = -1
        self._fresh = False  # the meter driver: no good cycle yet
        self._last_ok_ms = 0
        self._i_da = [0, 0, 0]
        self._cur_seen: tuple[float, float, float] | None = None
        self._wh_seen = -1.0
        self._reading = 0
        self._key: tuple[Any, ...] = ()
        self._out = self._outputs()

    # -- the step (firmware/app.py control_task + _account_energy + _drain_events) -----------
    def step(self, now_ms: int) -> None:
        if self.down_until is not None:
            if now_ms < self.down_until:
                return
            self._boot(now_ms)
        inp = self.inputs
        ctl = self.ctl
        if inp is None or ctl is None:
            return
        reading = -1
        if inp.meter_ok:
            i = self._i_da
            cur = inp.current_a
            if cur != self._cur_seen:
                i[0] = _da(cur[0])
                i[1] = _da(cur[1])
                i[2] = _da(cur[2])
                self._cur_seen = cur
            if inp.energy_wh != self._wh_seen:
                self._wh_seen = inp.energy_wh
                self._reading = meter_register_wh(inp.energy_wh)
            reading = self._reading
            self._last_ok_ms = now_ms
            self._fresh = True
        elif self._fresh and now_ms - self._last_ok_ms >= self.stale_ms:
            self._fresh = False
        i = self._i_da
        low = -12000 if inp.diode else -abs(inp.cp_high_mv)
        pp = inp.pp_ohms if inp.pp_ohms >= 0 else PP_OPEN_OHMS
        ctl.step(
            now_ms,
            inp.cp_high_mv,
            low,
            pp,
            i[0],
            i[1],
            i[2],
            self._fresh,
            self.energy_wh,
            inp.rcd_tripped,
            ctl.contactor_on,
        )
        if reading >= 0:
            if self._meter_prev_wh >= 0 and reading > self._meter_prev_wh:
                self.energy_wh += reading - self._meter_prev_wh
                self.store.update(self.energy_wh, now_ms)
            self._meter_prev_wh = reading
        events = ctl.events
        while len(events):
            kind = events.pop()[0]
            if kind == EV_SESSION_START:
                self.store.start_session(now_ms)
                self.sessions += 1
            elif kind == EV_SESSION_STOP:
                self.store.stop_session(now_ms)
        self.steps += 1
        self._out = self._outputs()

    def _outputs(self) -> ColumnOutputs:
        ctl = self.ctl
        if ctl is None or self.down_until is not None:
            return ColumnOutputs(
                duty=0,
                offered_a=0.0,
                contactor=False,
                status=OFF_STATUS,
                cp_state="E",
                limit_source="safety",
                failsafe_active=True,
                energy_wh=self.store.energy_wh,
                error="NoError",
            )
        key = (
            ctl.duty,
            ctl.offered_da,
            ctl.contactor_on,
            ctl.status,
            ctl.cp_state,
            ctl.limit_source,
            ctl.failsafe_active,
            self.energy_wh,
            ctl.error,
        )
        if key == self._key:
            return self._out  # unchanged: the same object (the engine relies on nothing else)
        self._key = key
        return ColumnOutputs(
            duty=ctl.duty,
            offered_a=ctl.offered_da / 10.0,
            contactor=ctl.contactor_on,
            status=STATUS_NAMES[ctl.status],
            cp_state=CP_NAMES[ctl.cp_state],
            limit_source=LIMIT_SOURCE_NAMES[ctl.limit_source],
            failsafe_active=ctl.failsafe_active,
            energy_wh=self.energy_wh,
            error=ERROR_NAMES[ctl.error],
        )

    @property
    def outputs(self) -> ColumnOutputs:
        return self._out

    def assign(self, now_ms: int, limit_a: float, validity_s: int, failsafe_a: float | None) -> bool:
        ctl = self.ctl
        if self.silent or ctl is None or self.down_until is not None:
            return False
        if failsafe_a is not None:
            ctl.set_failsafe(_limit_da(failsafe_a))
        return ctl.assign_limit(_limit_da(limit_a), max(0, int(validity_s)), now_ms) >= 0

    def cut(self, now_ms: int, duration_ms: int) -> None:
        """Power gone: the RAM (controller, register, store object) is lost; the flash stays."""
        end = now_ms + max(0, int(duration_ms))
        if self.down_until is not None:
            self.down_until = max(self.down_until, end)
            return
        self.ctl = None
        self.down_until = end
        self._out = self._outputs()


class SimTarget:
    """The `sim` target (hil.replay.target.Target): columns keyed by id, stepped on demand."""

    realtime = False
    name = "sim"

    def __init__(self) -> None:
        self.columns: dict[str, SimColumn] = {}
        self._presented: list[SimColumn] = []

    def start(self, columns: dict[str, dict[str, object]]) -> None:
        for column_id, raw in columns.items():
            cfg, errors = fw_config.check(dict(raw))
            if errors:
                raise TargetError("column %s: invalid firmware config: %s" % (column_id, "; ".join(errors)))
            self.columns[column_id] = SimColumn(column_id, cfg)

    def _col(self, column_id: str) -> SimColumn:
        col = self.columns.get(column_id)
        if col is None:
            raise TargetError("no column %r on this target" % column_id)
        return col

    def set_inputs(self, column_id: str, now_ms: int, inputs: ColumnInputs) -> None:
        col = self._col(column_id)
        col.inputs = inputs
        self._presented.append(col)

    def advance(self, to_ms: int) -> None:
        presented = self._presented
        for col in presented:
            col.step(to_ms)
        presented.clear()

    def outputs(self, column_id: str) -> ColumnOutputs:
        return self._col(column_id).outputs

    def assign_limit(
        self, column_id: str, now_ms: int, limit_a: float, validity_s: int, failsafe_a: float | None = None
    ) -> bool:
        return self._col(column_id).assign(now_ms, limit_a, validity_s, failsafe_a)

    def gateway_silent(self, column_id: str, now_ms: int, silent: bool) -> None:
        self._col(column_id).silent = bool(silent)

    def power_cut(self, column_id: str, now_ms: int, duration_ms: int) -> None:
        self._col(column_id).cut(now_ms, duration_ms)

    def stats(self) -> dict[str, object]:
        cols = self.columns.values()
        return {
            "controller_steps": sum(c.steps for c in cols),
            "boots": sum(c.boots for c in cols),
            "flash_writes": sum(c.flash.writes for c in cols),
            "sessions": sum(c.sessions for c in cols),
        }

    def close(self) -> None:
        self._presented.clear()
