"""The `mpy` replay target: the real firmware in the MicroPython unix port, in real time.

A scripted session through the Target contract only (set_inputs, advance, outputs,
assign_limit, gateway_silent, power_cut), the way the replay engine drives it: a car
plugs in and charges under the gateway's limit, the gateway lowers the limit, the power
fails mid-session, and the gateway goes silent. `run_session` is shared with the
`serial:` target's test (test_serial_target.py), which drives the same firmware over a
pty.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from firmware import pilot, regmap
from firmware.app import CONTROL_PERIOD_MS
from hil.bus_faults import BusFaults
from hil.replay.column_link import MAX_HEARTBEAT_PERIOD_S, TargetError
from hil.replay.mpy import MpyTarget
from hil.replay.realtime import RealtimeColumns
from hil.replay.target import ColumnInputs, ColumnOutputs

HEARTBEAT_TIMEOUT_S = 10
QUANTUM_WH = 25
LINK_BAUD = 19200
CONFIG: dict[str, Any] = {
    "column_id": "col-1", "bus_address": 4, "phases": 3,
    "hardware_rating_a": 32, "installation_rating_a": 25, "failsafe_a": 8,
    "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S, "energy_quantum_wh": QUANTUM_WH,
    "meter": {"type": "sdm630", "address": 1, "baud": 9600},
    "link": {"mode": "modbus-rtu", "baud": LINK_BAUD},
}
# A lower limit reaches the pilot within one control period plus the link time: the FC16
# request and its reply on the wire (15 + 8 bytes of 11 bits), the firmware's 2 ms frame
# gap, and an allowance for scheduling two processes on a busy test machine.
LINK_TIME_S = (15 + 8) * 11 / LINK_BAUD + 0.002 + 0.1
FOLLOW_BUDGET_S = CONTROL_PERIOD_MS / 1000 + LINK_TIME_S


class Session:
    """Trace time for a test: steps of `step_ms`, paced by the target's advance()."""

    def __init__(self, target: RealtimeColumns, column_id: str) -> None:
        self.target = target
        self.cid = column_id
        self.now = 0
        self.cp_mv = 12000
        self.current_a = 0.0
        self.energy_wh = 0.0

    def inputs(self, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self, key, value)
        i = self.current_a
        self.target.set_inputs(self.cid, self.now, ColumnInputs(
            cp_high_mv=self.cp_mv, diode=True, pp_ohms=220 if self.cp_mv < 12000 else -1,
            current_a=(i, i, i), voltage_v=(230.0, 230.0, 230.0), energy_wh=self.energy_wh))

    def step(self, ms: int = 50) -> ColumnOutputs:
        self.now += ms
        self.target.advance(self.now)
        return self.target.outputs(self.cid)

    def wait(self, what: str, predicate: Callable[[ColumnOutputs], bool], within_ms: int) -> ColumnOutputs:
        end = self.now + within_ms
        out = self.target.outputs(self.cid)
        while not predicate(out):
            if self.now >= end:
                raise AssertionError("no %s within %d ms; last outputs %s" % (what, within_ms, out))
            out = self.step()
        return out


def _follow_time_s(target: RealtimeColumns, cid: str, predicate: Callable[[ColumnOutputs], bool]) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2.0:
        if predicate(target.outputs(cid)):
            return time.monotonic() - t0
        time.sleep(0.002)
    raise AssertionError("the offer did not follow within 2 s: %s" % (target.outputs(cid),))


