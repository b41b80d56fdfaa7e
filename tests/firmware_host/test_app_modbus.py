"""The whole firmware app as a virtual column, on CPython and on the MicroPython unix port.

Real parts on every edge: a simulated SDM630 (pymodbus) on the meter line, a pymodbus
client playing the gateway on the RS-485 link, and the board's analogue world (control
pilot, contactor feedback) driven over a third serial line. Nothing in the firmware is
replaced: it is the same app a board runs from main.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymodbus.client import ModbusSerialClient

from firmware import pilot, regmap, status
from hil.rig.firmware_proc import INTERPRETERS
from hil.rig.vcolumn import VirtualColumn
from tools.firmware_build import build

UNIT = 3
CONFIG = {
    "column_id": "test-col-3", "bus_address": UNIT, "phases": 3,
    "hardware_rating_a": 32, "installation_rating_a": 25, "failsafe_a": 10,
    "meter": {"type": "sdm630", "address": 1, "baud": 9600},
    "link": {"mode": "modbus-rtu", "baud": 19200},
}


class Column:
    """A virtual column and a pymodbus client playing the gateway on its RS-485 link."""

    def __init__(self, vcol: VirtualColumn, client: ModbusSerialClient) -> None:
        self.vcol = vcol
        self.client = client
        self.meter = vcol.meter
        self.board = vcol.board
        self.outputs = vcol.outputs

    def inputs(self) -> list[int]:
        reply = self.client.read_input_registers(0, count=regmap.INPUT_COUNT, device_id=UNIT)
        assert not reply.isError(), reply
        return list(reply.registers)

    def wait_for(self, what: str, predicate, timeout_s: float = 10.0):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            regs = self.inputs()
            last = (regs, self.outputs())
            if predicate(*last):
                return last
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; last registers/outputs: {last}")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The firmware compiled with mpy-cross: MicroPython loads it as a board would."""
    return build(out=tmp_path_factory.mktemp("bundle")).root


def _start_column(interp: str, tmp_path: Path, config: dict[str, object], bundle: Path) -> Iterator[Column]:
    with VirtualColumn(interp, tmp_path / "column", config, bundle=bundle) as vcol:
        vcol.meter.set_load([0.0, 0.0, 0.0])
        assert vcol.link_path is not None
        client = ModbusSerialClient(vcol.link_path, baudrate=19200, timeout=1, retries=2)
        try:
            assert client.connect()
            yield Column(vcol, client)
        finally:
            client.close()
    print(vcol.output.decode(errors="replace")[-3000:])


@pytest.fixture(params=INTERPRETERS)
def column(request: pytest.FixtureRequest, tmp_path: Path, bundle: Path) -> Iterator[Column]:
    yield from _start_column(request.param, tmp_path, CONFIG, bundle)


def test_a_charging_session_under_a_gateway_limit(column: Column) -> None:
    regs, _ = column.wait_for("boot", lambda r, o: r[regmap.IR_STATUS] == status.ST_AVAILABLE)
    assert regs[regmap.IR_BUS_ADDRESS] == UNIT
    assert regs[regmap.IR_HARDWARE_RATING] == 320
    assert regs[regmap.IR_FAILSAFE_LIMIT] == 100  # config failsafe until the gateway assigns one

    # The gateway assigns 16 A for 60 s; the car plugs in (B) and asks to charge (C).
    assert not column.client.write_registers(regmap.HR_ASSIGNED_LIMIT, [160, 60], device_id=UNIT).isError()
    column.board(cp_mv=9000, diode=1, pp_ohms=220)  # a 32 A cable
    column.wait_for("Preparing", lambda r, o: r[regmap.IR_STATUS] == status.ST_PREPARING)
    column.board(cp_mv=6000)
    regs, out = column.wait_for("contactor closed", lambda r, o: o.get("contactor") == 1
                                and r[regmap.IR_STATUS] == status.ST_CHARGING)
    assert regs[regmap.IR_OFFERED_CURRENT] == 160
    assert regs[regmap.IR_LIMIT_SOURCE] == status.SRC_GATEWAY
    assert out["duty"] == pilot.duty_for_current_da(160)
    assert 0 < regs[regmap.IR_ASSIGNED_REMAINING] <= 60

    # The car draws 15 A per phase; the meter reading reaches the registers.
    column.meter.set_load([15.0, 15.0, 15.0])
    regs, _ = column.wait_for("meter current", lambda r, o: r[regmap.IR_CURRENT_L1] == 150)
    assert regs[regmap.IR_VOLTAGE_L1] == 2300

    # The gateway lowers the limit: the pilot follows at once.
    assert not column.client.write_registers(regmap.HR_ASSIGNED_LIMIT, [100, 60], device_id=UNIT).isError()
    column.wait_for("lower duty", lambda r, o: o.get("duty") == pilot.duty_for_current_da(100)
                    and r[regmap.IR_OFFERED_CURRENT] == 100)

    # Unplug: contactor opens, the column is available again.
    column.meter.set_load([0.0, 0.0, 0.0])
    column.board(cp_mv=12000)
    column.wait_for("unplugged", lambda r, o: o.get("contactor") == 0
                    and r[regmap.IR_STATUS] == status.ST_AVAILABLE)


def test_out_of_range_limit_is_refused_and_changes_nothing(column: Column) -> None:
    column.wait_for("boot", lambda r, o: r[regmap.IR_STATUS] == status.ST_AVAILABLE)
    reply = column.client.write_registers(regmap.HR_ASSIGNED_LIMIT, [900, 60], device_id=UNIT)
    assert reply.isError() and reply.exception_code == 3
    held = column.client.read_holding_registers(0, count=regmap.HOLDING_COUNT, device_id=UNIT)
    assert held.registers[regmap.HR_ASSIGNED_LIMIT] == 0
    regs = column.inputs()
    assert regs[regmap.IR_ASSIGNED_REMAINING] == 0
    assert regs[regmap.IR_LIMIT_SOURCE] != status.SRC_GATEWAY


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_a_broken_config_boots_safe_and_says_why(interp: str, tmp_path: Path, bundle: Path) -> None:
    broken = dict(CONFIG, phases=2)
    for col in _start_column(interp, tmp_path, broken, bundle):
        regs, _ = col.wait_for("config fault", lambda r, o: r[regmap.IR_ERROR] == status.ERR_CONFIG)
        assert regs[regmap.IR_ERROR_FLAGS] & regmap.FLAG_CONFIG
        col.board(cp_mv=6000, diode=1)
        time.sleep(0.5)
        assert col.outputs().get("contactor", 0) == 0
        assert col.inputs()[regmap.IR_OFFERED_CURRENT] == 0
        reply = col.client.write_registers(regmap.HR_ASSIGNED_LIMIT, [160, 60], device_id=UNIT)
        assert reply.isError() and reply.exception_code == 4
