"""What the realtime targets (`mpy`, `serial:`) share: pacing to the wall clock, the
board and meter inputs, the outputs, the gateway's commands, power cuts and link faults,
for columns reached over Modbus RTU links (hil.replay.column_link.ModbusBus).

Outputs: the pilot, contactor and status come from the board line as they change (when
there is one; else the duty is derived from the offered current register and the
contactor from the status, closed while Charging: approximations); CP state, limit
source, failsafe, energy and error come from the input registers, at most poll_s plus
one transaction old. While a column is off (a power cut) or has not answered since it
booted: no pilot (duty 10000, 0 A), contactor open, status Unavailable, CP state E, the
last energy register seen. (`mpy` and `site` read all of it from the board line's tap
instead: hil.replay.tap.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, overload

from firmware import pilot, regmap, regmap_tables, status, status_names
from hil.models.sdm_meter import SdmMeterModel
from hil.replay.board_io import BoardIo
from hil.replay.column_link import LinkStats, ModbusBus, TargetError
from hil.replay.target import ColumnInputs, ColumnOutputs

if TYPE_CHECKING:
    from hil.bus_faults import BusFaults

PowerSwitch = Callable[[str, bool], None]
# A trace's noise `rate` is per delivery; on the wire it becomes a per-byte rate that hits
# an assignment exchange (FC16 request of 15 bytes + its 8-byte reply) with that chance.
_EXCHANGE_BYTES = 23


def _name(names: tuple[str, ...], code: int) -> str:
    return names[code] if 0 <= code < len(names) else "unknown(%d)" % code


def outputs_from(regs: list[int] | None, board: Mapping[str, Any] | None,
                 last_energy_wh: int) -> ColumnOutputs:
    """ColumnOutputs from the input registers and the board line (either may be missing).
    No registers: the column is off or still booting (no pilot, contactor open)."""
    if regs is None:
        return ColumnOutputs(duty=pilot.DUTY_NO_CURRENT, offered_a=0.0, contactor=False,
                             status=status_names.STATUS_NAMES[status.ST_UNAVAILABLE],
                             cp_state=status_names.CP_NAMES[status.CP_E],
                             limit_source=status_names.LIMIT_SOURCE_NAMES[status.SRC_SAFETY],
                             failsafe_active=True, energy_wh=last_energy_wh,
                             error=status_names.ERROR_NAMES[status.ERR_NONE])
    if board and "duty" in board:
        duty = int(board["duty"])
        offered_da = int(board.get("offered_da", 0))
        contactor = bool(board.get("contactor", 0))
        st = int(board.get("status", regs[regmap.IR_STATUS]))
    else:
        offered_da = regs[regmap.IR_OFFERED_CURRENT]
        duty = pilot.duty_for_current_da(offered_da) if offered_da > 0 else pilot.DUTY_NO_CURRENT
        st = regs[regmap.IR_STATUS]
        contactor = st == status.ST_CHARGING
    return ColumnOutputs(duty=duty, offered_a=offered_da / 10, contactor=contactor,
                         status=_name(status_names.STATUS_NAMES, st),
                         cp_state=_name(status_names.CP_NAMES, regs[regmap.IR_CP_STATE]),
                         limit_source=_name(status_names.LIMIT_SOURCE_NAMES, regs[regmap.IR_LIMIT_SOURCE]),
                         failsafe_active=bool(regs[regmap.IR_ERROR_FLAGS] & regmap.FLAG_FAILSAFE_ACTIVE),
                         energy_wh=regmap_tables.get_u32(regs, regmap.IR_ENERGY),
                         error=_name(status_names.ERROR_NAMES, regs[regmap.IR_ERROR]))


@dataclass
class Column:
    """One column as a realtime target holds it."""

    column_id: str
    config: dict[str, Any]
    bus: ModbusBus | None    # None: the harness is not the gateway on the link (hil.replay.site_target)
    board: BoardIo | None = None
    meter: SdmMeterModel | None = None
    power: Callable[[bool], None] | None = None
    powered: bool = True
    power_on_at_ms: int | None = None
    board_state: dict[str, int] = field(default_factory=dict)
    meter_state: tuple[Any, ...] | None = None
    meter_ok: bool = True
    last_energy_wh: int = 0
    faults: BusFaults | None = None      # a faulty stretch of wire on the link, if any
    noise: list[tuple[int, str, float, int]] = field(default_factory=list)  # (until, kind, rate, delay)


def limit_registers(limit_a: float, failsafe_a: float | None) -> tuple[int, int | None]:
    """Amps -> deci-amps within the register's range (a gateway caps what it sends)."""
    def da(amps: float) -> int:
        return max(0, min(regmap.MAX_LIMIT_DA, round(amps * 10)))
    return da(limit_a), (None if failsafe_a is None else da(failsafe_a))