def run_session(target: RealtimeColumns, cid: str) -> None:
    """The scripted session; `target` is started with CONFIG as column `cid`."""
    s = Session(target, cid)
    s.inputs()
    out = s.wait("boot", lambda o: o.status == "Available", 3000)
    assert out.failsafe_active  # no gateway limit yet
    assert out.offered_a == 0 and not out.contactor

    # The gateway assigns 16 A (failsafe 8 A); a car plugs in and asks to charge.
    target.assign_limit(cid, s.now, 16.0, 120, failsafe_a=8.0)
    s.inputs(cp_mv=9000)
    s.wait("Preparing with 16 A offered", lambda o: o.status == "Preparing" and o.offered_a == 16.0, 2000)
    s.inputs(cp_mv=6000)
    # (The pilot and contactor come from the board as they change; the registers behind
    # cp_state, limit_source and energy are polled, so they may lag by a poll period.)
    out = s.wait("charging", lambda o: o.status == "Charging" and o.contactor and o.cp_state == "C", 3000)
    assert out.limit_source == "gateway" and not out.failsafe_active
    assert out.duty == pilot.duty_for_current_da(160)
    assert out.error == "NoError"

    # It draws 15 A per phase; the meter's import register climbs 3 Wh every 100 ms and
    # the column's own energy register follows it Wh for Wh.
    for _ in range(20):
        s.inputs(current_a=15.0, energy_wh=s.energy_wh + 3)
        s.step(100)
    out = s.wait("the energy register to catch up", lambda o: o.energy_wh == 60, 3000)

    # The gateway lowers the limit: the pilot follows within a control period + link time.
    target.assign_limit(cid, s.now, 10.0, 120, failsafe_a=8.0)
    took = _follow_time_s(target, cid, lambda o: o.offered_a == 10.0
                          and o.duty == pilot.duty_for_current_da(100))
    assert took <= FOLLOW_BUDGET_S, "the offer took %.3f s to follow" % took
    assert target.outputs(cid).limit_source == "gateway"
    s.inputs(current_a=9.5)  # the car follows

    # Power cut mid-session, 1.5 s: the column goes dark, then boots from its energy store.
    before = target.outputs(cid).energy_wh
    target.power_cut(cid, s.now, 1500)
    out = target.outputs(cid)
    assert not out.contactor and out.offered_a == 0 and out.status == "Unavailable"
    assert target.assign_limit(cid, s.now, 12.0, 120) is False  # nobody there to take it
    s.step(1000)
    assert target.outputs(cid).status == "Unavailable"  # still off half-way
    out = s.wait("charging again under the gateway's limit after the reboot",
                 lambda o: o.status == "Charging" and o.limit_source == "gateway" and not o.failsafe_active,
                 8000)
    assert before - QUANTUM_WH <= out.energy_wh <= before, (before, out.energy_wh)
    # The gateway re-sent its assignment (what was left of its validity) to the rebooted
    # column; the offer is the gateway's 10 A, or still the 8 A failsafe it started the
    # new session with when the assignment came later (increases wait
    # pwm_min_change_interval_s).
    assert out.offered_a in (8.0, 10.0)
    # The outputs come from the board's tap at once; the registers from the next poll.
    regs = target.registers(cid)
    for _ in range(30):
        if regs is not None and regs[regmap.IR_ASSIGNED_REMAINING] > 0:
            break
        s.step(100)
        regs = target.registers(cid)
    assert regs is not None and 100 <= regs[regmap.IR_ASSIGNED_REMAINING] < 120, regs
    stats = target.stats(cid)
    assert stats.reboots == 1 and stats.reasserts == 1

    # The gateway goes silent: the column holds the assignment until its heartbeat
    # timeout runs out, then falls back to the failsafe limit.
    hb_period = min(MAX_HEARTBEAT_PERIOD_S, HEARTBEAT_TIMEOUT_S / 4)
    writes = target.stats(cid).writes_ok
    target.gateway_silent(cid, s.now, True)
    t_silent = time.monotonic()
    assert target.assign_limit(cid, s.now, 12.0, 120) is False  # a silent link carries nothing
    out = s.wait("failsafe", lambda o: o.failsafe_active, (HEARTBEAT_TIMEOUT_S + 2) * 1000)
    took = time.monotonic() - t_silent
    assert HEARTBEAT_TIMEOUT_S - hb_period - 0.3 <= took <= HEARTBEAT_TIMEOUT_S + 0.5, took
    assert out.limit_source == "failsafe" and out.offered_a == 8.0 and out.contactor
    s.inputs(current_a=7.5)  # the car follows
    assert target.stats(cid).writes_ok == writes  # nothing was written while silent

    # The link comes back: the gateway's limit applies again.
    target.gateway_silent(cid, s.now, False)
    out = s.wait("the gateway's limit again", lambda o: not o.failsafe_active
                 and o.limit_source == "gateway", 2000)
    stats = target.stats(cid)
    assert stats.writes_failed == 0 and stats.reads_failed == 0 and stats.writes_rejected == 0
    assert stats.dropped == 2


def test_a_session_on_the_micropython_firmware() -> None:
    target = MpyTarget(interp="micropython", speed=1.0)
    try:
        target.start({"col-1": CONFIG})
        run_session(target, "col-1")
        assert target.max_lag_ms < 500
    finally:
        target.close()
    assert target.vcolumn("col-1").proc is None  # close() stopped the firmware


def test_a_column_that_never_answers_is_a_clear_error() -> None:
    silent = BusFaults(silent=True)  # the column's replies never reach the harness
    target = MpyTarget(interp="cpython", boot_timeout_s=1.5, timeout_s=0.05, retries=0, link_faults=silent)
    try:
        with pytest.raises(TargetError) as err:
            target.start({"col-1": CONFIG})
    finally:
        target.close()
    message = str(err.value)
    assert "col-1" in message and "bus address 4" in message and "does not answer" in message
    assert "vcolumn: ready" in message  # the firmware's own output says it did boot
    assert silent.counts().silenced > 0


def test_a_firmware_that_dies_is_reported_with_its_last_words() -> None:
    target = MpyTarget(interp="cpython")
    try:
        target.start({"col-1": CONFIG})
        proc = target.vcolumn("col-1").proc
        assert proc is not None
        proc.kill()   # not a power cut the harness made: a crash
        proc.wait(timeout=5)
        with pytest.raises(TargetError, match="col-1: its firmware stopped") as err:
            target.outputs("col-1")
    finally:
        target.close()
    assert "vcolumn: ready" in str(err.value)