class RealtimeColumns:
    """Pacing, inputs, outputs, link commands and power cuts for columns reached over
    Modbus RTU links; subclasses bring the columns up in `start`."""

    realtime = True

    def __init__(self, speed: float | str | None = 1.0, boot_timeout_s: float = 20.0) -> None:
        if speed in (None, "max") or (isinstance(speed, (int, float)) and not 0 < speed < float("inf")):
            self.speed: float | None = None    # unpaced: advance() never waits
        else:
            self.speed = float(speed)          # type: ignore[arg-type]
        self.boot_timeout_s = boot_timeout_s
        self.columns: dict[str, Column] = {}
        self.max_lag_ms = 0
        self._t0 = time.monotonic()

    def _column(self, column_id: str) -> Column:
        try:
            return self.columns[column_id]
        except KeyError:
            raise TargetError("unknown column %r (this target has %s)"
                              % (column_id, ", ".join(sorted(self.columns)) or "none")) from None

    @staticmethod
    def _bus(col: Column) -> ModbusBus:
        if col.bus is None:
            raise TargetError("column %s: the harness has no link of its own to it" % col.column_id)
        return col.bus

    def _wait_booted(self) -> None:
        deadline = time.monotonic() + self.boot_timeout_s
        for col in self.columns.values():
            self._bus(col).wait_image(col.column_id, max(0.1, deadline - time.monotonic()))
        self._t0 = time.monotonic()   # trace time 0: every column answers

    # -- Target ------------------------------------------------------------------------------
    def set_inputs(self, column_id: str, now_ms: int, inputs: ColumnInputs) -> None:
        col = self._column(column_id)
        wanted = {"cp_mv": int(inputs.cp_high_mv), "diode": int(bool(inputs.diode)),
                  "pp_ohms": int(inputs.pp_ohms), "rcd": int(bool(inputs.rcd_tripped))}
        changed = {k: v for k, v in wanted.items() if col.board_state.get(k) != v}
        col.board_state.update(wanted)
        if changed and col.board is not None and col.powered:
            self._to_board(col, changed)
        meter = col.meter
        if meter is None:
            return
        state = (tuple(inputs.current_a), tuple(inputs.voltage_v), inputs.energy_wh)
        if state != col.meter_state:
            col.meter_state = state
            for ph in range(meter.phases):
                meter.set_phase(ph, voltage_v=inputs.voltage_v[ph], current_a=inputs.current_a[ph])
            meter.set_energy(import_kwh=inputs.energy_wh / 1000.0)
        if inputs.meter_ok != col.meter_ok:
            col.meter_ok = inputs.meter_ok
            meter.set_fault(None if inputs.meter_ok else "no_reply")

    def _to_board(self, col: Column, inputs: dict[str, int]) -> None:
        assert col.board is not None
        try:
            col.board.board(**inputs)
        except OSError as exc:  # a full line: nobody reads it
            self._check_alive(col)
            raise TargetError("column %s: its board's I/O line takes no input (%s)"
                              % (col.column_id, exc.strerror or exc)) from None

    def _check_alive(self, col: Column) -> None:
        """Raise TargetError when the column is known to have died (subclasses know how)."""

    def _wall(self, ms: int) -> float:
        assert self.speed is not None
        return self._t0 + ms / 1000.0 / self.speed

    def _next_event(self, to_ms: int) -> tuple[int, int, Column] | None:
        """The earliest power-on (kind 0) or end of bus noise (kind 1) at or before to_ms."""
        best: tuple[int, int, Column] | None = None
        for col in self.columns.values():
            if col.power_on_at_ms is not None and col.power_on_at_ms <= to_ms \
                    and (best is None or col.power_on_at_ms < best[0]):
                best = (col.power_on_at_ms, 0, col)
            for until, _kind, _rate, _delay in col.noise:
                if until <= to_ms and (best is None or until < best[0]):
                    best = (until, 1, col)
        return best

    def advance(self, to_ms: int) -> None:
        """Wait until the wall clock reaches trace time to_ms (at `speed`), switching
        columns back on and ending bus noise at their own times on the way."""
        while True:
            event = self._next_event(to_ms)
            if event is None:
                break
            at_ms, kind, col = event
            self._sleep_until(at_ms)
            if kind == 0:
                self._power_on(col)
            else:
                self._apply_noise(col, at_ms)
        self._sleep_until(to_ms)

    def _sleep_until(self, ms: int) -> None:
        if self.speed is None:
            return
        delay = self._wall(ms) - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            self.max_lag_ms = max(self.max_lag_ms, int(-delay * 1000))

    def outputs(self, column_id: str) -> ColumnOutputs:
        col = self._column(column_id)
        if col.powered:
            self._check_alive(col)
        regs = self._bus(col).image(column_id) if col.powered else None
        board = col.board.outputs() if col.board is not None else None
        out = outputs_from(regs, board, col.last_energy_wh)
        col.last_energy_wh = out.energy_wh
        return out

    def assign_limit(self, column_id: str, now_ms: int, limit_a: float, validity_s: int,
                     failsafe_a: float | None = None) -> bool:
        """Queue the assignment on the column's link (written at once, retried until the
        column takes it). Returns False when it cannot get there: the gateway is silent
        or the column is off (the engine's gateway then counts it as not delivered)."""
        col = self._column(column_id)
        limit_da, failsafe_da = limit_registers(limit_a, failsafe_a)
        return self._bus(col).assign(column_id, limit_da, max(0, min(0xFFFF, int(validity_s))), failsafe_da)

    def gateway_silent(self, column_id: str, now_ms: int, silent: bool) -> None:
        col = self._column(column_id)
        self._bus(col).set_silent(column_id, silent)

    def power_cut(self, column_id: str, now_ms: int, duration_ms: int) -> None:
        col = self._column(column_id)
        if col.power is None:
            raise TargetError("column %s: a power cut needs a power switch (power=...)" % column_id)
        if col.powered:
            if col.bus is not None:
                col.bus.set_powered(column_id, False)
            col.power(False)
            col.powered = False
        col.power_on_at_ms = now_ms + max(0, int(duration_ms))

    def _power_on(self, col: Column) -> None:
        col.power_on_at_ms = None
        if col.powered or col.power is None:
            return
        col.power(True)
        col.powered = True
        if col.board is not None and col.board_state:
            self._to_board(col, col.board_state)  # the board boots with its inputs as they are now
        if col.bus is not None:
            col.bus.set_powered(col.column_id, True)

    def link_fault(self, column_id: str | None, now_ms: int, kind: str, duration_ms: int,
                   value: Mapping[str, Any]) -> bool:
        """Bus noise on the columns' links for duration_ms (the engine's optional hook):
        drop / corrupt bytes at the per-byte rate that hits an assignment exchange with
        probability `rate` (default 0.5), or delay chunks by `delay_ms` (default 1000)
        with probability `rate`. True when every column concerned has a faulty wire on
        its link (the `mpy` target's); False leaves the fault to the engine."""
        if kind not in ("drop", "corrupt", "delay"):
            return False
        cols = [self._column(column_id)] if column_id is not None else list(self.columns.values())
        if not cols or any(col.faults is None for col in cols):
            return False
        rate = value.get("rate", 0.5)
        delay_ms = value.get("delay_ms", 1000)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise TargetError("link.fault at %.3f s: rate must be a number from 0 to 1, got %r"
                              % (now_ms / 1000, rate))
        if isinstance(delay_ms, bool) or not isinstance(delay_ms, int) or delay_ms < 0:
            raise TargetError("link.fault at %.3f s: delay_ms must be an int >= 0, got %r"
                              % (now_ms / 1000, delay_ms))
        for col in cols:
            col.noise.append((now_ms + max(0, int(duration_ms)), kind, float(rate), delay_ms))
            self._apply_noise(col, now_ms)
        return True

    @staticmethod
    def _apply_noise(col: Column, now_ms: int) -> None:
        """Set the wire to the worst of the noise windows still open at now_ms."""
        col.noise = [n for n in col.noise if n[0] > now_ms]
        rates = {"drop": 0.0, "corrupt": 0.0, "delay": 0.0}
        delay_s = 0.0
        for _until, kind, rate, delay_ms in col.noise:
            rates[kind] = max(rates[kind], rate)
            if kind == "delay":
                delay_s = max(delay_s, delay_ms / 1000)

        def per_byte(rate: float) -> float:
            return 1.0 - (1.0 - rate) ** (1.0 / _EXCHANGE_BYTES)

        if col.faults is not None:
            col.faults.set(drop_rate=per_byte(rates["drop"]), corrupt_rate=per_byte(rates["corrupt"]),
                           delay_rate=rates["delay"], delay_s=delay_s)

    @overload
    def stats(self, column_id: str) -> LinkStats: ...

    @overload
    def stats(self, column_id: None = None) -> dict[str, Any]: ...

    def stats(self, column_id: str | None = None) -> LinkStats | dict[str, Any]:
        """One column's link counters (reads, writes, retries, reboots...), or without a
        column id the run's figures for a report: totals, per column, the pacing lag."""
        if column_id is not None:
            return self._bus(self._column(column_id)).stats(column_id)
        per = {cid: asdict(self._bus(col).stats(cid)) for cid, col in self.columns.items()}
        totals: dict[str, int] = {}
        for figures in per.values():
            for key, value in figures.items():
                if isinstance(value, int):
                    totals[key] = totals.get(key, 0) + value
        return {"link": totals, "columns": per, "max_lag_ms": self.max_lag_ms}

    def registers(self, column_id: str) -> list[int] | None:
        """The column's latest input registers (firmware.regmap IR_*), None while it is off."""
        col = self._column(column_id)
        return self._bus(col).image(column_id) if col.powered else None


